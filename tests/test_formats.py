import struct

import numpy as np
import pytest

from primis.errors import PrimisError
from primis.formats import (
    KEY_MAGIC,
    PUBLIC_MAGIC,
    KeyFile,
    KeyHeader,
    PublicFile,
    PublicHeader,
    _container,
    new_file_id,
)


def _public(noise: int = 4) -> PublicFile:
    header = PublicHeader(
        file_id=new_file_id(),
        model_hash="a" * 64,
        grid=(2, 3),
        n=8,
        m=2,
        k=1,
        noise=noise,
        mask_signs=True,
        permuted=False,
    )
    vectors = np.zeros((12, 8), dtype=np.int8)
    vectors[:, : 2 + noise] = np.where(np.arange(2 + noise) % 2, 1, -1)
    return PublicFile(header, vectors)


def test_public_file_round_trips():
    public = _public()
    again = PublicFile.from_bytes(public.to_bytes())
    assert again.header == public.header and np.array_equal(again.vectors, public.vectors)


def test_key_file_round_trips():
    header = KeyHeader(
        file_id=new_file_id(),
        public_sha256="b" * 64,
        model_hash="a" * 64,
        maps=[0, 1],
        shape=(5, 7),
        intensity={"dtype": "uint8", "low": 0, "high": 255},
    )
    key = KeyFile(header, b"\x01\x02")
    assert KeyFile.from_bytes(key.to_bytes()) == key


def test_payload_that_contradicts_the_header_is_rejected():
    public = _public()
    lying = PublicFile(public.header.model_copy(update={"noise": 2}), public.vectors)
    with pytest.raises(PrimisError, match="do not match"):
        PublicFile.from_bytes(lying.to_bytes())
    huge = PublicFile(public.header.model_copy(update={"grid": (100000, 100000)}), public.vectors)
    with pytest.raises(PrimisError, match="exceed the limit"):
        PublicFile.from_bytes(huge.to_bytes())


def test_version_header_and_trailing_data_are_checked():
    data = _public().to_bytes()
    newer = data[:8] + struct.pack(">H", 99) + data[10:]
    with pytest.raises(PrimisError, match="version 99"):
        PublicFile.from_bytes(newer)
    with pytest.raises(PrimisError, match="trailing"):
        PublicFile.from_bytes(data + b"x")
    with pytest.raises(PrimisError, match="invalid header"):
        PublicFile.from_bytes(_container(PUBLIC_MAGIC, _key_header(), b""))
    with pytest.raises(PrimisError, match="public file, not a key"):
        KeyFile.from_bytes(data)
    assert data[:8] == PUBLIC_MAGIC != KEY_MAGIC


def _key_header() -> KeyHeader:
    return KeyHeader(
        file_id=new_file_id(),
        public_sha256="b" * 64,
        model_hash="a" * 64,
        maps=[0],
        shape=(5, 7),
        intensity={"dtype": "uint8", "low": 0, "high": 255},
    )


def test_pair_file_names_come_from_one_place(tmp_path):
    """A pair is NAME.primis beside NAME.primiskey; the helpers name and recognise both."""
    from primis.formats import is_key_file, is_public_file, key_beside, key_path, public_path

    public = public_path(tmp_path / "public", "abc")
    assert public == tmp_path / "public" / "abc.primis" and is_public_file(public)
    key = key_path(tmp_path / "keys", "abc")
    assert key == tmp_path / "keys" / "abc.primiskey" and is_key_file(key)
    assert key_beside(public, tmp_path / "keys") == key
    assert not is_public_file(key) and not is_key_file(public)
    assert not is_public_file(tmp_path / "abc.primis.part")


def test_describe_refuses_a_file_that_is_no_primis_file(tmp_path):
    """`describe` (what `primis info` prints) names a file it cannot describe in one line."""
    from primis.formats import describe

    other = tmp_path / "notes.txt"
    other.write_bytes(b"not a PRIMIS file at all")
    with pytest.raises(PrimisError, match="not a PRIMIS public, key or wrapped key file"):
        describe(other)
