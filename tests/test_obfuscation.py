import math
import os

import numpy as np
import pytest

from primis.config import ObfuscationConfig
from primis.obfuscation import ambiguate, disambiguate, key_size, make_key


def random_code(vectors: int, n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    code = np.zeros((vectors, n), dtype=np.int8)
    for row in code:
        chosen = rng.permutation(n)[: 2 * k]
        row[chosen[:k]], row[chosen[k:]] = 1, -1
    return code


SETTINGS = [(1.0, True), (1.0, False), (0.4, True), (0.4, False), (0.0, True)]


@pytest.mark.parametrize(("fill", "mask"), SETTINGS)
def test_disambiguation_returns_the_exact_code(fill, mask):
    code = random_code(300, 64, 3)
    public = ambiguate(code, 3, ObfuscationConfig(fill=fill, mask_signs=mask))
    key = make_key(code, public, 3, mask)
    assert np.array_equal(disambiguate(public, key, 3, mask), code)


@pytest.mark.parametrize(("fill", "mask"), SETTINGS)
def test_public_vectors_keep_support_and_fill_level(fill, mask):
    n, k = 64, 3
    code = random_code(200, n, k, seed=2)
    public = ambiguate(code, k, ObfuscationConfig(fill=fill, mask_signs=mask))
    assert set(np.unique(public)) <= {-1, 0, 1}
    assert (public[code != 0] != 0).all()
    assert ((public != 0).sum(1) == 2 * k + round(fill * (n - 2 * k))).all()
    if not mask:
        assert (public[code != 0] == code[code != 0]).all()


def test_key_size_is_within_one_percent_of_ideal():
    n, k = 256, 4
    code = random_code(2048, n, k, seed=3)
    for mask in (True, False):
        public = ambiguate(code, k, ObfuscationConfig(mask_signs=mask))
        ideal, packed = key_size(public, k, mask)
        assert len(make_key(code, public, k, mask)) == packed
        assert packed * 8 <= 1.01 * ideal
    full = 2048 * (math.log2(math.comb(n, k)) + math.log2(math.comb(n - k, k)))
    assert ideal_masked_equals(code, n, k, full)


def ideal_masked_equals(code, n, k, expected):
    public = ambiguate(code, k, ObfuscationConfig(mask_signs=True))
    return math.isclose(key_size(public, k, True)[0], expected, rel_tol=1e-9)


def test_noise_is_indistinguishable_by_value_and_sign():
    """Masked signs and full fill: public signs are fair coins, true entries included."""
    code = random_code(4000, 64, 3, seed=4)
    public = ambiguate(code, 3, ObfuscationConfig())
    true_signs = public[code != 0]
    noise_signs = public[code == 0]
    assert set(np.unique(true_signs)) == set(np.unique(noise_signs)) == {-1, 1}
    for signs in (true_signs, noise_signs):
        share = (signs > 0).mean()
        assert abs(share - 0.5) < 4 * math.sqrt(0.25 / signs.size)
    # The public sign of a true entry does not predict its true sign.
    agree = (public[code != 0] == code[code != 0]).mean()
    assert abs(agree - 0.5) < 4 * math.sqrt(0.25 / true_signs.size)


def test_noise_comes_from_the_os_csprng(monkeypatch):
    """All of ambiguation's randomness is os.urandom's: with os.urandom replaced by a seeded
    stream the public code is a function of the stream (same stream, same code; another
    stream, another code). Noise from any other source (numpy's generator, `random`, `secrets`
    bound at import) would make two runs on the same stream differ."""
    code = random_code(200, 64, 3, seed=6)

    def public_for(seed: int) -> np.ndarray:
        stream = np.random.default_rng(seed)
        calls = []
        monkeypatch.setattr(os, "urandom", lambda size: calls.append(size) or stream.bytes(size))
        shown = ambiguate(code, 3, ObfuscationConfig(fill=0.5))
        assert calls, "ambiguation drew no randomness from os.urandom"
        return shown

    first = public_for(1)
    np.testing.assert_array_equal(public_for(1), first)
    assert not np.array_equal(public_for(2), first)
    monkeypatch.setattr(os, "urandom", lambda size: bytes(size))  # all-zero "randomness"
    zeros = ambiguate(code, 3, ObfuscationConfig(fill=0.5))
    np.testing.assert_array_equal(zeros, ambiguate(code, 3, ObfuscationConfig(fill=0.5)))


def test_two_ambiguations_differ():
    code = random_code(50, 64, 3)
    first = ambiguate(code, 3, ObfuscationConfig())
    second = ambiguate(code, 3, ObfuscationConfig())
    assert not np.array_equal(first, second)


def test_shuffled_atoms_round_trip_and_cost_log2_n_factorial_per_map():
    from primis.obfuscation import (
        ambiguate_maps,
        permutation_digits,
        permutation_from_digits,
        unshuffle_atoms,
    )

    n, k, maps = 64, 3, 2
    code = random_code(2 * 150, n, k, seed=5)
    shown, perms = ambiguate_maps(code, maps, k, ObfuscationConfig(fill=0.5))
    for j, perm in enumerate(perms):
        assert sorted(perm) == list(range(n))
        assert np.array_equal(permutation_from_digits(permutation_digits(perm)), perm)
        part = slice(j * 150, (j + 1) * 150)
        original = unshuffle_atoms(shown[part], perm)
        key = make_key(code[part], original, k, True, perm)
        assert np.array_equal(disambiguate(shown[part], key, k, True, permuted=True), code[part])
        plain_bits = key_size(original, k, True)[0]
        ideal, packed = key_size(shown[part], k, True, permuted=True)
        assert math.isclose(ideal - plain_bits, math.log2(math.factorial(n)))
        assert len(key) == packed and packed * 8 <= 1.01 * ideal
    assert not np.array_equal(perms[0], perms[1])
    assert not ambiguate_maps(code, maps, k, ObfuscationConfig(permute_atoms=False))[1][0]


def test_public_vectors_that_reveal_nothing_are_not_shuffled_and_allow_variable_counts():
    from primis.obfuscation import ambiguate_maps, reveals_nothing

    n, k = 32, 3
    code = random_code(40, n, k, seed=8)
    code[:10] = 0  # vectors with fewer pairs: s = 0 here
    code[10:20][code[10:20] == 1] = 0
    code[10:20][code[10:20] == -1] = 0
    assert reveals_nothing(ObfuscationConfig())
    shown, perms = ambiguate_maps(code, 2, k, ObfuscationConfig())
    assert perms == [None, None] and np.all(np.abs(shown) == 1)
    assert not reveals_nothing(ObfuscationConfig(fill=0.9))
    with pytest.raises(ValueError, match="exactly"):
        ambiguate_maps(code, 2, k, ObfuscationConfig(fill=0.9))


@pytest.mark.parametrize("mask", [True, False])
def test_keys_coded_in_chunks_equal_keys_coded_at_once(monkeypatch, mask):
    import primis.obfuscation as obfuscation

    code = random_code(100, 32, 2, seed=5)
    public = ambiguate(code, 2, ObfuscationConfig(fill=0.5, mask_signs=mask))
    whole = make_key(code, public, 2, mask)
    chunks = obfuscation._chunks
    monkeypatch.setattr(obfuscation, "_chunks", lambda count: chunks(count, 7))
    assert make_key(code, public, 2, mask) == whole
    assert np.array_equal(disambiguate(public, whole, 2, mask), code)


def test_strict_key_bits_count_each_vectors_support_and_the_counts_entropy():
    from primis.obfuscation import ambiguate_maps, image_key_bits, strict_key_bits
    from primis.privacy import PRIVACY_MODES

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
