"""The DICOM node: `primis serve` receiving by C-STORE (pynetdicom as the sender), and
`primis restore-to` sending; against Orthanc (Debian package) where it is installed."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    EncapsulatedPDFStorage,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

import primis
from primis import dicomnode
from primis.dicomnode import (
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SUCCESS,
    DicomNode,
)
from primis.metrics import psnr
from tests.conftest import assert_clean_failure, run_cli, smooth_image

PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-12345"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return primis.load_model(tiny_model_dir, device="cpu")


def instance(
    seed: int,
    shape: tuple[int, int] = (48, 60),
    bits: int = 12,
    syntax: str = ExplicitVRLittleEndian,
    sop_class: str = DigitalXRayImageStorageForPresentation,
    study: str | None = None,
) -> Dataset:
    """A MONOCHROME2 radiograph with a patient's name and id, in ``syntax``."""
    pixels = np.rint(smooth_image(*shape, seed) * (2**bits - 1)).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, "19700101"
    ds.Modality, ds.InstanceNumber = "DX", seed
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = pixels.tobytes()
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def store(address: tuple[str, int], datasets: list[Dataset], calling_ae="STORESCU") -> list:
    """C-STORE every data set over one association; their statuses (None: no answer)."""
    ae = AE(calling_ae)
    for pair in dict.fromkeys((d.SOPClassUID, d.file_meta.TransferSyntaxUID) for d in datasets):
        ae.add_requested_context(*pair)
    association = ae.associate(*address, ae_title="PRIMIS")
    assert association.is_established
    try:
        answers = (association.send_c_store(d) for d in datasets)
        return [int(a.Status) if "Status" in a else None for a in answers]
    finally:
        association.release()


def files(folder: Path, suffix: str) -> list[Path]:
    return sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []


def wait_until_spooled(spool: Path, count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while len(files(spool, ".dcm")) < count:
        assert time.monotonic() < deadline, f"fewer than {count} instance(s) spooled in 60 s"
        time.sleep(0.005)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def restored_pixels(public: Path, key_dir: Path, model) -> np.ndarray:
    key = (key_dir / f"{public.stem}.primiskey").read_bytes()
    return primis.restore(public.read_bytes(), key, model)


def hold_sharing(monkeypatch) -> threading.Event:
    """Make the node's sharing wait (up to 60 s) until the returned event is set."""
    release = threading.Event()
    share_into = dicomnode.share_into

    def held(*args, **kwargs):
        release.wait(60)
        return share_into(*args, **kwargs)

    monkeypatch.setattr(dicomnode, "share_into", held)
    return release


def test_every_received_instance_is_shared_as_ambiguate_shares_it(tmp_path, model, caplog):
    sent = [
        instance(1),
        instance(2, (40, 52), bits=16, syntax=ImplicitVRLittleEndian),
        instance(3, syntax=RLELossless, sop_class=ComputedRadiographyImageStorage),
        instance(4, syntax=JPEG2000Lossless),
    ]
    caplog.set_level("INFO", logger="primis.dicomnode")
    options = {"port": 0, "refine_steps": 0, "ack": "after-share"}
    with DicomNode(tmp_path / "public", tmp_path / "keys", model, **options) as node:
        ae = AE("ECHOSCU")
        ae.add_requested_context(Verification)
        echo = ae.associate(*node.address, ae_title="PRIMIS")
        assert int(echo.send_c_echo().Status) == SUCCESS
        echo.release()
        assert store(node.address, sent) == [SUCCESS] * 4
        publics = files(tmp_path / "public", ".primis")
        assert len(publics) == 4  # on disk when the sender got its answer
    assert node.stats.stored == 4 and node.stats.failed == 0
    assert files(tmp_path / "keys" / "spool", ".dcm") == []
    records = [json.loads(line) for line in (tmp_path / "keys" / "manifest.jsonl").open()]
    by_uid = {r["input"].removeprefix("dicom-instance:").split("#")[0]: r for r in records}
    assert set(by_uid) == {str(d.SOPInstanceUID) for d in sent}
    for public in publics:
        data = public.read_bytes()
        assert PATIENT_NAME.encode() not in data and PATIENT_ID.encode() not in data
        assert (tmp_path / "keys" / f"{public.stem}.primiskey").stat().st_mode & 0o777 == 0o600
    log = caplog.text
    assert log.count("shared instance") == 4
    assert PATIENT_NAME not in log and PATIENT_ID not in log
    assert not any(str(d.SOPInstanceUID) in log for d in sent)
    for number, ds in enumerate(sent):  # the same keys as `ambiguate` of the same file
        path = tmp_path / "files" / f"{number}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        local = primis.share(path, model, refine_steps=0)
        expected = primis.restore(local.public, local.key, model)
        record = by_uid[str(ds.SOPInstanceUID)]
        got = restored_pixels(Path(record["public"]), tmp_path / "keys", model)
        assert got.shape == ds.pixel_array.shape and got.dtype == ds.pixel_array.dtype
        np.testing.assert_array_equal(got, expected)


def test_an_instance_sent_again_is_acknowledged_not_shared_twice(tmp_path, model):
    ds = instance(5)
    with DicomNode(tmp_path / "p", tmp_path / "k", model, port=0, refine_steps=0) as node:
        assert store(node.address, [ds, ds]) == [SUCCESS, SUCCESS]
    assert (node.stats.stored, node.stats.duplicates) == (1, 1)
    assert len(files(tmp_path / "p", ".primis")) == 1


def test_a_known_uid_with_other_content_is_shared_as_a_new_file(tmp_path, model, caplog):
    """Duplicates by content: the same instance in another transfer syntax is acknowledged
    as a duplicate; a correction under the same SOP Instance UID (MONOCHROME1 instead of
    MONOCHROME2) is shared as a new file, the conflict logged without identifiers."""
    caplog.set_level("INFO", logger="primis.dicomnode")
    ds = instance(45)
    again = instance(45, syntax=RLELossless)
    again.SOPInstanceUID = ds.SOPInstanceUID
    corrected = instance(45)
    corrected.SOPInstanceUID, corrected.PhotometricInterpretation = ds.SOPInstanceUID, "MONOCHROME1"
    options = {"port": 0, "refine_steps": 0}
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        assert store(node.address, [ds]) == [SUCCESS]
        assert store(node.address, [again, corrected]) == [SUCCESS, SUCCESS]
    assert (node.stats.stored, node.stats.duplicates) == (2, 1)
    assert len(files(tmp_path / "p", ".primis")) == 2
    records = [json.loads(line) for line in (tmp_path / "k" / "manifest.jsonl").open()]
    assert {r["input"].split("#")[0] for r in records} == {f"dicom-instance:{ds.SOPInstanceUID}"}
    assert "received before with other content" in caplog.text
    assert str(ds.SOPInstanceUID) not in caplog.text


def test_only_allowed_calling_ae_titles_may_associate(tmp_path, model):
    options = {"port": 0, "allow": ["TRUSTED"], "refine_steps": 0}
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        intruder = AE("INTRUDER")
        intruder.add_requested_context(Verification)
        association = intruder.associate(*node.address, ae_title="PRIMIS")
        assert association.is_rejected
        assert store(node.address, [instance(6)], calling_ae="TRUSTED") == [SUCCESS]


def test_what_cannot_be_shared_fails_with_a_status_and_nothing_half_written(tmp_path, model):
    frames = instance(7)
    frames.NumberOfFrames, frames.Rows = 2, frames.Rows // 2
    report = Dataset()
    report.file_meta = FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.SOPClassUID, report.SOPInstanceUID = EncapsulatedPDFStorage, generate_uid()
    report.PatientName, report.MIMETypeOfEncapsulatedDocument = PATIENT_NAME, "application/pdf"
    report.EncapsulatedDocument = b"%PDF-1.4 not an image"
    options = {"port": 0, "refine_steps": 0, "sop_classes": dicomnode.all_storage_classes()}
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        assert store(node.address, [frames, report, instance(8)]) == [
            CANNOT_UNDERSTAND,
            CANNOT_UNDERSTAND,
            SUCCESS,
        ]
    assert len(files(tmp_path / "p", ".primis")) == len(files(tmp_path / "k", ".primiskey")) == 1
    failed = tmp_path / "k" / "spool" / "failed"
    assert len(files(failed, ".dcm")) == 2
    reasons = " ".join(p.read_text() for p in files(failed, ".txt"))
    assert "multi-frame" in reasons and "no pixel data" in reasons
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in failed.iterdir())


def test_a_full_disk_answers_out_of_resources_and_keeps_the_instance(tmp_path, model, monkeypatch):
    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dicomnode, "share_into", full)
    with DicomNode(tmp_path / "p", tmp_path / "k", model, port=0, ack="after-share") as node:
        assert store(node.address, [instance(9)]) == [OUT_OF_RESOURCES]
    assert len(files(tmp_path / "k" / "spool", ".dcm")) == 1  # shared at the next start
    assert files(tmp_path / "p", ".primis") == []


def test_what_a_killed_node_left_in_the_spool_is_shared_at_the_next_start(tmp_path, model):
    spool = tmp_path / "k" / "spool"
    spool.mkdir(parents=True)
    ds = instance(10)
    ds.save_as(spool / "0123456789abcdef.dcm", enforce_file_format=True)
    (spool / ".0123456789abcdef.dcm.999999999.abcdefgh.part").write_bytes(b"half")  # dead writer
    with DicomNode(tmp_path / "p", tmp_path / "k", model, port=0, refine_steps=0) as node:
        pass  # stopping shares what is queued
    assert node.stats.stored == 1
    assert list(spool.iterdir()) == []
    (public,) = files(tmp_path / "p", ".primis")
    assert restored_pixels(public, tmp_path / "k", model).shape == ds.pixel_array.shape


def test_concurrent_associations_and_back_pressure(tmp_path, model, monkeypatch):
    """Two senders at once are both served; with room for one instance and no wait, a third
    sender gets 0xA700 while the queue is full."""
    release, started = threading.Event(), threading.Event()
    share_into = dicomnode.share_into

    def slow_share(*args, **kwargs):
        started.set()
        release.wait(30)
        return share_into(*args, **kwargs)

    monkeypatch.setattr(dicomnode, "share_into", slow_share)
    options = {"port": 0, "refine_steps": 0, "queue_size": 2, "queue_timeout": 0.0}
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        answers: queue.Queue = queue.Queue()
        senders = [
            threading.Thread(target=lambda s=s: answers.put(store(node.address, [instance(s)])))
            for s in (11, 12)
        ]
        for sender in senders:
            sender.start()
        assert started.wait(30)
        wait_until_spooled(tmp_path / "k" / "spool", 2)
        assert store(node.address, [instance(13)]) == [OUT_OF_RESOURCES]
        release.set()
        for sender in senders:
            sender.join(60)
    assert [answers.get_nowait() for _ in senders] == [[SUCCESS], [SUCCESS]]
    assert (node.stats.stored, node.stats.refused) == (2, 1)


def test_a_worker_failure_answers_that_instance_and_the_node_goes_on(tmp_path, model, monkeypatch):
    """An exception past the share's own handling (a bug) fails that instance with 0x0110, the
    next instance is shared; a worker that is gone answers 0x0110 at once, not never."""
    share = DicomNode._share
    calls = []

    def flaky(self, job):
        calls.append(job.path.name)
        if len(calls) == 1:
            raise RuntimeError(f"bug while sharing {PATIENT_NAME}")
        return share(self, job)

    monkeypatch.setattr(DicomNode, "_share", flaky)
    options = {"port": 0, "refine_steps": 0, "ack": "after-share"}
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        assert store(node.address, [instance(40), instance(41)]) == [PROCESSING_FAILURE, SUCCESS]
    assert (node.stats.stored, node.stats.failed) == (1, 1)
    assert len(files(tmp_path / "k" / "spool" / "failed", ".dcm")) == 1
    monkeypatch.setattr(DicomNode, "_work", lambda self: None)  # the worker ends at once
    options = {"port": 0, "answer_timeout": 60, "ack": "after-share"}
    with DicomNode(tmp_path / "p2", tmp_path / "k2", model, **options) as node:
        started = time.monotonic()
        assert store(node.address, [instance(42)]) == [PROCESSING_FAILURE]
        assert time.monotonic() - started < 30


def test_the_wait_for_an_answer_is_bounded(tmp_path, model, monkeypatch):
    release = hold_sharing(monkeypatch)
    options = {"port": 0, "refine_steps": 0, "answer_timeout": 0.5, "ack": "after-share"}
    ds = instance(43)
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        assert store(node.address, [ds]) == [OUT_OF_RESOURCES]  # still queued: retry later
        release.set()
        deadline = time.monotonic() + 30
        while node.stats.stored < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store(node.address, [ds]) == [SUCCESS]  # the retry: already shared
    assert (node.stats.stored, node.stats.duplicates) == (1, 1)
    with pytest.raises(primis.PrimisError, match="answer timeout"):
        DicomNode(tmp_path / "p", tmp_path / "k", model, answer_timeout=0)


def test_a_node_used_from_python_keeps_data_sets_out_of_the_log(tmp_path, model, caplog):
    """pynetdicom logs data set attributes at INFO and DEBUG; DicomNode keeps its logger at
    WARNING whatever the application's logging says."""
    logging.getLogger("pynetdicom").setLevel(logging.NOTSET)
    caplog.set_level(logging.DEBUG)
    ds = instance(44)
    with DicomNode(tmp_path / "p", tmp_path / "k", model, port=0, refine_steps=0) as node:
        assert store(node.address, [ds]) == [SUCCESS]
    assert "shared instance" in caplog.text
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text
    assert str(ds.SOPInstanceUID) not in caplog.text


def test_after_spool_acknowledges_before_sharing_and_fails_fast_what_it_can(
    tmp_path, model, monkeypatch
):
    """The default (--ack after-spool): success once the instance is in the spool, while the
    share has not even started; an instance that fails the header checks gets 0xC000 at once;
    stopping shares what was acknowledged."""
    release = hold_sharing(monkeypatch)
    frames = instance(50)
    frames.NumberOfFrames, frames.Rows = 2, frames.Rows // 2
    with DicomNode(tmp_path / "p", tmp_path / "k", model, port=0, refine_steps=0) as node:
        assert node.ack == "after-spool"
        started = time.monotonic()
        assert store(node.address, [instance(51), frames, instance(52)]) == [
            SUCCESS,
            CANNOT_UNDERSTAND,
            SUCCESS,
        ]
        assert time.monotonic() - started < 30 and not release.is_set()
        assert files(tmp_path / "p", ".primis") == []  # acknowledged, not shared yet
        assert len(files(tmp_path / "k" / "spool", ".dcm")) == 2
        release.set()
    assert (node.stats.stored, node.stats.failed) == (2, 1)
    assert len(files(tmp_path / "p", ".primis")) == 2
    assert files(tmp_path / "k" / "spool", ".dcm") == []


def test_the_spool_quota_refuses_what_does_not_fit(tmp_path, model, monkeypatch):
    release = hold_sharing(monkeypatch)
    options = {"port": 0, "refine_steps": 0, "queue_timeout": 0.0, "spool_max_bytes": 9000}
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        # each instance is under 9000 B, two are over: the first fits, the second does not
        assert store(node.address, [instance(53), instance(54)]) == [SUCCESS, OUT_OF_RESOURCES]
        big = instance(55, (200, 200))
        assert store(node.address, [big]) == [OUT_OF_RESOURCES]  # more than the whole quota
        release.set()
    assert (node.stats.stored, node.stats.refused) == (1, 2)


def test_only_image_storage_classes_are_accepted_by_default(tmp_path, model):
    ae = AE("STORESCU")
    ae.add_requested_context(EncapsulatedPDFStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    with DicomNode(tmp_path / "p", tmp_path / "k", model, port=0) as node:
        association = ae.associate(*node.address, ae_title="PRIMIS")
        accepted = {str(c.abstract_syntax) for c in association.accepted_contexts}
        association.release()
    assert accepted == {str(DigitalXRayImageStorageForPresentation)}


def _raw_pdu_flood(address, declared: int, sent: int) -> int:
    """Open a TCP connection, send a PDU header (A-ASSOCIATE-RQ) declaring ``declared`` bytes,
    then zeros; the bytes the node took before it closed the connection."""
    taken = 0
    with socket.create_connection(address, timeout=30) as raw:
        raw.sendall(bytes([1, 0]) + declared.to_bytes(4, "big"))
        chunk = bytes(1 << 16)
        with contextlib.suppress(OSError):
            while taken < sent:
                raw.sendall(chunk)
                taken += len(chunk)
    return taken


def test_network_input_is_bounded_while_it_arrives(tmp_path, model, caplog):
    """A PDU that declares more than the limit is not read: the connection closes at once
    (here after at most the socket buffers, not the 64 MB sent); an instance larger than the
    instance limit closes its association while it arrives; the node serves others after."""
    caplog.set_level("WARNING", logger="primis.dicomnode")
    options = {"port": 0, "refine_steps": 0, "max_instance_bytes": 4096}
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        assert _raw_pdu_flood(node.address, 1 << 30, 64 << 20) < 64 << 20
        assert store(node.address, [instance(60, (48, 60))]) == [None]  # 5760 B of pixels
        assert store(node.address, [instance(61, (20, 24))]) == [SUCCESS]
    assert "a PDU of 1073741824 B declared" in caplog.text
    assert "more than 4096 B (the instance limit)" in caplog.text
    assert node.stats.stored == 1


def test_failed_instances_are_kept_by_the_retention_rule(tmp_path, model):
    def multi_frame(seed):
        ds = instance(seed)
        ds.NumberOfFrames, ds.Rows = 2, ds.Rows // 2
        return ds

    options = {"port": 0, "refine_steps": 0, "failed_keep": 2}
    failed = tmp_path / "k" / "spool" / "failed"
    with DicomNode(tmp_path / "p", tmp_path / "k", model, **options) as node:
        assert (
            store(node.address, [multi_frame(s) for s in (62, 63, 64)]) == [CANNOT_UNDERSTAND] * 3
        )
    assert len(files(failed, ".dcm")) == len(files(failed, ".txt")) == 2
    with DicomNode(tmp_path / "p", tmp_path / "k", model, port=0, failed_days=0):
        pass
    assert files(failed, ".dcm") == files(failed, ".txt") == []


class Served:
    """`primis serve ARGS` in a subprocess, on a free port of 127.0.0.1; its stderr lines are
    collected as they come."""

    def __init__(self, *args: object) -> None:
        command = [sys.executable, "-m", "primis", "serve", "--host", "127.0.0.1", "--port", "0"]
        self.process = subprocess.Popen(
            [*command, *map(str, args)], stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        try:
            line = self.wait_for("listening as", 180)
            self.port = int(re.search(r" on [^ ]+:(\d+)", line).group(1))
        except BaseException:
            self.__exit__()
            raise

    def _read(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                line = self.lines.get(timeout=left)
                if line is None:
                    break
                if text in line:
                    return line
        raise AssertionError(f"no {text!r} from primis serve:\n{''.join(self.log)}")

    def stop(self, timeout: float = 120) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.wait_for("stopped:", 5)
        return code

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_serve_stops_cleanly_on_sigterm_after_answering_its_senders(tmp_path, tiny_model_dir):
    folders = ["--public-dir", tmp_path / "p", "--key-dir", tmp_path / "k"]
    with Served("--model", tiny_model_dir, *folders) as served:  # 50 refinement steps
        address = ("127.0.0.1", served.port)
        answer: queue.Queue = queue.Queue()
        sender = threading.Thread(target=lambda: answer.put(store(address, [instance(14)])))
        sender.start()
        wait_until_spooled(tmp_path / "k" / "spool")
        assert served.stop() == 0  # while the instance is being shared
        sender.join(60)
    assert answer.get_nowait() == [SUCCESS]
    assert len(files(tmp_path / "p", ".primis")) == 1
    log = "".join(served.log)
    assert log.index("stopping") < log.index("shared instance")  # shared after SIGTERM
    assert "stopped: 1 received, 1 shared" in log
    assert PATIENT_NAME not in log and PATIENT_ID not in log


@pytest.mark.slow
@pytest.mark.parametrize("ack", ["after-spool", "after-share"])
def test_an_instance_received_by_a_node_killed_while_sharing_is_shared_at_restart(
    tmp_path, tiny_model_dir, ack
):
    arguments = ["--model", tiny_model_dir, "--public-dir", tmp_path / "p", "--key-dir"]
    arguments += [tmp_path / "k", "--refine-steps", "100", "--ack", ack]
    with Served(*arguments) as served:
        answer: queue.Queue = queue.Queue()
        address = ("127.0.0.1", served.port)
        sender = threading.Thread(target=lambda: answer.put(store(address, [instance(19)])))
        sender.start()
        wait_until_spooled(tmp_path / "k" / "spool")
        if ack == "after-spool":  # acknowledged once synced in the spool, then killed
            sender.join(60)
            assert answer.get_nowait() == [SUCCESS]
            served.wait_for("acknowledged instance", 10)
        served.process.kill()
        sender.join(60)
    if ack == "after-share":
        assert answer.get_nowait() != [SUCCESS]  # the sender saw no success, keeps its copy
    assert files(tmp_path / "p", ".primis") == []
    with Served(*arguments) as restarted:
        assert restarted.stop() == 0
    assert "stopped: 0 received, 1 shared" in "".join(restarted.log)
    assert len(files(tmp_path / "p", ".primis")) == 1
    assert files(tmp_path / "k" / "spool", ".dcm") == []


def test_serve_refuses_bad_settings_in_one_line(tmp_path, tiny_model_dir):
    folders = ["--public-dir", tmp_path / "p", "--key-dir", tmp_path / "k"]
    model = ["--model", tiny_model_dir]
    assert_clean_failure(run_cli("serve", *model, *folders, "--ae-title", "A" * 17), "AE title")
    bad = {
        "--sop-classes": (["--sop-classes", "not-a-uid"], "--sop-classes"),
        "--to": (["--to", tmp_path / "missing.pub"], "not a PRIMIS recipient public key"),
        "both": (["--passphrase", "--passphrase-file", tmp_path / "x"], "give one"),
    }
    for extra, message in bad.values():
        assert_clean_failure(run_cli("serve", *model, *folders, *extra), message)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", *model, *folders, "--host", "127.0.0.1", "--port", port)
    assert_clean_failure(result, "cannot listen")


class Receiver:
    """A Storage SCP that keeps what it receives (the recipient's PACS)."""

    def __init__(self, ae_title: str = "PACS") -> None:
        self.received: list[Dataset] = []
        ae = AE(ae_title)
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ExplicitVRLittleEndian)
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        return SUCCESS


def test_restore_to_sends_reconstructions_by_c_store(tmp_path, tiny_model_dir, model):
    sent = [instance(15), instance(16, syntax=RLELossless)]
    for keep in (False, True):
        out = tmp_path / f"keep-{keep}"
        with DicomNode(
            out / "p", out / "k", model, port=0, refine_steps=0, keep_header=keep
        ) as node:
            assert store(node.address, sent) == [SUCCESS] * 2
        pacs = Receiver()
        try:
            publics = files(out / "p", ".primis")
            destination = ["--host", "127.0.0.1", "--port", pacs.port, "--called-ae", "PACS"]
            result = run_cli(
                "restore-to", *publics, "--model", tiny_model_dir, "--key-dir", out / "k",
                *destination,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert result.stdout.count("status 0x0000") == 2
        finally:
            pacs.server.shutdown()
        assert len(pacs.received) == 2
        expected = {restored_pixels(p, out / "k", model).tobytes() for p in publics}
        assert {d.pixel_array.tobytes() for d in pacs.received} == expected
        names = {str(d.PatientName) for d in pacs.received}
        assert names == ({PATIENT_NAME} if keep else {"ANONYMOUS"})
        assert not {d.SOPInstanceUID for d in pacs.received} & {d.SOPInstanceUID for d in sent}


def test_restore_to_fails_in_one_line_without_a_peer(tmp_path, tiny_model_dir, model):
    path = tmp_path / "x.dcm"
    instance(17).save_as(path, enforce_file_format=True)
    primis.share_file(path, tmp_path / "p", tmp_path / "k", model, refine_steps=0)
    result = run_cli(
        "restore-to", tmp_path / "p", "--model", tiny_model_dir, "--key-dir", tmp_path / "k",
        "--host", "127.0.0.1", "--port", free_port(), "--called-ae", "PACS",
    )  # fmt: skip
    assert_clean_failure(result, "cannot associate with PACS")


def test_restore_dicom_makes_any_input_a_dicom_file(tmp_path, model):
    path = tmp_path / "scan.png"
    Image.fromarray((smooth_image(40, 52, 18) * 255).astype(np.uint8)).save(path)
    done = primis.share_file(path, tmp_path / "p", tmp_path / "k", model, refine_steps=0)
    data = primis.restore_dicom(done.public_path, tmp_path / "k", model)
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.PatientIdentityRemoved == "NO"  # a PNG does not say whether text is burned in
    np.testing.assert_array_equal(
        ds.pixel_array, restored_pixels(done.public_path, tmp_path / "k", model)
    )


# ---- Orthanc (Debian package `orthanc`): a real DICOM server sends to `primis serve` ----


def need_peer(found: object, what: str, package: str) -> None:
    """Skip unless ``found`` (a peer program); fail instead where PRIMIS_REQUIRE_PEERS=1 says
    the peers must be there (.ci/run sets it after installing them)."""
    if found:
        return
    message = f"{what} is not installed (apt-get install {package}; .ci/run does)"
    if os.environ.get("PRIMIS_REQUIRE_PEERS") == "1":
        pytest.fail(f"{message}, and PRIMIS_REQUIRE_PEERS=1 requires it")
    pytest.skip(message)


ORTHANC = shutil.which("Orthanc") or next(
    (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None
)


class Orthanc:
    """Orthanc on free localhost ports with a generated configuration and storage in
    ``folder``; ``modalities`` are the DICOM nodes it may send to."""

    def __init__(self, folder: Path, modalities: dict[str, list]) -> None:
        self.http, self.dicom = free_port(), free_port()
        config = {
            "Name": "primis-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
            "DicomModalities": modalities,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomCheckCalledAet": False,
            "DicomScuTimeout": 300,
            "SynchronousCMove": True,
            "StableAge": 1,
        }
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = (folder / "orthanc.log").open("w")
        self.process = subprocess.Popen(
            [ORTHANC, str(path)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.rest("GET", "/system")
                return
            time.sleep(0.2)
        self.close()
        raise AssertionError(f"Orthanc did not start:\n{(folder / 'orthanc.log').read_text()}")

    def rest(self, method: str, path: str, body: bytes | None = None):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http}{path}", data=body, method=method
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            data = response.read()
        return (
            json.loads(data) if response.headers.get_content_type() == "application/json" else data
        )

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


@pytest.mark.slow
def test_orthanc_sends_studies_to_primis_serve_and_receives_restorations(tmp_path):
    """Orthanc sends one study by C-MOVE and one by C-STORE (its REST store) to `primis serve`
    with the bundled model; every instance is shared, public files hold no patient data, keys
    restore the pixels; `restore-to` sends the reconstructions back into Orthanc."""
    need_peer(ORTHANC, "Orthanc", "orthanc")
    started = time.perf_counter()
    moved, pushed = generate_uid(), generate_uid()
    syntaxes = [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless]
    studies = {
        moved: [
            instance(20 + i, (256, 256), syntax=syntaxes[i % 3], study=moved) for i in range(4)
        ],
        pushed: [instance(30 + i, (256, 256), study=pushed) for i in range(2)],
    }
    sent = [ds for study in studies.values() for ds in study]
    folders = ["--public-dir", tmp_path / "p", "--key-dir", tmp_path / "k"]
    with Served(*folders, "--refine-steps", "0", "--keep-header", "--allow", "ORTHANC") as served:
        orthanc = Orthanc(tmp_path / "orthanc", {"primis": ["PRIMIS", "127.0.0.1", served.port]})
        try:
            for number, ds in enumerate(sent):
                path = tmp_path / "in" / f"{number}.dcm"
                path.parent.mkdir(exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                orthanc.rest("POST", "/instances", path.read_bytes())
            assert len(orthanc.rest("GET", "/instances")) == len(sent)
            sending = time.perf_counter()
            mover = AE("MOVESCU")
            mover.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            association = mover.associate("127.0.0.1", orthanc.dicom, ae_title="ORTHANC")
            assert association.is_established
            query = Dataset()
            query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", moved
            model = StudyRootQueryRetrieveInformationModelMove
            answers = list(association.send_c_move(query, "PRIMIS", model))
            association.release()
            assert int(answers[-1][0].Status) == SUCCESS, answers[-1][0]
            assert int(answers[-1][0].NumberOfCompletedSuboperations) == 4
            (study,) = orthanc.rest("POST", "/tools/lookup", pushed.encode())
            orthanc.rest("POST", "/modalities/primis/store", study["ID"].encode())
            seconds = time.perf_counter() - sending
            assert served.stop() == 0
            publics = files(tmp_path / "p", ".primis")
            assert len(publics) == len(sent)
            records = [json.loads(line) for line in (tmp_path / "k" / "manifest.jsonl").open()]
            by_uid = {r["input"].removeprefix("dicom-instance:").split("#")[0]: r for r in records}
            model = primis.load_model("cxr", device="cpu")
            quality = []
            for ds in sent:
                public = Path(by_uid[str(ds.SOPInstanceUID)]["public"])
                data = public.read_bytes()
                assert PATIENT_NAME.encode() not in data and PATIENT_ID.encode() not in data
                got = restored_pixels(public, tmp_path / "k", model)
                quality.append(psnr(ds.pixel_array / 4095, got / 4095))
            assert min(quality) > 30, quality
            before = set(orthanc.rest("GET", "/instances"))
            result = run_cli(
                "restore-to", tmp_path / "p", "--key-dir", tmp_path / "k", "--host", "127.0.0.1",
                "--port", orthanc.dicom, "--called-ae", "ORTHANC",
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            back = set(orthanc.rest("GET", "/instances")) - before
            assert len(back) == len(sent)
            for instance_id in back:
                tags = orthanc.rest("GET", f"/instances/{instance_id}/simplified-tags")
                assert tags["PatientName"] == PATIENT_NAME  # the header kept in the key
                assert tags["DerivationDescription"] == "PRIMIS authorized reconstruction"
        finally:
            orthanc.close()
    summary = next(line for line in served.log if line.startswith("stopped:")).strip()
    print(
        f"\nOrthanc -> primis serve: {len(sent)} instances sent (4 by C-MOVE, 2 by C-STORE) in "
        f"{seconds:.2f} s; serve {summary}; {len(back)} restorations sent back; median PSNR "
        f"{np.median(quality):.2f} dB; {time.perf_counter() - started:.1f} s in all"
    )


def test_a_missing_peer_fails_where_ci_requires_peers(monkeypatch):
    monkeypatch.delenv("PRIMIS_REQUIRE_PEERS", raising=False)
    with pytest.raises(pytest.skip.Exception):
        need_peer(None, "Orthanc", "orthanc")
    monkeypatch.setenv("PRIMIS_REQUIRE_PEERS", "1")
    with pytest.raises(pytest.fail.Exception, match="PRIMIS_REQUIRE_PEERS=1"):
        need_peer(None, "Orthanc", "orthanc")
    need_peer("/usr/sbin/Orthanc", "Orthanc", "orthanc")  # found: nothing happens
