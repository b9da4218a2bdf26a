"""Throughput of the DICOM node: instances per second received by C-STORE and shared, for
512x512 and full-size radiographs.

    python benchmarks/dicom_node.py [--model cxr] [--count 8] [--full-count 2] [--out FILE]

Real chest X-rays wrapped as DICOM instances with patient tags (8-bit, as the images are):
512x512, the held-out cxr test images resized (DX); full size, the actualmed computed
radiographs of ../shared/data/cxr-multi (about 2500x1970, CR). A `DicomNode` in this process
(as `primis serve` runs it) receives them over ``--associations`` concurrent associations on
localhost and answers each only once its public file and key are on disk, so instances per
second counts both receiving and sharing; with the default (``REFINE_STEPS``) and with
``REFINED_STEPS`` refinement steps. Prints a table with the CPU model, its flags and the numeric
type, and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage as CR_STORAGE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

from primis.config import REFINE_STEPS, REFINED_STEPS
from primis.dicomnode import SUCCESS, DicomNode
from primis.modelstore import load_model
from primis.report import describe_machine, machine_info, markdown_table, write_json

try:
    from benchmarks.holdout import DATA, holdout_split
except ModuleNotFoundError:  # run as a script from the repository root
    from holdout import DATA, holdout_split

ACTUALMED = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr-multi" / "actualmed"
)


def as_instance(pixels: np.ndarray, sop_class: str) -> Dataset:
    """8-bit MONOCHROME2 pixels as a DICOM instance with a (fake) patient's name and id."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Doe^Jane", "PID-0042", "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.astype(np.uint8).tobytes()
    return ds


def instances(paths: list[Path], count: int, sop_class: str, side: int | None) -> list[Dataset]:
    """``count`` instances of the images at ``paths`` (cycled), resized to side x side when
    ``side`` is given."""
    if not paths:
        raise SystemExit("no images found: see the module docstring for the data it needs")
    images = (Image.open(paths[i % len(paths)]).convert("L") for i in range(count))
    if side:
        images = (image.resize((side, side), Image.BICUBIC) for image in images)
    return [as_instance(np.asarray(image), sop_class) for image in images]


def send(address: tuple[str, int], datasets: list[Dataset], seconds: list[float]) -> None:
    """C-STORE the data sets over one association, recording each answer's wait."""
    ae = AE("BENCH")
    ae.dimse_timeout = ae.network_timeout = None  # a full-size image takes minutes on a CPU
    for sop_class in {d.SOPClassUID for d in datasets}:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    association = ae.associate(*address, ae_title="PRIMIS")
    assert association.is_established, "no association with the node"
    for ds in datasets:
        started = time.perf_counter()
        status = association.send_c_store(ds)
        assert int(status.Status) == SUCCESS, status
        seconds.append(time.perf_counter() - started)
    association.release()


def measure(
    model, warm_up: Dataset, datasets: list[Dataset], refine_steps: int, associations: int
) -> dict:
    """Send ``warm_up`` (not counted), then every data set, to a fresh node; instances and
    megapixels per second of the latter."""
    with tempfile.TemporaryDirectory() as tmp:
        folders = (Path(tmp) / "public", Path(tmp) / "keys")
        node = DicomNode(*folders, model, port=0, refine_steps=refine_steps, ack="after-share")
        send(node.start().address, [warm_up], [])
        waits: list[float] = []
        senders = [
            threading.Thread(target=send, args=(node.address, datasets[i::associations], waits))
            for i in range(min(associations, len(datasets)))
        ]
        started = time.perf_counter()
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        seconds = time.perf_counter() - started
        stats = node.stop()
        public_bytes = sum(p.stat().st_size for p in folders[0].glob("*.primis"))
    assert stats.stored == len(datasets) + 1 and stats.failed == 0, stats
    megapixels = sum(d.Rows * d.Columns for d in datasets) / 1e6
    return {
        "instances": len(datasets),
        "refine_steps": refine_steps,
        "associations": associations,
        "seconds": seconds,
        "instances_per_second": len(datasets) / seconds,
        "megapixels_per_second": megapixels / seconds,
        "median_answer_seconds": statistics.median(waits),
        "megapixels_per_instance": megapixels / len(datasets),
        "public_bytes_per_instance": public_bytes / (len(datasets) + 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cxr", help="bundled name or model directory")
    parser.add_argument("--count", type=int, default=8, help="512x512 instances per mode")
    parser.add_argument("--full-count", type=int, default=2, help="full-size instances per mode")
    parser.add_argument("--associations", type=int, default=2, help="concurrent senders")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/dicom_node.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    results = []
    test = holdout_split(DATA)["test"]
    warm_up, *small = instances(test, args.count + 1, DigitalXRayImageStorageForPresentation, 512)
    full = instances(sorted(ACTUALMED.glob("*.png")), args.full_count, CR_STORAGE, None)
    for size, datasets in (("512x512", small), ("full size", full)):
        for refine_steps in sorted({REFINE_STEPS, REFINED_STEPS}):
            row = measure(model, warm_up, datasets, refine_steps, args.associations)
            results.append({"size": size, **row})
            print(f"{size}, refine {refine_steps}: {row['instances_per_second']:.3g} instances/s")
    machine = machine_info()
    write_json(args.out, {"machine": machine, "model": args.model, "results": results})
    print(f"\nDICOM node throughput ({args.model}; {describe_machine(machine)}):\n")
    header = ["images", "refine steps", "instances", "instances/s", "MP/s", "median answer s"]
    rows = [
        [
            f"{r['size']} ({r['megapixels_per_instance']:.2f} MP)",
            r["refine_steps"],
            r["instances"],
            f"{r['instances_per_second']:.3g}",
            f"{r['megapixels_per_second']:.3g}",
            f"{r['median_answer_seconds']:.3g}",
        ]
        for r in results
    ]
    print(markdown_table(header, rows))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
