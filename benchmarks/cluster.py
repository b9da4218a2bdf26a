"""Sharing on a Dask cluster against local worker processes, on one machine.

    nice -n 10 python benchmarks/cluster.py --images 20  # --refine-steps 0 and the default

For each refine setting, `primis ambiguate` runs on the first N chest X-rays of
../shared/data/cxr as a user runs it (a new process: model load, cluster start), once per mode:
--workers 1 and 2, --cluster local:1 and local:2; then once more with every output present
(start-up and skip checks only), so the batch's own time is the difference. Files and
megapixels per second are given both ways (whole command; batch alone), with the median of the
per-file times the command reports. The scheduler's overhead per file: no-op tasks through the
same client loop (`primis.cluster.run_on_cluster`) on local:2. Prints a table with the CPU, its
flags, the numeric type and the load average, and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from primis.config import REFINE_STEPS, REFINED_STEPS
from primis.report import describe_machine, machine_info, write_json

CXR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr" / "images"
MODES = {
    "--workers 1": ["--workers", "1"],
    "--workers 2": ["--workers", "2"],
    "--cluster local:1": ["--cluster", "local:1"],
    "--cluster local:2": ["--cluster", "local:2"],
}
PER_FILE = re.compile(r" in ([0-9.]+) s$")


def run_mode(inputs: Path, args: list[str], refine_steps: int, root: Path) -> dict:
    """One mode: the command on every input, then its rerun (all skipped)."""
    command = [sys.executable, "-m", "primis", "ambiguate", str(inputs), "--model", "cxr"]
    command += ["--refine-steps", str(refine_steps), *args]
    command += ["--public-dir", str(root / "public"), "--key-dir", str(root / "keys")]
    started = time.perf_counter()
    first = subprocess.run(command, check=True, capture_output=True, text=True)
    middle = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    ended = time.perf_counter()
    per_file = [float(m.group(1)) for m in map(PER_FILE.search, first.stdout.splitlines()) if m]
    return {"command_s": middle - started, "startup_s": ended - middle, "per_file_s": per_file}


def _noop(path: Path) -> tuple[str, str]:
    return "done", ""


def scheduler_overhead(tasks: int) -> float:
    """Seconds per file of no-op tasks through `run_on_cluster` on local:2 (client, scheduler
    and worker round trips, nothing computed)."""
    from primis.cluster import connect, run_on_cluster

    items = [Path(f"noop{i}") for i in range(tasks)]
    with connect("local:2") as client:
        client.submit(_noop, items[0], pure=False).result()  # workers up and warm
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            run_on_cluster(
                client,
                items,
                lambda path: client.submit(_noop, path, pure=False),
                lambda _, report: report,
                "noop",
                {},
            )
        return (time.perf_counter() - started) / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument(
        "--refine-steps", type=int, nargs="+", default=sorted({REFINE_STEPS, REFINED_STEPS})
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--noop-tasks", type=int, default=200)
    parser.add_argument("--json", type=Path, default=Path("runs/cluster.json"))
    args = parser.parse_args()
    images = sorted(CXR.glob("*.jpg"))[: args.images]
    if len(images) < args.images:
        sys.exit(f"needs {args.images} images in {CXR.resolve()}, found {len(images)}")
    megapixels = sum(w * h for w, h in (Image.open(p).size for p in images)) / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs"
        inputs.mkdir()
        for image in images:
            (inputs / image.name).symlink_to(image.resolve())
        for steps in args.refine_steps:
            for mode in args.modes:
                root = Path(tmp) / f"{steps}{mode.replace(' ', '')}"
                row = run_mode(inputs, MODES[mode], steps, root)
                batch_s = row["command_s"] - row["startup_s"]
                rows.append(
                    {
                        "refine_steps": steps,
                        "mode": mode,
                        **row,
                        "files_per_s": len(images) / row["command_s"],
                        "mp_per_s": megapixels / row["command_s"],
                        "batch_files_per_s": len(images) / batch_s,
                        "batch_mp_per_s": megapixels / batch_s,
                        "median_file_s": statistics.median(row["per_file_s"]),
                    }
                )
                print(f"done: refine {steps}, {mode}", file=sys.stderr)
    overhead = scheduler_overhead(args.noop_tasks)
    machine = machine_info()
    load = os.getloadavg()
    report = {
        "machine": machine,
        "load_average": load,
        "images": len(images),
        "megapixels": megapixels,
        "rows": rows,
        "scheduler_overhead_s_per_file": overhead,
    }
    print(f"{len(images)} chest X-rays ({megapixels:.2f} MP), model cxr")
    print(f"{describe_machine(machine)} (here); each of N workers runs torch on cores/N threads")
    print(f"load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    header = (
        f"{'refine':>6s} {'mode':18s} {'cmd s':>7s} {'start s':>7s} {'files/s':>8s} {'MP/s':>6s} "
        f"{'batch files/s':>13s} {'batch MP/s':>10s} {'median file s':>13s}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['refine_steps']:6d} {row['mode']:18s} {row['command_s']:7.1f} "
            f"{row['startup_s']:7.1f} {row['files_per_s']:8.3f} {row['mp_per_s']:6.3f} "
            f"{row['batch_files_per_s']:13.3f} {row['batch_mp_per_s']:10.3f} "
            f"{row['median_file_s']:13.2f}"
        )
    print(f"scheduler overhead per file (no-op tasks, local:2): {overhead * 1000:.1f} ms")
    write_json(args.json, report)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
