"""Train the default model on the sample chest X-rays and measure it on the held-out images.

Split (fixed for comparisons): sort the file names, shuffle with random.Random(0), hold out
the last 25 as test; of the rest, the last 10 validate (checkpoint choice), the others train.

    python benchmarks/holdout.py --minutes 20            # train, then measure
    python benchmarks/holdout.py --run runs/holdout      # measure an existing run

Prints a table of medians (codes refined as `primis ambiguate` refines them by default, and
the encoder's own codes) and writes JSON (default runs/holdout.json).
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from pathlib import Path

import torch

from primis.config import RunConfig, load_run_config, parse_config
from primis.evaluation import measure_sharing, summarize
from primis.modelstore import load_model
from primis.report import write_json
from primis.sharing import REFINE_STEPS
from primis.train import train

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr" / "images"


def holdout_split(folder: Path) -> dict[str, list[Path]]:
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".png"})
    random.Random(0).shuffle(names)
    paths = [folder / name for name in names]
    return {"train": paths[:-35], "valid": paths[-35:-25], "test": paths[-25:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--config", type=Path, help="run config (default: the shipped defaults)")
    parser.add_argument("--run", type=Path, default=Path("runs/holdout"))
    parser.add_argument("--minutes", type=float, help="train for this long first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("runs/holdout.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    split = holdout_split(args.data)
    training = None
    if args.minutes:
        config = load_run_config(args.config).model_dump()
        config["train"].update(max_minutes=args.minutes, steps=10**7, threads=args.threads)
        config = parse_config(RunConfig, config, "holdout benchmark")
        started = time.monotonic()
        result = train(config, split["train"], split["valid"], args.run)
        training = {
            "minutes": (time.monotonic() - started) / 60,
            "steps": result.steps,
            "best_valid_psnr": result.best_psnr,
            "history": result.history,
        }
    model = load_model(args.run)
    records = [measure_sharing(model, p, model.obfuscation) for p in split["test"]]
    summary = summarize(records)
    unrefined = summarize(
        [measure_sharing(model, p, model.obfuscation, refine_steps=0) for p in split["test"]]
    )
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads",
        "model_hash": model.hash,
        "training": training,
        "refine_steps": REFINE_STEPS,
        "test": summary,
        "test_unrefined": unrefined,
    }
    write_json(args.json, report)
    rows = [
        ("authorized PSNR (dB)", summary["median_authorized_psnr"]),
        ("authorized SSIM", summary["median_authorized_ssim"]),
        ("unrefined PSNR (dB)", unrefined["median_authorized_psnr"]),
        ("unrefined SSIM", unrefined["median_authorized_ssim"]),
        ("without-key PSNR (dB)", summary["median_without_key_psnr"]),
        ("without-key SSIM", summary["median_without_key_ssim"]),
        ("key bytes / image", summary["median_key_bytes"]),
        ("key bits / pixel", summary["median_key_bits_per_pixel"]),
        ("public bytes / image", summary["median_public_bytes"]),
        ("encode+ambiguate s / image", summary["median_encode_seconds"]),
        ("unrefined encode+ambiguate s", unrefined["median_encode_seconds"]),
        ("disambiguate+decode s / image", summary["median_decode_seconds"]),
    ]
    print(f"{len(records)} held-out images, medians ({report['machine']}):")
    for name, value in rows:
        print(f"  {name:32s} {value:10.4f}")
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
