"""Training throughput on CPU, and minutes of training until held-out PSNR first reaches 30 dB.

    python benchmarks/train_speed.py                     # throughput table only
    python benchmarks/train_speed.py --time-to 30 --minutes 10

Throughput: optimizer steps on random crops of the sample chest X-rays, for the shipped default
configuration and for the paper's configuration (downsampling [2,2], channels 32/64, n=256,
k=16, m=4, 64x64 patches) in this implementation; median over timed steps, reported as
patches per second and as megapixels per second. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from primis.config import ModelConfig, RunConfig, TrainConfig
from primis.data import RandomCropDataset

try:
    from benchmarks.holdout import DATA, holdout_split
except ModuleNotFoundError:  # run as a script from the repository root
    from holdout import DATA, holdout_split

PAPER = RunConfig(
    model=ModelConfig(stem=2, channels=[32, 64], blocks=1, n=256, k=16, m=4),
    train=TrainConfig(crop=64, batch_size=32),
)


def throughput(config: RunConfig, paths: list[Path], steps: int, warmup: int = 3) -> dict:
    """Median seconds per training step (forward, backward, AdamW) on real crops."""
    from primis.model import SparseTernaryAutoEncoder

    torch.manual_seed(0)
    network = SparseTernaryAutoEncoder(config.model)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    dataset = RandomCropDataset(paths, config.train.crop)
    batch_size = config.train.batch_size
    times = []
    for step in range(warmup + steps):
        x = torch.stack(
            [dataset[(step * batch_size + i) % len(dataset)] for i in range(batch_size)]
        )
        started = time.perf_counter()
        loss = torch.mean((network(x, ternary_weight=1.0) - x) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    pixels = batch_size * config.train.crop**2
    return {
        "crop": config.train.crop,
        "batch": batch_size,
        "median_step_seconds": seconds,
        "patches_per_second": batch_size / seconds,
        "patches64_per_second": pixels / 64**2 / seconds,
        "megapixels_per_second": pixels / 1e6 / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-to", type=float, help="also train until this PSNR (dB)")
    parser.add_argument("--minutes", type=float, default=10.0, help="budget for --time-to")
    parser.add_argument("--run", type=Path, default=Path("runs/time-to-psnr"))
    parser.add_argument("--json", type=Path, default=Path("runs/train_speed.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    split = holdout_split(args.data)
    report = {
        "machine": f"{platform.machine()}, {args.threads} CPU threads",
        "torch": torch.__version__,
        "throughput": {},
    }
    for name, config in (("default", RunConfig()), ("paper", PAPER)):
        report["throughput"][name] = throughput(config, split["train"], args.steps)
    print(f"training throughput ({report['machine']}), median of {args.steps} steps:")
    print(
        f"  {'config':8s} {'crop':>5s} {'batch':>5s} {'s/step':>8s} {'patches/s':>10s} "
        f"{'64x64/s':>8s} {'Mpx/s':>7s}"
    )
    for name, row in report["throughput"].items():
        print(
            f"  {name:8s} {row['crop']:5d} {row['batch']:5d} {row['median_step_seconds']:8.3f} "
            f"{row['patches_per_second']:10.1f} {row['patches64_per_second']:8.1f} "
            f"{row['megapixels_per_second']:7.2f}"
        )

    if args.time_to:
        from primis.train import train

        config = RunConfig().model_dump()
        config["train"].update(
            max_minutes=args.minutes, steps=10**7, threads=args.threads, validate_every=50
        )
        result = train(
            RunConfig.model_validate(config),
            split["train"],
            split["valid"],
            args.run,
            show_progress=False,
        )
        pure = [h for h in result.history if h["ternary_weight"] >= 1.0]
        reached = next((h for h in pure if h["psnr"] >= args.time_to), None)
        report["time_to_psnr"] = {
            "target_db": args.time_to,
            "budget_minutes": args.minutes,
            "minutes": reached["seconds"] / 60 if reached else None,
            "curve": [(round(h["seconds"] / 60, 2), h["psnr"]) for h in pure],
        }
        if reached:
            print(
                f"validation PSNR reached {args.time_to} dB after {reached['seconds'] / 60:.1f} "
                f"min ({reached['step']} steps)"
            )
        else:
            print(f"validation PSNR did not reach {args.time_to} dB in {args.minutes} min")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
