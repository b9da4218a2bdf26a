"""Regression tests for the audit of hostile files, OS failures and interrupted batches (issue
16); each test names the finding it covers."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from PIL import Image

from primis import formats
from primis.errors import PrimisError
from primis.formats import (
    PUBLIC_MAGIC,
    KeyFile,
    PublicFile,
    PublicHeader,
    _container,
    open_pair,
    seal_pair,
    sha256,
)
from primis.keywrap import WRAPPED_MAGIC, unwrap, wrap
from tests.conftest import ambiguate_cli, assert_clean_failure, run_cli, smooth_image
from tests.test_dicom import _write_dicom


def _png(path: Path, seed: int = 0, size: tuple[int, int] = (40, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((smooth_image(*size, seed) * 255).astype(np.uint8)).save(path)
    return path


def _ambiguate(model: Path, *inputs: Path, out: Path, extra=()):
    return ambiguate_cli(model, *inputs, out=out, extra=("--refine-steps", "0", *extra))


def _disambiguate(model: Path, public: Path, key_dir: Path, out: Path, *extra):
    args = ["disambiguate", public, "--model", model, "--out-dir", out, *extra]
    return run_cli(*args, *(["--key-dir", key_dir] if key_dir else []))


@pytest.fixture
def pair(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """A public file and its key, made from one small PNG."""
    out = tmp_path / "pair"
    _ambiguate(tiny_model_dir, _png(tmp_path / "in" / "scan.png"), out=out).check_returncode()
    return out / "public" / "scan.primis", out / "keys" / "scan.primiskey"


def _edited_key(key: Path, **changes) -> bytes:
    """The key with header fields changed (any JSON value) and its checksum recomputed, as a
    careful hand edit would leave it."""
    data = key.read_bytes()
    (length,) = struct.unpack_from(">I", data, 10)
    header = json.loads(data[14 : 14 + length]) | changes
    text = json.dumps(header).replace("Infinity", "1e999").encode()
    body = data[:10] + struct.pack(">I", len(text)) + text + data[14 + length : -32]
    return body + hashlib.sha256(body).digest()


def _model_hash(model: Path) -> str:
    from primis.modelstore import load_model

    return load_model(model).hash


def _header(model_hash: str, grid: tuple[int, int]) -> PublicHeader:
    """A public header for the tiny model's code (n=32, m=2) with one entry of each sign."""
    return PublicHeader(
        file_id="0" * 32,
        model_hash=model_hash,
        grid=grid,
        n=32,
        m=2,
        k=1,
        noise=0,
        mask_signs=True,
        permuted=False,
    )


def _bomb(model_hash: str, grid: tuple[int, int]) -> bytes:
    """A small public file with a valid checksum that declares a huge code (finding 1)."""
    payload = zlib.compress(bytes(1 << 20), 9)
    return _container(PUBLIC_MAGIC, _header(model_hash, grid), payload)


# Finding 1: huge declared geometry, and the public file parsed before the key's digest check.
def test_huge_declared_geometry_is_refused_from_the_header(tmp_path, tiny_model_dir, pair):
    bomb = tmp_path / "bomb.primis"
    bomb.write_bytes(_bomb(_model_hash(tiny_model_dir), (1 << 12, 1 << 12)))
    started = time.perf_counter()
    assert_clean_failure(run_cli("info", bomb), "exceed the limit")
    result = _disambiguate(tiny_model_dir, bomb, None, tmp_path / "o", "--without-key")
    assert_clean_failure(result, "exceed the limit")
    # With a key, the digest is checked on the raw bytes before the payload is inflated.
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "bomb.primiskey").write_bytes(pair[1].read_bytes())
    assert_clean_failure(
        _disambiguate(tiny_model_dir, bomb, tmp_path / "k", tmp_path / "o"), "another public file"
    )
    assert time.perf_counter() - started < 10 and not list((tmp_path / "o").iterdir())


def test_decoding_a_grid_is_bounded_by_the_pixel_limit(tmp_path, tiny_model_dir, monkeypatch):
    header = _header(_model_hash(tiny_model_dir), (64, 64))
    vectors = np.zeros((header.vectors, header.n), np.int8)
    vectors[:, :2] = (1, -1)
    bomb = tmp_path / "wide.primis"
    bomb.write_bytes(PublicFile(header, vectors).to_bytes())
    monkeypatch.setenv("PRIMIS_MAX_PIXELS", "10000")
    result = _disambiguate(tiny_model_dir, bomb, None, tmp_path / "o", "--without-key")
    assert_clean_failure(result, "PRIMIS_MAX_PIXELS")


# Finding 2: wrapped-key headers of the wrong types.
WRAPPED = wrap(b"plain", [X25519PrivateKey.generate().public_key()], None)  # any wrapped key


def _rewrapped(data: bytes, header: bytes) -> bytes:
    """A wrapped key with its header replaced (the AEAD no longer matches, which is the point:
    validation must refuse it first, in one line)."""
    length = struct.unpack_from(">I", data, 10)[0]
    return WRAPPED_MAGIC + struct.pack(">HI", 1, len(header)) + header + data[14 + length :]


@pytest.mark.parametrize(
    "header",
    [
        b'{"cipher": "chacha20-poly1305", "slots": 5}',
        b'{"cipher": "chacha20-poly1305", "slots": [5, "x", null]}',
        b'{"cipher": "chacha20-poly1305", "slots": [{"type": {"nested": [1]}}]}',
        b'{"cipher": "chacha20-poly1305", "slots": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"cipher": "chacha20-poly1305", "slots": [{"type": "scrypt", "salt": "AAAA", '
        b'"params": {"n": 1e400, "r": 8, "p": 1}, "nonce": "", "wrapped": ""}]}',
        b'{"cipher": "chacha20-poly1305", "slots": [{"type": "x25519", "recipient": 7, '
        b'"ephemeral": [], "nonce": {}, "wrapped": "%%%"}]}',
        b"[]",
        b"\xff\xfe",
    ],
)
def test_wrapped_key_headers_of_wrong_types_are_refused(header):
    data = _rewrapped(WRAPPED, header)
    with pytest.raises(PrimisError, match="corrupted wrapped key header"):
        unwrap(data, None, "pass")


# Finding 3: scrypt cost and slot count from the file.
def _scrypt_slot(n: int) -> dict:
    return {
        "type": "scrypt",
        "salt": base64.b64encode(bytes(16)).decode(),
        "params": {"n": n, "r": 8, "p": 1},
        "nonce": base64.b64encode(bytes(12)).decode(),
        "wrapped": base64.b64encode(bytes(48)).decode(),
    }


@pytest.mark.parametrize(
    ("slots", "message"),
    [
        ([_scrypt_slot(1 << 20)], "PRIMIS_MAX_SCRYPT_BYTES"),
        ([_scrypt_slot(1 << 14)] * 2, "more than one passphrase slot"),
        ([_scrypt_slot(1 << 14)] * 250, "PRIMIS_MAX_KEY_SLOTS"),
        ([_scrypt_slot(3000)], "power of 2"),
    ],
)
def test_scrypt_cost_and_slot_count_are_bounded(slots, message):
    header = json.dumps({"cipher": "chacha20-poly1305", "slots": slots}).encode()
    data = _rewrapped(WRAPPED, header)
    started = time.perf_counter()
    with pytest.raises(PrimisError, match=message):
        unwrap(data, None, "pass")
    assert time.perf_counter() - started < 1


# Finding 4: the key's source details and stored DICOM header are validated.
@pytest.mark.parametrize(
    "source",
    [
        {"format": "dicom", "rescale_slope": "abc"},
        {"format": "gif"},
        {"format": "dicom", "window_center": [1e308, float("inf")]},
        {"format": "dicom", "modality": {"x": 1}},
        {"format": "dicom", "bits_stored": 10**30},
        {"unknown": 1},
    ],
)
def test_key_source_details_are_validated(pair, source):
    with pytest.raises(PrimisError, match="invalid header"):
        KeyFile.from_bytes(_edited_key(pair[1], source=source))


@pytest.mark.parametrize("text", ["!!!!", "QUJ", 5, ["x"]])
def test_a_stored_dicom_header_must_be_base64(pair, text):
    with pytest.raises(PrimisError, match="invalid header"):
        KeyFile.from_bytes(_edited_key(pair[1], dicom_header=text))


def test_a_stored_dicom_header_that_is_not_dicom_fails_cleanly(tmp_path, tiny_model_dir, pair):
    public, key = pair
    parsed_public = PublicFile.from_bytes(public.read_bytes())
    parsed_key = KeyFile.from_bytes(key.read_bytes())
    header = parsed_key.header.model_copy(
        update={"source": {"format": "dicom"}, "dicom_header": base64.b64encode(b"junk").decode()}
    )
    new_public, new_key = seal_pair(parsed_public, KeyFile(header, parsed_key.payload))
    case = tmp_path / "case"
    (case / "keys").mkdir(parents=True)
    (case / "scan.primis").write_bytes(new_public)
    (case / "keys" / "scan.primiskey").write_bytes(new_key)
    result = _disambiguate(tiny_model_dir, case / "scan.primis", case / "keys", tmp_path / "o")
    assert_clean_failure(result, "stored DICOM header is unreadable")


# Finding 5: an edited plain key (checksum recomputed) is refused, not decoded.
def test_edited_keys_are_refused(tmp_path, tiny_model_dir, pair):
    public, key = pair
    parsed = KeyFile.from_bytes(key.read_bytes())
    rng = np.random.default_rng(5)
    edits = []
    for _ in range(30):
        payload = bytearray(parsed.payload)
        bit = int(rng.integers(8 * len(payload)))
        payload[bit // 8] ^= 1 << (bit % 8)
        edits.append(KeyFile(parsed.header, bytes(payload)).to_bytes())
    intensity = parsed.header.intensity
    edits += [
        _edited_key(key, shape=[parsed.header.shape[0] - 1, parsed.header.shape[1]]),
        _edited_key(key, intensity=intensity | {"high": intensity["high"] - 1}),
        _edited_key(key, intensity=intensity | {"invert": not intensity["invert"]}),
        _edited_key(key, maps=[0]),
    ]
    for edited in edits:
        with pytest.raises(PrimisError, match="the key was edited"):
            open_pair(public.read_bytes(), edited, "public", "key")
    for intensity_edit in ({"high": float("inf")}, {"low": 300.0}, {"dtype": "object"}):
        with pytest.raises(PrimisError, match="invalid header"):
            KeyFile.from_bytes(_edited_key(key, intensity=intensity | intensity_edit))


def test_version_1_pairs_still_decode(tmp_path, tiny_model_dir, pair):
    public, key = pair
    parsed_public = PublicFile.from_bytes(public.read_bytes())
    parsed_key = KeyFile.from_bytes(key.read_bytes())
    old_public = PublicFile(
        parsed_public.header.model_copy(update={"key_commitment": None, "privacy": None}),
        parsed_public.vectors,
    ).to_bytes()
    update = {"salt": None, "public_sha256": sha256(old_public), "privacy": None}
    old_key = KeyFile(parsed_key.header.model_copy(update=update), parsed_key.payload).to_bytes()
    assert [struct.unpack_from(">H", data, 8)[0] for data in (old_public, old_key)] == [1, 1]
    case = tmp_path / "v1"
    (case / "keys").mkdir(parents=True)
    (case / "scan.primis").write_bytes(old_public)
    (case / "keys" / "scan.primiskey").write_bytes(old_key)
    result = _disambiguate(tiny_model_dir, case / "scan.primis", case / "keys", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    new = _disambiguate(tiny_model_dir, public, key.parent, tmp_path / "o2")
    assert new.returncode == 0, new.stderr
    assert (tmp_path / "o" / "scan.png").read_bytes() == (tmp_path / "o2" / "scan.png").read_bytes()
    assert struct.unpack_from(">H", public.read_bytes(), 8)[0] == formats.VERSION


@pytest.mark.parametrize("version", [2, 3])
def test_version_2_and_3_pairs_still_decode(tmp_path, tiny_model_dir, pair, monkeypatch, version):
    """Version 2 files: sealed, with no key-coding fields (the supports coded enumeratively);
    version 3: with them, but without the privacy preset (version 4)."""
    public, key = pair
    parsed_public = PublicFile.from_bytes(public.read_bytes())
    parsed_key = KeyFile.from_bytes(key.read_bytes())
    assert parsed_key.header.coding == "enumerative" and parsed_key.header.privacy == "strict"
    monkeypatch.setattr(formats, "VERSION", version)
    header = parsed_key.header.model_copy(update={"privacy": None})
    update = {"privacy": None, "key_commitment": KeyFile(header, parsed_key.payload).commitment()}
    old_public = PublicFile(
        parsed_public.header.model_copy(update=update), parsed_public.vectors
    ).to_bytes()
    header = header.model_copy(update={"public_sha256": sha256(old_public)})
    later = {"privacy"} | ({"coding", "variable_rate"} if version == 2 else set())
    text = header.model_dump_json(exclude_none=True, exclude=later).encode()
    payload = parsed_key.payload
    body = struct.pack(">8sHI", formats.KEY_MAGIC, version, len(text)) + text
    body += struct.pack(">I", len(payload)) + payload
    case = tmp_path / f"v{version}"
    (case / "keys").mkdir(parents=True)
    (case / "scan.primis").write_bytes(old_public)
    (case / "keys" / "scan.primiskey").write_bytes(body + hashlib.sha256(body).digest())
    monkeypatch.undo()
    result = _disambiguate(tiny_model_dir, case / "scan.primis", case / "keys", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    new = _disambiguate(tiny_model_dir, public, key.parent, tmp_path / "o2")
    assert new.returncode == 0, new.stderr
    assert (tmp_path / "o" / "scan.png").read_bytes() == (tmp_path / "o2" / "scan.png").read_bytes()


# Finding 6: OS errors in batches.
def test_a_name_too_long_fails_that_file_only(tmp_path, tiny_model_dir):
    long_name = _png(tmp_path / "in" / ("x" * 244 + ".png"))
    short = _png(tmp_path / "in" / "short.png", 1)
    result = _ambiguate(tiny_model_dir, long_name, short, out=tmp_path / "out")
    assert_clean_failure(result, "name too long")
    assert "x" * 244 in result.stderr and "1 done" in result.stdout
    for folder, suffix in (("public", ".primis"), ("keys", ".primiskey")):
        found = [p.name for p in (tmp_path / "out" / folder).glob(f"*{suffix}*")]
        assert found == [f"short{suffix}"]


@pytest.mark.parametrize(("failing_call", "code"), [(1, errno.ENOSPC), (4, errno.EROFS)])
def test_a_full_or_read_only_disk_stops_the_batch_without_half_pairs(
    tmp_path, tiny_model_dir, monkeypatch, failing_call, code
):
    inputs = [_png(tmp_path / "in" / f"img{i}.png", i) for i in range(3)]
    calls = {"n": 0}
    real = tempfile.mkstemp

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= failing_call:  # a key and a public file per input
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", failing)
    result = _ambiguate(tiny_model_dir, *inputs, out=tmp_path / "out")
    assert_clean_failure(result, os.strerror(code))
    assert "batch stopped" in result.stderr and result.stderr.count("error:") == 1
    publics = {p.stem for p in (tmp_path / "out" / "public").glob("*.primis")}
    keys = {p.stem for p in (tmp_path / "out" / "keys").glob("*.primiskey")}
    assert publics == keys == {f"img{i}" for i in range((failing_call - 1) // 2)}
    assert not list((tmp_path / "out").rglob("*.part"))
    monkeypatch.setattr(tempfile, "mkstemp", real)
    _ambiguate(tiny_model_dir, *inputs, out=tmp_path / "out").check_returncode()
    _check_outputs(tmp_path / "out", inputs)


def test_a_failing_fsync_leaves_no_half_pair(tmp_path, tiny_model_dir, monkeypatch):
    import primis.io.files

    calls = {"n": 0}
    real = os.fsync

    def failing(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # the public file, after its key was written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(primis.io.files.os, "fsync", failing)
    result = _ambiguate(tiny_model_dir, _png(tmp_path / "in" / "a.png"), out=tmp_path / "out")
    assert_clean_failure(result, "no space left")
    assert not list((tmp_path / "out").rglob("*.primis*"))


def test_an_output_folder_that_is_a_file_stops_with_one_line(tmp_path, tiny_model_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "public").write_text("a file")
    result = _ambiguate(tiny_model_dir, _png(tmp_path / "in" / "a.png"), out=tmp_path / "out")
    assert_clean_failure(result, "is not a folder")
    assert result.stderr.count("error:") == 1


# Finding 7: the existing-output check matches exact names.
def test_an_output_with_a_longer_dotted_name_does_not_count(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    _ambiguate(tiny_model_dir, _png(tmp_path / "in" / "1.2.840.png"), out=out).check_returncode()
    restored = tmp_path / "restored"
    _png(restored / "1.2.840.5.png", 3)
    public = out / "public" / "1.2.840.primis"
    result = _disambiguate(tiny_model_dir, public, out / "keys", restored)
    assert result.returncode == 0 and "1 done, 0 failed" in result.stdout, result.stderr
    assert (restored / "1.2.840.png").is_file()


# Finding 8: manifests after --overwrite (kills are in test_kill_at_any_point).
@pytest.mark.parametrize("names", ["stem", "id"])
def test_overwrite_lists_each_input_once_and_removes_replaced_outputs(
    tmp_path, tiny_model_dir, names
):
    inputs = [_png(tmp_path / "in" / f"img{i}.png", i) for i in range(2)]
    for extra in ([], ["--overwrite"], ["--overwrite"]):
        _ambiguate(
            tiny_model_dir, *inputs, out=tmp_path / "out", extra=["--names", names, *extra]
        ).check_returncode()
    _check_outputs(tmp_path / "out", inputs)


def _check_outputs(out: Path, inputs: list[Path]) -> None:
    """Every input done once: one manifest line each, complete pairs, nothing else on disk."""
    lines = (out / "keys" / "manifest.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert sorted(r["input"] for r in records) == sorted(str(p.absolute()) for p in inputs)
    public_lines = (out / "public" / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["file_id"] for x in public_lines) == sorted(
        r["file_id"] for r in records
    )
    assert sorted(map(str, (out / "public").glob("*.primis"))) == sorted(
        r["public"] for r in records
    )
    assert sorted(map(str, (out / "keys").glob("*.primiskey"))) == sorted(r["key"] for r in records)
    for r in records:
        open_pair(Path(r["public"]).read_bytes(), Path(r["key"]).read_bytes(), "p", "k")
    assert not list(out.rglob("*.part"))


# Finding 9: a dead writer's temporary files go at once.
def test_parts_of_a_dead_writer_are_removed_at_once(tmp_path, tiny_model_dir):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    keys = tmp_path / "out" / "keys"
    keys.mkdir(parents=True)
    stale = keys / f".a.primiskey.{int(dead.stdout)}.abcd1234.part"
    live = keys / f".b.primiskey.{os.getpid()}.abcd1234.part"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    _ambiguate(tiny_model_dir, _png(tmp_path / "in" / "a.png"), out=tmp_path / "out")
    assert not stale.exists() and live.exists()


# Finding 10: manifests never follow links, and get their mode.
def test_manifests_do_not_follow_symbolic_links(tmp_path, tiny_model_dir):
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    keys = tmp_path / "out" / "keys"
    keys.mkdir(parents=True)
    (keys / "manifest.jsonl").symlink_to(outside)
    result = _ambiguate(tiny_model_dir, _png(tmp_path / "in" / "a.png"), out=tmp_path / "out")
    assert_clean_failure(result, "symbolic link")
    assert outside.read_text() == ""


def test_an_existing_manifest_gets_the_private_mode(tmp_path, tiny_model_dir):
    manifest = tmp_path / "out" / "keys" / "manifest.jsonl"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("")
    manifest.chmod(0o644)
    _ambiguate(tiny_model_dir, _png(tmp_path / "in" / "a.png"), out=tmp_path / "out")
    assert stat.S_IMODE(manifest.stat().st_mode) == 0o600


# Finding 11: file modes follow the umask, restored images are a documented choice (0600).
def test_modes_follow_the_umask_and_restored_images_are_private(tmp_path, tiny_model_dir):
    old = os.umask(0o077)
    try:
        _ambiguate(tiny_model_dir, _png(tmp_path / "in" / "a.png"), out=tmp_path / "out")
    finally:
        os.umask(old)
    public = tmp_path / "out" / "public" / "a.primis"
    assert stat.S_IMODE(public.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "out" / "keys" / "a.primiskey").stat().st_mode) == 0o600
    keys = tmp_path / "out" / "keys"
    _disambiguate(tiny_model_dir, public, keys, tmp_path / "r").check_returncode()
    assert stat.S_IMODE((tmp_path / "r" / "a.png").stat().st_mode) == 0o600
    _disambiguate(tiny_model_dir, public, keys, tmp_path / "r2", "--output-mode", "640")
    assert stat.S_IMODE((tmp_path / "r2" / "a.png").stat().st_mode) == 0o640
    old = os.umask(0o022)
    try:
        _ambiguate(tiny_model_dir, _png(tmp_path / "in2" / "b.png"), out=tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "public" / "b.primis").stat().st_mode) == 0o644
    assert_clean_failure(
        _disambiguate(tiny_model_dir, public, keys, tmp_path / "r3", "--output-mode", "9"),
        "octal",
    )


# Finding 12: DICOM names, the DeidentificationMethod length, burned-in annotation.
def test_dicom_outputs_hide_uids_and_do_not_overclaim(tmp_path, tiny_model_dir, recwarn):
    uid = "1.2.826.0.1.3680043.8.498.12345"
    (tmp_path / "in").mkdir()
    (tmp_path / "in2").mkdir()
    pixels = (smooth_image(32, 40, 2) * 4000).astype(np.uint16)
    source = _write_dicom(tmp_path / "in" / f"{uid}.dcm", pixels, "MONOCHROME2",
                          BurnedInAnnotation="YES")  # fmt: skip
    out = tmp_path / "out"
    _ambiguate(tiny_model_dir, source, out=out, extra=["--names", "id"]).check_returncode()
    (public,) = (out / "public").glob("*.primis")
    assert uid not in public.name and uid not in (out / "public" / "manifest.jsonl").read_text()
    assert uid in (out / "keys" / "manifest.jsonl").read_text()
    _disambiguate(tiny_model_dir, public, out / "keys", tmp_path / "r").check_returncode()
    ds = pydicom.dcmread(tmp_path / "r" / f"{public.stem}.dcm")
    assert ds.BurnedInAnnotation == "YES" and ds.PatientIdentityRemoved == "NO"
    assert len(ds.DeidentificationMethod) <= 64
    assert not [w for w in recwarn if "DeidentificationMethod" in str(w.message)]
    # Identity removed is claimed only where the input says there is no burned-in text.
    for name, said, removed in (
        ("plain", {}, "NO"),
        ("clean", {"BurnedInAnnotation": "NO"}, "YES"),
    ):
        plain = _write_dicom(tmp_path / "in2" / f"{name}.dcm", pixels, "MONOCHROME2", **said)
        _ambiguate(tiny_model_dir, plain, out=out, extra=["--names", "stem"]).check_returncode()
        public = out / "public" / f"{name}.primis"
        _disambiguate(tiny_model_dir, public, out / "keys", tmp_path / "r").check_returncode()
        ds = pydicom.dcmread(tmp_path / "r" / f"{name}.dcm")
        assert ds.PatientIdentityRemoved == removed and len(ds.DeidentificationMethod) <= 64
        assert ("DeidentificationMethodCodeSequence" in ds) == (removed == "YES")


# Finding 13: image sizes are checked from headers, before decoding.
def _huge_png(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header declares width x height (CRC fixed)."""
    _png(path, size=(8, 8))
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_huge_declared_images_are_refused_before_decoding(tmp_path, tiny_model_dir, monkeypatch):
    import tifffile

    png = _huge_png(tmp_path / "in" / "wide.png", 16000, 16000)
    tif = tmp_path / "in" / "big.tif"
    tifffile.imwrite(tif, np.zeros((200, 200), np.uint16), compression="zlib")
    npy = tmp_path / "in" / "big.npy"
    np.save(npy, np.zeros((200, 200), np.uint8))
    dcm = _write_dicom(tmp_path / "in" / "big.dcm", np.zeros((200, 200), np.uint16), "MONOCHROME2")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(tifffile.TiffFile, "asarray", no_decoding)
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(no_decoding))
    started = time.perf_counter()
    result = _ambiguate(tiny_model_dir, png, out=tmp_path / "out")
    assert_clean_failure(result, "exceed the limit")
    monkeypatch.setenv("PRIMIS_MAX_PIXELS", "10000")
    for path in (tif, npy, dcm):
        assert_clean_failure(_ambiguate(tiny_model_dir, path, out=tmp_path / "out"), "PRIMIS_MAX")
    assert time.perf_counter() - started < 10
    assert not list((tmp_path / "out" / "public").glob("*.primis"))


def test_a_deflated_dicom_bomb_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    (tmp_path / "in").mkdir()
    path = _write_dicom(tmp_path / "in" / "deflate.dcm", np.zeros((8, 8), np.uint16),
                        "MONOCHROME2")  # fmt: skip
    ds = pydicom.dcmread(path)
    ds.add_new(0x00091010, "OB", bytes(24 << 20))  # 24 MiB of zeros: a few KiB deflated
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert path.stat().st_size < 1 << 20
    monkeypatch.setenv("PRIMIS_MAX_PIXELS", "1000")
    result = _ambiguate(tiny_model_dir, path, out=tmp_path / "out")
    assert_clean_failure(result, "inflates beyond")


# Finding 14: a float64 range that overflows.
def test_a_float_range_beyond_float64_fails_cleanly(tmp_path, tiny_model_dir):
    path = tmp_path / "in" / "wide.npy"
    path.parent.mkdir()
    np.save(path, np.array([[-1e308, 1e308], [0.0, 1.0]] * 4, dtype=np.float64))
    assert_clean_failure(_ambiguate(tiny_model_dir, path, out=tmp_path / "out"), "range")


# Finding 15: info recognises wrapped keys.
def test_info_describes_wrapped_keys(tmp_path, pair, monkeypatch):
    monkeypatch.setenv("PRIMIS_PASSPHRASE", "correct horse")
    run_cli("keys", "gen", "--out", tmp_path / "alice", check=True)
    key = pair[1]
    run_cli("keys", "wrap", key, "--to", tmp_path / "alice.pub", "--passphrase", check=True)
    report = json.loads(run_cli("info", key, check=True).stdout)
    assert report["kind"] == "wrapped key"
    assert [slot["type"] for slot in report["slots"]] == ["x25519", "scrypt"]
    assert "wrapped" not in json.dumps(report["slots"])


# Findings 6 and 8: kill -9 at several points, then rerun.
_KILLER = """
import os, signal, sys
target, calls = int(sys.argv[1]), [0]
def hooked(call):
    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return call(*args, **kwargs)
    return run
os.replace, os.write = hooked(os.replace), hooked(os.write)
from primis.cli import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("names", ["stem", "id"])
@pytest.mark.slow
def test_kill_at_any_point_then_rerun(tmp_path, tiny_model_dir, names):
    """Per input: manifest line, key placed, public placed, public manifest line (os.write or
    os.replace each); then the two manifest rewrites. Kill at a spread of those points."""
    inputs = [_png(tmp_path / "in" / f"img{i}.png", i) for i in range(3)]
    for point in (1, 2, 3, 4, 13):
        out = tmp_path / f"out{point}"
        args = ["ambiguate", *inputs, "--model", tiny_model_dir, "--public-dir", out / "public"]
        args += ["--key-dir", out / "keys", "--refine-steps", "0", "--names", names]
        killed = subprocess.run(
            [sys.executable, "-c", _KILLER, str(point), *map(str, args)], capture_output=True
        )
        assert killed.returncode == -9, killed.stderr.decode()[-2000:]
        _ambiguate(tiny_model_dir, *inputs, out=out, extra=["--names", names]).check_returncode()
        _check_outputs(out, inputs)


def test_freed_memory_goes_back_where_the_c_library_offers_it():
    import platform

    from primis.limits import release_free_memory

    assert release_free_memory() == (platform.libc_ver()[0] == "glibc")


def test_importing_primis_caps_the_onednn_cache_unless_the_user_set_it():
    import os
    import subprocess
    import sys

    show = "import os, primis; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    default = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True)
    assert default.stdout.strip() == "64"
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "512"
    chosen = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True)
    assert chosen.stdout.strip() == "512"


def test_one_line_joins_a_message_and_bounds_it():
    from primis.errors import one_line

    joined = one_line(ValueError("all failed:\n  a: bad\n  b: worse"))
    assert joined == "all failed: a: bad; b: worse"
    assert one_line(KeyError()) == "KeyError"
    assert len(one_line(ValueError("x" * 1000), limit=50)) == 50
