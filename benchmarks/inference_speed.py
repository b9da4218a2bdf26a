"""Inference speed on 512x512 chest X-rays: the sharing round trip per image, and whole folders.

    python benchmarks/inference_speed.py --model cxr [--actualmed 24]

Per image (median over images, 2 CPU threads): encode+ambiguate and disambiguate+decode at
batch 1 and batch 16, with the encoder's code (0 refinement steps) and with the default
refinement, each mode in its own process so its peak memory (max RSS) is its own, also per
megapixel; then files and megapixels per second for `primis ambiguate` (both ways) and
`primis disambiguate` on a folder of 512x512 images and, with --actualmed N, on the first N
full-resolution radiographs of ../shared/data/cxr-multi/actualmed. Prints a table with the CPU
model, its flags and the numeric type, and writes JSON. `ATEN_CPU_CAPABILITY=avx2` measures
the float32 path of an AVX2 CPU on a newer one.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from primis.io.pixels import IntensityMapping
from primis.modelstore import load_model
from primis.report import describe_machine, machine_info, write_json
from primis.sharing import REFINE_STEPS, ImageToShare, reconstruct_many, share_images

try:
    from benchmarks.holdout import DATA, holdout_split
except ModuleNotFoundError:  # run as a script from the repository root
    from holdout import DATA, holdout_split


MP_512 = 512 * 512 / 1e6


def images_512(paths: list[Path], count: int) -> list[np.ndarray]:
    chosen = [paths[i % len(paths)] for i in range(count)]
    return [
        np.asarray(Image.open(p).convert("L").resize((512, 512), Image.BICUBIC)) for p in chosen
    ]


def measure_mode(model_dir: Path, data: Path, batch: int, refine_steps: int, rounds: int) -> dict:
    """Seconds per image for both halves of the round trip at one batch size."""
    model = load_model(model_dir)
    pixels = images_512(holdout_split(data)["test"], batch * rounds)
    items = [
        ImageToShare(IntensityMapping.of(p).forward(p), IntensityMapping.of(p)) for p in pixels
    ]
    options = {"batch_size": batch, "refine_steps": refine_steps}
    share_images(items[:batch], model, model.obfuscation, **options)  # warm-up
    encode, decode = [], []
    for r in range(rounds):
        chunk = items[r * batch : (r + 1) * batch]
        started = time.perf_counter()
        shared = share_images(chunk, model, model.obfuscation, **options)
        middle = time.perf_counter()
        reconstruct_many([(s.public, s.key) for s in shared], model, batch_size=batch)
        ended = time.perf_counter()
        encode.append((middle - started) / batch)
        decode.append((ended - middle) / batch)
    return {
        "batch": batch,
        "refine_steps": refine_steps,
        "images": batch * rounds,
        "encode_ambiguate_seconds": statistics.median(encode),
        "disambiguate_decode_seconds": statistics.median(decode),
        "round_trip_seconds": statistics.median(e + d for e, d in zip(encode, decode, strict=True)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def folder_throughput(model_dir: Path, folder: Path, threads: int) -> dict:
    """Files and megapixels per second through the command line on every image of ``folder``."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    megapixels = sum(np.prod(Image.open(p).size) for p in paths) / 1e6
    command = [
        sys.executable,
        "-c",
        f"import torch; torch.set_num_threads({threads}); from primis.cli import main; main()",
    ]
    timings = {"files": len(paths), "megapixels": megapixels}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = ["--model", model_dir]
        for name, args in (
            (
                "ambiguate_unrefined",
                [
                    "ambiguate",
                    folder,
                    *model,
                    "--refine-steps",
                    0,
                    "--public-dir",
                    root / "p0",
                    "--key-dir",
                    root / "k0",
                ],
            ),
            (
                "ambiguate",
                ["ambiguate", folder, *model, "--public-dir", root / "p", "--key-dir", root / "k"],
            ),
            (
                "disambiguate",
                [
                    "disambiguate",
                    root / "p",
                    *model,
                    "--key-dir",
                    root / "k",
                    "--out-dir",
                    root / "o",
                ],
            ),
        ):
            started = time.perf_counter()
            subprocess.run([*command, *map(str, args)], check=True, capture_output=True)
            seconds = time.perf_counter() - started
            timings[f"{name}_files_per_second"] = len(paths) / seconds
            timings[f"{name}_megapixels_per_second"] = megapixels / seconds
    return timings


def folder_of_512(data: Path, count: int, root: Path) -> Path:
    folder = root / "in512"
    folder.mkdir()
    for i, pixels in enumerate(images_512(holdout_split(data)["test"], count)):
        Image.fromarray(pixels).save(folder / f"img{i:04d}.png")
    return folder


def folder_of_actualmed(count: int, root: Path) -> Path:
    """Links to the first ``count`` full-resolution radiographs of the held-out source."""
    source = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr-multi"
    folder = root / "actualmed"
    folder.mkdir()
    for path in sorted((source / "actualmed").glob("*.png"))[:count]:
        (folder / path.name).symlink_to(path.resolve())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--folder", type=int, default=200, help="images in the folder test")
    parser.add_argument("--actualmed", type=int, default=0, help="full-resolution folder test")
    parser.add_argument("--mode", type=int, nargs=2, help=argparse.SUPPRESS)  # child: batch, steps
    parser.add_argument("--json", type=Path, default=Path("runs/inference_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(measure_mode(args.model, args.data, *args.mode, args.rounds)))
        return
    rows = []
    for batch, refine_steps in ((1, 0), (1, REFINE_STEPS), (16, 0), (16, REFINE_STEPS)):
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--model",
                str(args.model),
                "--data",
                str(args.data),
                "--threads",
                str(args.threads),
                "--rounds",
                str(args.rounds),
                "--mode",
                str(batch),
                str(refine_steps),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"512x512": folder_of_512(args.data, args.folder, Path(tmp))}
        if args.actualmed:
            folders["actualmed"] = folder_of_actualmed(args.actualmed, Path(tmp))
        throughput = {
            name: folder_throughput(args.model, folder, args.threads)
            for name, folder in folders.items()
        }
    machine = machine_info()
    report = {
        "machine": machine,
        "model": str(args.model),
        "per_image": rows,
        "folders": throughput,
    }
    print(f"512x512 chest X-rays, {describe_machine(machine)}; medians per image:")
    print(
        f"  {'batch':>5s} {'refine':>6s} {'encode+amb s':>13s} {'s/MP':>7s} "
        f"{'disamb+decode s':>16s} {'s/MP':>7s} {'peak MB':>8s}"
    )
    for row in rows:
        print(
            f"  {row['batch']:5d} {row['refine_steps']:6d} {row['encode_ambiguate_seconds']:13.4f} "
            f"{row['encode_ambiguate_seconds'] / MP_512:7.3f} "
            f"{row['disambiguate_decode_seconds']:16.4f} "
            f"{row['disambiguate_decode_seconds'] / MP_512:7.3f} {row['peak_rss_mb']:8.0f}"
        )
    for name, folder in throughput.items():
        print(
            f"  folder {name} ({folder['files']} files, {folder['megapixels']:.1f} MP): ambiguate "
            f"{folder['ambiguate_files_per_second']:.3g} files/s "
            f"({folder['ambiguate_megapixels_per_second']:.3g} MP/s; unrefined "
            f"{folder['ambiguate_unrefined_files_per_second']:.3g} files/s, "
            f"{folder['ambiguate_unrefined_megapixels_per_second']:.3g} MP/s), disambiguate "
            f"{folder['disambiguate_files_per_second']:.3g} files/s "
            f"({folder['disambiguate_megapixels_per_second']:.3g} MP/s)"
        )
    write_json(args.json, report)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
