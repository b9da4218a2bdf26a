"""Training throughput on CPU, and minutes of training until held-out PSNR first reaches 30 dB.

    python benchmarks/train_speed.py                     # throughput table only
    python benchmarks/train_speed.py --time-to 30 --minutes 10

Throughput: optimizer steps on random crops of the sample chest X-rays, for the shipped default
configuration and for the paper's configuration (downsampling [2,2], channels 32/64, n=256,
k=16, m=4, 64x64 patches) in this implementation, in float32 and (on CPUs with native
bfloat16, where training uses it) with bfloat16 autocast; median seconds per step in each
phase of the schedule, weighted by the phase's share of a run, reported as patches per second.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from primis.config import ModelConfig, RunConfig, TrainConfig
from primis.data import RandomCropDataset
from primis.model import SparseTernaryAutoEncoder, use_autocast
from primis.report import write_json
from primis.train import train

try:
    from benchmarks.holdout import DATA, holdout_split
except ModuleNotFoundError:  # run as a script from the repository root
    from holdout import DATA, holdout_split

PAPER = RunConfig(
    model=ModelConfig(stem=2, channels=[32, 64], blocks=1, n=256, k=16, m=4),
    train=TrainConfig(crop=64, batch_size=32),
)


def throughput(config: RunConfig, paths: list[Path], steps: int, autocast: bool) -> dict:
    """Training speed (forward, backward, AdamW on real crops) in each phase of the schedule.

    Median seconds per step with real-valued codes, half blended and pure ternary; the headline
    is the whole schedule's rate: phases weighted by the share of the run they take.
    """
    torch.manual_seed(0)
    network = SparseTernaryAutoEncoder(config.model)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    dataset = RandomCropDataset(paths, config.train.crop)
    batch_size = config.train.batch_size
    t = config.train
    shares = {0.0: t.real_steps, 0.5: t.anneal_steps, 1.0: 1 - t.real_steps - t.anneal_steps}
    phases = {}
    for weight in shares:
        times = []
        for step in range(steps + 2):  # two warm-up steps
            x = torch.stack(
                [dataset[(step * batch_size + i) % len(dataset)] for i in range(batch_size)]
            )
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = network(x, ternary_weight=weight, straight_through=t.straight_through)
                loss = torch.mean((y.float() - x) ** 2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= 2:
                times.append(time.perf_counter() - started)
        phases[weight] = statistics.median(times)
    seconds = sum(shares[w] * phases[w] for w in shares)
    pixels = batch_size * config.train.crop**2
    return {
        "crop": config.train.crop,
        "batch": batch_size,
        "bfloat16_autocast": autocast,
        "median_step_seconds": {"real": phases[0.0], "blend": phases[0.5], "ternary": phases[1.0]},
        "schedule_step_seconds": seconds,
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
    precisions = [False]
    if use_autocast(torch.device("cpu"), amp=True):
        precisions.append(True)
    for name, config in (("default", RunConfig()), ("paper", PAPER)):
        for autocast in precisions:
            row = throughput(config, split["train"], args.steps, autocast)
            report["throughput"][f"{name}, {'bf16' if autocast else 'fp32'}"] = row
    print(
        f"training throughput ({report['machine']}), median of {args.steps} steps per phase, "
        "phases weighted by their share of the schedule:"
    )
    print(
        f"  {'config':14s} {'crop':>4s} {'batch':>5s} {'real':>6s} {'blend':>6s} {'tern.':>6s} "
        f"{'s/step':>7s} {'patches/s':>9s} {'64x64/s':>8s}"
    )
    for name, row in report["throughput"].items():
        phase = row["median_step_seconds"]
        print(
            f"  {name:14s} {row['crop']:4d} {row['batch']:5d} {phase['real']:6.3f} "
            f"{phase['blend']:6.3f} {phase['ternary']:6.3f} {row['schedule_step_seconds']:7.3f} "
            f"{row['patches_per_second']:9.1f} {row['patches64_per_second']:8.1f}"
        )

    if args.time_to:
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
    write_json(args.json, report)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
