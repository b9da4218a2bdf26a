"""The public file (``.primis``) and the key file (``.primiskey``): layout, writing, validation.

Both files share one container::

    magic (8 bytes) | version (u16) | header length (u32) | header (UTF-8 JSON)
    | payload length (u32) | payload | SHA-256 of everything before (32 bytes)

The public header holds only what decoding needs: model hash, code grid, code parameters and
a random file id. The key header ties the key to one public file (file id and public digest)
and carries the private side: original size, intensity mapping, the maps it opens.

The two files are bound both ways (version 2): the key names the public file's digest, and
the public file holds a commitment to the key, SHA-256 over a random 32-byte salt kept in the
key, the key's header and its payload. A key edited after the fact (even with its checksum
recomputed) no longer matches the genuine public file and is refused; the salt keeps the
commitment from revealing anything about the key. Version 3 adds the key's coding (`coding`,
`variable_rate`: supports range coded under the model's context model, `primis.keys`);
version 4 the privacy preset in both headers (`privacy`, `privacy.PRIVACY_MODES`); version 5
the key's high-fidelity layer (`residual`: the payload's last bytes, `primis.fidelity`). A
file is written at the lowest of versions 4 and 5 that holds it. Versions 1 (no commitment),
2 and 3 still read.

Readers check magic, version, lengths, digest and every header field before use, and the code
geometry against the limits of `primis.limits` before inflating the payload.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from primis.config import Strict
from primis.errors import PrimisError
from primis.limits import MAX_CODE_ENTRIES, MAX_CODE_VECTORS, MAX_FILE_BYTES, MAX_PIXELS

PUBLIC_MAGIC = b"PRIMIS\x00P"
KEY_MAGIC = b"PRIMIS\x00K"
VERSION = 4
RESIDUAL_VERSION = 5  # keys with a high-fidelity layer
READABLE_VERSIONS = (1, 2, 3, 4, 5)
MAX_HEADER = 1 << 20
# File names: NAME.primis beside NAME.primiskey (same NAME, in the public and the key folder).
PUBLIC_SUFFIX = ".primis"
KEY_SUFFIX = ".primiskey"
UNSEALED = "0" * 64  # the key's public digest before `seal_pair` fills it in
_COMMITMENT = b"primis key commitment v1\x00"
_PREFIX = struct.Struct(">8sHI")
_LENGTH = struct.Struct(">I")
DIGEST = 32


_HEX64 = r"^[0-9a-f]{64}$"
_LATER_KEY_FIELDS = ("coding", "variable_rate", "privacy", "residual")
_PRIVACY = r"^[a-z][a-z0-9-]{0,31}$"
_SIDE = 1 << 20  # rows or columns of an image or a code grid


class PublicHeader(Strict):
    kind: Literal["public"] = "public"
    file_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    model_hash: str = Field(pattern=_HEX64)
    grid: tuple[int, int] = Field(description="code positions (rows, columns)")
    n: int = Field(ge=2, le=4096)
    m: int = Field(ge=1, le=64)
    k: int = Field(ge=1)
    noise: int = Field(ge=0, description="noise entries per vector")
    mask_signs: bool
    permuted: bool = Field(description="atoms shown in a secret per-map order")
    privacy: str | None = Field(
        None, pattern=_PRIVACY, description="the privacy preset, or custom (version 4)"
    )
    key_commitment: str | None = Field(
        None, pattern=_HEX64, description="SHA-256 of the key's salt, header and payload"
    )

    @model_validator(mode="after")
    def _geometry(self) -> PublicHeader:
        rows, cols = self.grid
        if not (1 <= rows <= _SIDE and 1 <= cols <= _SIDE):
            raise ValueError("invalid code grid")
        if 2 * self.k > self.n or self.noise > self.n - 2 * self.k:
            raise ValueError("invalid code parameters")
        return self

    @property
    def vectors(self) -> int:
        return self.m * self.grid[0] * self.grid[1]


class Intensity(Strict):
    """The affine map that restores the input's values (see `primis.io.pixels.IntensityMapping`)."""

    dtype: Literal[
        "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16",
        "float32", "float64"
    ]  # fmt: skip
    low: Finite
    high: Finite
    invert: bool = False

    @model_validator(mode="after")
    def _range(self) -> Intensity:
        if not (self.high > self.low and math.isfinite(self.high - self.low)):
            raise ValueError("invalid intensity range")
        dtype = np.dtype(self.dtype)
        if dtype.kind in "ui" and not (
            np.iinfo(dtype).min <= self.low and self.high <= np.iinfo(dtype).max + 1
        ):
            raise ValueError(f"intensity range outside {self.dtype}")
        return self


Finite = Annotated[float, Field(allow_inf_nan=False)]


class Source(Strict):
    """Private facts about the input (`primis.io.images.read_source`), kept in the key only."""

    format: Literal["dicom", "npy", "tiff", "png", "jpg", "jpeg", "jfif", "webp", "bmp"] | None = (
        None  # every format `read_source` names
    )
    transfer_syntax: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=64)
    photometric: str | None = Field(None, pattern=r"^[A-Z0-9_]{1,16}$")
    bits_allocated: int | None = Field(None, ge=1, le=64)
    bits_stored: int | None = Field(None, ge=1, le=64)
    pixel_representation: int | None = Field(None, ge=0, le=1)
    rescale_slope: Finite | None = None
    rescale_intercept: Finite | None = None
    modality: str | None = Field(None, pattern=r"^[A-Z0-9_ ]{0,16}$")
    window_center: Finite | list[Finite] | None = None
    window_width: Finite | list[Finite] | None = None
    burned_in_annotation: bool | None = None
    presentation_lut_inverse: bool | None = None

    @field_validator("window_center", "window_width")
    @classmethod
    def _few(cls, value):
        if isinstance(value, list) and not 1 <= len(value) <= 16:
            raise ValueError("expected 1 to 16 window values")
        return value


class KeyHeader(Strict):
    kind: Literal["key"] = "key"
    file_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    public_sha256: str = Field(pattern=_HEX64)
    model_hash: str = Field(pattern=_HEX64)
    maps: list[int] = Field(min_length=1, max_length=64)
    shape: tuple[int, int] = Field(description="original image (rows, columns)")
    intensity: dict
    source: dict = Field(default_factory=dict, description="private details of the input")
    dicom_header: str | None = Field(
        None, max_length=1 << 22, description="original DICOM header (base64)"
    )
    salt: str | None = Field(None, pattern=_HEX64, description="secret salt of the commitment")
    coding: Literal["enumerative", "context"] = Field(
        "enumerative", description="how the payload codes the supports (version 3)"
    )
    variable_rate: bool = Field(False, description="each vector's count is coded (version 3)")
    privacy: str | None = Field(
        None, pattern=_PRIVACY, description="the privacy preset, or custom (version 4)"
    )
    residual: int | None = Field(
        None,
        ge=1,
        description="bytes at the payload's end holding the high-fidelity layer (version 5)",
    )

    @model_validator(mode="after")
    def _coding(self) -> KeyHeader:
        if self.variable_rate and self.coding != "context":
            raise ValueError("a variable rate needs context coding")
        return self

    @field_validator("maps")
    @classmethod
    def _maps(cls, maps: list[int]) -> list[int]:
        if any(not 0 <= j < 64 for j in maps) or len(set(maps)) != len(maps):
            raise ValueError("invalid code maps")
        return maps

    @field_validator("shape")
    @classmethod
    def _shape(cls, shape: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= side <= _SIDE for side in shape):
            raise ValueError("invalid image shape")
        return shape

    @field_validator("dicom_header")
    @classmethod
    def _base64(cls, text: str | None) -> str | None:
        if text is not None:
            try:
                base64.b64decode(text.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                raise ValueError("invalid base64") from None
        return text

    @field_validator("intensity")
    @classmethod
    def _intensity(cls, intensity: dict) -> dict:
        return Intensity.model_validate(intensity).model_dump()

    @field_validator("source")
    @classmethod
    def _source(cls, source: dict) -> dict:
        return Source.model_validate(source).model_dump(exclude_none=True)


_STORED_BLOCK = 0xFFFF  # the most bytes one stored deflate block holds


def _planes_stream(nonzero: bytes, positive: bytes, full: bool) -> bytes:
    """The public payload: one zlib stream of both bit planes at level 6. Where every entry is
    non-zero (``full``), the positive plane follows the compressed nonzero plane in stored
    deflate blocks instead: signs that are random do not compress, and the payload's size then
    depends on the planes' length alone, not on the image."""
    if not full:
        return zlib.compress(nonzero + positive, 6)
    compressor = zlib.compressobj(6)
    head = compressor.compress(nonzero) + compressor.flush(zlib.Z_SYNC_FLUSH)  # byte-aligned
    starts = range(0, max(len(positive), 1), _STORED_BLOCK)
    blocks = []
    for start in starts:  # header byte: BFINAL on the last block, BTYPE 00 (stored)
        chunk = positive[start : start + _STORED_BLOCK]
        final = start == starts[-1]
        blocks.append(struct.pack("<BHH", final, len(chunk), len(chunk) ^ 0xFFFF) + chunk)
    checksum = struct.pack(">I", zlib.adler32(positive, zlib.adler32(nonzero)))
    return head + b"".join(blocks) + checksum


@dataclass(frozen=True)
class PublicFile:
    header: PublicHeader
    vectors: np.ndarray  # (m * rows * columns, n) int8 in {-1, 0, 1}

    def to_bytes(self) -> bytes:
        nonzero = np.packbits(self.vectors != 0)
        positive = np.packbits(self.vectors > 0)
        payload = _planes_stream(nonzero.tobytes(), positive.tobytes(), bool(np.all(nonzero)))
        return _container(PUBLIC_MAGIC, self.header, payload, self.header.key_commitment)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "public file") -> PublicFile:
        """Parse and validate; the geometry is checked against the limits before inflating."""
        header, payload = _open_container(data, PUBLIC_MAGIC, PublicHeader, name)
        MAX_CODE_VECTORS.check(header.vectors, name)
        count = header.vectors * header.n
        MAX_CODE_ENTRIES.check(count, name)
        plane = (count + 7) // 8
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(payload, 2 * plane + 1)
        except zlib.error:
            raise PrimisError(f"{name}: corrupted payload") from None
        if len(raw) != 2 * plane or inflater.unconsumed_tail or not inflater.eof:
            raise PrimisError(f"{name}: payload size does not match the header")
        bits = np.frombuffer(raw, dtype=np.uint8)
        nonzero = np.unpackbits(bits[:plane], count=count).view(bool)
        positive = np.unpackbits(bits[plane:], count=count).view(bool)
        if np.any(positive > nonzero):
            raise PrimisError(f"{name}: corrupted payload (sign without entry)")
        live = np.count_nonzero(nonzero.reshape(-1, header.n), axis=1)
        if np.any(live != 2 * header.k + header.noise):
            raise PrimisError(f"{name}: public vectors do not match the code parameters")
        vectors = positive.view(np.int8) * np.int8(2)  # int8 throughout: 1 byte per entry
        vectors -= nonzero.view(np.int8)
        return cls(header, vectors.reshape(-1, header.n))


@dataclass(frozen=True)
class KeyFile:
    header: KeyHeader
    payload: bytes

    def to_bytes(self) -> bytes:
        return _container(KEY_MAGIC, self.header, self.payload, self.header.salt)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "key file") -> KeyFile:
        header, payload = _open_container(data, KEY_MAGIC, KeyHeader, name)
        MAX_PIXELS.check(header.shape[0] * header.shape[1], name)
        return cls(header, payload)

    @property
    def code_payload(self) -> bytes:
        """The payload's coded supports (all of it, but for a high-fidelity layer)."""
        return self.payload[: len(self.payload) - (self.header.residual or 0)]

    @property
    def residual_payload(self) -> bytes:
        """The high-fidelity layer (`primis.fidelity`), or b"" where the key has none."""
        return self.payload[len(self.payload) - (self.header.residual or 0) :]

    def commitment(self) -> str:
        """SHA-256 over the salt, the header (less the public digest) and the payload."""
        fields = self.header.model_dump(mode="json", exclude={"public_sha256"})
        for name in _LATER_KEY_FIELDS:  # absent from older keys' commitments while at default
            if fields[name] == KeyHeader.model_fields[name].default:
                del fields[name]
        text = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return sha256(_COMMITMENT + _LENGTH.pack(len(text)) + text + self.payload)


def seal_pair(public: PublicFile, key: KeyFile) -> tuple[bytes, bytes]:
    """The bytes of a public file and its key, bound both ways: a fresh salt (OS CSPRNG) goes
    into the key, the key's commitment into the public header, the public digest into the key.
    """
    salted = KeyFile(key.header.model_copy(update={"salt": os.urandom(32).hex()}), key.payload)
    header = public.header.model_copy(update={"key_commitment": salted.commitment()})
    public_bytes = PublicFile(header, public.vectors).to_bytes()
    digest = {"public_sha256": sha256(public_bytes)}
    return public_bytes, KeyFile(salted.header.model_copy(update=digest), key.payload).to_bytes()


def open_pair(
    public_bytes: bytes, key_bytes: bytes, public_name: str, key_name: str
) -> tuple[PublicFile, KeyFile]:
    """Parse a public file and its key and check that they belong together. The key is read
    first and the public file's digest checked on its raw bytes, so a public file that is not
    the key's is refused before its payload is inflated."""
    key = KeyFile.from_bytes(key_bytes, key_name)
    if key.header.public_sha256 != sha256(public_bytes):
        # Say why: a damaged file, another file's key, or an older version of this file.
        header, _ = _open_container(public_bytes, PUBLIC_MAGIC, PublicHeader, public_name)
        if header.file_id != key.header.file_id:
            raise PrimisError(f"{key_name} belongs to another public file (file id mismatch)")
        raise PrimisError(f"{key_name} was made for a different version of {public_name}")
    public = PublicFile.from_bytes(public_bytes, public_name)
    if key.header.file_id != public.header.file_id:
        raise PrimisError(f"{key_name} belongs to another public file (file id mismatch)")
    if key.header.model_hash != public.header.model_hash:
        raise PrimisError(f"{key_name} and {public_name} name different models")
    expected = public.header.key_commitment
    if (expected is None) != (key.header.salt is None) or (
        expected is not None and key.commitment() != expected
    ):
        raise PrimisError(
            f"{key_name} does not match the commitment in {public_name}: the key was edited"
        )
    return public, key


def new_file_id() -> str:
    return os.urandom(16).hex()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _container(magic: bytes, header: Strict, payload: bytes, sealed: str | None = None) -> bytes:
    """The file's bytes: the current version when the pair is sealed (see `seal_pair`), else 1."""
    text = header.model_dump_json(exclude_none=True).encode()
    version = VERSION if sealed is not None else 1
    if getattr(header, "residual", None):
        version = RESIDUAL_VERSION
    body = _PREFIX.pack(magic, version, len(text)) + text + _LENGTH.pack(len(payload)) + payload
    return body + hashlib.sha256(body).digest()


def _open_container(data: bytes, magic: bytes, header_type: type[Strict], name: str):
    other = KEY_MAGIC if magic == PUBLIC_MAGIC else PUBLIC_MAGIC
    what = "key" if magic == KEY_MAGIC else "public"
    if data[:8] == other:
        actual = "public" if what == "key" else "key"
        raise PrimisError(f"{name}: this is a PRIMIS {actual} file, not a {what} file")
    if len(data) < _PREFIX.size or data[:8] != magic:
        raise PrimisError(f"{name}: not a PRIMIS {what} file")
    _, version, header_length = _PREFIX.unpack_from(data)
    if version not in READABLE_VERSIONS:
        raise PrimisError(
            f"{name}: unsupported format version {version} (this PRIMIS reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    if header_length > MAX_HEADER:
        raise PrimisError(f"{name}: header too large")
    start = _PREFIX.size + header_length
    if len(data) < start + _LENGTH.size + DIGEST:
        raise PrimisError(f"{name}: truncated file")
    (payload_length,) = _LENGTH.unpack_from(data, start)
    end = start + _LENGTH.size + payload_length
    if len(data) != end + DIGEST:
        raise PrimisError(
            f"{name}: truncated file"
            if len(data) < end + DIGEST
            else f"{name}: trailing data after the end of the file"
        )
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise PrimisError(f"{name}: corrupted file (checksum mismatch)")
    try:
        header = header_type.model_validate_json(data[_PREFIX.size : start])
    except ValidationError as err:
        raise PrimisError(f"{name}: invalid header ({validation_reason(err)})") from None
    sealed = header.key_commitment if magic == PUBLIC_MAGIC else header.salt
    if (version >= 2) != (sealed is not None):
        raise PrimisError(f"{name}: invalid header (commitment does not fit version {version})")
    if version < 4 and header.privacy is not None:
        raise PrimisError(f"{name}: invalid header (privacy does not fit version {version})")
    payload = data[start + _LENGTH.size : end]
    residual = getattr(header, "residual", None)
    if (version == RESIDUAL_VERSION) != bool(residual) or (residual or 0) > len(payload):
        raise PrimisError(f"{name}: invalid header (residual does not fit version {version})")
    return header, payload


def validation_reason(err: ValidationError) -> str:
    """The first validation problem in one short line: where, and what."""
    first = err.errors(include_url=False)[0]
    where = ".".join(map(str, first["loc"]))
    return (f"{where}: " if where else "") + first["msg"].splitlines()[0][:200]


def read_file(path: Path) -> bytes:
    """File contents with a size cap (`PRIMIS_MAX_FILE_BYTES`), as a PrimisError on any OS
    failure."""
    path = Path(path)
    try:
        MAX_FILE_BYTES.check(path.stat().st_size, str(path))
        return path.read_bytes()
    except FileNotFoundError:
        raise PrimisError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PrimisError(f"{path}: is a folder, not a file") from None
    except OSError as err:
        raise PrimisError(f"{path}: cannot read ({err.strerror})") from None


def public_path(folder: Path, name: str) -> Path:
    """FOLDER/NAME.primis: where a pair's public file lives."""
    return Path(folder) / f"{name}{PUBLIC_SUFFIX}"


def key_path(folder: Path, name: str) -> Path:
    """FOLDER/NAME.primiskey: where a pair's key lives."""
    return Path(folder) / f"{name}{KEY_SUFFIX}"


def key_beside(public: Path, key_folder: Path) -> Path:
    """The key of public file ``public`` in ``key_folder`` (the same NAME)."""
    return key_path(key_folder, Path(public).stem)


def is_public_file(path: Path) -> bool:
    """Whether ``path`` is named as a public file."""
    return Path(path).suffix == PUBLIC_SUFFIX


def is_key_file(path: Path) -> bool:
    """Whether ``path`` is named as a key."""
    return Path(path).suffix == KEY_SUFFIX


def describe(path: Path) -> dict:
    """What `primis info` prints for a public file, a key or a wrapped key: its header and
    sizes (for a public file also the key it implies: the ideal bits and an enumerative key's
    payload bytes for all maps at k pairs per vector; a context-coded key is smaller, and an
    adaptive-rate model's keys hold fewer pairs)."""
    from primis.keys.enumerative import image_key_size
    from primis.keywrap import describe as describe_wrapped
    from primis.keywrap import is_wrapped

    data = read_file(Path(path))
    if data[:8] == KEY_MAGIC:
        key = KeyFile.from_bytes(data, str(path))
        return key.header.model_dump() | {"bytes": len(data), "key_payload_bytes": len(key.payload)}
    if data[:8] == PUBLIC_MAGIC:
        public = PublicFile.from_bytes(data, str(path))
        h = public.header
        ideal, packed = image_key_size(public.vectors, h.m, h.k, h.mask_signs, h.permuted)
        return h.model_dump() | {
            "bytes": len(data),
            "vectors": int(public.vectors.shape[0]),
            "ideal_key_bits": round(ideal, 1),
            "enumerative_key_payload_bytes": packed,
        }
    if is_wrapped(data):
        return describe_wrapped(data, str(path))
    raise PrimisError(f"{path}: not a PRIMIS public, key or wrapped key file")
