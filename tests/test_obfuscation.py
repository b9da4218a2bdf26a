import math
import os

import numpy as np
import pytest

from primis.config import ObfuscationConfig
from primis.obfuscation import ambiguate, ambiguate_maps
from tests.conftest import random_code

SETTINGS = [(1.0, True), (1.0, False), (0.4, True), (0.4, False), (0.0, True)]


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


def test_each_map_is_shuffled_by_its_own_permutation():
    n, k, maps = 64, 3, 2
    code = random_code(2 * 150, n, k, seed=5)
    _, perms = ambiguate_maps(code, maps, k, ObfuscationConfig(fill=0.5))
    assert all(sorted(perm) == list(range(n)) for perm in perms)
    assert not np.array_equal(perms[0], perms[1])
    assert not ambiguate_maps(code, maps, k, ObfuscationConfig(permute_atoms=False))[1][0]


def test_public_vectors_that_reveal_nothing_are_not_shuffled_and_allow_variable_counts():
    from primis.obfuscation import reveals_nothing

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
