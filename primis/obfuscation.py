"""Ambiguation and disambiguation of ternary code vectors, and the key as packed supports.

Codes here are int8 arrays of shape (V, n): V code vectors, each with exactly k entries +1 and
k entries -1, in the order `code_to_vectors` gives (map-major, then rows, then columns). The
public vector keeps the true support S and fills a fraction of the other positions with noise
entries of the same alphabet; the key is S (with its signs when signs are masked), coded
enumeratively. All randomness comes from the operating system's CSPRNG.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from primis.config import ADAPTIVE_STRICT_ONLY, ObfuscationConfig
from primis.enumerative import (
    ideal_bits,
    pack_digits,
    packed_size,
    rank_subsets,
    ternary_support_bits,
    unpack_digits,
    unrank_subsets,
)
from primis.errors import PrimisError
from primis.keycoding import KeyModel, decode_code, encode_code

if TYPE_CHECKING:  # torch is imported where used, so that `primis info` needs none
    import torch


def code_to_vectors(code: torch.Tensor) -> np.ndarray:
    """The model's code (1, m, n, h, w) -> vectors (m*h*w, n), map-major: the layout of public
    files, keys and everything here."""
    _, m, n, h, w = code.shape
    return code[0].permute(0, 2, 3, 1).reshape(m * h * w, n).cpu().numpy()


def vectors_to_code(vectors: np.ndarray, m: int, grid: tuple[int, int]) -> torch.Tensor:
    """Vectors (m*h*w, n) in `code_to_vectors` order -> the model's code (1, m, n, h, w)."""
    import torch

    rows, cols = grid
    code = torch.from_numpy(np.ascontiguousarray(vectors)).view(m, rows, cols, -1)
    return code.permute(0, 3, 1, 2).unsqueeze(0).contiguous()


def secure_uniform_bits(shape: tuple[int, ...]) -> np.ndarray:
    """Independent fair bits (uint8 0/1) from os.urandom."""
    count = math.prod(shape)
    raw = np.frombuffer(os.urandom((count + 7) // 8), dtype=np.uint8)
    return np.unpackbits(raw)[:count].reshape(shape)


def secure_random_keys(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform 64-bit integers from os.urandom, for drawing random subsets by sorting."""
    return np.frombuffer(os.urandom(8 * math.prod(shape)), dtype=np.uint64).reshape(shape)


def noise_count(n: int, k: int, fill: float) -> int:
    """How many of the n-2k zero entries of each vector become noise."""
    return round(fill * (n - 2 * k))


def reveals_nothing(obfuscation: ObfuscationConfig) -> bool:
    """Whether public vectors are independent of the code: every entry non-zero (fill 1) with
    a random sign (mask_signs). Shuffling atoms then hides nothing more, and each vector may
    hold fewer than k pairs (a rate that follows the content) without the public file showing
    it."""
    return obfuscation.fill == 1.0 and obfuscation.mask_signs


def check_mode_for_rate(obfuscation: ObfuscationConfig, adaptive_rate: bool) -> None:
    """PrimisError where a model with an adaptive rate would share in a mode whose public
    vectors are not independent of the code: they would show each vector's count."""
    if adaptive_rate and not reveals_nothing(obfuscation):
        raise PrimisError(ADAPTIVE_STRICT_ONLY)


def effective(obfuscation: ObfuscationConfig) -> ObfuscationConfig:
    """The settings as applied: no atom shuffle where the public vectors reveal nothing."""
    if reveals_nothing(obfuscation) and obfuscation.permute_atoms:
        return obfuscation.model_copy(update={"permute_atoms": False})
    return obfuscation


def ambiguate(code: np.ndarray, k: int, obfuscation: ObfuscationConfig) -> np.ndarray:
    """The public vectors: true support kept, noise entries added, signs masked if configured.
    Where the public vectors reveal nothing, vectors may hold any s <= k pairs."""
    check_code(code, k, variable=reveals_nothing(obfuscation))
    v, n = code.shape
    if reveals_nothing(obfuscation):
        return (secure_uniform_bits((v, n)).astype(np.int8) * 2 - 1).astype(np.int8)
    support = code != 0
    public = np.where(support, code, 0).astype(np.int8)
    noise = noise_count(n, k, obfuscation.fill)
    if noise == n - 2 * k:
        fill_mask = ~support
    else:
        keys = secure_random_keys((v, n))
        keys = np.where(support, np.iinfo(np.uint64).max, keys)
        chosen = np.argsort(keys, axis=1)[:, :noise]
        fill_mask = np.zeros((v, n), dtype=bool)
        np.put_along_axis(fill_mask, chosen, True, axis=1)
    random_signs = (secure_uniform_bits((v, n)).astype(np.int8) * 2 - 1).astype(np.int8)
    public[fill_mask] = random_signs[fill_mask]
    if obfuscation.mask_signs:
        public[support] = random_signs[support]
    return public


def check_code(code: np.ndarray, k: int, variable: bool = False) -> None:
    """Every vector holds exactly k entries +1 and k entries -1 (``variable``: s <= k of each)."""
    if code.ndim != 2 or code.dtype != np.int8:
        raise ValueError("codes are int8 arrays of shape (vectors, n)")
    positive, negative = (code == 1).sum(1), (code == -1).sum(1)
    if variable:
        if np.any(positive != negative) or np.any(positive > k):
            raise ValueError(f"every code vector must hold s <= {k} entries +1 and s entries -1")
    elif not (np.all(positive == k) and np.all(negative == k)):
        raise ValueError(f"every code vector must hold exactly {k} entries +1 and {k} entries -1")


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


def secure_permutation(n: int) -> np.ndarray:
    """A uniformly random permutation of range(n) from os.urandom."""
    return np.argsort(secure_random_keys((n,)), kind="stable")


def shuffle_atoms(vectors: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Column c of the result shows atom perm[c]."""
    return vectors[:, perm]


def unshuffle_atoms(shown: np.ndarray, perm: np.ndarray) -> np.ndarray:
    original = np.empty_like(shown)
    original[:, perm] = shown
    return original


def permutation_digits(perm: np.ndarray) -> list[int]:
    """Lehmer code: digit i (radix n-i) counts later entries smaller than perm[i]."""
    return [int(np.count_nonzero(perm[i + 1 :] < perm[i])) for i in range(len(perm))]


def permutation_radices(n: int, count: int) -> np.ndarray:
    """Radices of the Lehmer digits of ``count`` permutations of n atoms, one after another."""
    return np.array(list(range(n, 0, -1)) * count, dtype=object)


def permutation_from_digits(digits: list[int]) -> np.ndarray:
    available = list(range(len(digits)))
    return np.array([available.pop(int(d)) for d in digits])


def size_class(side: int, multiple: int) -> int:
    """The padded side of a coarse size class: the smallest ``multiple`` * 2^i or
    ``multiple`` * 3 * 2^(i-1) pixels at least ``side``; at most half as many again per side."""
    power = multiple
    while True:
        if power >= side:
            return power
        if power >= 2 * multiple and power * 3 // 2 >= side:
            return power * 3 // 2
        power *= 2


def class_grid(grid: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The public grid of an image whose code grid is ``grid``, padded to its size class."""
    return tuple(size_class(cells * multiple, multiple) // multiple for cells in grid)


def crop_grid(
    vectors: np.ndarray, maps: int, grid: tuple[int, int], part: tuple[int, int]
) -> np.ndarray:
    """The vectors of the top-left ``part`` of each map of a ``grid`` (map-major rows)."""
    n = vectors.shape[1]
    return vectors.reshape(maps, *grid, n)[:, : part[0], : part[1]].reshape(-1, n)


def image_grid(public_grid: tuple[int, int], shape: tuple[int, int], multiple: int):
    """The code grid of an image of ``shape`` whose public file shows ``public_grid``: the
    public grid, or the part of it the image covers where the file is padded to its size
    class (`pad_public`)."""
    grid = tuple(-(-side // multiple) for side in shape)
    padded = grid != tuple(public_grid) and class_grid(grid, multiple) == tuple(public_grid)
    return grid if padded else tuple(public_grid)


def pad_public(
    vectors: np.ndarray, maps: int, grid: tuple[int, int], multiple: int
) -> tuple[tuple[int, int], np.ndarray]:
    """Public vectors of a strict file padded to the grid's size class with fresh noise (the
    real ones top-left): (class grid, vectors)."""
    padded_grid = class_grid(grid, multiple)
    n = vectors.shape[1]
    noise = secure_uniform_bits((maps, *padded_grid, n)).astype(np.int8) * 2 - 1
    noise[:, : grid[0], : grid[1]] = vectors.reshape(maps, *grid, n)
    return padded_grid, noise.reshape(-1, n)


def ambiguate_maps(
    vectors: np.ndarray, maps: int, k: int, obfuscation: ObfuscationConfig
) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Public vectors of every code map (map-major rows) and each map's secret atom order.

    With ``permute_atoms`` the columns of each map are shuffled by a fresh random permutation,
    so how often the model uses each atom says nothing about where the true entries are (not
    needed, and not done, where the public vectors reveal nothing).
    """
    public = ambiguate(vectors, k, obfuscation)
    rows = len(vectors) // maps
    shuffle = obfuscation.permute_atoms and not reveals_nothing(obfuscation)
    perms: list[np.ndarray | None] = []
    for j in range(maps):
        part = slice(j * rows, (j + 1) * rows)
        perm = secure_permutation(vectors.shape[1]) if shuffle else None
        if perm is not None:
            public[part] = shuffle_atoms(public[part], perm)
        perms.append(perm)
    return public, perms


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


def disambiguate(
    public: np.ndarray, key: bytes, k: int, mask_signs: bool, permuted: bool = False
) -> np.ndarray:
    """The true code vectors from the public vectors (as shown) and exactly their packed key."""
    code, used = read_key(public, key, k, mask_signs, permuted)
    if used != len(key):
        raise PrimisError(f"key payload has {len(key)} bytes, expected {used}")
    return code


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


def _chunks(count: int, size: int = 1 << 15) -> list[slice]:
    """Row ranges of at most ``size`` vectors: the (vectors, n) int64 work arrays of key coding
    stay near 64 MB for n = 256, whatever the image size."""
    return [slice(start, min(count, start + size)) for start in range(0, count, size)]


def allowed_atoms(public: np.ndarray, mask_signs: bool) -> np.ndarray:
    """(V, 2, n): where each vector's +1 and -1 entries may lie, given its public vector
    (read-only: with masked signs both rows are one array, broadcast)."""
    if mask_signs:
        live = public != 0
        return np.broadcast_to(live[:, None], (len(live), 2, live.shape[1]))
    return np.stack([public == 1, public == -1], axis=1)


def make_context_key(
    code: np.ndarray,
    public: list[np.ndarray],
    perms: list[np.ndarray | None],
    maps: list[int],
    grid: tuple[int, int],
    k: int,
    mask_signs: bool,
    key_model: KeyModel,
    variable: bool,
) -> bytes:
    """The key of the maps ``maps`` coded under the model's context model: the atom order of
    each shuffled map (as in `make_key`), then the range-coded true vectors ``code`` (their
    rows, map-major) given the (unshuffled) ``public`` vectors of each map."""
    n = code.shape[1]
    digits = [permutation_digits(perm) for perm in perms if perm is not None]
    order = pack_digits(
        np.array([d for ds in digits for d in ds], dtype=object),
        permutation_radices(n, len(digits)),
    )
    allowed = allowed_atoms(np.concatenate(public), mask_signs)
    return order + encode_code(code, maps, grid, k, key_model, allowed, variable)


def read_context_key(
    shown: list[np.ndarray],
    payload: bytes,
    maps: list[int],
    grid: tuple[int, int],
    k: int,
    mask_signs: bool,
    permuted: bool,
    key_model: KeyModel,
    variable: bool,
) -> np.ndarray:
    """Inverse of :func:`make_context_key` given the public vectors of each map as shown."""
    n = shown[0].shape[1]
    radices = permutation_radices(n, len(maps) if permuted else 0)
    used = packed_size(radices)
    if len(payload) < used:
        raise PrimisError(f"key payload has {len(payload)} bytes, expected at least {used}")
    digits = unpack_digits(payload[:used], radices)
    public = [
        unshuffle_atoms(vectors, permutation_from_digits(digits[i * n : (i + 1) * n]))
        if permuted
        else vectors
        for i, vectors in enumerate(shown)
    ]
    allowed = allowed_atoms(np.concatenate(public), mask_signs)
    return decode_code(payload[used:], maps, grid, n, k, key_model, allowed, variable)
