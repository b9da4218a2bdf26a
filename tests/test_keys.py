"""The key module's interface: both coders restore what they code through `encode_key` and
`decode_key`, a key names its coder, and a model's coder and tables are made once."""

import numpy as np
import pytest

from primis.config import ObfuscationConfig
from primis.errors import PrimisError
from primis.formats import KeyFile
from primis.io.pixels import IntensityMapping
from primis.keys import (
    ContextKeyCoder,
    EnumerativeKeyCoder,
    KeyCoder,
    coder_for,
    decode_key,
    encode_key,
    fit_key_model,
    key_spec,
)
from primis.keys.context import KeyModel
from primis.modelstore import load_model
from primis.obfuscation import ambiguate_maps
from primis.sharing import RateControl, reconstruct, share_image
from tests.conftest import random_code, smooth_image

M, N, K, GRID = 3, 32, 2, (5, 6)
MODES = [
    ObfuscationConfig(),  # strict: counts coded where the coder can
    ObfuscationConfig(fill=0.5),  # atoms shuffled
    ObfuscationConfig(fill=0.3, mask_signs=False, permute_atoms=False),
]


def coders(vectors: np.ndarray) -> list[KeyCoder]:
    """Both codings, the context model fitted to ``vectors``."""
    return [EnumerativeKeyCoder(), ContextKeyCoder(fit_key_model([(vectors, GRID)], K))]


@pytest.mark.parametrize("obfuscation", MODES)
@pytest.mark.parametrize("maps", [[0, 1, 2], [1], [0, 2]])
def test_keys_open_exactly_their_maps(obfuscation, maps):
    vectors = random_code(M * GRID[0] * GRID[1], N, K, seed=1)
    shown, perms = ambiguate_maps(vectors, M, K, obfuscation)
    for coder in coders(vectors):
        spec = key_spec(coder, maps, GRID, K, obfuscation, perms)
        assert spec.variable == (coder.codes_counts and obfuscation.fill == 1.0)
        assert spec.permuted == (obfuscation.fill < 1.0 and obfuscation.permute_atoms)
        payload, bits = encode_key(coder, vectors, shown, perms, spec)
        assert 0 < bits <= 8 * len(payload) + 1
        back = decode_key(coder, payload, shown, spec)
        rows = np.zeros(M, dtype=bool)
        rows[maps] = True
        opened = np.repeat(rows, GRID[0] * GRID[1])
        assert np.array_equal(back[opened], vectors[opened])
        assert not back[~opened].any()
        with pytest.raises(PrimisError):
            decode_key(coder, payload[:-1], shown, spec)


def test_a_key_naming_maps_the_public_vectors_lack_is_refused():
    vectors = random_code(M * GRID[0] * GRID[1], N, K, seed=2)
    shown, perms = ambiguate_maps(vectors, M, K, ObfuscationConfig())
    coder = EnumerativeKeyCoder()
    opens = key_spec(coder, [0], GRID, K, MODES[0], perms)
    payload, _ = encode_key(coder, vectors, shown, perms, opens)
    spec = key_spec(coder, [M], GRID, K, MODES[0], perms)
    with pytest.raises(PrimisError, match="code maps"):
        decode_key(coder, payload, shown, spec)


def test_a_key_is_read_by_the_coder_it_names():
    vectors = random_code(M * GRID[0] * GRID[1], N, K, seed=3)
    enumerative, contextual = coders(vectors)
    assert coder_for("enumerative", contextual).coding == "enumerative"
    assert coder_for("context", contextual) is contextual
    assert coder_for("enumerative", enumerative) is enumerative
    with pytest.raises(PrimisError, match="no key model"):
        coder_for("context", enumerative)


def test_enumerative_keys_price_no_atom():
    vectors = random_code(M * GRID[0] * GRID[1], N, K, seed=4)
    costs = EnumerativeKeyCoder().atom_costs(vectors, GRID, 0.5, np.float16)
    assert costs.shape == (len(vectors), 2, N) and costs.dtype == np.float16 and not costs.any()


def test_a_models_coder_and_its_tables_are_made_once(context_model_dir, monkeypatch):
    model = load_model(context_model_dir)
    coder = model.key_coder
    assert isinstance(coder, ContextKeyCoder) and model.key_coder is coder
    cfg = model.network.config
    grid = (4, 5)
    vectors = random_code(cfg.m * grid[0] * grid[1], cfg.n, cfg.k, seed=5)
    shown, perms = ambiguate_maps(vectors, cfg.m, cfg.k, ObfuscationConfig(fill=0.5))
    spec = key_spec(coder, list(range(cfg.m)), grid, cfg.k, ObfuscationConfig(fill=0.5), perms)

    def rebuilt(*_):
        raise AssertionError("a key model was made while coding")

    monkeypatch.setattr(KeyModel, "__post_init__", rebuilt)
    payload, _ = encode_key(coder, vectors, shown, perms, spec)
    assert np.array_equal(decode_key(coder, payload, shown, spec), vectors)
    coder.atom_costs(vectors, grid)


@pytest.mark.parametrize(
    "obfuscation, maps, k",
    [
        (ObfuscationConfig(), None, None),
        (ObfuscationConfig(), None, 1),  # below the model's k
        (ObfuscationConfig(fill=0.5), [1], None),
        (ObfuscationConfig(fill=0.3, mask_signs=False), None, 1),
    ],
)
def test_context_coded_keys_restore_what_enumerative_keys_restore(
    tiny_model_dir, context_model_dir, obfuscation, maps, k
):
    plain, context = load_model(tiny_model_dir), load_model(context_model_dir)
    assert plain.key_model is None and context.key_model is not None
    pixels = (smooth_image(70, 90, 11) * 255).astype(np.uint8)
    mapping = IntensityMapping.of(pixels)
    unit = mapping.forward(pixels)
    restored = []
    for model in (plain, context):
        exact = RateControl(weight=0.0)  # the same code for both (no rate-distortion choice)
        shared = share_image(unit, mapping, model, obfuscation, k, maps, refine_steps=2, rate=exact)
        key = KeyFile.from_bytes(shared.key)
        assert key.header.coding == ("context" if model is context else "enumerative")
        assert key.header.variable_rate == (model is context and obfuscation.fill == 1.0)
        restored.append(reconstruct(shared.public, shared.key, model)[0])
    assert np.array_equal(restored[0], restored[1])


def test_an_image_too_small_for_a_key_of_128_bits_is_refused(context_model_dir):
    model = load_model(context_model_dir)
    pixels = (smooth_image(8, 8, 1) * 255).astype(np.uint8)  # one code vector per map
    mapping = IntensityMapping.of(pixels)
    with pytest.raises(PrimisError, match="too small to share"):
        share_image(mapping.forward(pixels), mapping, model, ObfuscationConfig())
