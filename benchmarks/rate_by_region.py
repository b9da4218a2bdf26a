"""Where a key's bits go: key bits per code position inside the lungs and outside, on the cxr
test split with its lung masks.

    python benchmarks/rate_by_region.py --models cxr cxr-v1 --json runs/rate_by_region.json

For each image the code is made as `primis ambiguate` makes it (refined, default rate weight)
and `ContextKeyCoder.vector_information` gives the key bits of every code vector; a position
(16 x 16 pixels) takes the bits of its vectors in all maps. Positions are "lung" where the
mask covers more than half of them and "outside" where it covers none. Also the Spearman
correlation of a position's bits with its detail (mean absolute pixel difference), and the
bits of an enumerative key (`cxr-v1`: the same for every position). Prints a table and writes
JSON.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import spearmanr

from primis.config import REFINE_STEPS
from primis.data import resolve_sources
from primis.io.images import read_source
from primis.io.pixels import pad_to_multiple
from primis.keys.enumerative import ideal_bits, key_radices
from primis.modelstore import LoadedModel, load_model
from primis.obfuscation import code_to_vectors
from primis.report import describe_machine, machine_info, write_json
from primis.sharing import RateControl, encode_images

ROOT = Path(__file__).resolve().parents[1]
MASKS = ROOT.parent / "shared" / "data" / "cxr" / "lung-masks"


def cells(values: np.ndarray, multiple: int) -> np.ndarray:
    """Mean of ``values`` (H, W) over each code position's pixels, the image padded as encoded."""
    padded = pad_to_multiple(values.astype(np.float32), multiple)
    rows, cols = padded.shape[0] // multiple, padded.shape[1] // multiple
    return padded.reshape(rows, multiple, cols, multiple).mean(axis=(1, 3))


def position_bits(model: LoadedModel, unit: np.ndarray, refine_steps: int) -> np.ndarray:
    """(rows, cols): key bits of each code position's vectors (all maps), the code made as
    sharing makes it; a model without a key model pays its enumerative count everywhere."""
    cfg = model.network.config
    if model.key_model is None:  # an enumerative key: a vector's bits do not depend on it
        filled = np.ones((1, cfg.n), dtype=np.int8)  # a public vector at the default full fill
        radices = key_radices(filled, cfg.k, model.obfuscation.mask_signs)
        rows, cols = (-(-size // cfg.downsampling) for size in unit.shape)
        return np.full((rows, cols), cfg.m * ideal_bits(radices))
    weight = RateControl().weight_for(refine_steps, model)
    code = encode_images(model, [unit], cfg.k, refine_steps, rate_weight=weight)[0]
    rows, cols = code.shape[3:]
    vectors = code_to_vectors(code)
    bits = model.key_coder.vector_information(vectors, list(range(cfg.m)), (rows, cols), cfg.k)
    return bits.reshape(cfg.m, rows, cols).sum(axis=0)


def measure(model: LoadedModel, paths: list[Path], refine_steps: int) -> dict:
    multiple = model.network.config.downsampling
    images = []
    for path in paths:
        image = read_source(path)
        unit = image.mapping.forward(image.pixels)
        mask = np.asarray(Image.open(MASKS / f"{path.stem}.png").convert("L")) > 127
        lung = cells(mask, multiple)
        detail = np.zeros_like(unit)
        detail[:, 1:] += np.abs(np.diff(unit, axis=1))
        detail[1:, :] += np.abs(np.diff(unit, axis=0))
        detail = cells(detail, multiple)
        bits = position_bits(model, unit, refine_steps)
        inside, outside = bits[lung > 0.5], bits[lung == 0]
        images.append(
            {
                "image": path.name,
                "lung_bits": float(np.mean(inside)),
                "outside_bits": float(np.mean(outside)),
                # None where every position costs the same (an enumerative key)
                "spearman_detail": float(spearmanr(bits.ravel(), detail.ravel()).statistic)
                if np.ptp(bits) > 0
                else None,
                "p10_bits": float(np.percentile(bits, 10)),
                "p90_bits": float(np.percentile(bits, 90)),
            }
        )
        print(
            f"  {path.name}: lung {images[-1]['lung_bits']:.1f}, outside "
            f"{images[-1]['outside_bits']:.1f} bits per position",
            flush=True,
        )
    summary = {
        name: statistics.median(row[name] for row in images)
        for name in ("lung_bits", "outside_bits", "p10_bits", "p90_bits")
    }
    correlations = [row["spearman_detail"] for row in images if row["spearman_detail"] is not None]
    summary["spearman_detail"] = statistics.median(correlations) if correlations else None
    return {"hash": model.hash, "images": images, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cxr", "cxr-v1"])
    parser.add_argument("--data", type=Path, default=ROOT / "splits/cxr/test.txt")
    parser.add_argument("--limit", type=int, help="first N images")
    parser.add_argument("--refine-steps", type=int, default=REFINE_STEPS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("runs/rate_by_region.json"))
    args = parser.parse_args()

    if not MASKS.is_dir():
        raise SystemExit(f"lung masks not found at {MASKS} (../shared/data/cxr)")
    torch.set_num_threads(args.threads)
    paths = resolve_sources(args.data)[: args.limit]
    info = machine_info()
    report = {"machine": info, "refine_steps": args.refine_steps, "models": {}}
    for name in args.models:
        print(f"{name}:", flush=True)
        report["models"][name] = measure(load_model(name), paths, args.refine_steps)
    print(f"\nkey bits per code position (16 x 16 pixels), medians over {len(paths)} images;")
    print(f"{describe_machine(info)}; refine steps {args.refine_steps}")
    print("| model | lung | outside | 10th-90th percentile | Spearman with detail |")
    print("|---|---|---|---|---|")
    for name, result in report["models"].items():
        s = result["summary"]
        print(
            f"| {name} | {s['lung_bits']:.1f} | {s['outside_bits']:.1f} | "
            f"{s['p10_bits']:.1f}-{s['p90_bits']:.1f} | "
            + ("-" if s["spearman_detail"] is None else f"{s['spearman_detail']:.2f}")
            + " |"
        )
    write_json(args.json, report)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
