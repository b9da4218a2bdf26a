"""Restored DICOM passes dicom3tools' `dciodvfy` (Debian's `dicom3tools`) with no error that
its input did not already have: de-identified and `--keep-header` restorations of pydicom's
test files and of the DICOMs in ../shared/data/cxr-multi/dicom."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

import primis
from tests.test_dicomnode import need_peer

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
INPUTS = [
    PYDICOM_FILES / name
    for name in (
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
    )
]
CXR_MULTI = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr-multi" / "dicom"


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file, spaces normalised."""
    program = shutil.which("dciodvfy")
    need_peer(program, "dicom3tools' dciodvfy", "dicom3tools")
    result = subprocess.run([program, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [re.sub(r"\s+", " ", line) for line in lines if line.startswith("Error")]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return primis.load_model(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("keep_header", [False, True])
def test_restored_dicom_adds_no_dciodvfy_error(tmp_path, model, keep_header):
    inputs = INPUTS + sorted(CXR_MULTI.glob("*.dcm"))  # the latter where ../shared is present
    counts = []
    for number, path in enumerate(inputs):
        before = dciodvfy_errors(path)
        out = tmp_path / str(number)
        done = primis.share_file(
            path, out / "p", out / "k", model, refine_steps=0, keep_header=keep_header
        )
        restored = out / "restored.dcm"
        restored.write_bytes(primis.restore_dicom(done.public_path, out / "k", model))
        after = dciodvfy_errors(restored)
        new = [error for error in after if error not in before]
        assert not new, f"{path.name} (keep_header={keep_header}): {new}"
        counts.append(f"{path.name} {len(before)} -> {len(after)}")
    print(f"\ndciodvfy errors, input -> restored (keep_header={keep_header}): {'; '.join(counts)}")
