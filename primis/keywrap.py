"""Keys for recipients: key files encrypted to X25519 public keys or to a passphrase.

A wrapped key file replaces the plain one::

    magic "PRIMIS\\0W" | version (u16) | header length (u32) | header (JSON) | nonce | ciphertext

The content (the plain key file) is sealed with ChaCha20-Poly1305 under a fresh random data key;
the header, which is authenticated as associated data, holds that data key wrapped for each
recipient (ephemeral X25519 + HKDF-SHA256 + ChaCha20-Poly1305) or derived from a passphrase
(scrypt). All primitives come from the `cryptography` library.

Version 2 (written now) names no recipient: an identity finds its slot by trial decryption, as
age does, so a wrapped key does not link a patient's key to the clinicians it is for; its
passphrase slot uses scrypt with n = 2^18 (age's work factor). Version 1 files (recipients
named, n = 2^15) still open.

The header is validated (types, sizes, base64) before use; the slot count, at most one
passphrase slot, and scrypt's memory (128 * n * r * p bytes) are bounded by `primis.limits`
before any key derivation runs, so a hostile file cannot make opening it slow or large.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pydantic import BeforeValidator, Field, ValidationError

from primis.config import Strict
from primis.errors import PrimisError
from primis.formats import KeyFile, read_file, validation_reason
from primis.io.files import write_atomic
from primis.limits import MAX_KEY_SLOTS, MAX_SCRYPT_BYTES

WRAPPED_MAGIC = b"PRIMIS\x00W"
VERSION = 2
READABLE_VERSIONS = (1, 2)
_PREFIX = struct.Struct(">8sHI")
SCRYPT = {"n": 2**18, "r": 8, "p": 1}  # written; a file's own parameters open it
MAX_HEADER = 1 << 16
_INFO = b"primis key wrap v1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _encoded(size: int):
    """A base64 text field that must decode to exactly ``size`` bytes."""

    def decode(text: object) -> bytes:
        if not isinstance(text, str):
            raise ValueError("expected base64 text")
        try:
            raw = base64.b64decode(text.encode(), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("invalid base64") from None
        if len(raw) != size:
            raise ValueError(f"expected {size} bytes")
        return raw

    return Annotated[bytes, BeforeValidator(decode)]


class _Slot(Strict):
    nonce: _encoded(12)
    wrapped: _encoded(32 + 16)


class X25519Slot(_Slot):
    type: Literal["x25519"]
    recipient: _encoded(32) | None = None  # version 1 only: version 2 names no recipient
    ephemeral: _encoded(32)


class ScryptParams(Strict):
    n: int = Field(ge=2, le=1 << 30)
    r: int = Field(ge=1, le=1 << 10)
    p: int = Field(ge=1, le=1 << 10)


class ScryptSlot(_Slot):
    type: Literal["scrypt"]
    salt: _encoded(16)
    params: ScryptParams


class WrappedHeader(Strict):
    cipher: Literal["chacha20-poly1305"]
    slots: list[Annotated[X25519Slot | ScryptSlot, Field(discriminator="type")]] = Field(
        min_length=1
    )


def _header(data: bytes, name: str) -> tuple[WrappedHeader, int]:
    """The validated header of a wrapped key and where it ends; limits checked."""
    if len(data) < _PREFIX.size or not is_wrapped(data):
        raise PrimisError(f"{name}: not a wrapped PRIMIS key")
    _, version, length = _PREFIX.unpack_from(data)
    if version not in READABLE_VERSIONS:
        raise PrimisError(f"{name}: unsupported wrapped-key version {version}")
    end = _PREFIX.size + length
    if length > MAX_HEADER:
        raise PrimisError(f"{name}: wrapped key header too large")
    if len(data) < end + 12 + 16:
        raise PrimisError(f"{name}: truncated wrapped key")
    try:
        header = WrappedHeader.model_validate_json(data[_PREFIX.size : end])
    except ValidationError as err:
        raise PrimisError(
            f"{name}: corrupted wrapped key header ({validation_reason(err)})"
        ) from None
    MAX_KEY_SLOTS.check(len(header.slots), name)
    for slot in header.slots:
        if isinstance(slot, X25519Slot) and (slot.recipient is None) != (version >= 2):
            raise PrimisError(
                f"{name}: corrupted wrapped key header (recipient field does not fit "
                f"version {version})"
            )
    scrypt = [slot for slot in header.slots if isinstance(slot, ScryptSlot)]
    if len(scrypt) > 1:
        raise PrimisError(f"{name}: more than one passphrase slot")
    for slot in scrypt:
        params = slot.params
        if params.n & (params.n - 1):
            raise PrimisError(f"{name}: invalid scrypt parameters (n is not a power of 2)")
        MAX_SCRYPT_BYTES.check(128 * params.n * params.r * params.p, name)
    return header, end


def describe(data: bytes, name: str = "key") -> dict:
    """What `primis info` shows of a wrapped key: its slots, never their secrets."""
    header, _ = _header(data, name)
    slots = [
        ({"type": "x25519"} | ({"recipient": _b64(slot.recipient)} if slot.recipient else {}))
        if isinstance(slot, X25519Slot)
        else {"type": "scrypt", "params": slot.params.model_dump()}
        for slot in header.slots
    ]
    version = _PREFIX.unpack_from(data)[1]
    return {
        "kind": "wrapped key",
        "version": version,
        "cipher": header.cipher,
        "slots": slots,
        "bytes": len(data),
    }


def generate_identity() -> tuple[bytes, bytes]:
    """A new recipient key pair as (private PEM, public PEM)."""
    private = X25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def write_identity(path: Path) -> Path:
    """Write a new recipient key pair: the private key to ``path`` (0600) and the public key
    to ``path``.pub, which it returns; an existing identity is never overwritten."""
    public_path = path.with_name(path.name + ".pub")
    if path.exists() or public_path.exists():
        raise PrimisError(f"{path}: exists; refusing to overwrite an identity")
    private_pem, public_pem = generate_identity()
    write_atomic(path, private_pem, mode=0o600)
    write_atomic(public_path, public_pem)
    return public_path


def load_recipient(path: Path) -> X25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as err:
        raise PrimisError(
            f"{path}: not a PRIMIS recipient public key ({err})".splitlines()[0]
        ) from None
    if not isinstance(key, X25519PublicKey):
        raise PrimisError(f"{path}: not an X25519 public key")
    return key


def load_identity(path: Path) -> X25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise PrimisError(f"{path}: not a PRIMIS identity ({err})".splitlines()[0]) from None
    if not isinstance(key, X25519PrivateKey):
        raise PrimisError(f"{path}: not an X25519 private key")
    return key


def _kek_from_exchange(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=ephemeral + recipient, info=_INFO).derive(shared)


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _scrypt(passphrase: str, salt: bytes, params: dict[str, int]) -> bytes:
    return Scrypt(salt=salt, length=32, **params).derive(passphrase.encode())


class KeyWrapping:
    """Who a key is wrapped for: X25519 ``recipients`` and/or a ``passphrase``. One object
    wraps any number of keys (`wrap`); the passphrase's scrypt key is derived once, on the
    first key, with one random salt, so a batch pays for scrypt once (each key still gets its
    own random data key and nonces). Picklable, for batch workers."""

    def __init__(
        self,
        recipients: Sequence[X25519PublicKey | str | os.PathLike] = (),
        passphrase: str | None = None,
    ) -> None:
        loaded = [r if isinstance(r, X25519PublicKey) else load_recipient(r) for r in recipients]
        self.recipients = [_raw(r) for r in loaded]
        if not self.recipients and not passphrase:
            raise PrimisError("wrapping needs at least one --to recipient or a passphrase")
        self.passphrase = passphrase or None
        self._scrypt: tuple[bytes, bytes] | None = None  # (salt, key-encryption key)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_scrypt": None}  # each process derives its own

    def __repr__(self) -> str:
        passphrase = ", a passphrase" if self.passphrase else ""
        return f"KeyWrapping({len(self.recipients)} recipient(s){passphrase})"

    def wrap(self, plain: bytes) -> bytes:
        """A key file's bytes encrypted for these recipients and passphrase (version 2)."""
        data_key = ChaCha20Poly1305.generate_key()
        slots = []
        for rec_raw in self.recipients:
            ephemeral = X25519PrivateKey.generate()
            eph_raw = _raw(ephemeral.public_key())
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(rec_raw))
            kek = _kek_from_exchange(shared, eph_raw, rec_raw)
            nonce = os.urandom(12)
            slots.append(
                {
                    "type": "x25519",
                    "ephemeral": _b64(eph_raw),
                    "nonce": _b64(nonce),
                    "wrapped": _b64(ChaCha20Poly1305(kek).encrypt(nonce, data_key, None)),
                }
            )
        if self.passphrase:
            if self._scrypt is None:
                salt = os.urandom(16)
                self._scrypt = salt, _scrypt(self.passphrase, salt, SCRYPT)
            salt, kek = self._scrypt
            nonce = os.urandom(12)
            slots.append(
                {
                    "type": "scrypt",
                    "salt": _b64(salt),
                    "params": SCRYPT,
                    "nonce": _b64(nonce),
                    "wrapped": _b64(ChaCha20Poly1305(kek).encrypt(nonce, data_key, None)),
                }
            )
        header = json.dumps({"cipher": "chacha20-poly1305", "slots": slots}).encode()
        prefix = _PREFIX.pack(WRAPPED_MAGIC, VERSION, len(header)) + header
        nonce = os.urandom(12)
        return prefix + nonce + ChaCha20Poly1305(data_key).encrypt(nonce, plain, prefix)


def wrap(plain: bytes, recipients: list[X25519PublicKey], passphrase: str | None) -> bytes:
    """Encrypt a key file's bytes for the recipients and/or a passphrase (`KeyWrapping`)."""
    return KeyWrapping(recipients, passphrase).wrap(plain)


def read_passphrase_file(path: str | os.PathLike) -> str:
    """The passphrase in a file: its first line, without the line ending. An empty one, or a
    file that cannot be read, is a PrimisError."""
    path = Path(path)
    try:
        text = read_file(path).decode("utf-8")
    except UnicodeDecodeError:
        raise PrimisError(f"{path}: a passphrase file must be UTF-8 text") from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise PrimisError(f"{path}: empty passphrase")
    return lines[0]


def is_wrapped(data: bytes) -> bool:
    return data[:8] == WRAPPED_MAGIC


def unwrap(
    data: bytes, identity: X25519PrivateKey | None, passphrase: str | None, name: str = "key"
) -> bytes:
    """The plain key file inside a wrapped one; a wrong identity or passphrase is a PrimisError."""
    header, end = _header(data, name)
    slots = header.slots
    if identity is None and passphrase is None:
        kinds = sorted({slot.type for slot in slots})
        raise PrimisError(
            f"{name} is wrapped ({', '.join(kinds)}): give --identity or a passphrase "
            "(prompt, or PRIMIS_PASSPHRASE)"
        )
    data_key = _open_slots(slots, identity, passphrase)
    if data_key is None:
        raise PrimisError(f"{name}: wrong identity or passphrase for this wrapped key")
    try:
        return ChaCha20Poly1305(data_key).decrypt(
            data[end : end + 12], data[end + 12 :], data[:end]
        )
    except InvalidTag:
        raise PrimisError(f"{name}: wrapped key is corrupted (authentication failed)") from None


def _open_slots(
    slots: list[X25519Slot | ScryptSlot],
    identity: X25519PrivateKey | None,
    passphrase: str | None,
) -> bytes | None:
    mine = _raw(identity.public_key()) if identity is not None else None
    for slot in slots:
        try:
            # Version 1 names the recipient; version 2 does not: every x25519 slot is tried.
            if isinstance(slot, X25519Slot) and mine and slot.recipient in (None, mine):
                shared = identity.exchange(X25519PublicKey.from_public_bytes(slot.ephemeral))
                kek = _kek_from_exchange(shared, slot.ephemeral, mine)
            elif isinstance(slot, ScryptSlot) and passphrase is not None:
                kek = _scrypt(passphrase, slot.salt, slot.params.model_dump())
            else:
                continue
            return ChaCha20Poly1305(kek).decrypt(slot.nonce, slot.wrapped, None)
        except (InvalidTag, ValueError):
            continue
    return None


def wrap_key_file(path: Path, wrapping: KeyWrapping) -> str:
    """Encrypt the key file at ``path`` in place for ``wrapping`` (0600); its report line. A
    file already wrapped, or not a valid key, is refused."""
    data = read_file(path)
    if is_wrapped(data):
        raise PrimisError(f"{path}: already wrapped")
    KeyFile.from_bytes(data, str(path))  # wrap only valid keys
    write_atomic(path, wrapping.wrap(data), mode=0o600)
    return f"{path}: wrapped"
