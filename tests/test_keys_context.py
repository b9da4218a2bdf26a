"""Context-coded keys: exact round trips, the fitted model pays off, corruption is refused."""

import math

import numpy as np
import pytest
import torch

from primis.errors import PrimisError
from primis.keys.context import ContextKeyCoder, KeyModel, fit_key_model
from primis.modelstore import describe_model, load_model, save_model
from primis.obfuscation import code_to_vectors


def smooth_code(m: int, n: int, grid: tuple[int, int], k: int, seed: int, variable: bool):
    """(m, n, rows, cols) codes whose neighbouring vectors share atoms, as a trained model's do;
    with ``variable`` each vector holds a random s <= k pairs."""
    rng = np.random.default_rng(seed)
    rows, cols = grid
    code = np.zeros((m, n, rows, cols), dtype=np.int8)
    favourite = np.random.default_rng(0).permutation(n)[: 4 * k]  # the same for every seed
    for j in range(m):
        for r in range(rows):
            for c in range(cols):
                s = int(rng.integers(0, k + 1)) if variable else k
                pool = favourite if rng.random() < 0.7 else rng.permutation(n)
                atoms = rng.choice(pool, 2 * s, replace=False)
                code[j, atoms[:s], r, c] = 1
                code[j, atoms[s:], r, c] = -1
    return code


def as_vectors(code: np.ndarray) -> np.ndarray:
    return code_to_vectors(torch.from_numpy(code)[None])


def fit(codes: list[np.ndarray], k: int) -> ContextKeyCoder:
    """The coder of a key model fitted to ``codes``."""
    return ContextKeyCoder(fit_key_model([(as_vectors(code), code.shape[2:]) for code in codes], k))


@pytest.mark.parametrize("variable", [False, True])
def test_round_trip_is_exact_and_the_fitted_model_beats_uniform(variable):
    m, n, k, grid = 2, 64, 3, (9, 7)
    coder = fit([smooth_code(m, n, grid, k, s, variable) for s in range(4)], k)
    code = smooth_code(m, n, grid, k, 99, variable)
    vectors = as_vectors(code)
    data = coder.encode_vectors(vectors, [0, 1], grid, k, variable=variable)
    back = coder.decode_vectors(data, [0, 1], grid, n, k, variable=variable)
    assert np.array_equal(back, vectors)
    uniform = len(vectors) * math.log2(math.comb(n, k) * math.comb(n - k, k))
    if not variable:
        assert 8 * len(data) < 0.9 * uniform
    # Stages are coded in groups of about `chunk` vectors: any grouping writes the same bytes
    # (one stage per group is the order the decoder reads in).
    for chunk in (1, 20, 10**6):
        again = coder.encode_vectors(vectors, [0, 1], grid, k, variable=variable, chunk=chunk)
        assert again == data


def test_codes_with_empty_vectors_round_trip():
    """Vectors holding no pairs (flat regions under an adaptive rate), whole stages of them and
    a code of nothing but them, round trip exactly."""
    m, n, k, grid = 2, 64, 3, (6, 5)
    coder = fit([smooth_code(m, n, grid, k, s, True) for s in range(4)], k)
    code = smooth_code(m, n, grid, k, 7, True)
    code[:, :, :3, :] = 0  # the first stages hold nothing
    for case in (code, np.zeros_like(code)):
        vectors = as_vectors(case)
        data = coder.encode_vectors(vectors, [0, 1], grid, k, variable=True)
        back = coder.decode_vectors(data, [0, 1], grid, n, k, variable=True)
        assert np.array_equal(back, vectors)


@pytest.mark.parametrize("variable", [False, True])
def test_vector_information_adds_up_to_the_key_and_follows_the_content(variable):
    m, n, k, grid = 2, 64, 3, (9, 7)
    coder = fit([smooth_code(m, n, grid, k, s, variable) for s in range(4)], k)
    vectors = as_vectors(smooth_code(m, n, grid, k, 99, variable))
    bits = coder.vector_information(vectors, [0, 1], grid, k, variable=variable)
    coded = 8 * len(coder.encode_vectors(vectors, [0, 1], grid, k, variable=variable))
    assert bits.shape == (len(vectors),) and np.all(bits >= 0)
    assert bits.sum() <= coded <= bits.sum() + 64  # the range coder's few bytes of overhead
    # Vector (1, 1) of map 0 (index 8 of the 9 x 7 grid) costs less where it repeats the
    # vectors above (index 1) and to the left (index 7) than where it holds rare atoms.
    repeated = vectors.copy()
    repeated[[1, 7, 8]] = repeated[0]
    rare = repeated.copy()
    favourite = np.random.default_rng(0).permutation(n)[: 4 * k]  # as smooth_code's
    unusual = np.setdiff1d(np.arange(n), np.concatenate([favourite, np.flatnonzero(vectors[0])]))
    rare[8] = 0
    rare[8, unusual[:k]], rare[8, unusual[k : 2 * k]] = 1, -1
    cheap, costly = (
        coder.vector_information(v, [0, 1], grid, k, variable=variable)[8] for v in (repeated, rare)
    )
    assert cheap < 0.5 * costly


def test_a_subset_of_maps_and_allowed_atoms_round_trip():
    m, n, k, grid = 3, 32, 2, (5, 6)
    code = smooth_code(m, n, grid, k, 1, False)
    coder = fit([code], k)
    vectors = as_vectors(code)[: 2 * 30]  # maps 0 and 1 of 3
    rng = np.random.default_rng(2)
    allowed = rng.random((len(vectors), 2, n)) < 0.5
    allowed[:, 0] |= vectors == 1
    allowed[:, 1] |= vectors == -1
    data = coder.encode_vectors(vectors, [0, 2], grid, k, allowed, variable=False)
    back = coder.decode_vectors(data, [0, 2], grid, n, k, allowed, variable=False)
    assert np.array_equal(back, vectors)
    with pytest.raises(ValueError, match="rules it out"):
        coder.encode_vectors(vectors, [0, 2], grid, k, ~allowed, variable=False)


@pytest.mark.parametrize("variable", [False, True])
def test_lower_k_than_the_model_round_trips(variable):
    n, grid = 32, (4, 4)
    coder = fit([smooth_code(1, n, grid, 4, 0, True)], 4)
    vectors = as_vectors(smooth_code(1, n, grid, 2, 3, variable))
    data = coder.encode_vectors(vectors, [0], grid, 2, variable=variable)
    back = coder.decode_vectors(data, [0], grid, n, 2, variable=variable)
    assert np.array_equal(back, vectors)
    with pytest.raises(PrimisError, match="up to 4 pairs"):
        coder.encode_vectors(vectors, [0], grid, 5)


def test_corrupted_payloads_fail_cleanly_or_differ():
    """(Whole key files are guarded by their checksum and the public file's commitment, see
    test_formats; this is the coder's own line of defence.)"""
    n, k, grid = 64, 3, (6, 6)
    code = smooth_code(2, n, grid, k, 4, True)
    coder = fit([code], k)
    vectors = as_vectors(code)
    data = coder.encode_vectors(vectors, [0, 1], grid, k)
    with pytest.raises(PrimisError, match="32-bit words"):
        coder.decode_vectors(data[:-1], [0, 1], grid, n, k)
    for flip in range(0, len(data) // 2, 7):
        damaged = bytearray(data)
        damaged[flip] ^= 0x5A
        try:
            back = coder.decode_vectors(bytes(damaged), [0, 1], grid, n, k)
        except PrimisError as err:
            assert "corrupted" in str(err)
        else:
            assert not np.array_equal(back, vectors)


def test_the_key_model_validates_its_tables():
    with pytest.raises(PrimisError, match="positive"):
        KeyModel(np.zeros((1, 2, 9, 8), np.float32), np.ones((1, 25, 5), np.float32))
    with pytest.raises(PrimisError, match="shape"):
        KeyModel(np.ones((1, 2, 8, 8), np.float32), np.ones((1, 25, 5), np.float32))
    model = KeyModel(np.ones((2, 2, 9, 16), np.float32), np.ones((2, 16, 4), np.float32))
    assert model.k == 3 and model.fits(2, 16, 3) and not model.fits(2, 16, 4)
    assert KeyModel.from_tensors(model.tensors()).fits(2, 16, 3)


def test_atom_costs_price_the_atoms_the_model_expects_lowest():
    m, n, k, grid = 2, 64, 3, (9, 7)
    coder = fit([smooth_code(m, n, grid, k, s, False) for s in range(4)], k)
    vectors = as_vectors(smooth_code(m, n, grid, k, 99, False))
    costs = coder.atom_costs(vectors, grid)
    assert costs.shape == (len(vectors), 2, n) and costs.dtype == np.float32
    favourite = np.random.default_rng(0).permutation(n)[: 4 * k]  # as smooth_code draws them
    rare = np.setdiff1d(np.arange(n), favourite)
    assert np.median(costs[:, :, favourite]) + 2 < np.median(costs[:, :, rare])
    # Scaled and stored in half precision: the same costs, clipped to float16's range.
    half = coder.atom_costs(vectors, grid, scale=0.5, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, 0.5 * costs, rtol=2e-3, atol=1e-3)
    huge = coder.atom_costs(vectors, grid, scale=1e9, dtype=np.float16)
    assert np.isfinite(huge).all() and huge.max() == np.finfo(np.float16).max


def coupled_code(m: int, n: int, grid: tuple[int, int], k: int, seed: int) -> np.ndarray:
    """(m, n, rows, cols) codes whose -1 atoms are partners of their +1 atoms (a + 1 for atom
    a) and whose later maps repeat the first map's atoms at each place shifted by 5 per map:
    what the couplings model."""
    rng = np.random.default_rng(seed)
    rows, cols = grid
    code = np.zeros((m, n, rows, cols), dtype=np.int8)
    for r in range(rows):
        for c in range(cols):
            s = int(rng.integers(1, k + 1))
            plus = 2 * rng.choice(n // 2, s, replace=False)  # even atoms; partners odd
            for j in range(m):
                shifted = (plus + 10 * j) % n
                code[j, shifted, r, c] = 1
                code[j, shifted + 1, r, c] = -1
    return code


def test_couplings_learn_what_the_decoder_knows_and_keys_still_round_trip_exactly():
    m, n, k, grid = 2, 64, 3, (8, 7)
    training = [coupled_code(m, n, grid, k, s) for s in range(6)]
    samples = [(as_vectors(code), code.shape[2:]) for code in training]
    plain = ContextKeyCoder(fit_key_model(samples, k))
    coupled_model = fit_key_model(samples, k, couplings=True)
    assert coupled_model.coupled and not plain.model.coupled
    coupled = ContextKeyCoder(coupled_model)
    vectors = as_vectors(coupled_code(m, n, grid, k, 99))
    sizes = {}
    for name, coder in (("plain", plain), ("coupled", coupled)):
        data = coder.encode_vectors(vectors, [0, 1], grid, k)
        assert np.array_equal(coder.decode_vectors(data, [0, 1], grid, n, k), vectors)
        sizes[name] = len(data)
    # The -1 atoms and the second map follow from what is decoded before them.
    assert sizes["coupled"] < 0.6 * sizes["plain"]
    # Any grouping of stages writes the same bytes; a key of one map (no previous map to
    # follow), a lower k and atoms ruled out by a public vector round trip too.
    for chunk in (1, 10**6):
        again = coupled.encode_vectors(vectors, [0, 1], grid, k, chunk=chunk)
        assert again == coupled.encode_vectors(vectors, [0, 1], grid, k)
    second = vectors[len(vectors) // 2 :]
    data = coupled.encode_vectors(second, [1], grid, k)
    assert np.array_equal(coupled.decode_vectors(data, [1], grid, n, k), second)
    low = as_vectors(smooth_code(m, n, grid, 2, 5, True))
    data = coupled.encode_vectors(low, [0, 1], grid, 2)
    assert np.array_equal(coupled.decode_vectors(data, [0, 1], grid, n, 2), low)
    allowed = np.ones((len(vectors), 2, n), dtype=bool)
    allowed[:, 0, 1::2] = False  # +1 entries only on even atoms, as the code has them
    data = coupled.encode_vectors(vectors, [0, 1], grid, k, allowed)
    assert np.array_equal(coupled.decode_vectors(data, [0, 1], grid, n, k, allowed), vectors)


def test_coupling_tables_are_validated_and_travel_with_the_model():
    m, n, k = 2, 8, 2
    atoms, counts = np.ones((m, 2, 9, n)), np.ones((m, (k + 1) ** 2, k + 1))
    pairs, cross = np.ones((m, n, n)), np.ones((m - 1, 2, 2, n, n))
    model = KeyModel(atoms, counts, pairs, cross)
    assert set(model.tensors()) == set(KeyModel.from_tensors(model.tensors()).tensors())
    assert KeyModel.from_tensors(model.tensors()).coupled
    with pytest.raises(PrimisError, match="both"):
        KeyModel(atoms, counts, pairs)
    with pytest.raises(PrimisError, match="shape"):
        KeyModel(atoms, counts, pairs, np.ones((m, 2, 2, n, n)))
    with pytest.raises(PrimisError, match="positive"):
        KeyModel(atoms, counts, pairs, 0 * cross)


def test_a_coupled_key_model_is_saved_loaded_and_described_with_its_model(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    cfg = model.network.config
    grid = (6, 5)
    codes = [coupled_code(cfg.m, cfg.n, grid, cfg.k, seed) for seed in range(12)]
    key_model = fit_key_model([(as_vectors(c), grid) for c in codes], cfg.k, couplings=True)
    assert key_model.coupled
    save_model(tmp_path / "coupled", model.network, model.obfuscation, key_model=key_model)
    loaded = load_model(tmp_path / "coupled")
    assert loaded.key_model.coupled
    assert np.array_equal(loaded.key_model.cross_weights, key_model.cross_weights)
    assert describe_model(tmp_path / "coupled")["keys"] == {"coding": "context", "couplings": True}
    assert describe_model("cxr-v3")["keys"] == {"coding": "context", "couplings": False}


def test_couplings_fit_where_the_caller_runs_without_gradients():
    m, n, k, grid = 2, 32, 2, (5, 4)
    codes = [(as_vectors(coupled_code(m, n, grid, k, s)), grid) for s in range(4)]
    with torch.inference_mode():
        assert fit_key_model(codes, k, couplings=True).fits(m, n, k)


def test_couplings_fall_back_to_the_plain_model_where_nothing_can_be_held_out():
    m, n, k, grid = 2, 32, 2, (5, 4)
    one_image = [(as_vectors(coupled_code(m, n, grid, k, 0)), grid)]
    plain = fit_key_model(one_image, k)
    fitted = fit_key_model(one_image, k, couplings=True)
    assert not fitted.coupled
    assert np.array_equal(fitted.atom_weights, plain.atom_weights)
