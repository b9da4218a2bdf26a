"""The sharing workflow: batches, shards, manifests, DICOM, wrapped keys, partial keys."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

import primis
from primis.errors import PrimisError
from primis.formats import KeyFile
from tests.conftest import ambiguate_cli, assert_clean_failure, run_cli, smooth_image
from tests.test_dicom import _write_dicom


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "studies"
    (root / "a" / "b").mkdir(parents=True)
    for i, where in enumerate(["a", "a", "a/b", "a/b", "."]):
        image = (smooth_image(30 + i, 40, i) * 255).astype(np.uint8)
        Image.fromarray(image).save(root / where / f"img{i}.png")
    return root


def test_folders_and_globs_with_manifests_and_skips(tmp_path, folder, tiny_model_dir):
    out = tmp_path / "out"
    first = ambiguate_cli(tiny_model_dir, folder / "a", out=out)
    assert first.returncode == 0, first.stderr
    assert "ambiguate: 4 done, 0 failed" in first.stdout
    again = ambiguate_cli(tiny_model_dir, str(folder / "**" / "*.png"), out=out)
    assert "1 done, 4 skipped" in again.stdout
    redo = ambiguate_cli(tiny_model_dir, folder, out=out, extra=["--overwrite"])
    assert "ambiguate: 5 done, 0 failed" in redo.stdout
    private = [json.loads(x) for x in (out / "keys" / "manifest.jsonl").read_text().splitlines()]
    assert {Path(r["input"]).name for r in private} == {f"img{i}.png" for i in range(5)}
    assert stat.S_IMODE((out / "keys" / "manifest.jsonl").stat().st_mode) == 0o600
    public_manifest = (out / "public" / "manifest.jsonl").read_text()
    assert "img" not in public_manifest and str(folder) not in public_manifest
    ids = {json.loads(x)["file_id"] for x in public_manifest.splitlines()}
    assert {r["file_id"] for r in private} == ids


def test_shards_split_the_batch(tmp_path, folder, tiny_model_dir):
    outs = []
    for index in range(2):
        out = tmp_path / f"shard{index}"
        result = ambiguate_cli(tiny_model_dir, folder, out=out, extra=["--shard", f"{index}/2"])
        assert result.returncode == 0, result.stderr
        outs.append({p.stem for p in (out / "public").glob("*.primis")})
    assert not outs[0] & outs[1] and len(outs[0] | outs[1]) == 5
    assert_clean_failure(
        ambiguate_cli(tiny_model_dir, folder, out=tmp_path / "x", extra=["--shard", "2/2"]),
        "--shard",
    )


def test_name_clashes_fail_without_overwriting(tmp_path, tiny_model_dir):
    for where in ("x", "y"):
        (tmp_path / where).mkdir()
        Image.fromarray(np.full((20, 20), 9, np.uint8)).save(tmp_path / where / "same.png")
    result = ambiguate_cli(tiny_model_dir, tmp_path / "x", tmp_path / "y", out=tmp_path / "o")
    assert_clean_failure(result, "same output name")
    assert "1 done" in result.stdout


def test_disambiguate_batch_skips_existing_outputs(tmp_path, folder, tiny_model_dir):
    out = tmp_path / "out"
    ambiguate_cli(tiny_model_dir, folder, out=out)
    args = [
        "disambiguate",
        out / "public",
        "--model",
        tiny_model_dir,
        "--key-dir",
        out / "keys",
        "--out-dir",
        out / "restored",
    ]
    assert "5 done" in run_cli(*args, check=True).stdout
    assert "0 done, 5 skipped" in run_cli(*args, check=True).stdout
    assert "5 done" in run_cli(*args, "--overwrite", check=True).stdout


def test_dicom_round_trip_with_and_without_the_original_header(tmp_path, tiny_model_dir):
    pixels = (smooth_image(48, 40, 3) * 4000).astype(np.uint16)
    (tmp_path / "in").mkdir()
    source = _write_dicom(
        tmp_path / "in" / "cxr.dcm",
        pixels,
        "MONOCHROME1",
        RescaleSlope="1",
        RescaleIntercept="0",
        Modality="DX",
        StudyDescription="CHEST PA",
        BurnedInAnnotation="NO",
    )
    for keep, out in ((True, tmp_path / "kept"), (False, tmp_path / "anon")):
        extra = ["--keep-header"] if keep else []
        ambiguate_cli(tiny_model_dir, source, out=out, extra=["--names", "auto", *extra])
        # DICOM outputs are named by their random file id (names often hold UIDs), even
        # with --names auto (stems for other inputs).
        (public_path,) = (out / "public").glob("*.primis")
        public = public_path.read_bytes()
        for secret in (b"Doe", b"PID-12345", b"CHEST", b"MONOCHROME", b"cxr"):
            assert secret not in public and secret.decode() not in public_path.name
        run_cli(
            "disambiguate",
            public_path,
            "--model",
            tiny_model_dir,
            "--key-dir",
            out / "keys",
            "--out-dir",
            out / "restored",
            check=True,
        )
        ds = pydicom.dcmread(out / "restored" / f"{public_path.stem}.dcm")
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 12
        assert ds.pixel_array.shape == pixels.shape and ds.pixel_array.dtype == np.uint16
        key = (out / "keys" / f"{public_path.stem}.primiskey").read_bytes()
        expected = primis.restore(public, key, model=tiny_model_dir)
        np.testing.assert_array_equal(ds.pixel_array, expected)  # stored values, not inverted
        if keep:
            assert ds.PatientName == "Doe^Jane" and ds.StudyDescription == "CHEST PA"
        else:
            assert "Doe" not in str(ds) and "PID-12345" not in str(ds)
            assert ds.PatientIdentityRemoved == "YES"  # the input says: no burned-in text
            assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"


def test_wrapped_keys_open_only_for_their_recipient_or_passphrase(
    tmp_path, folder, tiny_model_dir, monkeypatch
):
    out = tmp_path / "out"
    ambiguate_cli(tiny_model_dir, folder / "img4.png", out=out)
    key = out / "keys" / "img4.primiskey"
    run_cli("keys", "gen", "--out", tmp_path / "alice", check=True)
    run_cli("keys", "gen", "--out", tmp_path / "bob", check=True)
    assert stat.S_IMODE((tmp_path / "alice").stat().st_mode) == 0o600
    monkeypatch.setenv("PRIMIS_PASSPHRASE", "correct horse")
    run_cli("keys", "wrap", key, "--to", tmp_path / "alice.pub", "--passphrase", check=True)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(PrimisError, match="not a PRIMIS key"):
        KeyFile.from_bytes(key.read_bytes())
    base = [
        "disambiguate",
        out / "public" / "img4.primis",
        "--model",
        tiny_model_dir,
        "--key-dir",
        out / "keys",
    ]
    run_cli(*base, "--out-dir", tmp_path / "r1", "--identity", tmp_path / "alice", check=True)
    run_cli(*base, "--out-dir", tmp_path / "r2", "--passphrase", check=True)
    assert (
        Image.open(tmp_path / "r1" / "img4.png").size
        == Image.open(tmp_path / "r2" / "img4.png").size
        == (40, 34)
    )
    assert_clean_failure(
        run_cli(*base, "--out-dir", tmp_path / "r3", "--identity", tmp_path / "bob"),
        "wrong identity or passphrase",
    )
    monkeypatch.setenv("PRIMIS_PASSPHRASE", "wrong")
    assert_clean_failure(
        run_cli(*base, "--out-dir", tmp_path / "r4", "--passphrase"), "wrong identity or passphrase"
    )
    assert_clean_failure(run_cli(*base, "--out-dir", tmp_path / "r5"), "is wrapped")


def test_partial_keys_open_only_their_maps(tmp_path, folder, tiny_model_dir):
    out = tmp_path / "out"
    ambiguate_cli(tiny_model_dir, folder / "img4.png", out=out, extra=["--maps", "0"])
    key = KeyFile.from_bytes((out / "keys" / "img4.primiskey").read_bytes())
    assert key.header.maps == [0]
    run_cli(
        "disambiguate",
        out / "public" / "img4.primis",
        "--model",
        tiny_model_dir,
        "--key-dir",
        out / "keys",
        "--out-dir",
        out / "r",
        check=True,
    )
    assert_clean_failure(
        ambiguate_cli(
            tiny_model_dir, folder / "img4.png", out=tmp_path / "bad", extra=["--maps", "7"]
        ),
        "maps",
    )


@pytest.mark.slow
def test_a_killed_batch_leaves_no_partial_output_and_reruns_to_completion(tmp_path, tiny_model_dir):
    import os
    import signal
    import subprocess
    import sys
    import time

    from primis.sharing import read_pair

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(40):
        Image.fromarray((smooth_image(160, 192, i) * 255).astype(np.uint8)).save(
            inputs / f"img{i:02d}.png"
        )
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "primis",
        "ambiguate",
        "--names",
        "stem",
        str(inputs),
        "--model",
        str(tiny_model_dir),
        "--public-dir",
        str(out / "public"),
        "--key-dir",
        str(out / "keys"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "public").glob("*.primis"))) < 3:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    publics = sorted((out / "public").glob("*.primis"))
    assert 3 <= len(publics) < 40, "the batch finished before it could be interrupted"
    for public in publics:  # every output that exists is whole and has its key
        key = out / "keys" / f"{public.stem}.primiskey"
        read_pair(public.read_bytes(), key.read_bytes())
    result = run_cli(*command[3:], check=True)
    assert f"{40 - len(publics)} done, {len(publics)} skipped" in result.stdout
    assert "0 failed" in result.stdout
    assert len(list((out / "public").glob("*.primis"))) == 40
    assert len(list((out / "keys").glob("*.primiskey"))) == 40


def test_extensionless_dicom_files_in_folders_are_found(tmp_path, tiny_model_dir):
    export = tmp_path / "pacs" / "series1"
    export.mkdir(parents=True)
    _write_dicom(
        export / "IM0001", (smooth_image(32, 32, 1) * 4000).astype(np.uint16), "MONOCHROME2"
    )
    (export / "DICOMDIR.txt").write_text("not an image")
    result = ambiguate_cli(tiny_model_dir, tmp_path / "pacs", out=tmp_path / "out")
    assert result.returncode == 0, result.stderr
    (public,) = (tmp_path / "out" / "public").glob("*.primis")  # named by its file id
    manifest = (tmp_path / "out" / "keys" / "manifest.jsonl").read_text()
    assert str(export / "IM0001") in manifest and public.stem in manifest
    assert "1 done" in result.stdout


def test_batch_summary_names_skips_only_when_there_are_some(capsys, tmp_path):
    from primis.batch import BatchResult, Outcome, run_batch
    from primis.cli_options import run_batch as run_and_summarise

    items = [tmp_path / "a.png", tmp_path / "b.png"]
    skipped = run_batch(items, lambda path: Outcome.SKIPPED, "ambiguate", {})
    assert skipped == BatchResult(2, 0, 2, {})
    capsys.readouterr()
    run_and_summarise(items, lambda path: f"{path.name}: done", "ambiguate", {})
    assert capsys.readouterr().out.splitlines()[-1] == "ambiguate: 2 done, 0 failed"
    run_and_summarise(items, lambda path: Outcome.SKIPPED, "ambiguate", {})
    assert "2 skipped (outputs exist; --overwrite to redo)" in capsys.readouterr().out


def test_a_batch_written_to_a_log_reports_its_count_and_time_left(monkeypatch, capsys, tmp_path):
    import primis.batch as batch

    monkeypatch.setattr(batch, "LOG_PROGRESS_SECONDS", 0.0)
    items = [tmp_path / f"{index}.png" for index in range(4)]
    result = batch.run_batch(items, lambda path: f"{path.name}: done", "share", {})
    assert (result.done, result.skipped, result.failures) == (4, 0, {})
    lines = capsys.readouterr().err.splitlines()  # stderr is no terminal under pytest
    assert [line.split(",")[0] for line in lines] == [f"share: {n}/4 files" for n in range(1, 5)]
    assert all(" elapsed, about " in line and line.endswith(" left") for line in lines)
    assert lines[-1].endswith("about 0:00:00 left")
