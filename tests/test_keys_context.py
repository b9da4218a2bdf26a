"""Context-coded keys: exact round trips, the fitted model pays off, corruption is refused."""

import math

import numpy as np
import pytest
import torch

from primis.errors import PrimisError
from primis.keys.context import ContextKeyCoder, KeyModel, fit_key_model
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
