"""Tiled processing of large radiographs: seams, peak memory and time against the pixel count.

    python benchmarks/tiling.py --model cxr

1. Seams: the first --images full-resolution radiographs (about 2500x1970) of the held-out
   `actualmed` source of ../shared/data/cxr-multi are shared and restored whole and in tiles
   (`primis.sharing.Tiling`; images up to 1344 px a side go whole anyway): the PSNR of each
   against the original and the largest pixel difference between the two restorations.
2. Memory and time: `primis ambiguate` and `primis disambiguate`, each in its own process, on a
   real radiograph resized to 16-bit images of --sizes, each ``WxH`` (default refinement) or
   ``WxH@S`` (S refinement steps: ``@0`` is the encoder's code, and a few steps give the
   refined path's peak memory, which does not grow with the step count, at a fraction of its
   time): the peak resident memory of that process, seconds, seconds per megapixel.

Prints tables with the machine (CPU model, flags, numeric type) and writes JSON.
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

from primis.io.images import read_image
from primis.metrics import psnr
from primis.modelstore import load_model
from primis.report import describe_machine, machine_info, write_json
from primis.sharing import REFINE_STEPS, Tiling, decode_codes, encode_images

MULTI = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr-multi"
WHOLE = Tiling(cells=10**6, region=10**6)


def seams(model_name: str, images: int, refine_steps: int) -> list[dict]:
    model = load_model(model_name)
    rows = []
    for source in ("actualmed",):
        for path in sorted((MULTI / source).glob("*.png"))[:images]:
            unit, _ = read_image(path)
            k = model.network.config.k
            outputs = []
            for tiling in (WHOLE, Tiling()):
                code = encode_images(model, [unit], k, refine_steps, tiling=tiling)[0]
                outputs.append(
                    decode_codes(model, [code], tiling=tiling)[0][: unit.shape[0], : unit.shape[1]]
                )
            rows.append(
                {
                    "image": f"{source}/{path.name}",
                    "shape": list(unit.shape),
                    "whole_psnr": psnr(unit, outputs[0]),
                    "tiled_psnr": psnr(unit, outputs[1]),
                    "max_pixel_difference": float(np.abs(outputs[0] - outputs[1]).max()),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def child(args: list[str]) -> None:
    """Run one `primis` command in this process, then print its peak memory."""
    from primis.cli import main

    started = time.perf_counter()
    try:
        main(args)
    except SystemExit as exit_:
        if exit_.code:
            raise
    finally:
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


def run_child(args: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_and_time(model_name: str, sizes: list[tuple[int, int, int | None]]) -> list[dict]:
    """``sizes``: width, height and refinement steps (None: the default)."""
    source = sorted((MULTI / "actualmed").glob("*.png"))[0]
    base = Image.open(source).convert("L")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for width, height, steps in sizes:
            pixels = np.asarray(base.resize((width, height), Image.BICUBIC), dtype=np.float32)
            image = (pixels * 257).astype(np.uint16)  # 16-bit, full range
            folder = root / f"{width}x{height}-{steps}"
            folder.mkdir()
            Image.fromarray(image).save(folder / "image.png")
            common = ["--model", model_name]
            refine = [] if steps is None else ["--refine-steps", steps]
            share = run_child(
                [
                    "ambiguate",
                    folder / "image.png",
                    *common,
                    *refine,
                    "--public-dir",
                    folder / "p",
                    "--key-dir",
                    folder / "k",
                ]
            )
            restore = run_child(
                [
                    "disambiguate",
                    folder / "p",
                    *common,
                    "--key-dir",
                    folder / "k",
                    "--out-dir",
                    folder / "o",
                ]
            )
            megapixels = width * height / 1e6
            rows.append(
                {
                    "size": f"{width}x{height}",
                    "refine_steps": REFINE_STEPS if steps is None else steps,
                    "megapixels": megapixels,
                    "ambiguate_seconds": share["seconds"],
                    "ambiguate_seconds_per_mp": share["seconds"] / megapixels,
                    "ambiguate_peak_rss_mb": share["peak_rss_mb"],
                    "disambiguate_seconds": restore["seconds"],
                    "disambiguate_seconds_per_mp": restore["seconds"] / megapixels,
                    "disambiguate_peak_rss_mb": restore["peak_rss_mb"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _sizes(text: str) -> list[tuple[int, int, int | None]]:
    """ "1500x1250,8192x8192@0" -> [(1500, 1250, None), (8192, 8192, 0)]."""
    sizes = []
    for item in filter(None, text.split(",")):
        size, _, steps = item.partition("@")
        width, height = (int(v) for v in size.split("x"))
        sizes.append((width, height, int(steps) if steps else None))
    return sizes


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cxr")
    parser.add_argument("--images", type=int, default=3, help="images for the seam check")
    parser.add_argument("--refine-steps", type=int, default=REFINE_STEPS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default="1500x1250,3000x2500,4096x4096,8192x8192@0,8192x8192@2",
        help="WxH (default refinement) or WxH@STEPS, comma-separated",
    )
    parser.add_argument("--json", type=Path, default=Path("runs/tiling.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = machine_info()
    seam_rows = seams(args.model, args.images, args.refine_steps) if args.images else []
    size_rows = memory_and_time(args.model, args.sizes)
    print(f"\n{describe_machine(machine)}; refine steps {args.refine_steps}")
    print(f"{'image':60s} {'whole dB':>9s} {'tiled dB':>9s} {'max diff':>9s}")
    for row in seam_rows:
        print(
            f"{row['image'][:60]:60s} {row['whole_psnr']:9.3f} {row['tiled_psnr']:9.3f} "
            f"{row['max_pixel_difference']:9.5f}"
        )
    loss = [r["whole_psnr"] - r["tiled_psnr"] for r in seam_rows]
    if loss:
        print(
            f"PSNR loss of tiling: median {statistics.median(loss):.4f} dB, "
            f"worst {max(loss):.4f} dB"
        )
    print(
        f"\n{'size':>10s} {'refine':>6s} {'amb s':>8s} {'s/MP':>7s} {'peak MB':>8s} "
        f"{'disamb s':>9s} {'s/MP':>7s} {'peak MB':>8s}"
    )
    for row in size_rows:
        print(
            f"{row['size']:>10s} {row['refine_steps']:6d} {row['ambiguate_seconds']:8.2f} "
            f"{row['ambiguate_seconds_per_mp']:7.3f} {row['ambiguate_peak_rss_mb']:8.0f} "
            f"{row['disambiguate_seconds']:9.2f} {row['disambiguate_seconds_per_mp']:7.3f} "
            f"{row['disambiguate_peak_rss_mb']:8.0f}"
        )
    write_json(
        args.json,
        {
            "machine": machine,
            "refine_steps": args.refine_steps,
            "seams": seam_rows,
            "sizes": size_rows,
        },
    )
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
