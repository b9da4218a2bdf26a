"""Enumerative coding: k-subsets as integers (combinatorial number system), packed in mixed radix.

A sorted k-subset c_1 < ... < c_k of {0..N-1} has rank sum_i C(c_i, i) in [0, C(N, k)). A
sequence of such ranks, each with its own radix, is packed into blocks of big integers, so the
packed size is within a few bits per block of the ideal sum of log2(radix).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from primis.errors import PrimisError

DIGITS_PER_BLOCK = 512


@lru_cache(maxsize=32)
def binomial_table(n_max: int, k_max: int) -> np.ndarray:
    """table[c, i] = C(c, i) for 0 <= c <= n_max, 0 <= i <= k_max (int64 when it fits)."""
    table = np.array(
        [[math.comb(c, i) for i in range(k_max + 1)] for c in range(n_max + 1)], dtype=object
    )
    if math.comb(n_max, min(k_max, n_max // 2)) < 2**62:
        table = table.astype(np.int64)
    table.flags.writeable = False
    return table


def rank_subsets(members: np.ndarray, n_max: int) -> np.ndarray:
    """Ranks of sorted subsets, one per row of ``members`` (V, k) with entries in [0, n_max)."""
    k = members.shape[1]
    table = binomial_table(n_max, k)
    return table[members, np.arange(1, k + 1)].sum(axis=1)


def unrank_subsets(ranks: np.ndarray, k: int, n_max: int) -> np.ndarray:
    """Inverse of :func:`rank_subsets`: (V,) ranks -> (V, k) sorted members."""
    table = binomial_table(n_max, k)
    remaining = np.array(ranks, dtype=table.dtype, copy=True)
    members = np.empty((len(remaining), k), dtype=np.int64)
    for i in range(k, 0, -1):
        column = np.ascontiguousarray(table[:, i])
        c = np.searchsorted(column, remaining, side="right") - 1
        members[:, i - 1] = c
        remaining = remaining - column[c]
    return members


def ideal_bits(radices: np.ndarray) -> float:
    """sum log2(radix): the information content of the digits."""
    return float(sum(math.log2(int(r)) for r in radices if int(r) > 1))


def ternary_support_bits(n: int, counts: np.ndarray) -> np.ndarray:
    """log2(n! / (s! s! (n-2s)!)) for each count s (float64, the shape of ``counts``): the ideal
    bits that name which s of a vector's n entries are +1 and which s are -1."""
    log2_factorial = np.concatenate([[0.0], np.cumsum(np.log2(np.arange(1, n + 1)))])
    s = np.asarray(counts)
    return log2_factorial[n] - 2 * log2_factorial[s] - log2_factorial[n - 2 * s]


def _layout(radices: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, bytes) of every block of digits; bytes hold the block's largest value."""
    layout = []
    for start in range(0, len(radices), DIGITS_PER_BLOCK):
        end = min(len(radices), start + DIGITS_PER_BLOCK)
        layout.append((start, end, (math.prod(radices[start:end]) - 1).bit_length() // 8 + 1))
    return layout


def packed_size(radices: np.ndarray) -> int:
    """Bytes :func:`pack_digits` produces for these radices."""
    return sum(size for _, _, size in _layout([int(r) for r in radices]))


def pack_digits(digits: np.ndarray, radices: np.ndarray) -> bytes:
    """Mixed-radix packing of ``digits[i] < radices[i]`` into bytes (big-endian blocks)."""
    out = bytearray()
    d_all, r_all = [int(d) for d in digits], [int(r) for r in radices]
    if len(d_all) != len(r_all):
        raise ValueError("one digit per radix")
    for a, b, size in _layout(r_all):
        value = 0
        for digit, radix in zip(d_all[a:b], r_all[a:b], strict=True):
            if not 0 <= digit < radix:
                raise ValueError(f"digit {digit} outside radix {radix}")
            value = value * radix + digit
        out += value.to_bytes(size, "big")
    return bytes(out)


def unpack_digits(data: bytes, radices: np.ndarray) -> list[int]:
    """Inverse of :func:`pack_digits`; a corrupted stream raises PrimisError."""
    r_all = [int(r) for r in radices]
    layout = _layout(r_all)
    expected = sum(size for _, _, size in layout)
    if len(data) != expected:
        raise PrimisError(f"key payload has {len(data)} bytes, expected {expected}")
    digits: list[int] = []
    offset = 0
    for a, b, size in layout:
        value = int.from_bytes(data[offset : offset + size], "big")
        offset += size
        block = []
        for radix in reversed(r_all[a:b]):
            value, digit = divmod(value, radix)
            block.append(digit)
        if value:
            raise PrimisError("key payload is corrupted (a block exceeds its range)")
        digits.extend(reversed(block))
    return digits
