"""Inference speed: the default sharing path against the encoder alone, per image and per folder.

    python benchmarks/inference_speed.py --model cxr [--actualmed 3] [--kernels native avx2]

Per image (median over rounds; each mode in its own process, so its peak memory (max RSS) is
its own), with the restored images' median PSNR: the encoder alone (the network's forward pass
and the choice of code, what the paper's code runs), `share_images` (encode and ambiguate: the
default sharing path, and each ``--refine-steps``) and `reconstruct_many` (disambiguate and
decode), on 512x512 chest X-rays at batch 1 and 16 and, with ``--actualmed N``, on the first N
full-resolution radiographs of ../shared/data/cxr-multi/actualmed at batch 1. Every mode runs
under each of ``--kernels``: ``native`` (torch's best kernels; bfloat16 autocast where the CPU
has it natively) and ``avx2`` (`ATEN_CPU_CAPABILITY=avx2`: the float32 path of an AVX2 CPU).
Then files and megapixels per second for `primis ambiguate` and `primis disambiguate` on a
folder of 512x512 images. Prints tables with the CPU model, its flags and each mode's numeric
type, and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
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

from primis.config import REFINED_STEPS
from primis.io.images import read_source
from primis.io.pixels import IntensityMapping, pad_to_multiple
from primis.metrics import psnr
from primis.modelstore import load_model
from primis.report import describe_machine, machine_info, write_json
from primis.sharing import REFINE_STEPS, ImageToShare, reconstruct_many, share_images

try:
    from benchmarks.holdout import DATA, holdout_split
except ModuleNotFoundError:  # run as a script from the repository root
    from holdout import DATA, holdout_split


ACTUALMED = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr-multi" / "actualmed"
)
KERNELS = {"native": None, "avx2": "avx2"}  # ATEN_CPU_CAPABILITY for each


def images_512(paths: list[Path], count: int) -> list[np.ndarray]:
    chosen = [paths[i % len(paths)] for i in range(count)]
    return [
        np.asarray(Image.open(p).convert("L").resize((512, 512), Image.BICUBIC)) for p in chosen
    ]


def actualmed_images(count: int) -> list[np.ndarray]:
    """The first ``count`` full-resolution radiographs of the held-out source, as stored."""
    paths = sorted(ACTUALMED.glob("*.png"))[:count]
    if len(paths) < count:
        raise SystemExit(f"{ACTUALMED}: {len(paths)} radiographs, {count} asked for")
    return [read_source(p).pixels for p in paths]


def images_for(images: str, data: Path, count: int) -> list[np.ndarray]:
    if images == "actualmed":
        return actualmed_images(count)
    return images_512(holdout_split(data)["test"], count)


def measure_mode(
    model_dir: Path, data: Path, images: str, batch: int, refine_steps: int, rounds: int
) -> dict:
    """Seconds per image of the encoder alone and of both halves of the sharing round trip, and
    the restored images' PSNR (dB over each image's own range)."""
    model = load_model(model_dir)
    pixels = images_for(images, data, batch * rounds)
    items = [
        ImageToShare(IntensityMapping.of(p).forward(p), IntensityMapping.of(p)) for p in pixels
    ]
    options = {"batch_size": batch, "refine_steps": refine_steps}
    share_images(items[:batch], model, model.obfuscation, **options)  # warm-up
    encoder, encode, decode, quality = [], [], [], []
    for r in range(rounds):
        chunk = items[r * batch : (r + 1) * batch]
        started = time.perf_counter()
        for item in chunk:  # the encoder alone, one image at a time as a batch of one
            unit = pad_to_multiple(item.unit, model.network.config.downsampling)
            model.network.encode(torch.from_numpy(unit.astype(np.float32))[None, None])
        encoded = time.perf_counter()
        shared = share_images(chunk, model, model.obfuscation, **options)
        middle = time.perf_counter()
        restored = reconstruct_many([(s.public, s.key) for s in shared], model, batch_size=batch)
        ended = time.perf_counter()
        for item, (values, _) in zip(chunk, restored, strict=True):
            quality.append(psnr(item.unit, item.mapping.forward(values)))
        encoder.append((encoded - started) / batch)
        encode.append((middle - encoded) / batch)
        decode.append((ended - middle) / batch)
    machine = machine_info()
    return {
        "images": images,
        "kernels": machine["kernels"],
        "dtype": machine["dtype"],
        "batch": batch,
        "refine_steps": refine_steps,
        "count": batch * rounds,
        "megapixels": statistics.median(p.size for p in pixels) / 1e6,
        "encoder_seconds": statistics.median(encoder),
        "encode_ambiguate_seconds": statistics.median(encode),
        "disambiguate_decode_seconds": statistics.median(decode),
        "psnr": statistics.median(quality),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def folder_throughput(model_dir: Path, folder: Path, threads: int) -> dict:
    """Files and megapixels per second of `primis ambiguate` (the defaults) and `primis
    disambiguate` on every image of ``folder``."""
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


def run_mode(
    args: argparse.Namespace, kernels: str, mode: tuple[str, int, int], rounds: int
) -> dict:
    """One mode (images, batch, refine steps) over ``rounds`` in a child process under
    ``kernels``."""
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if KERNELS[kernels]:
        env["ATEN_CPU_CAPABILITY"] = KERNELS[kernels]
    images, batch, refine_steps = mode
    command = [sys.executable, __file__, "--model", str(args.model), "--data", str(args.data)]
    command += ["--threads", str(args.threads), "--rounds", str(rounds)]
    command += ["--mode", images, str(batch), str(refine_steps)]
    child = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(child.stdout.strip().splitlines()[-1]) | {"kernels_asked": kernels}


def print_per_image(rows: list[dict]) -> None:
    """Medians per image; "x encoder" is the sharing path's time over the encoder's alone."""
    print(
        f"  {'kernels':>8s} {'numeric type':>17s} {'images':>9s} {'batch':>5s} {'refine':>6s} "
        f"{'encoder s':>9s} {'share s':>8s} {'x encoder':>9s} {'s/MP':>6s} {'restore s':>9s} "
        f"{'PSNR dB':>7s} {'peak MB':>7s}"
    )
    for row in rows:
        share, megapixels = row["encode_ambiguate_seconds"], row["megapixels"]
        print(
            f"  {row['kernels']:>8s} {row['dtype']:>17s} {row['images']:>9s} {row['batch']:5d} "
            f"{row['refine_steps']:6d} {row['encoder_seconds']:9.3f} {share:8.3f} "
            f"{share / row['encoder_seconds']:9.2f} {share / megapixels:6.3f} "
            f"{row['disambiguate_decode_seconds']:9.3f} {row['psnr']:7.2f} "
            f"{row['peak_rss_mb']:7.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kernels", nargs="+", choices=sorted(KERNELS), default=["native", "avx2"])
    parser.add_argument(
        "--refine-steps",
        type=int,
        nargs="+",
        default=sorted({0, REFINE_STEPS, REFINED_STEPS}),
        help="refinement steps to measure (default: none, the sharing default and 50)",
    )
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 16], help="512x512 batches")
    parser.add_argument(
        "--folder", type=int, default=200, help="images in the folder test (0: none)"
    )
    parser.add_argument("--actualmed", type=int, default=0, help="full-resolution radiographs")
    parser.add_argument("--mode", nargs=3, help=argparse.SUPPRESS)  # child: images batch steps
    parser.add_argument("--json", type=Path, default=Path("runs/inference_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.mode:
        images, batch, steps = args.mode[0], int(args.mode[1]), int(args.mode[2])
        print(json.dumps(measure_mode(args.model, args.data, images, batch, steps, args.rounds)))
        return
    modes = [("512x512", batch, steps) for batch in args.batches for steps in args.refine_steps]
    if args.actualmed:
        modes += [("actualmed", 1, steps) for steps in args.refine_steps]
    rows = []
    for kernels in args.kernels:
        for mode in modes:
            rounds = args.actualmed if mode[0] == "actualmed" else args.rounds
            rows.append(run_mode(args, kernels, mode, rounds))
    throughput = {}
    if args.folder:
        with tempfile.TemporaryDirectory() as tmp:
            folder = folder_of_512(args.data, args.folder, Path(tmp))
            throughput["512x512"] = folder_throughput(args.model, folder, args.threads)
    machine = machine_info()
    report = {
        "machine": machine,
        "model": str(args.model),
        "default_refine_steps": REFINE_STEPS,
        "per_image": rows,
        "folders": throughput,
    }
    print(f"{describe_machine(machine)}; model {args.model}; medians per image:")
    print_per_image(rows)
    for name, folder in throughput.items():
        print(
            f"  folder {name} ({folder['files']} files, {folder['megapixels']:.1f} MP, "
            f"{machine['kernels']} kernels): ambiguate "
            f"{folder['ambiguate_files_per_second']:.3g} files/s "
            f"({folder['ambiguate_megapixels_per_second']:.3g} MP/s), disambiguate "
            f"{folder['disambiguate_files_per_second']:.3g} files/s "
            f"({folder['disambiguate_megapixels_per_second']:.3g} MP/s)"
        )
    write_json(args.json, report)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
