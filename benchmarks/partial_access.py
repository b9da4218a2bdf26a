"""PSNR on the held-out chest X-rays for keys that open 1..m code maps.

python benchmarks/partial_access.py --model cxr --model runs/partial-access
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from primis.io.images import read_image
from primis.metrics import psnr
from primis.modelstore import load_model
from primis.report import write_json
from primis.sharing import reconstruct, share_image

try:
    from benchmarks.holdout import DATA, holdout_split
except ModuleNotFoundError:  # run as a script from the repository root
    from holdout import DATA, holdout_split


def psnr_by_maps(model_name: str, paths: list[Path]) -> dict[int, float]:
    model = load_model(model_name)
    images = [read_image(p) for p in paths]
    result = {}
    for held in range(1, model.network.config.m + 1):
        scores = []
        for unit, mapping in images:
            shared = share_image(unit, mapping, model, model.obfuscation, maps=list(range(held)))
            restored, _ = reconstruct(shared.public, shared.key, model)
            scores.append(psnr(unit, mapping.forward(restored)))
        result[held] = float(np.mean(scores))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path, default=Path("runs/partial_access.json"))
    args = parser.parse_args()
    paths = holdout_split(args.data)["test"]
    report = {name: psnr_by_maps(name, paths) for name in args.model}
    print(f"mean PSNR (dB) on {len(paths)} held-out images by code maps the key opens:")
    for name, row in report.items():
        print(f"  {name:30s} " + "  ".join(f"{k} map(s): {v:6.2f}" for k, v in row.items()))
    write_json(args.json, report)


if __name__ == "__main__":
    main()
