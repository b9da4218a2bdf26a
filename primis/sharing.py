"""The inference pipeline: image -> (public file, key file) and back, and the attacker's view.

    pixels --mapping--> [0,1] --pad--> encode, refine --> ternary code (m*h*w vectors, length n)
      --ambiguate--> public vectors  ==> public file (no image data beyond the code)
      --supports-->  packed key      ==> key file (file id, public digest, mapping, shape)

Disambiguation reverses it; keys may open a subset of the code maps (the others decode as
zeros), and the attacker's view decodes the public vectors as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    ambiguate_maps,
    key_size,
    make_key,
    noise_count,
    read_key,
    unshuffle_atoms,
)

# Adam steps that improve each image's code before it is shared (`SparseTernaryAutoEncoder.refine`):
# the bundled model gives 36.9 dB with them against 32.3 dB with the encoder's code (held-out
# median, MODEL_CARD.md); 100 steps gained 0.25 dB more on validation images at twice the time.
REFINE_STEPS = 50


@dataclass(frozen=True)
class SharedImage:
    file_id: str
    public: bytes
    key: bytes
    ideal_key_bits: float
    pixels: int


def code_to_vectors(code: torch.Tensor) -> np.ndarray:
    """Code (1, m, n, h, w) -> vectors (m*h*w, n), map-major: the public file's layout."""
    _, m, n, h, w = code.shape
    return code[0].permute(0, 2, 3, 1).reshape(m * h * w, n).cpu().numpy()


def vectors_to_code(vectors: np.ndarray, header: PublicHeader) -> torch.Tensor:
    rows, cols = header.grid
    code = torch.from_numpy(vectors).view(header.m, rows, cols, header.n)
    return code.permute(0, 3, 1, 2).unsqueeze(0).contiguous()


@dataclass(frozen=True)
class ImageToShare:
    """An input in model range with what its key must carry to restore it."""

    unit: np.ndarray
    mapping: IntensityMapping
    source: dict = field(default_factory=dict)
    dicom_header: str | None = None


def share_images(
    images: list[ImageToShare],
    model: LoadedModel,
    obfuscation: ObfuscationConfig,
    k: int | None = None,
    maps: list[int] | None = None,
    batch_size: int = 16,
    refine_steps: int = REFINE_STEPS,
) -> list[SharedImage]:
    """Encode (see `encode_images`) and ambiguate images.

    Each key opens ``maps`` (default all); ``source`` and ``dicom_header`` go into the key only.
    """
    cfg = model.network.config
    k = k or cfg.k
    maps = sorted(set(maps)) if maps else list(range(cfg.m))
    if any(not 0 <= j < cfg.m for j in maps):
        raise PrimisError(f"maps must lie in 0..{cfg.m - 1}")
    if not 1 <= k <= cfg.k:
        raise PrimisError(f"k must lie in 1..{cfg.k} for this model")
    codes = encode_images(model, [image.unit for image in images], k, refine_steps, batch_size)
    return [
        _package(image, code, model, obfuscation, k, maps)
        for image, code in zip(images, codes, strict=True)
    ]


def encode_images(
    model: LoadedModel,
    units: list[np.ndarray],
    k: int,
    refine_steps: int = REFINE_STEPS,
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Ternary code (1,m,n,h,w) of each image in [0,1], padded to the model's grid; images of
    one padded size share a forward pass. With ``refine_steps`` each code is refined on the
    image's own pixels (the padding does not count)."""
    multiple = model.network.config.downsampling
    padded = [pad_to_multiple(unit, multiple) for unit in units]
    codes: list[torch.Tensor | None] = [None] * len(units)
    for indices in _batches([p.shape for p in padded], batch_size):
        x = torch.from_numpy(np.stack([padded[i] for i in indices]))[:, None]
        valid = torch.zeros_like(x)
        for row, i in enumerate(indices):
            valid[row, :, : units[i].shape[0], : units[i].shape[1]] = 1
        device = _device(model)
        code = model.network.encode(x.to(device), k, refine_steps, valid.to(device))
        for row, i in enumerate(indices):
            codes[i] = code[row : row + 1]
    return codes


def share_image(
    unit: np.ndarray,
    mapping: IntensityMapping,
    model: LoadedModel,
    obfuscation: ObfuscationConfig,
    k: int | None = None,
    maps: list[int] | None = None,
    source: dict | None = None,
    dicom_header: str | None = None,
    refine_steps: int = REFINE_STEPS,
) -> SharedImage:
    """One image through :func:`share_images`."""
    image = ImageToShare(unit, mapping, source or {}, dicom_header)
    return share_images([image], model, obfuscation, k, maps, refine_steps=refine_steps)[0]


def _batches(shapes: list[tuple], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal shape, in chunks of at most ``batch_size``."""
    groups: dict[tuple, list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(tuple(shape), []).append(index)
    return [
        members[start : start + batch_size]
        for members in groups.values()
        for start in range(0, len(members), batch_size)
    ]


def _package(
    image: ImageToShare,
    code: torch.Tensor,
    model: LoadedModel,
    obfuscation: ObfuscationConfig,
    k: int,
    maps: list[int],
) -> SharedImage:
    """Ambiguate one image's code and write its public file and key."""
    cfg = model.network.config
    vectors = code_to_vectors(code)
    public_vectors, perms = ambiguate_maps(vectors, cfg.m, k, obfuscation)
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
        permuted=obfuscation.permute_atoms,
    )
    public = PublicFile(header, public_vectors).to_bytes()
    per_map = rows * cols
    payload = b""
    ideal = 0.0
    for j in maps:
        part, perm = slice(j * per_map, (j + 1) * per_map), perms[j]
        shown = public_vectors[part]
        original = shown if perm is None else unshuffle_atoms(shown, perm)
        payload += make_key(vectors[part], original, k, obfuscation.mask_signs, perm)
        ideal += key_size(shown, k, obfuscation.mask_signs, perm is not None)[0]
    key_header = KeyHeader(
        file_id=header.file_id,
        public_sha256=sha256(public),
        model_hash=model.hash,
        maps=maps,
        shape=image.unit.shape,
        intensity=image.mapping.to_dict(),
        source=image.source,
        dicom_header=image.dicom_header,
    )
    key = KeyFile(key_header, payload).to_bytes()
    return SharedImage(header.file_id, public, key, ideal, image.unit.size)


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
        vectors[part], used = read_key(
            public.vectors[part], key.payload[offset:], h.k, h.mask_signs, h.permuted
        )
        offset += used
    if offset != len(key.payload):
        raise PrimisError("key payload length does not match the public file")
    return vectors


def _device(model: LoadedModel) -> torch.device:
    return next(model.network.parameters()).device


def _decode_many(
    model: LoadedModel, codes: list[tuple[np.ndarray, PublicHeader]], batch_size: int
) -> list[np.ndarray]:
    """Decode code vectors to [0,1] images; codes with the same grid share a forward pass."""
    images: list[np.ndarray | None] = [None] * len(codes)
    shapes = [(h.m, h.n, *h.grid) for _, h in codes]
    for indices in _batches(shapes, batch_size):
        code = torch.cat([vectors_to_code(*codes[i]) for i in indices]).to(_device(model))
        decoded = model.network.decode(code)[:, 0].cpu().numpy()
        for row, i in enumerate(indices):
            images[i] = decoded[row]
    return images


def reconstruct_many(
    pairs: list[tuple[bytes, bytes]], model: LoadedModel, batch_size: int = 16
) -> list[tuple[np.ndarray, KeyFile]]:
    """Authorized reconstructions (input dtype and range) of (public, key) pairs, batched."""
    opened = []
    for public_bytes, key_bytes in pairs:
        public, key = read_pair(public_bytes, key_bytes)
        _check_model(public, model, "public file")
        opened.append((public, key, recover_code(public, key)))
    units = _decode_many(model, [(code, public.header) for public, _, code in opened], batch_size)
    return [_restore(unit, key) for unit, (_, key, _) in zip(units, opened, strict=True)]


def _restore(unit: np.ndarray, key: KeyFile, key_name: str = "key") -> tuple[np.ndarray, KeyFile]:
    rows, cols = key.header.shape
    if rows > unit.shape[0] or cols > unit.shape[1] or rows < 1 or cols < 1:
        raise PrimisError(f"{key_name}: image shape does not fit the public code")
    try:
        mapping = IntensityMapping.from_dict(key.header.intensity)
    except (KeyError, TypeError, ValueError):
        raise PrimisError(f"{key_name}: invalid intensity mapping") from None
    return mapping.inverse(unit[:rows, :cols]), key


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
    unit = _decode_many(model, [(recover_code(public, key), public.header)], 1)[0]
    return _restore(unit, key, key_name)


def attacker_view(public_bytes: bytes, model: LoadedModel, name: str = "public file") -> np.ndarray:
    """What anyone decodes from the public file alone: its vectors decoded as they are."""
    public = PublicFile.from_bytes(public_bytes, name)
    _check_model(public, model, name)
    return _decode_many(model, [(public.vectors, public.header)], 1)[0]
