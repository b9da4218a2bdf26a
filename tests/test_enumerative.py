import math
from itertools import combinations

import numpy as np
import pytest

from primis.enumerative import (
    ideal_bits,
    pack_digits,
    packed_size,
    rank_subsets,
    unpack_digits,
    unrank_subsets,
)
from primis.errors import PrimisError


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
