"""The privacy frontier: every obfuscation mode against the attacks of `primis attack`.

Attackers train on images of the cxr training split; targets are the cxr test split (with lung
masks: Dice of the best attack's images against prior-only) and one held-out source of
cxr-multi, downscaled to at most --side pixels (no masks there). Codes are the encoder's
(--refine-steps, default 0, to save CPU; the leak of a mode does not depend on how well the
code was refined, its key size and authorized quality do a little).

    python benchmarks/privacy_frontier.py --threads 1 --out /work/runs/frontier

Prints one table per source, writes OUT/frontier.json, OUT/frontier.md and OUT/frontier.png
(key bits per pixel against the best attack's PSNR gain over prior-only), and the machine.
Each finished mode is written at once, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from primis.config import AttackConfig
from primis.data import resolve_sources
from primis.frontier import frontier, frontier_table, modes, write_frontier
from primis.io.images import read_image
from primis.modelstore import load_model
from primis.report import describe_machine, machine_info

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"


def downscaled(paths: list[Path], side: int, folder: Path) -> list[Path]:
    """8-bit PNG copies of ``paths`` with the longer side at most ``side`` pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths:
        image = read_image(path)[0]
        scale = min(1.0, side / max(image.shape))
        shape = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        pixels = Image.fromarray((image * 255).round().astype(np.uint8))
        copies.append(folder / f"{path.stem}.png")
        pixels.resize(shape, Image.LANCZOS).save(copies[-1])
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cxr")
    parser.add_argument("--attackers", type=int, default=60, help="images of the train split")
    parser.add_argument("--targets", type=int, default=15, help="images of the test split")
    parser.add_argument("--heldout", default="figure1_covid", help="held-out source (splits/)")
    parser.add_argument("--heldout-targets", type=int, default=10)
    parser.add_argument("--side", type=int, default=512, help="held-out images downscaled to")
    parser.add_argument("--config", type=Path, help="AttackConfig (YAML or JSON)")
    parser.add_argument("--inversion-steps", type=int, default=600)
    parser.add_argument("--distinguisher-steps", type=int, default=600)
    parser.add_argument("--no-budget-check", action="store_true")
    parser.add_argument("--refine-steps", type=int, default=0)
    parser.add_argument("--modes", help="indices into primis.frontier.modes(), e.g. 0,5")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/frontier"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = AttackConfig(
        inversion_steps=args.inversion_steps,
        distinguisher_steps=args.distinguisher_steps,
        budget_check=not args.no_budget_check,
    )
    if args.config:
        from primis.config import load_config

        config = load_config(AttackConfig, args.config)
    chosen = modes()
    if args.modes:
        chosen = [chosen[int(i)] for i in args.modes.split(",")]
    model = load_model(args.model)
    attackers = resolve_sources(ROOT / "splits" / "cxr" / "train.txt")[: args.attackers]
    sources = {
        f"cxr test split ({args.targets} targets)": (
            resolve_sources(ROOT / "splits" / "cxr" / "test.txt")[: args.targets],
            SHARED / "cxr" / "lung-masks",
        ),
        f"held-out {args.heldout} ({args.heldout_targets} targets, at most {args.side} px)": (
            downscaled(
                resolve_sources(ROOT / "splits" / "heldout" / f"{args.heldout}.txt")[
                    : args.heldout_targets
                ],
                args.side,
                args.out / "heldout",
            ),
            None,
        ),
    }
    info = machine_info()
    print(describe_machine(info))
    print(f"model {args.model}, {len(attackers)} attacker images, {config}")
    series: dict[str, list[dict]] = {name: [] for name in sources}
    started = time.monotonic()

    def done(name: str, row: dict) -> None:
        series[name].append(row)
        write_frontier(series, args.out, info)
        minutes = (time.monotonic() - started) / 60
        print(f"[{minutes:.1f} min] {name}: {row['mode']}: {row['psnr_gain']:+.2f} dB", flush=True)

    frontier(model, attackers, sources, config, args.refine_steps, chosen, done)
    for name, rows in series.items():
        print(f"\n{name}\n{frontier_table(rows)}")


if __name__ == "__main__":
    main()
