"""Tiled encoding and decoding (`primis.sharing.Tiling`) against whole-image processing, the
key sizes of rate-distortion optimised coding and rate control (`RateControl`), and sharing
with an adaptive-rate model."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from primis.config import ObfuscationConfig
from primis.errors import PrimisError
from primis.formats import KeyFile, PublicFile
from primis.io.images import read_image
from primis.io.pixels import IntensityMapping, pad_to_multiple
from primis.model import SparseTernaryAutoEncoder
from primis.modelstore import load_model, save_model
from primis.privacy import PRIVACY_MODES
from primis.sharing import (
    RATE_WEIGHT,
    RATE_WEIGHTS,
    RateControl,
    Tiling,
    _padded_region,
    _scaled,
    decode_codes,
    encode_images,
    reconstruct,
    share_image,
)
from tests.conftest import (
    TINY,
    ambiguate_cli,
    assert_clean_failure,
    cxr_images,
    run_cli,
    smooth_image,
)

WHOLE = Tiling(cells=10**6, region=10**6)


def test_tiles_cover_the_grid_once_with_their_halo():
    tiling = Tiling(cells=4, halo=2)
    covered = np.zeros((10, 7), dtype=int)
    for outer, inner in tiling.tiles((10, 7)):
        covered[inner] += 1
        for o, i, size in zip(outer, inner, (10, 7), strict=True):
            assert o.start == max(0, i.start - 2) and o.stop == min(size, i.stop + 2)
    assert (covered == 1).all()
    assert tiling.fits((8 * 8, 8 * 8), 8) and not tiling.fits((8 * 9, 8), 8)
    for bad in ({"cells": 0}, {"halo": -1}, {"cells": 8, "region": 4}):
        with pytest.raises(PrimisError):
            Tiling(**bad)


@pytest.mark.parametrize("refine_steps", [0, 3])
def test_tiled_codes_and_images_equal_whole_image_processing(tiny_model_dir, refine_steps):
    torch.manual_seed(0)
    model = load_model(tiny_model_dir)
    image = smooth_image(8 * 13 - 3, 8 * 17 - 5, seed=3).astype(np.float32)
    k = model.network.config.k
    tiled = Tiling(cells=4, halo=12)  # 4x5 tiles of at most 28x28 positions, one region
    whole_code = encode_images(model, [image], k, refine_steps, tiling=WHOLE)[0]
    tiled_code = encode_images(model, [image], k, refine_steps, tiling=tiled)[0]
    # The encoder and the decoder see less than the halo: the scores are the whole image's and
    # refinement's error and gradient, summed over tiles, are too (up to rounding, which may
    # flip a tie).
    same = (tiled_code == whole_code).all(dim=2).float().mean()
    assert same == 1.0 if refine_steps == 0 else same > 0.99
    # Without context the tiles' borders see zero padding instead of the image.
    blind = encode_images(model, [image], k, refine_steps, tiling=Tiling(cells=4, halo=0))[0]
    assert (blind == whole_code).all(dim=2).float().mean() < 0.99
    whole_image = decode_codes(model, [whole_code], tiling=WHOLE)[0]
    tiled_image = decode_codes(model, [whole_code], tiling=tiled)[0]
    np.testing.assert_allclose(tiled_image, whole_image, atol=1e-5)


def test_refinement_region_by_region_keeps_the_quality(tiny_model_dir):
    torch.manual_seed(0)
    model = load_model(tiny_model_dir)
    image = smooth_image(8 * 20, 8 * 22, seed=4).astype(np.float32)
    k = model.network.config.k
    errors = []
    tilings = (
        WHOLE,
        Tiling(cells=4, halo=6, region=8),  # 3x3 regions of 2x2 tiles
        Tiling(cells=4, halo=6, region=400),  # one region (larger than the default) of tiles
    )
    for tiling in tilings:
        code = encode_images(model, [image], k, 5, tiling=tiling)[0]
        errors.append(float(np.mean((decode_codes(model, [code], tiling=WHOLE)[0] - image) ** 2)))
    unrefined = encode_images(model, [image], k, 0, tiling=WHOLE)[0]
    before = float(np.mean((decode_codes(model, [unrefined], tiling=WHOLE)[0] - image) ** 2))
    assert all(tiled < 1.05 * errors[0] and tiled < before for tiled in errors[1:])


def test_refinement_progress_counts_every_step_and_changes_no_code(tiny_model_dir):
    model = load_model(tiny_model_dir)
    images = [smooth_image(8 * 20, 8 * 22, seed=s).astype(np.float32) for s in (4, 5)]
    small = smooth_image(40, 48, seed=6).astype(np.float32)
    k = model.network.config.k
    tiling = Tiling(cells=4, halo=2, region=8)  # the large images go in 3x3 regions each
    calls = []
    codes = encode_images(
        model, [*images, small], k, 2, tiling=tiling, progress=lambda *c: calls.append(c)
    )
    plain = encode_images(model, [*images, small], k, 2, tiling=tiling)
    assert all((a == b).all() for a, b in zip(codes, plain, strict=True))
    passes = 2 * 9 + 1  # each region of the large images, and the small one whole
    assert calls == [(done, 2 * passes) for done in range(1, 2 * passes + 1)]


def _share(model, unit, mapping, rate, refine_steps=3):
    shared = share_image(
        unit, mapping, model, model.obfuscation, refine_steps=refine_steps, rate=rate
    )
    restored = mapping.forward(reconstruct(shared.public, shared.key, model)[0])
    return shared, float(np.mean((restored - unit) ** 2))


@pytest.fixture(scope="module")
def bundled():
    """The bundled model: its key model prices atoms as on real radiographs (a tiny untrained
    model's codes are nearly constant, so weights change little there)."""
    return load_model("cxr")


@pytest.fixture
def radiograph():
    pixels = (smooth_image(160, 192, 5) * 255).astype(np.uint8)
    mapping = IntensityMapping.of(pixels)
    return mapping.forward(pixels), mapping


def test_a_rate_weight_trades_quality_for_smaller_keys(bundled, radiograph):
    model = bundled
    # Weights far enough apart that the trade shows on one image (between 0 and 0.05 the
    # rate-weighted choice, which tries one more code, may even land on a slightly better one).
    weights = (0.0, 0.1, 0.2)
    results = [_share(model, *radiograph, RateControl(weight=w)) for w in weights]
    sizes = [len(shared.key) for shared, _ in results]
    assert sizes[0] > sizes[1] > sizes[2]
    assert results[0][1] < results[1][1] < results[2][1]
    assert [shared.rate_weight for shared, _ in results] == list(weights)
    # The default: RATE_WEIGHT when refining with a key model, else 0.
    assert _share(model, *radiograph, None)[0].rate_weight == RATE_WEIGHT
    assert _share(model, *radiograph, None, refine_steps=0)[0].rate_weight == 0.0


def test_rate_control_meets_a_key_budget_or_a_quality(bundled, radiograph):
    model = bundled
    unit, mapping = radiograph
    free, _ = _share(model, unit, mapping, RateControl(weight=0.0))
    budget = 0.93 * free.key_bits_per_pixel
    shared, error = _share(model, unit, mapping, RateControl(key_bpp=budget))
    assert shared.key_bits_per_pixel <= budget
    assert shared.psnr == pytest.approx(10 * np.log10(1 / error), abs=1e-6)
    index = RATE_WEIGHTS.index(shared.rate_weight)
    assert index > 0  # weight 0 exceeds the budget; the next smaller weight does too
    smaller, _ = _share(model, unit, mapping, RateControl(weight=RATE_WEIGHTS[index - 1]))
    assert smaller.key_bits_per_pixel > budget
    # A quality: the largest weight that reaches it, and 0 (reported) where none does.
    aimed, _ = _share(model, unit, mapping, RateControl(quality=shared.psnr))
    assert aimed.psnr >= shared.psnr and aimed.rate_weight >= shared.rate_weight
    unreachable, _ = _share(model, unit, mapping, RateControl(quality=99.0))
    assert unreachable.rate_weight == 0.0 and unreachable.psnr < 99.0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"key_bpp": 0.3, "quality": 30.0}, "not both"),
        ({"weight": 0.1, "quality": 30.0}, "exclude each other"),
        ({"weight": -1.0}, ">= 0"),
        ({"key_bpp": float("nan")}, ">= 0"),
    ],
)
def test_rate_settings_are_validated(settings, message):
    with pytest.raises(PrimisError, match=message):
        RateControl(**settings)


def test_rates_need_a_key_model(tiny_model_dir, radiograph):
    model = load_model(tiny_model_dir)
    for rate in (RateControl(weight=0.1), RateControl(quality=30.0)):
        with pytest.raises(PrimisError, match="key model"):
            _share(model, *radiograph, rate)


def test_rate_weighted_codes_are_the_same_tiled(context_model_dir):
    model = load_model(context_model_dir)  # a small model: tiles of a few positions
    image = smooth_image(8 * 13 - 3, 8 * 17 - 5, seed=3).astype(np.float32)
    k = model.network.config.k
    codes = [
        encode_images(model, [image], k, 0, tiling=tiling, rate_weight=1.0)[0]
        for tiling in (WHOLE, Tiling(cells=4, halo=12))
    ]
    assert torch.equal(codes[0], codes[1])
    plain = encode_images(model, [image], k, 0, tiling=WHOLE)[0]
    assert not torch.equal(codes[0], plain)


@pytest.mark.parametrize("shape", [(300, 257), (257, 300), (320, 288)])
def test_a_region_is_padded_as_the_whole_image_is(shape):
    unit = np.random.default_rng(0).random(shape, dtype=np.float32)
    whole = pad_to_multiple(unit, 16)
    grid = (whole.shape[0] // 16, whole.shape[1] // 16)
    for outer, _ in Tiling(cells=6, halo=2).tiles(grid):
        pixels = _scaled(outer, 16)
        assert np.array_equal(_padded_region(unit, pixels), whole[pixels])


ADAPTIVE = TINY.model_copy(update={"adaptive_rate": True, "k": 3})


@pytest.fixture(scope="module")
def adaptive_model(tmp_path_factory) -> Path:
    """A tiny untrained adaptive-rate model whose thresholds give radiographs' vectors every
    count 0..k, exported with a key model fitted to its codes (`primis export --key-data`)."""
    torch.manual_seed(0)
    network = SparseTernaryAutoEncoder(ADAPTIVE).eval()
    with torch.no_grad():
        network.thresholds.copy_(torch.tensor([1.8, 1.4]))  # counts 0, 1 in map 0; 2, 3 in map 1
    run = tmp_path_factory.mktemp("adaptive-run")
    save_model(run, network, ObfuscationConfig())
    listing = run / "key-data.txt"
    listing.write_text("".join(f"{path}\n" for path in cxr_images()[2:5]))
    out = tmp_path_factory.mktemp("adaptive-model")
    run_cli("export", run, "--out", out, "--key-data", listing, check=True)
    return out


def test_an_adaptive_model_shares_a_radiograph_in_the_strict_mode_and_restores_it_exactly(
    adaptive_model, tmp_path
):
    model = load_model(adaptive_model)
    assert model.key_model is not None and model.key_model.fits(2, ADAPTIVE.n, ADAPTIVE.k)
    source = cxr_images()[0]
    strict = ("--privacy", "strict", "--refine-steps", "0")
    ambiguate_cli(adaptive_model, source, out=tmp_path, extra=strict)
    key = KeyFile.from_bytes((tmp_path / "keys" / f"{source.stem}.primiskey").read_bytes())
    assert key.header.coding == "context" and key.header.variable_rate
    public = tmp_path / "public" / f"{source.stem}.primis"
    restored_dir = tmp_path / "restored"
    run_cli(
        "disambiguate", public, "--model", adaptive_model, "--key-dir", tmp_path / "keys",
        "--out-dir", restored_dir, check=True,
    )  # fmt: skip
    restored = np.asarray(Image.open(restored_dir / f"{source.stem}.png"))
    pixels, mapping = read_image(source)[0], IntensityMapping.from_dict(key.header.intensity)
    code = encode_images(model, [pixels], ADAPTIVE.k, refine_steps=0)[0]
    counts = (code == 1).sum(2)
    assert torch.equal(counts, (code == -1).sum(2))
    assert set(counts.unique().tolist()) == set(range(ADAPTIVE.k + 1))  # a mix of counts
    decoded = decode_codes(model, [code])[0][: pixels.shape[0], : pixels.shape[1]]
    expected = mapping.inverse(decoded)
    assert restored.shape == pixels.shape and np.array_equal(restored, expected)


def test_an_adaptive_models_public_file_size_depends_only_on_the_image_size(adaptive_model):
    model = load_model(adaptive_model)
    sizes, keys = [], []
    for path in cxr_images()[:2]:
        pixels = read_image(path)[0][:200, :240]  # two radiographs, one size
        mapping = IntensityMapping.of(pixels)
        shared = share_image(
            pixels, mapping, model, PRIVACY_MODES["strict"].settings, refine_steps=0
        )
        entries = PublicFile.from_bytes(shared.public).vectors
        assert np.all(np.abs(entries) == 1)  # every entry a fair random sign (5 sigma)
        assert abs(entries.mean()) < 5 / np.sqrt(entries.size)
        sizes.append(len(shared.public))
        keys.append(len(shared.key))
    assert sizes[0] == sizes[1] and keys[0] != keys[1]  # only the key follows the content


@pytest.mark.parametrize("privacy", ["compact", "paper"])
def test_an_adaptive_model_refuses_the_modes_that_show_counts(adaptive_model, tmp_path, privacy):
    source = cxr_images()[0]
    result = ambiguate_cli(adaptive_model, source, out=tmp_path, extra=("--privacy", privacy))
    assert_clean_failure(result, "shares only in the strict mode")
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_an_adaptive_model_without_a_key_model_says_what_it_needs(tmp_path):
    network = SparseTernaryAutoEncoder(ADAPTIVE).eval()
    save_model(tmp_path, network, ObfuscationConfig())
    pixels = (smooth_image(64, 80, 2) * 255).astype(np.uint8)
    mapping = IntensityMapping.of(pixels)
    with pytest.raises(PrimisError, match="export --key-data"):
        share_image(mapping.forward(pixels), mapping, load_model(tmp_path), ObfuscationConfig())
