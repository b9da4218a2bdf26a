"""Design study of the codec at equal compute (issue "The codec", item 1).

Each pilot is `configs/study/base.yaml` (random start, the v2 training data and augmentations,
a fixed CPU-time budget on one thread in float32) with a few settings changed: capacity (width,
depth), the content-adaptive rate, code layouts. Pilots are ordinary resumable runs, so a session
that ends mid-pilot loses nothing:

    python benchmarks/design_study.py train base wide4x --runs RUNS   # one after another
    python benchmarks/design_study.py report --runs RUNS --out RUNS/report

`train` starts a pilot or resumes it from its checkpoint until its budget is spent. `report`
reads each pilot's learning curve (validation PSNR against CPU time), measures the final model on
the held-out sources (splits/heldout: unrefined codes and strict-mode ideal key bits, as the
validation computes them, and JPEG 2000 at each image's key rate), fits PSNR(t) = a - b * t**-c
to the curve to extrapolate it to a longer budget, prints a Markdown table and writes JSON and
two plots: PSNR against CPU time, and PSNR against key bits per pixel. Each pilot's held-out
figures are kept in its run folder with its checkpoint's digest, so only changed pilots are
measured again.
With the JSON copied to docs/design-study/, `python -m benchmarks.tables` remakes MODEL_CARD.md's
table from it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from primis.checkpoint import CHECKPOINT
from primis.config import RunConfig, load_run_config, parse_config
from primis.evaluation import _codec_round_trip
from primis.formats import sha256
from primis.io.files import write_atomic
from primis.io.images import read_image
from primis.io.pixels import pad_to_multiple
from primis.keys.enumerative import strict_key_bits
from primis.metrics import psnr
from primis.model import SparseTernaryAutoEncoder
from primis.obfuscation import code_to_vectors
from primis.report import Chart, describe_machine, machine_info, markdown_table, write_json
from primis.train import load_run, new_run, resumed_run, train

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "study" / "base.yaml"
TRAIN_LIST = ROOT / "splits" / "v2" / "train.txt"
VALID_LIST = ROOT / "splits" / "v2" / "valid.txt"
HELD_OUT = ROOT / "splits" / "heldout"

# Each pilot: what it tests and its changes to the base configuration. Validation runs about as
# often in CPU time for every pilot: every `validate_every` steps, scaled by the step's cost.
PILOTS: dict[str, tuple[str, dict]] = {
    "base": ("today's capacity (channels 32/64/128, 1 block)", {}),
    "wide2x": (
        "capacity: width, about 2x the FLOPs per pixel",
        {"model": {"channels": [48, 96, 192]}, "train": {"validate_every": 1000}},
    ),
    "wide4x": (
        "capacity: width, about 4x the FLOPs per pixel",
        {"model": {"channels": [64, 128, 256]}, "train": {"validate_every": 500}},
    ),
    "deep": (
        "capacity: depth, 3 blocks per scale (about 1.7x the FLOPs)",
        {"model": {"blocks": 3}, "train": {"validate_every": 1200}},
    ),
    "adaptive": (
        "content-adaptive rate: per-vector pair count s <= k under a rate term",
        {
            "model": {"adaptive_rate": True},
            "train": {"rate_weight": 0.0008, "threshold_lr_scale": 50.0},
        },
    ),
    "adaptive-low": (
        "content-adaptive rate at a lower lambda (a point nearer the fixed rate)",
        {
            "model": {"adaptive_rate": True},
            "train": {"rate_weight": 0.0002, "threshold_lr_scale": 50.0},
        },
    ),
    "maps4k2": (
        "layout: 4 maps of k=2 (same non-zeros per position)",
        {"model": {"m": 4, "k": 2}},
    ),
    "n512": ("layout: n=512 atoms per vector", {"model": {"n": 512}}),
}
EXTRAPOLATE_HOURS = 12.0
# Learning-curve points before this share of the budget are left out of the fit (warm-up).
FIT_FROM = 0.15


def pilot_config(name: str) -> RunConfig:
    """The base configuration with pilot ``name``'s changes, validated."""
    data = load_run_config(BASE).model_dump()
    for section, changes in PILOTS[name][1].items():
        data[section].update(changes)
    return parse_config(RunConfig, data, f"pilot {name}")


def train_pilot(name: str, runs: Path) -> None:
    """Start pilot ``name`` in ``runs/name``, or resume it; returns when its budget is spent."""
    out = runs / name
    torch.set_num_threads(1)
    if (out / CHECKPOINT).exists():
        config, inputs = resumed_run(out)
        train(config, inputs.train, inputs.valid, out, resume=True)
    else:
        config = pilot_config(name)
        inputs = new_run(out, config, TRAIN_LIST, VALID_LIST)
        train(config, inputs.train, inputs.valid, out)


def fit_curve(hours: np.ndarray, psnr: np.ndarray) -> tuple[float, float, float] | None:
    """(a, b, c) of PSNR = a - b * hours**-c fitted by least squares (c in 0.05..2 by grid, a and
    b linear for each c), or None with fewer than three points."""
    if len(hours) < 3:
        return None
    best = None
    for c in np.linspace(0.05, 2.0, 196):
        basis = np.stack([np.ones_like(hours), -(hours**-c)], axis=1)
        (a, b), *_ = np.linalg.lstsq(basis, psnr, rcond=None)
        error = float(np.sum((basis @ np.array([a, b]) - psnr) ** 2))
        if b >= 0 and (best is None or error < best[0]):
            best = (error, float(a), float(b), float(c))
    return None if best is None else best[1:]


def code_quality(network, image: np.ndarray, k: int) -> tuple[float, float]:
    """(PSNR, strict-mode ideal key bits per pixel) of the unrefined code of ``image`` with at
    most ``k`` pairs per vector, on the image's own pixels."""
    x = torch.from_numpy(pad_to_multiple(image, network.config.downsampling))[None, None]
    with torch.no_grad():
        code = network.encode(x, k=k)
        out = network.decode(code)[0, 0, : image.shape[0], : image.shape[1]].numpy()
    return psnr(image, out), strict_key_bits(code_to_vectors(code)) / image.size


def final_network(run: Path) -> SparseTernaryAutoEncoder:
    """The network where the run's budget ended (its last checkpoint), in evaluation mode: a
    learning curve's end point, whatever keep-best kept."""
    network = SparseTernaryAutoEncoder(load_run(run).model)
    network.load_state_dict(load_file(run / CHECKPOINT / "model.safetensors"))
    return network.eval()


def held_out(run: Path, per_source: int) -> dict[str, dict]:
    """Per held-out source (the first ``per_source`` images of each list) and per k (the
    model's, and for a fixed-rate pilot also half of it: the rate a user gets from `--k`): mean
    unrefined PSNR and strict-mode key bpp of the run's kept model, and JPEG 2000's mean PSNR
    at each image's key rate."""
    network = final_network(run)
    k = network.config.k
    ks = [k] if network.config.adaptive_rate else [k, max(1, k // 2)]
    results = {}
    for listing in sorted(HELD_OUT.glob("*.txt")):
        paths = [listing.parent / line for line in listing.read_text().split()][:per_source]
        images = [read_image(path)[0] for path in paths]
        for kk in ks:
            rows = []
            for image in images:
                quality, bpp = code_quality(network, image, kk)
                decoded, _ = _codec_round_trip(image, "jpeg2000", bpp)
                rows.append((quality, bpp, psnr(image, decoded)))
            psnrs, bpps, jpeg2000 = np.array(rows).T
            name = listing.stem if kk == k else f"{listing.stem} (k={kk})"
            results[name] = {
                "images": len(rows),
                "k": kk,
                "psnr": float(psnrs.mean()),
                "key_bpp": float(bpps.mean()),
                "jpeg2000_psnr_at_key_bpp": float(jpeg2000.mean()),
            }
    return results


def flops_per_pixel(config: RunConfig) -> float:
    """Forward multiply-adds x 2 per pixel of the pilot's network on a 256x256 input."""
    from torch.utils.flop_counter import FlopCounterMode

    network = SparseTernaryAutoEncoder(config.model).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        network(torch.rand(1, 1, 256, 256))
    return counter.get_total_flops() / 256**2


def cached_held_out(run: Path, per_source: int) -> dict[str, dict]:
    """`held_out`, kept in ``run/held_out.json`` with the checkpoint's digest and the image
    count it was measured for, so a report after one more pilot re-measures only that one."""
    cache = run / "held_out.json"
    key = {"checkpoint": sha256((run / CHECKPOINT / "model.safetensors").read_bytes())}
    key["per_source"] = per_source
    if cache.is_file():
        kept = json.loads(cache.read_text())
        if kept["key"] == key:
            return kept["results"]
    results = held_out(run, per_source)
    write_json(cache, {"key": key, "results": results})
    return results


def summarize_pilot(run: Path, per_source: int) -> dict:
    """A pilot's learning curve, its extrapolation and its held-out figures."""
    config = load_run(run)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    budget = 60 * config.train.max_minutes
    hours = np.array([h["seconds"] / 3600 for h in history])
    psnr = np.array([h["psnr"] for h in history])
    late = hours >= FIT_FROM * budget / 3600
    fit = fit_curve(hours[late], psnr[late])
    extrapolated = None if fit is None else fit[0] - fit[1] * EXTRAPOLATE_HOURS ** -fit[2]
    return {
        "steps": history[-1]["step"] if history else 0,
        "cpu_hours": float(hours[-1]) if len(hours) else 0.0,
        "budget_hours": budget / 3600,
        "flops_per_pixel": flops_per_pixel(config),
        "curve": history,
        "final_valid_psnr": history[-1]["psnr"] if history else math.nan,
        "final_valid_key_bpp": history[-1]["key_bpp"] if history else math.nan,
        "fit": fit,
        f"extrapolated_psnr_{EXTRAPOLATE_HOURS:g}h": extrapolated,
        "held_out": cached_held_out(run, per_source),
    }


def curve_plot(pilots: dict[str, dict], path: Path) -> None:
    """Validation PSNR against CPU hours per pilot, with each fit drawn to twice the budget."""
    points = [(h["seconds"] / 3600, h["psnr"]) for p in pilots.values() for h in p["curve"]]
    late = [y for x, y in points if x > 0.1]
    span = 2 * max(p["budget_hours"] for p in pilots.values())
    chart = Chart(
        (720, 460),
        56,
        (0.0, span),
        (min(late) - 1, max(late) + 2),
        ("CPU hours (1 thread)", "valid PSNR (dB)"),
    )
    for index, (name, pilot) in enumerate(pilots.items()):
        shade = (index * 47) % 200
        curve = [chart.at(h["seconds"] / 3600, h["psnr"]) for h in pilot["curve"]]
        curve = [(x, y) for x, y in curve if y <= chart.height - chart.margin]
        if len(curve) > 1:
            chart.draw.line(curve, fill=shade, width=2)
        if pilot["fit"]:
            a, b, c = pilot["fit"]
            xs = np.linspace(pilot["cpu_hours"], span, 30)
            dashes = [chart.at(x, a - b * x**-c) for x in xs]
            for start, end in zip(dashes[::2], dashes[1::2], strict=False):
                chart.draw.line([start, end], fill=shade, width=1)
        chart.draw.text((chart.width - 110, 20 + 14 * index), name, fill=shade)
    write_atomic(path, chart.png())


def rate_plot(pilots: dict[str, dict], path: Path) -> None:
    """Held-out PSNR against key bits per pixel: one marker per pilot and source."""
    points = [
        (name, f"{source[:4]} k{r['k']}", r["key_bpp"], r["psnr"])
        for name, p in pilots.items()
        for source, r in p["held_out"].items()
    ]
    xs, ys = [p[2] for p in points], [p[3] for p in points]
    chart = Chart(
        (720, 460),
        56,
        (min(xs) * 0.9, max(xs) * 1.1),
        (min(ys) - 1, max(ys) + 1),
        ("key bits per pixel (strict, ideal)", "held-out PSNR (dB)"),
        (5, ".2f", ".0f"),
    )
    names = list(pilots)
    for name, source, x, y in points:
        shade = (names.index(name) * 47) % 200
        px, py = chart.at(x, y)
        chart.draw.ellipse([px - 4, py - 4, px + 4, py + 4], outline=shade, width=2)
        chart.draw.text((px + 6, py - 6), f"{name} {source}", fill=shade)
    write_atomic(path, chart.png())


def report(runs: Path, out: Path, per_source: int) -> None:
    """Summarize every pilot found under ``runs``: table, JSON and plots in ``out``."""
    torch.set_num_threads(1)
    pilots = {
        name: summarize_pilot(runs / name, per_source)
        for name in PILOTS
        if (runs / name / "history.jsonl").exists()
    }
    machine = machine_info()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "design_study.json", {"machine": machine, "pilots": pilots})
    curve_plot(pilots, out / "psnr_vs_cpu_time.png")
    rate_plot(pilots, out / "psnr_vs_key_bpp.png")
    print(f"Machine (report): {describe_machine(machine)}")
    print(table(pilots))


def table(pilots: dict[str, dict]) -> str:
    """The report's table: per pilot its cost, training and held-out figures at its own k
    (JPEG 2000 at the same key rate in brackets), then a row per other k it was measured at."""
    k_suffix = " (k="
    sources = sorted({s.split(k_suffix)[0] for p in pilots.values() for s in p["held_out"]})
    header = ["pilot", "FLOPs/px", "CPU h", "steps", "final valid PSNR", "valid bpp"]
    header += [f"{EXTRAPOLATE_HOURS:g} h (fit)", *sources]
    rows = []
    for name, p in pilots.items():
        config = pilot_config(name)
        by_k: dict[int, dict[str, dict]] = {}
        for source, figures in p["held_out"].items():
            by_k.setdefault(figures["k"], {})[source.split(k_suffix)[0]] = figures
        own = config.model.k
        if config.model.adaptive_rate:
            label = f"{name}, lambda {config.train.rate_weight:g}"
        else:
            label = f"{name} (k={own})"
        extrapolated = p[f"extrapolated_psnr_{EXTRAPOLATE_HOURS:g}h"]
        row = [label, f"{p['flops_per_pixel'] / 1e3:.0f}k", f"{p['cpu_hours']:.2f}"]
        row += [f"{p['steps']:,}", f"{p['final_valid_psnr']:.2f}"]
        row += [f"{p['final_valid_key_bpp']:.3f}"]
        row.append("n/a" if extrapolated is None else f"{extrapolated:.2f}")
        rows.append(row + _held_out_cells(by_k.pop(own, {}), sources))
        for k, figures in sorted(by_k.items(), reverse=True):
            rows.append([f"{name} at k={k}", *[""] * 6, *_held_out_cells(figures, sources)])
    return markdown_table(header, rows)


def _held_out_cells(figures: dict[str, dict], sources: list[str]) -> list[str]:
    """Per source: PSNR / key bpp (JPEG 2000's PSNR at that rate), or n/a."""
    cell = "{psnr:.2f} / {key_bpp:.3f} ({jpeg2000_psnr_at_key_bpp:.2f})"
    return [cell.format(**figures[s]) if s in figures else "n/a" for s in sources]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    training = commands.add_parser("train", help="start or resume pilots, one after another")
    training.add_argument("pilots", nargs="+", choices=list(PILOTS))
    training.add_argument("--runs", type=Path, required=True, help="folder of the pilot runs")
    reporting = commands.add_parser("report", help="table, JSON and plots of the pilots")
    reporting.add_argument("--runs", type=Path, required=True)
    reporting.add_argument("--out", type=Path, required=True)
    reporting.add_argument("--per-source", type=int, default=10, help="held-out images each")
    args = parser.parse_args()
    if args.command == "train":
        for name in args.pilots:
            train_pilot(name, args.runs)
    else:
        report(args.runs, args.out, args.per_source)


if __name__ == "__main__":
    main()
