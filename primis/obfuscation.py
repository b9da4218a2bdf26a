"""Ambiguation of ternary code vectors, and the privacy presets.

Codes here are int8 arrays of shape (V, n): V code vectors, each with exactly k entries +1 and
k entries -1, in the order `code_to_vectors` gives (map-major, then rows, then columns). The
public vector keeps the true support S and fills a fraction of the other positions with noise
entries of the same alphabet; the key (`primis.keys`) names S among them (with its signs when
signs are masked). All randomness comes from the operating system's CSPRNG.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import numpy as np

from primis.config import ADAPTIVE_STRICT_ONLY, ObfuscationConfig
from primis.errors import PrimisError

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


def allowed_atoms(public: np.ndarray, mask_signs: bool) -> np.ndarray:
    """(V, 2, n): where each vector's +1 and -1 entries may lie, given its public vector
    (read-only: with masked signs both rows are one array, broadcast)."""
    if mask_signs:
        live = public != 0
        return np.broadcast_to(live[:, None], (len(live), 2, live.shape[1]))
    return np.stack([public == 1, public == -1], axis=1)
