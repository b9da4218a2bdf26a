"""Enumeratively coded keys: ranks and packing round trip near the ideal size, keys of every
mode restore the exact code, damage is refused."""

import math
from itertools import combinations

import numpy as np
import pytest

import primis.keys.enumerative as enumerative
from primis.config import ObfuscationConfig
from primis.errors import PrimisError
from primis.keys.enumerative import (
    ideal_bits,
    image_key_bits,
    key_size,
    make_key,
    pack_digits,
    packed_size,
    permutation_digits,
    permutation_from_digits,
    rank_subsets,
    read_key,
    strict_key_bits,
    unpack_digits,
    unrank_subsets,
)
from primis.obfuscation import ambiguate, ambiguate_maps, unshuffle_atoms
from primis.privacy import PRIVACY_MODES
from tests.conftest import random_code

SETTINGS = [(1.0, True), (1.0, False), (0.4, True), (0.4, False), (0.0, True)]


def opened(shown: np.ndarray, key: bytes, k: int, mask: bool, permuted: bool = False):
    """The code a whole map's key opens (`read_key` reads all of it)."""
    code, used = read_key(shown, key, k, mask, permuted)
    assert used == len(key)
    return code


def test_ranks_enumerate_all_subsets_once():
    n, k = 9, 3
    subsets = np.array(list(combinations(range(n), k)))
    ranks = rank_subsets(subsets, n).astype(int)
    assert sorted(ranks) == list(range(math.comb(n, k)))
    assert (unrank_subsets(ranks, k, n) == subsets).all()


def test_large_binomials_use_exact_integers():
    n, k = 1024, 40  # C(1024, 40) has about 270 bits
    rng = np.random.default_rng(0)
    subsets = np.sort(np.array([rng.choice(n, k, replace=False) for _ in range(50)]), axis=1)
    ranks = rank_subsets(subsets, n)
    assert max(int(r) for r in ranks) < math.comb(n, k)
    assert (unrank_subsets(ranks, k, n) == subsets).all()


def test_mixed_radix_packing_round_trips_near_ideal():
    rng = np.random.default_rng(1)
    radices = np.array([math.comb(256, 8)] * 1500 + [70] * 1500, dtype=object)
    digits = np.array([int(rng.integers(0, int(r))) for r in radices], dtype=object)
    packed = pack_digits(digits, radices)
    assert len(packed) == packed_size(radices)
    assert len(packed) * 8 <= ideal_bits(radices) * 1.01
    assert unpack_digits(packed, radices) == [int(d) for d in digits]


def test_damaged_payload_is_detected():
    radices = np.array([3] * 10, dtype=object)
    packed = pack_digits(np.array([2] * 10, dtype=object), radices)
    with pytest.raises(PrimisError):
        unpack_digits(packed[:-1], radices)
    with pytest.raises(PrimisError):
        unpack_digits(b"\xff" * len(packed), radices)  # beyond 3**10


@pytest.mark.parametrize(("fill", "mask"), SETTINGS)
def test_a_key_returns_the_exact_code(fill, mask):
    code = random_code(300, 64, 3)
    public = ambiguate(code, 3, ObfuscationConfig(fill=fill, mask_signs=mask))
    key = make_key(code, public, 3, mask)
    assert np.array_equal(opened(public, key, 3, mask), code)


def test_key_size_is_within_one_percent_of_ideal():
    n, k = 256, 4
    code = random_code(2048, n, k, seed=3)
    for mask in (True, False):
        public = ambiguate(code, k, ObfuscationConfig(mask_signs=mask))
        ideal, packed = key_size(public, k, mask)
        assert len(make_key(code, public, k, mask)) == packed
        assert packed * 8 <= 1.01 * ideal
    full = 2048 * (math.log2(math.comb(n, k)) + math.log2(math.comb(n - k, k)))
    public = ambiguate(code, k, ObfuscationConfig(mask_signs=True))
    assert math.isclose(key_size(public, k, True)[0], full, rel_tol=1e-9)


def test_shuffled_atoms_round_trip_and_cost_log2_n_factorial_per_map():
    n, k, maps = 64, 3, 2
    code = random_code(2 * 150, n, k, seed=5)
    shown, perms = ambiguate_maps(code, maps, k, ObfuscationConfig(fill=0.5))
    for j, perm in enumerate(perms):
        assert np.array_equal(permutation_from_digits(permutation_digits(perm)), perm)
        part = slice(j * 150, (j + 1) * 150)
        original = unshuffle_atoms(shown[part], perm)
        key = make_key(code[part], original, k, True, perm)
        assert np.array_equal(opened(shown[part], key, k, True, permuted=True), code[part])
        plain_bits = key_size(original, k, True)[0]
        ideal, packed = key_size(shown[part], k, True, permuted=True)
        assert math.isclose(ideal - plain_bits, math.log2(math.factorial(n)))
        assert len(key) == packed and packed * 8 <= 1.01 * ideal


@pytest.mark.parametrize("mask", [True, False])
def test_keys_coded_in_chunks_equal_keys_coded_at_once(monkeypatch, mask):
    code = random_code(100, 32, 2, seed=5)
    public = ambiguate(code, 2, ObfuscationConfig(fill=0.5, mask_signs=mask))
    whole = make_key(code, public, 2, mask)
    chunks = enumerative._chunks
    monkeypatch.setattr(enumerative, "_chunks", lambda count: chunks(count, 7))
    assert make_key(code, public, 2, mask) == whole
    assert np.array_equal(opened(public, whole, 2, mask), code)


def test_strict_key_bits_count_each_vectors_support_and_the_counts_entropy():
    n, k, maps = 32, 3, 2
    code = random_code(60, n, k, seed=9)
    strict = PRIVACY_MODES["strict"].settings
    public, _ = ambiguate_maps(code, maps, k, strict)
    fixed = image_key_bits(public, maps, k, strict)
    assert math.isclose(strict_key_bits(code), fixed, rel_tol=1e-12)
    # Counts 3, 1, 1, 0: each vector's support and signs, plus 4 times H(1/4, 1/2, 1/4) = 6 bits.
    variable = code[:4].copy()
    for row, count in zip(variable, (3, 1, 1, 0), strict=True):
        for sign in (1, -1):
            row[np.flatnonzero(row == sign)[count:]] = 0
    support = sum(math.log2(math.comb(n, 2 * s) * math.comb(2 * s, s)) for s in (3, 1, 1, 0))
    assert math.isclose(strict_key_bits(variable), support + 6, rel_tol=1e-12)
    variable[0, np.flatnonzero(variable[0] == 1)[0]] = 0  # two entries -1 for one +1
    with pytest.raises(ValueError, match="s entries -1"):
        strict_key_bits(variable)
