"""A DICOM round trip on a real chest X-ray: compressed 12-bit DICOM with patient tags in,
public file + key, DICOM out; prints input vs output tags and the pixel PSNR.

    python benchmarks/dicom_round_trip.py [--keep-header]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

from primis.io.images import read_image
from primis.metrics import psnr

try:
    from benchmarks.holdout import DATA, holdout_split
except ModuleNotFoundError:  # run as a script from the repository root
    from holdout import DATA, holdout_split

TAGS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "StudyDescription",
    "Modality",
    "PhotometricInterpretation",
    "BitsStored",
    "RescaleSlope",
    "RescaleIntercept",
    "WindowCenter",
    "WindowWidth",
    "PatientIdentityRemoved",
]


def make_dicom(source: Path, path: Path) -> None:
    """A 12-bit MONOCHROME2 DX image from an 8-bit JPEG, JPEG 2000 lossless compressed."""
    unit, _ = read_image(source)
    pixels = np.rint(unit * 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        SecondaryCaptureImageStorage,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID-0042", "19700101"
    ds.StudyDescription, ds.Modality = "CHEST PA", "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.PixelData = pixels.tobytes()
    ds.compress(JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-header", action="store_true")
    parser.add_argument("--model", default="cxr")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = root / "in" / "study.dcm"
        source.parent.mkdir()
        make_dicom(holdout_split(DATA)["test"][0], source)
        extra = ["--keep-header"] if args.keep_header else []
        run = [sys.executable, "-m", "primis"]
        subprocess.run(
            [
                *run,
                "ambiguate",
                str(source),
                "--model",
                args.model,
                "--public-dir",
                str(root / "public"),
                "--key-dir",
                str(root / "keys"),
                *extra,
            ],
            check=True,
        )
        subprocess.run(
            [
                *run,
                "disambiguate",
                str(root / "public"),
                "--model",
                args.model,
                "--key-dir",
                str(root / "keys"),
                "--out-dir",
                str(root / "out"),
            ],
            check=True,
        )
        original, restored = pydicom.dcmread(source), pydicom.dcmread(root / "out" / "study.dcm")
        public = (root / "public" / "study.primis").read_bytes()
        leaks = [t for t in ("Doe", "PID-0042", "19700101", "CHEST") if t.encode() in public]
        print(f"{'tag':28s} {'input':34s} output")
        for tag in TAGS:
            print(f"{tag:28s} {original.get(tag, '-')!s:34s} {restored.get(tag, '-')}")
        print(
            f"{'TransferSyntaxUID':28s} {original.file_meta.TransferSyntaxUID.name:34s} "
            f"{restored.file_meta.TransferSyntaxUID.name}"
        )
        a = original.pixel_array.astype(np.float64) / 4095
        b = restored.pixel_array.astype(np.float64) / 4095
        result = {
            "pixel_psnr_db": psnr(a, b),
            "shape": list(a.shape),
            "public_file_contains_patient_values": leaks,
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
