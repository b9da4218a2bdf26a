"""The public file (``.primis``) and the key file (``.primiskey``): layout, writing, validation.

Both files share one container::

    magic (8 bytes) | version (u16) | header length (u32) | header (UTF-8 JSON)
    | payload length (u32) | payload | SHA-256 of everything before (32 bytes)

The public header holds only what decoding needs: model hash, code grid, code parameters and
a random file id. The key header ties the key to one public file (file id and public digest)
and carries the private side: original size, intensity mapping, the maps it opens.
Readers check magic, version, lengths, digest and every header field before use.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError

from primis.config import Strict
from primis.errors import PrimisError

PUBLIC_MAGIC = b"PRIMIS\x00P"
KEY_MAGIC = b"PRIMIS\x00K"
VERSION = 1
MAX_HEADER = 1 << 24
MAX_ENTRIES = 1 << 32
_PREFIX = struct.Struct(">8sHI")
_LENGTH = struct.Struct(">I")
DIGEST = 32


class PublicHeader(Strict):
    kind: Literal["public"] = "public"
    file_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    model_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    grid: tuple[int, int] = Field(description="code positions (rows, columns)")
    n: int = Field(ge=2, le=4096)
    m: int = Field(ge=1, le=64)
    k: int = Field(ge=1)
    noise: int = Field(ge=0, description="noise entries per vector")
    mask_signs: bool
    permuted: bool = Field(description="atoms shown in a secret per-map order")


class KeyHeader(Strict):
    kind: Literal["key"] = "key"
    file_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    public_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    maps: list[int] = Field(min_length=1)
    shape: tuple[int, int] = Field(description="original image (rows, columns)")
    intensity: dict
    source: dict = Field(default_factory=dict, description="private details of the input")
    dicom_header: str | None = Field(None, description="original DICOM header (base64)")


@dataclass(frozen=True)
class PublicFile:
    header: PublicHeader
    vectors: np.ndarray  # (m * rows * columns, n) int8 in {-1, 0, 1}

    def to_bytes(self) -> bytes:
        nonzero = np.packbits(self.vectors != 0)
        positive = np.packbits(self.vectors > 0)
        return _container(
            PUBLIC_MAGIC, self.header, zlib.compress(nonzero.tobytes() + positive.tobytes(), 6)
        )

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "public file") -> PublicFile:
        header, payload = _open_container(data, PUBLIC_MAGIC, PublicHeader, name)
        rows, cols = header.grid
        if rows < 1 or cols < 1 or 2 * header.k > header.n:
            raise PrimisError(f"{name}: invalid code geometry in header")
        if header.noise > header.n - 2 * header.k:
            raise PrimisError(f"{name}: invalid noise count in header")
        count = header.m * rows * cols * header.n
        if count > MAX_ENTRIES:
            raise PrimisError(f"{name}: code too large ({count} entries)")
        plane = (count + 7) // 8
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(payload, 2 * plane + 1)
        except zlib.error:
            raise PrimisError(f"{name}: corrupted payload") from None
        if len(raw) != 2 * plane or inflater.unconsumed_tail or not inflater.eof:
            raise PrimisError(f"{name}: payload size does not match the header")
        bits = np.frombuffer(raw, dtype=np.uint8)
        nonzero = np.unpackbits(bits[:plane])[:count].astype(bool)
        positive = np.unpackbits(bits[plane:])[:count].astype(bool)
        if np.any(positive & ~nonzero):
            raise PrimisError(f"{name}: corrupted payload (sign without entry)")
        vectors = np.where(positive, 1, np.where(nonzero, -1, 0)).astype(np.int8)
        vectors = vectors.reshape(-1, header.n)
        live = nonzero.reshape(-1, header.n).sum(axis=1)
        if np.any(live != 2 * header.k + header.noise):
            raise PrimisError(f"{name}: public vectors do not match the code parameters")
        return cls(header, vectors)


@dataclass(frozen=True)
class KeyFile:
    header: KeyHeader
    payload: bytes

    def to_bytes(self) -> bytes:
        return _container(KEY_MAGIC, self.header, self.payload)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "key file") -> KeyFile:
        header, payload = _open_container(data, KEY_MAGIC, KeyHeader, name)
        return cls(header, payload)


def new_file_id() -> str:
    return os.urandom(16).hex()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _container(magic: bytes, header: Strict, payload: bytes) -> bytes:
    text = header.model_dump_json().encode()
    body = _PREFIX.pack(magic, VERSION, len(text)) + text + _LENGTH.pack(len(payload)) + payload
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
    if version != VERSION:
        raise PrimisError(
            f"{name}: unsupported format version {version} (this PRIMIS reads {VERSION})"
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
        raise PrimisError(f"{name}: invalid header ({err.errors()[0]['msg']})") from None
    return header, data[start + _LENGTH.size : end]


def read_file(path: Path, max_bytes: int = 1 << 31) -> bytes:
    """File contents with a size cap, as a PrimisError on any OS failure."""
    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise PrimisError(f"{path}: file too large")
        return path.read_bytes()
    except FileNotFoundError:
        raise PrimisError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PrimisError(f"{path}: is a folder, not a file") from None
    except OSError as err:
        raise PrimisError(f"{path}: cannot read ({err.strerror})") from None
