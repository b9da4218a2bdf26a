"""Keys for recipients: key files encrypted to X25519 public keys or to a passphrase.

A wrapped key file replaces the plain one::

    magic "PRIMIS\\0W" | version (u16) | header length (u32) | header (JSON) | nonce | ciphertext

The content (the plain key file) is sealed with ChaCha20-Poly1305 under a fresh random data key;
the header, which is authenticated as associated data, holds that data key wrapped for each
recipient (ephemeral X25519 + HKDF-SHA256 + ChaCha20-Poly1305) or derived from a passphrase
(scrypt). All primitives come from the `cryptography` library.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from primis.errors import PrimisError

WRAPPED_MAGIC = b"PRIMIS\x00W"
VERSION = 1
_PREFIX = struct.Struct(">8sHI")
SCRYPT = {"n": 2**15, "r": 8, "p": 1}
_INFO = b"primis key wrap v1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


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


def _scrypt(passphrase: str, salt: bytes, params: dict) -> bytes:
    return Scrypt(salt=salt, length=32, **params).derive(passphrase.encode())


def wrap(plain: bytes, recipients: list[X25519PublicKey], passphrase: str | None) -> bytes:
    """Encrypt a key file's bytes for the recipients and/or a passphrase."""
    if not recipients and not passphrase:
        raise PrimisError("wrap needs at least one --to recipient or a passphrase")
    data_key = ChaCha20Poly1305.generate_key()
    slots = []
    for recipient in recipients:
        ephemeral = X25519PrivateKey.generate()
        eph_raw, rec_raw = _raw(ephemeral.public_key()), _raw(recipient)
        kek = _kek_from_exchange(ephemeral.exchange(recipient), eph_raw, rec_raw)
        nonce = os.urandom(12)
        slots.append(
            {
                "type": "x25519",
                "recipient": _b64(rec_raw),
                "ephemeral": _b64(eph_raw),
                "nonce": _b64(nonce),
                "wrapped": _b64(ChaCha20Poly1305(kek).encrypt(nonce, data_key, None)),
            }
        )
    if passphrase:
        salt, nonce = os.urandom(16), os.urandom(12)
        kek = _scrypt(passphrase, salt, SCRYPT)
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


def is_wrapped(data: bytes) -> bool:
    return data[:8] == WRAPPED_MAGIC


def unwrap(
    data: bytes, identity: X25519PrivateKey | None, passphrase: str | None, name: str = "key"
) -> bytes:
    """The plain key file inside a wrapped one; a wrong identity or passphrase is a PrimisError."""
    if len(data) < _PREFIX.size or not is_wrapped(data):
        raise PrimisError(f"{name}: not a wrapped PRIMIS key")
    _, version, length = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise PrimisError(f"{name}: unsupported wrapped-key version {version}")
    end = _PREFIX.size + length
    if length > 1 << 20 or len(data) < end + 12 + 16:
        raise PrimisError(f"{name}: truncated wrapped key")
    try:
        slots = json.loads(data[_PREFIX.size : end])["slots"]
    except (ValueError, KeyError, TypeError):
        raise PrimisError(f"{name}: corrupted wrapped key header") from None
    if identity is None and passphrase is None:
        kinds = sorted({slot.get("type") for slot in slots})
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


def _open_slots(slots: list, identity, passphrase) -> bytes | None:
    mine = _raw(identity.public_key()) if identity is not None else None
    for slot in slots:
        try:
            if slot["type"] == "x25519" and mine is not None and _unb64(slot["recipient"]) == mine:
                ephemeral = _unb64(slot["ephemeral"])
                shared = identity.exchange(X25519PublicKey.from_public_bytes(ephemeral))
                kek = _kek_from_exchange(shared, ephemeral, mine)
            elif slot["type"] == "scrypt" and passphrase is not None:
                params = {k: int(slot["params"][k]) for k in ("n", "r", "p")}
                if params["n"] > 2**20 or params["r"] > 32 or params["p"] > 16:
                    continue
                kek = _scrypt(passphrase, _unb64(slot["salt"]), params)
            else:
                continue
            return ChaCha20Poly1305(kek).decrypt(
                _unb64(slot["nonce"]), _unb64(slot["wrapped"]), None
            )
        except (InvalidTag, KeyError, ValueError, TypeError):
            continue
    return None
