"""The private key: which entries of the public vectors are the true code.

A key opens some code maps of one image. Its payload is coded by a `KeyCoder`, chosen once per
model (`key_coder`): range coded under the model's key model where it has one
(`ContextKeyCoder`, `primis.keys.context`), else enumeratively (`EnumerativeKeyCoder`,
`primis.keys.enumerative`). A key header's ``coding`` names the coder that reads it.

`encode_key` and `decode_key` take an image's vectors of every map (map-major rows, as
`obfuscation.code_to_vectors` lays them out), pick the maps a key opens and undo the atom
shuffle; a coder sees only the opened maps. The byte layout of both codings is FORMAT.md's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from primis.config import ObfuscationConfig
from primis.errors import PrimisError
from primis.keys.context import TENSORS, ContextKeyCoder, KeyModel, fit_key_model
from primis.keys.enumerative import EnumerativeKeyCoder
from primis.obfuscation import reveals_nothing, unshuffle_atoms

__all__ = [
    "TENSORS",
    "ContextKeyCoder",
    "EnumerativeKeyCoder",
    "KeyCoder",
    "KeyModel",
    "KeySpec",
    "coder_for",
    "decode_key",
    "encode_key",
    "fit_key_model",
    "key_coder",
    "key_spec",
]


@dataclass(frozen=True)
class KeySpec:
    """What both sides of a key know besides its bytes: the code maps it opens (ascending), the
    code grid (rows, cols) of each, the pairs k per vector, whether the public signs are
    masked and the atoms shown shuffled, and whether vectors may hold s <= k pairs
    (``variable``, as `KeyHeader.variable_rate`: their counts are coded)."""

    maps: tuple[int, ...]
    grid: tuple[int, int]
    k: int
    mask_signs: bool
    permuted: bool
    variable: bool


class KeyCoder(Protocol):
    """How a key's payload codes the true vectors of the maps it opens, given their public
    vectors. ``coding`` is its name in key headers; ``codes_counts`` whether it codes each
    vector's count (vectors of s <= k pairs) or every vector holds k."""

    coding: str
    codes_counts: bool

    def encode(
        self, code: np.ndarray, public: np.ndarray, perms: list[np.ndarray | None], spec: KeySpec
    ) -> bytes:
        """The payload of the true vectors ``code`` of the opened maps (map-major rows) given
        their public vectors in the model's atom order and each map's atom order (None: not
        shuffled). ValueError where the code does not fit the public vectors."""
        ...

    def decode(self, payload: bytes, shown: np.ndarray, spec: KeySpec) -> np.ndarray:
        """The true vectors of the opened maps from their public vectors as shown (map-major
        rows); PrimisError where the payload is not a key of them."""
        ...

    def information(self, payload: bytes, public: np.ndarray, spec: KeySpec) -> float:
        """The key's information in bits: what guessing it takes."""
        ...

    def atom_costs(
        self,
        vectors: np.ndarray,
        grid: tuple[int, int],
        scale: float = 1.0,
        dtype: type = np.float32,
    ) -> np.ndarray:
        """(V, 2, n): the key bits, times ``scale``, that each atom adds to a code of every
        map by holding +1 ([:, 0]) or -1 ([:, 1]) in its vector, as ``dtype``."""
        ...


def key_coder(key_model: KeyModel | None) -> KeyCoder:
    """How a model's keys are coded: under its key model where it has one, else enumeratively
    (`LoadedModel.key_coder` keeps the one of a model)."""
    return EnumerativeKeyCoder() if key_model is None else ContextKeyCoder(key_model)


def coder_for(coding: str, model_coder: KeyCoder) -> KeyCoder:
    """The coder that reads a key coded as ``coding``, for a model whose keys ``model_coder``
    codes: enumerative keys need no model, context-coded ones the model's key model."""
    if coding == model_coder.coding:
        return model_coder
    if coding == EnumerativeKeyCoder.coding:
        return EnumerativeKeyCoder()
    raise PrimisError("the key is context coded, but the model has no key model")


def key_spec(
    coder: KeyCoder,
    maps: list[int],
    grid: tuple[int, int],
    k: int,
    obfuscation: ObfuscationConfig,
    perms: list[np.ndarray | None],
) -> KeySpec:
    """The spec of a key that ``coder`` makes, opening ``maps`` of an image shared under
    ``obfuscation`` with the atom orders ``perms`` (one per map): counts are coded where the
    coder can and the public vectors reveal nothing."""
    variable = coder.codes_counts and reveals_nothing(obfuscation)
    permuted = any(perm is not None for perm in perms)
    return KeySpec(tuple(maps), grid, k, obfuscation.mask_signs, permuted, variable)


def encode_key(
    coder: KeyCoder,
    vectors: np.ndarray,
    shown: np.ndarray,
    perms: list[np.ndarray | None],
    spec: KeySpec,
) -> tuple[bytes, float]:
    """The payload of the key opening ``spec.maps`` of an image's true ``vectors`` (all maps),
    given its public vectors as shown and each map's atom order, and its information in bits
    (`KeyCoder.information`)."""
    per_map = spec.grid[0] * spec.grid[1]
    parts = [slice(j * per_map, (j + 1) * per_map) for j in spec.maps]
    opened = [perms[j] for j in spec.maps]
    public = np.concatenate(
        [
            shown[part] if perm is None else unshuffle_atoms(shown[part], perm)
            for part, perm in zip(parts, opened, strict=True)
        ]
    )
    code = np.concatenate([vectors[part] for part in parts])
    payload = coder.encode(code, public, opened, spec)
    return payload, coder.information(payload, public, spec)


def decode_key(coder: KeyCoder, payload: bytes, shown: np.ndarray, spec: KeySpec) -> np.ndarray:
    """Inverse of `encode_key`: the true vectors of every map of the public vectors ``shown``,
    zero in the maps the key does not open."""
    per_map = spec.grid[0] * spec.grid[1]
    if any(not 0 <= j < len(shown) // per_map for j in spec.maps) or len(set(spec.maps)) != len(
        spec.maps
    ):
        raise PrimisError("key names code maps the public file does not have")
    rows = np.concatenate([np.arange(j * per_map, (j + 1) * per_map) for j in spec.maps])
    vectors = np.zeros_like(shown)
    vectors[rows] = coder.decode(payload, shown[rows], spec)
    return vectors
