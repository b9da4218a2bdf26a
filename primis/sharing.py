"""The inference pipeline: image -> (public file, key file) and back, and the attacker's view.

    pixels --mapping--> [0,1] --pad--> encode --> ternary code (m*h*w vectors of length n)
      --ambiguate--> public vectors  ==> public file (no image data beyond the code)
      --supports-->  packed key      ==> key file (file id, public digest, mapping, shape)

Disambiguation reverses it; keys may open a subset of the code maps (the others decode as
zeros), and the attacker's view decodes the public vectors as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from primis.config import ObfuscationConfig
from primis.errors import PrimisError
from primis.formats import (
    KeyFile,
    KeyHeader,
    PublicFile,
    PublicHeader,
    new_file_id,
    sha256,
)
from primis.imageio import IntensityMapping, pad_to_multiple
from primis.modelstore import LoadedModel
from primis.obfuscation import (
    ambiguate,
    disambiguate,
    key_size,
    make_key,
    noise_count,
)


@dataclass(frozen=True)
class SharedImage:
    public: bytes
    key: bytes
    ideal_key_bits: float
    pixels: int


def _to_vectors(code: torch.Tensor) -> np.ndarray:
    """(1, m, n, h, w) -> (m*h*w, n), map-major."""
    _, m, n, h, w = code.shape
    return code[0].permute(0, 2, 3, 1).reshape(m * h * w, n).cpu().numpy()


def _from_vectors(vectors: np.ndarray, header: PublicHeader) -> torch.Tensor:
    rows, cols = header.grid
    code = torch.from_numpy(vectors).view(header.m, rows, cols, header.n)
    return code.permute(0, 3, 1, 2).unsqueeze(0).contiguous()


def share_image(
    unit: np.ndarray,
    mapping: IntensityMapping,
    model: LoadedModel,
    obfuscation: ObfuscationConfig,
    k: int | None = None,
    maps: list[int] | None = None,
    source: dict | None = None,
) -> SharedImage:
    """Encode and ambiguate one image (float32 in [0,1]); the key opens ``maps`` (default all)."""
    network = model.network
    cfg = network.config
    k = k or cfg.k
    maps = sorted(set(maps)) if maps else list(range(cfg.m))
    if any(not 0 <= j < cfg.m for j in maps):
        raise PrimisError(f"maps must lie in 0..{cfg.m - 1}")
    if not 1 <= k <= cfg.k:
        raise PrimisError(f"k must lie in 1..{cfg.k} for this model")
    padded = pad_to_multiple(unit, cfg.downsampling)
    x = torch.from_numpy(np.ascontiguousarray(padded))[None, None].to(_device(model))
    code = network.encode(x, k)
    vectors = _to_vectors(code)
    public_vectors = ambiguate(vectors, k, obfuscation)
    _, _, _, rows, cols = code.shape
    header = PublicHeader(
        file_id=new_file_id(),
        model_hash=model.hash,
        grid=(rows, cols),
        n=cfg.n,
        m=cfg.m,
        k=k,
        noise=noise_count(cfg.n, k, obfuscation.fill),
        mask_signs=obfuscation.mask_signs,
    )
    public = PublicFile(header, public_vectors).to_bytes()
    per_map = rows * cols
    payload = b""
    ideal = 0.0
    for j in maps:
        part = slice(j * per_map, (j + 1) * per_map)
        payload += make_key(vectors[part], public_vectors[part], k, obfuscation.mask_signs)
        ideal += key_size(public_vectors[part], k, obfuscation.mask_signs)[0]
    key_header = KeyHeader(
        file_id=header.file_id,
        public_sha256=sha256(public),
        model_hash=model.hash,
        maps=maps,
        shape=unit.shape,
        intensity=mapping.to_dict(),
        source=source or {},
    )
    return SharedImage(public, KeyFile(key_header, payload).to_bytes(), ideal, unit.size)


def read_pair(
    public_bytes: bytes, key_bytes: bytes, public_name: str = "public file", key_name: str = "key"
) -> tuple[PublicFile, KeyFile]:
    """Parse a public file and its key, and check that they belong together."""
    public = PublicFile.from_bytes(public_bytes, public_name)
    key = KeyFile.from_bytes(key_bytes, key_name)
    if key.header.file_id != public.header.file_id:
        raise PrimisError(f"{key_name} belongs to another public file (file id mismatch)")
    if key.header.public_sha256 != sha256(public_bytes):
        raise PrimisError(f"{key_name} was made for a different version of {public_name}")
    if key.header.model_hash != public.header.model_hash:
        raise PrimisError(f"{key_name} and {public_name} name different models")
    return public, key


def _check_model(public: PublicFile, model: LoadedModel, name: str) -> None:
    if public.header.model_hash != model.hash:
        raise PrimisError(
            f"{name} was made with model {public.header.model_hash[:12]}, "
            f"not the loaded model {model.hash[:12]}"
        )
    cfg = model.network.config
    if (public.header.n, public.header.m) != (cfg.n, cfg.m) or public.header.k > cfg.n // 2:
        raise PrimisError(f"{name}: code parameters do not fit the model")


def recover_code(public: PublicFile, key: KeyFile) -> np.ndarray:
    """The true code vectors of the maps the key opens (other maps are zero)."""
    h = public.header
    per_map = h.grid[0] * h.grid[1]
    if any(not 0 <= j < h.m for j in key.header.maps) or len(set(key.header.maps)) != len(
        key.header.maps
    ):
        raise PrimisError("key names code maps the public file does not have")
    vectors = np.zeros_like(public.vectors)
    offset = 0
    for j in key.header.maps:
        part = slice(j * per_map, (j + 1) * per_map)
        size = key_size(public.vectors[part], h.k, h.mask_signs)[1]
        chunk = key.payload[offset : offset + size]
        offset += size
        vectors[part] = disambiguate(public.vectors[part], chunk, h.k, h.mask_signs)
    if offset != len(key.payload):
        raise PrimisError("key payload length does not match the public file")
    return vectors


def _device(model: LoadedModel) -> torch.device:
    return next(model.network.parameters()).device


def _decode(model: LoadedModel, vectors: np.ndarray, header: PublicHeader) -> np.ndarray:
    code = _from_vectors(vectors, header).to(_device(model))
    return model.network.decode(code)[0, 0].cpu().numpy()


def reconstruct(
    public_bytes: bytes,
    key_bytes: bytes,
    model: LoadedModel,
    public_name: str = "public file",
    key_name: str = "key",
) -> tuple[np.ndarray, KeyFile]:
    """Authorized reconstruction in the input's own dtype and range, and the key it used."""
    public, key = read_pair(public_bytes, key_bytes, public_name, key_name)
    _check_model(public, model, public_name)
    unit = _decode(model, recover_code(public, key), public.header)
    rows, cols = key.header.shape
    if rows > unit.shape[0] or cols > unit.shape[1] or rows < 1 or cols < 1:
        raise PrimisError(f"{key_name}: image shape does not fit the public code")
    try:
        mapping = IntensityMapping.from_dict(key.header.intensity)
    except (KeyError, TypeError, ValueError):
        raise PrimisError(f"{key_name}: invalid intensity mapping") from None
    return mapping.inverse(unit[:rows, :cols]), key


def attacker_view(public_bytes: bytes, model: LoadedModel, name: str = "public file") -> np.ndarray:
    """What anyone decodes from the public file alone: its vectors decoded as they are."""
    public = PublicFile.from_bytes(public_bytes, name)
    _check_model(public, model, name)
    return _decode(model, public.vectors, public.header)
