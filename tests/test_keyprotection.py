"""Keys never in clear on disk when asked (`--to`, `--passphrase-file` on `ambiguate`, `serve`,
`primis.share_file`), and the wrapped-key format: version 2 names no recipient (trial
decryption), scrypt n = 2^18; version 1 files still open."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest

import primis
from primis import keywrap
from primis.batch import SharingOutputs
from primis.dicomnode import SUCCESS, DicomNode
from primis.errors import PrimisError
from primis.formats import KeyFile
from primis.io import files as io_files
from primis.keywrap import KeyWrapping, describe, is_wrapped, load_identity, unwrap
from tests.conftest import assert_clean_failure, run_cli, smooth_image
from tests.test_dicom import _write_dicom
from tests.test_dicomnode import PATIENT_ID, PATIENT_NAME, instance, store

DATA = Path(__file__).parent / "data"
SECRETS = (b"Doe^Jane", b"PID-12345", b"CHEST PA")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return primis.load_model(tiny_model_dir, device="cpu")


@pytest.fixture
def people(tmp_path):
    """Two recipients' identities (alice, bob) and a passphrase file."""
    for name in ("alice", "bob"):
        run_cli("keys", "gen", "--out", tmp_path / name, check=True)
    (tmp_path / "pass.txt").write_text("correct horse battery staple\n")
    return tmp_path


@pytest.fixture
def written(monkeypatch):
    """Every (path, bytes) PRIMIS writes through its temporary files."""
    seen: list[tuple[Path, bytes]] = []
    real = io_files.write_temporary

    def spy(path, data, mode=None):
        seen.append((Path(path), bytes(data)))
        return real(path, data, mode)

    monkeypatch.setattr(io_files, "write_temporary", spy)
    return seen


def _patient_dicom(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (smooth_image(48, 40, 3) * 4000).astype(np.uint16)
    return _write_dicom(
        folder / "cxr.dcm", pixels, "MONOCHROME2", Modality="DX", StudyDescription="CHEST PA"
    )


def _no_secret_in(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(secret in data for secret in SECRETS), path


def test_share_file_writes_keys_wrapped_and_nothing_in_clear(tmp_path, people, model, written):
    source = _patient_dicom(tmp_path / "in")
    keys = tmp_path / "keys"
    done = primis.share_file(
        source, tmp_path / "p", keys, model, refine_steps=0, keep_header=True,
        recipients=[people / "alice.pub", people / "bob.pub"], passphrase="open sesame",
    )  # fmt: skip
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for path, data in written:
        if path.is_relative_to(keys):
            assert not any(s in data for s in SECRETS), path  # no plain temporary either
    key = done.key_path.read_bytes()
    assert is_wrapped(key)
    _no_secret_in(keys)
    for identity in ("alice", "bob"):
        plain = unwrap(key, load_identity(people / identity), None)
        assert KeyFile.from_bytes(plain).header.file_id == done.file_id
    assert KeyFile.from_bytes(unwrap(key, None, "open sesame")).header.file_id == done.file_id
    restored = primis.restore_dicom(done.public_path, keys, model, identity=people / "bob")
    assert b"Doe^Jane" in restored  # the header kept in the key
    outputs = SharingOutputs(tmp_path / "p", keys)
    with pytest.raises(PrimisError, match="SharingOutputs"):
        primis.share_file(source, tmp_path / "p", keys, model, outputs=outputs, passphrase="x")
    outputs.close()


def test_ambiguate_and_disambiguate_with_recipients_and_a_passphrase_file(
    tmp_path, people, tiny_model_dir
):
    source = _patient_dicom(tmp_path / "in")
    out = tmp_path / "out"
    wrap = ["--to", people / "alice.pub", "--passphrase-file", people / "pass.txt"]
    run_cli(
        "ambiguate", source, "--model", tiny_model_dir, "--public-dir", out / "p",
        "--key-dir", out / "k", "--refine-steps", "0", "--keep-header", *wrap, check=True,
    )  # fmt: skip
    assert stat.S_IMODE((out / "k").stat().st_mode) == 0o700
    (key,) = (out / "k").glob("*.primiskey")
    assert is_wrapped(key.read_bytes())
    _no_secret_in(out / "k")
    opened = {}
    for how in (["--identity", people / "alice"], ["--passphrase-file", people / "pass.txt"]):
        target = tmp_path / f"restored-{how[0]}"
        run_cli(
            "disambiguate", out / "p", "--model", tiny_model_dir, "--key-dir", out / "k",
            "--out-dir", target, *how, check=True,
        )  # fmt: skip
        (restored,) = target.glob("*.dcm")
        opened[how[0]] = pydicom.dcmread(restored)
    by_identity, by_passphrase = opened.values()
    np.testing.assert_array_equal(by_identity.pixel_array, by_passphrase.pixel_array)
    assert str(by_identity.PatientName) == str(by_passphrase.PatientName) == "Doe^Jane"
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not it\n")
    result = run_cli(
        "disambiguate", out / "p", "--model", tiny_model_dir, "--key-dir", out / "k",
        "--out-dir", tmp_path / "x", "--passphrase-file", wrong,
    )  # fmt: skip
    assert_clean_failure(result, "wrong identity or passphrase")


def test_passphrase_files_and_options_are_checked_in_one_line(tmp_path, people, tiny_model_dir):
    source = _patient_dicom(tmp_path / "in")
    base = ["ambiguate", source, "--model", tiny_model_dir, "--public-dir", tmp_path / "p"]
    base += ["--key-dir", tmp_path / "k"]
    (tmp_path / "empty.txt").write_text("\n")
    cases = {
        "empty passphrase": ["--passphrase-file", tmp_path / "empty.txt"],
        "no such file": ["--passphrase-file", tmp_path / "missing.txt"],
        "give one": ["--passphrase", "--passphrase-file", people / "pass.txt"],
        "not a PRIMIS recipient public key": ["--to", people / "pass.txt"],
    }
    for message, extra in cases.items():
        assert_clean_failure(run_cli(*base, *extra), message)
    assert not (tmp_path / "p").exists()  # checked before anything is written


def test_a_node_writes_keys_wrapped(tmp_path, people, model):
    wrapping = KeyWrapping([people / "alice.pub"])
    options = {"port": 0, "refine_steps": 0, "keep_header": True, "wrapping": wrapping}
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        assert store(node.address, [instance(1), instance(2)]) == [SUCCESS, SUCCESS]
    keys = sorted((tmp_path / "k").glob("*.primiskey"))
    assert len(keys) == 2 and all(is_wrapped(k.read_bytes()) for k in keys)
    for path in (tmp_path / "k").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert PATIENT_NAME.encode() not in data and PATIENT_ID.encode() not in data, path


def test_new_wrapped_keys_name_no_recipient_and_use_scrypt_2_18(people):
    alice, bob = (load_identity(people / name) for name in ("alice", "bob"))
    stranger = keywrap.X25519PrivateKey.generate()
    data = KeyWrapping([people / "alice.pub", people / "bob.pub"], "pw").wrap(b"key bytes")
    length = int.from_bytes(data[10:14], "big")
    header = json.loads(data[14 : 14 + length])
    assert int.from_bytes(data[8:10], "big") == 2
    for identity in (alice, bob):
        raw = keywrap._raw(identity.public_key())
        assert raw not in data and keywrap._b64(raw).encode() not in data
        assert unwrap(data, identity, None) == b"key bytes"  # found by trial decryption
    assert all("recipient" not in slot for slot in header["slots"])
    scrypt = next(slot for slot in header["slots"] if slot["type"] == "scrypt")
    assert scrypt["params"] == {"n": 2**18, "r": 8, "p": 1}
    with pytest.raises(PrimisError, match="wrong identity or passphrase"):
        unwrap(data, stranger, None)
    assert describe(data)["version"] == 2
    assert all(set(slot) <= {"type", "params"} for slot in describe(data)["slots"])
    # A version 2 header that names a recipient (or version 1 that does not) is refused.
    named = data.replace(
        b'"type": "x25519",', b'"type": "x25519", "recipient": "' + b"A" * 43 + b'=",', 1
    )
    named = named[:10] + (length + len(named) - len(data)).to_bytes(4, "big") + named[14:]
    with pytest.raises(PrimisError, match="recipient field does not fit version 2"):
        unwrap(named, alice, None)


def test_version_1_wrapped_keys_still_open(tmp_path):
    """tests/data/wrapped-v1 holds a key wrapped by the previous release (version 1: the
    recipient named, scrypt n = 2^15) for the identity `alice` and a passphrase."""
    folder = DATA / "wrapped-v1"
    data = (folder / "v2-scan.primiskey").read_bytes()
    plain = (DATA / "v2" / "v2-scan.primiskey").read_bytes()
    assert int.from_bytes(data[8:10], "big") == 1
    assert unwrap(data, load_identity(folder / "alice"), None) == plain
    assert unwrap(data, None, "release 0.x passphrase") == plain
    report = describe(data)
    assert report["version"] == 1 and "recipient" in report["slots"][0]
    passphrase = tmp_path / "pass.txt"
    passphrase.write_text("release 0.x passphrase\n")
    result = run_cli("info", folder / "v2-scan.primiskey")
    assert result.returncode == 0 and "wrapped key" in result.stdout
