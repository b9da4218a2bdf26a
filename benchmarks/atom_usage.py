"""How evenly a model's codes use the n atoms of each code map, on the held-out chest X-rays.

    python benchmarks/atom_usage.py primis/zoo/cxr runs/holdout

A selection that always takes the same few atoms carries little information: the key still pays
for every selection, the reconstruction gets little for it. Per code map: atoms ever selected,
entropy of the selection frequencies (log2 n at most), and the share of the 2k most used atoms.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from primis.io.images import read_image
from primis.modelstore import load_model
from primis.report import write_json
from primis.sharing import encode_images

try:
    from benchmarks.holdout import DATA, holdout_split
except ModuleNotFoundError:  # run as a script from the repository root
    from holdout import DATA, holdout_split


def atom_usage(model: str | Path, paths: list[Path]) -> list[dict]:
    """Per code map: atoms used, usage entropy in bits, share of the 2k most used atoms, in the
    codes as `primis ambiguate` makes them (refined)."""
    loaded = load_model(model)
    config = loaded.network.config
    counts = torch.zeros(config.m, config.n)
    for code in encode_images(loaded, [read_image(path)[0] for path in paths], config.k):
        counts += (code != 0).sum(dim=(0, 3, 4)).float()
    rows = []
    for frequencies in counts / counts.sum(dim=1, keepdim=True):
        used = frequencies[frequencies > 0]
        rows.append(
            {
                "atoms_used": len(used),
                "entropy_bits": float(-(used * used.log2()).sum()),
                "max_entropy_bits": math.log2(config.n),
                "top_2k_share": float(
                    frequencies.sort(descending=True).values[: 2 * config.k].sum()
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="run directories or bundled model names")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("runs/atom_usage.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    paths = holdout_split(args.data)["test"]
    report = {str(model): atom_usage(model, paths) for model in args.models}
    print(f"atom use on {len(paths)} held-out images, per code map:")
    print(
        f"  {'model':28s} {'map':>3s} {'atoms used':>10s} {'entropy bits':>12s} "
        f"{'top-2k share':>12s}"
    )
    for model, rows in report.items():
        for index, row in enumerate(rows):
            print(
                f"  {model:28s} {index:3d} {row['atoms_used']:10d} "
                f"{row['entropy_bits']:6.2f} / {row['max_entropy_bits']:.0f} "
                f"{row['top_2k_share']:12.2f}"
            )
    write_json(args.json, report)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
