"""Enumeratively coded keys: k-subsets as integers (combinatorial number system), packed in
mixed radix; what keys of models without a key model hold, and the atom orders of every key.

A sorted k-subset c_1 < ... < c_k of {0..N-1} has rank sum_i C(c_i, i) in [0, C(N, k)). A
sequence of such ranks, each with its own radix, is packed into blocks of big integers, so the
packed size is within a few bits per block of the ideal sum of log2(radix).

A map's key is its atom order (Lehmer digits, where its atoms are shown shuffled), then per
vector the rank of its true support among the public vector's non-zero entries and the rank
of its +1 entries among them (masked signs), or the ranks of its +1 and -1 entries among the
public +1 and -1 entries (public signs), packed together. Every vector holds exactly k pairs.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from primis.config import ObfuscationConfig
from primis.errors import PrimisError
from primis.obfuscation import check_code, unshuffle_atoms

if TYPE_CHECKING:
    from primis.keys import KeySpec

DIGITS_PER_BLOCK = 512
# Rows coded at a time: the (vectors, n) int64 work arrays of key coding stay near 64 MB for
# n = 256, whatever the image size.
ROWS_PER_CHUNK = 1 << 15


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


def permutation_digits(perm: np.ndarray) -> list[int]:
    """Lehmer code: digit i (radix n-i) counts later entries smaller than perm[i]."""
    return [int(np.count_nonzero(perm[i + 1 :] < perm[i])) for i in range(len(perm))]


def permutation_radices(n: int, count: int) -> np.ndarray:
    """Radices of the Lehmer digits of ``count`` permutations of n atoms, one after another."""
    return np.array(list(range(n, 0, -1)) * count, dtype=object)


def permutation_from_digits(digits: list[int]) -> np.ndarray:
    available = list(range(len(digits)))
    return np.array([available.pop(int(d)) for d in digits])


def _positions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: columns where ``mask`` holds, listed first in ascending order; and their count."""
    order = np.argsort(~mask, axis=1, kind="stable")
    return order, mask.sum(axis=1)


def _index_within(candidates: np.ndarray, chosen: np.ndarray, per_row: int) -> np.ndarray:
    """For each row, the indices of the ``chosen`` columns among the ``candidates`` columns."""
    index = np.cumsum(candidates, axis=1) - 1
    return index[chosen].reshape(-1, per_row)


def _support_parts(public: np.ndarray, k: int, mask_signs: bool):
    """The (candidates, subset size) parts the key codes, per vector, given the public vectors."""
    if mask_signs:
        return [(public != 0, 2 * k)]
    return [(public == 1, k), (public == -1, k)]


def key_radices(public: np.ndarray, k: int, mask_signs: bool, permuted: bool = False) -> np.ndarray:
    """Radix of each key digit, in key order; computable from the public vectors alone
    (shuffling atoms keeps every vector's counts, so shown or original vectors serve)."""
    columns = [
        [math.comb(int(c), size) for c in candidates.sum(axis=1)]
        for candidates, size in _support_parts(public, k, mask_signs)
    ]
    if mask_signs:
        columns.append([math.comb(2 * k, k)] * public.shape[0])
    support = np.array(columns, dtype=object).T.reshape(-1)
    if not permuted:
        return support
    n = public.shape[1]
    return np.concatenate([permutation_radices(n, 1), support])


def key_digits(
    code: np.ndarray,
    public: np.ndarray,
    k: int,
    mask_signs: bool,
    perm: np.ndarray | None = None,
) -> np.ndarray:
    """The key digits in the order of :func:`key_radices`: the atom order (if shuffled), then
    the ranks of the true supports within the (unshuffled) public vectors."""
    n = code.shape[1]
    support = []
    for rows in _chunks(len(code)):
        chunk, shown, columns = code[rows], public[rows], []
        if mask_signs:
            true = chunk != 0
            members = _index_within(shown != 0, true, 2 * k)
            columns.append(rank_subsets(members, n))
            signs_of_true = chunk[true].reshape(-1, 2 * k) == 1
            columns.append(rank_subsets(np.nonzero(signs_of_true)[1].reshape(-1, k), 2 * k))
        else:
            for sign in (1, -1):
                members = _index_within(shown == sign, chunk == sign, k)
                columns.append(rank_subsets(members, n))
        support.append(np.array(columns, dtype=object).T.reshape(-1))
    support = np.concatenate(support) if support else np.array([], dtype=object)
    if perm is None:
        return support
    return np.concatenate([np.array(permutation_digits(perm), dtype=object), support])


def make_key(
    code: np.ndarray,
    public: np.ndarray,
    k: int,
    mask_signs: bool,
    perm: np.ndarray | None = None,
) -> bytes:
    """Enumeratively coded support of every vector given its (unshuffled) public vector, after
    the atom order when the public vectors are shown shuffled by ``perm``."""
    radices = key_radices(public, k, mask_signs, perm is not None)
    return pack_digits(key_digits(code, public, k, mask_signs, perm), radices)


def read_key(
    public: np.ndarray, payload: bytes, k: int, mask_signs: bool, permuted: bool = False
) -> tuple[np.ndarray, int]:
    """Decode these vectors' key from the start of ``payload``: (true code, bytes used)."""
    v, n = public.shape
    radices = key_radices(public, k, mask_signs, permuted)
    if any(int(r) == 0 for r in radices):
        raise PrimisError("public code is inconsistent: a vector has too few non-zero entries")
    used = packed_size(radices)
    if len(payload) < used:
        raise PrimisError(f"key payload has {len(payload)} bytes, expected at least {used}")
    digits = np.array(unpack_digits(payload[:used], radices), dtype=object)
    if permuted:
        public = unshuffle_atoms(public, permutation_from_digits(list(digits[:n])))
        digits = digits[n:]
    parts = _support_parts(public, k, mask_signs)
    per_vector = len(parts) + (1 if mask_signs else 0)
    digits = digits.reshape(v, per_vector)
    code = np.zeros((v, n), dtype=np.int8)
    for rows in _chunks(v):
        code[rows] = _true_code(public[rows], digits[rows], k, mask_signs)
    return code, used


def _true_code(public: np.ndarray, digits: np.ndarray, k: int, mask_signs: bool) -> np.ndarray:
    """The true vectors of these public vectors (unshuffled) from their key digits."""
    v, n = public.shape
    code = np.zeros((v, n), dtype=np.int8)
    if mask_signs:
        order, _ = _positions(public != 0)
        members = unrank_subsets(digits[:, 0], 2 * k, n)
        columns = np.take_along_axis(order, members, axis=1)
        positive = np.zeros((v, 2 * k), dtype=bool)
        np.put_along_axis(positive, unrank_subsets(digits[:, 1], k, 2 * k), True, axis=1)
        code[np.repeat(np.arange(v), 2 * k), columns.reshape(-1)] = np.where(
            positive.reshape(-1), 1, -1
        )
    else:
        rows = np.repeat(np.arange(v), k)
        for part, sign in enumerate((1, -1)):
            order, _ = _positions(public == sign)
            members = unrank_subsets(digits[:, part], k, n)
            code[rows, np.take_along_axis(order, members, axis=1).reshape(-1)] = sign
    return code


def _chunks(count: int, size: int = ROWS_PER_CHUNK) -> list[slice]:
    """Row ranges of at most ``size`` vectors."""
    return [slice(start, min(count, start + size)) for start in range(0, count, size)]


def key_size(
    public: np.ndarray, k: int, mask_signs: bool, permuted: bool = False
) -> tuple[float, int]:
    """(ideal key bits, packed key bytes) for these public vectors."""
    radices = key_radices(public, k, mask_signs, permuted)
    return ideal_bits(radices), packed_size(radices)


def image_key_size(
    public: np.ndarray, maps: int, k: int, mask_signs: bool, permuted: bool = False
) -> tuple[float, int]:
    """(ideal key bits, packed key bytes) of an enumerative key for all maps of one image's
    public vectors (map-major rows), each map packed on its own as such keys are."""
    rows = len(public) // maps
    sizes = [
        key_size(public[j * rows : (j + 1) * rows], k, mask_signs, permuted) for j in range(maps)
    ]
    return sum(bits for bits, _ in sizes), sum(size for _, size in sizes)


def image_key_bits(public: np.ndarray, maps: int, k: int, obfuscation: ObfuscationConfig) -> float:
    """Ideal key bits for all maps of one image's public vectors (map-major rows)."""
    return image_key_size(public, maps, k, obfuscation.mask_signs, obfuscation.permute_atoms)[0]


def strict_key_bits(code: np.ndarray) -> float:
    """Ideal key bits, in the strict mode (`reveals_nothing`), of true code vectors (V, n) of
    one image that hold s entries +1 and s entries -1 each, s varying: per vector
    log2(n! / (s! s! (n-2s)!)) for its support and signs, plus the counts at their empirical
    entropy (V times H(s) bits: 0 when every vector holds the same count). For codes of exactly
    k pairs it is what `image_key_bits` gives in the strict mode."""
    v, n = code.shape
    check_code(code, n // 2, variable=True)
    if v == 0:
        return 0.0
    counts = np.count_nonzero(code == 1, axis=1)
    frequencies = np.bincount(counts) / v
    frequencies = frequencies[frequencies > 0]
    entropy = float(-(frequencies * np.log2(frequencies)).sum())
    return float(ternary_support_bits(n, counts).sum()) + v * entropy


class EnumerativeKeyCoder:
    """Keys coded enumeratively, map by map (`make_key`); needs no model, and each vector
    holds exactly k pairs (no count to code)."""

    coding = "enumerative"
    codes_counts = False

    def encode(
        self, code: np.ndarray, public: np.ndarray, perms: list[np.ndarray | None], spec: KeySpec
    ) -> bytes:
        """The maps' keys one after another (see `KeyCoder.encode`)."""
        maps = len(spec.maps)
        parts = zip(np.split(code, maps), np.split(public, maps), perms, strict=True)
        return b"".join(make_key(c, p, spec.k, spec.mask_signs, perm) for c, p, perm in parts)

    def decode(self, payload: bytes, shown: np.ndarray, spec: KeySpec) -> np.ndarray:
        """Inverse of `encode` (see `KeyCoder.decode`)."""
        opened, offset = [], 0
        for part in np.split(shown, len(spec.maps)):
            code, used = read_key(part, payload[offset:], spec.k, spec.mask_signs, spec.permuted)
            opened.append(code)
            offset += used
        if offset != len(payload):
            raise PrimisError("key payload length does not match the public file")
        return np.concatenate(opened)

    def information(self, payload: bytes, public: np.ndarray, spec: KeySpec) -> float:
        """The ideal bits of the maps' keys: sum log2(radix) of their digits."""
        parts = np.split(public, len(spec.maps))
        return sum(key_size(part, spec.k, spec.mask_signs, spec.permuted)[0] for part in parts)

    def atom_costs(
        self,
        vectors: np.ndarray,
        grid: tuple[int, int],
        scale: float = 1.0,
        dtype: type = np.float32,
    ) -> np.ndarray:
        """(V, 2, n) zeros: which atoms a vector holds does not change its key's size."""
        return np.zeros((len(vectors), 2, vectors.shape[1]), dtype=dtype)
