"""A training run's curve against JPEG 2000: where the run stands and where it is heading.

    python benchmarks/training_curve.py RUN --out DIR [--every 5]

Reads RUN/history.jsonl (validation PSNR and key bits per pixel at each validation, with the
CPU time spent) and measures JPEG 2000 on the same validation images (RUN/valid.txt, as the
run reads them), so each point also gets the rate JPEG 2000 needs for the same mean PSNR and
the key's rate over it ("x J2K", on the mean curve). Past warm-up the trend is taken as a
steady gain per doubling of CPU time (PSNR and log key bpp linear in log2 hours; a cosine
schedule's final decay adds to it), followed to the run's budget, to ten times it and to where
x J2K would reach the issue's target. Prints a table with the machine, writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from primis.io.files import write_atomic
from primis.io.images import read_image
from primis.report import Chart, describe_machine, machine_info, markdown_table, write_json
from primis.train import load_run

try:
    from benchmarks.design_study import FIT_FROM
    from benchmarks.rate_distortion import _mean_curve, bpp_at, codec_curve
except ModuleNotFoundError:  # run as a script from the repository root
    from design_study import FIT_FROM
    from rate_distortion import _mean_curve, bpp_at, codec_curve

# The issue's rate target (key bytes over JPEG 2000's at equal PSNR) and how far the trend is
# followed to find it: up to 2**HORIZON times the run's budget.
TARGET_X_JPEG2000 = 2.5
HORIZON = 16


def jpeg2000_curve(run: Path) -> list[dict]:
    """JPEG 2000's mean (bpp, PSNR) curve over the run's validation images."""
    paths = [Path(line) for line in (run / "valid.txt").read_text().split()]
    curves = []
    for path in paths:
        unit, mapping = read_image(path)
        curves.append(codec_curve(unit, mapping, "jpeg2000"))
    return _mean_curve(curves)


def curve_points(history: list[dict], anchor: list[dict]) -> list[dict]:
    """Each validation with its CPU hours and its key rate over JPEG 2000's at its PSNR."""
    points = []
    for entry in history:
        j2k_bpp, bound = bpp_at(anchor, entry["psnr"])
        ratio = None if j2k_bpp is None else entry["key_bpp"] / j2k_bpp
        points.append(
            {
                "step": entry["step"],
                "cpu_hours": entry["seconds"] / 3600,
                "psnr": entry["psnr"],
                "key_bpp": entry["key_bpp"],
                "jpeg2000_bpp": j2k_bpp,
                "x_jpeg2000": ratio,
                "x_jpeg2000_is_lower_bound": bound,
            }
        )
    return points


def extrapolate(points: list[dict], anchor: list[dict], budget_hours: float) -> dict:
    """The trend past warm-up (from `FIT_FROM` of the budget): PSNR and log key bpp as straight
    lines in log2(CPU hours), i.e. a steady gain per doubling of compute, and where they lead:
    PSNR, key bpp and x J2K at the budget and at ten times it, and the CPU hours at which x J2K
    would reach `TARGET_X_JPEG2000` ("target"; None beyond `HORIZON` doublings of the budget)."""
    late = [p for p in points if p["cpu_hours"] >= FIT_FROM * budget_hours]
    if len(late) < 3:
        return {"fit": None}
    doublings = np.log2([p["cpu_hours"] for p in late])
    psnr_line = np.polyfit(doublings, [p["psnr"] for p in late], 1)
    rate_line = np.polyfit(doublings, np.log([p["key_bpp"] for p in late]), 1)

    def at(hours: float) -> dict:
        psnr = float(np.polyval(psnr_line, np.log2(hours)))
        key_bpp = float(np.exp(np.polyval(rate_line, np.log2(hours))))
        j2k_bpp, _ = bpp_at(anchor, psnr)
        ratio = None if j2k_bpp is None else key_bpp / j2k_bpp
        return {"cpu_hours": hours, "psnr": psnr, "key_bpp": key_bpp, "x_jpeg2000": ratio}

    reached = None
    for hours in budget_hours * 2.0 ** np.arange(-4, HORIZON, 0.05):
        ratio = at(hours)["x_jpeg2000"]
        if ratio is not None and ratio <= TARGET_X_JPEG2000 and hours > late[-1]["cpu_hours"]:
            reached = at(float(hours))
            break
    return {
        "fit": {
            "psnr_db_per_doubling": float(psnr_line[0]),
            "key_bpp_change_per_doubling": float(np.exp(rate_line[0]) - 1),
        },
        "at_last_validation": at(late[-1]["cpu_hours"]),
        "at_budget": at(budget_hours),
        "at_10x_budget": at(10 * budget_hours),
        "target": reached,
    }


def plot(points: list[dict], trend: dict, field: str, label: str, path: Path) -> None:
    """``field`` of each validation past a quarter hour against log2 CPU hours, with its trend
    (thin) from the last validation to the hour x J2K reaches the target, or to ten times the
    budget."""
    late = [p for p in points if p["cpu_hours"] > 0.25 and p[field] is not None]
    ends = [trend.get("at_10x_budget") or {}]
    if trend.get("target"):
        ends = [trend["target"]]
    projected = [(e["cpu_hours"], e[field]) for e in ends if e.get(field) is not None]
    xs = [np.log2(p["cpu_hours"]) for p in late] + [np.log2(h) for h, _ in projected]
    ys = [p[field] for p in late] + [v for _, v in projected]
    if field == "x_jpeg2000":
        ys.append(TARGET_X_JPEG2000)
    chart = Chart(
        (720, 460),
        56,
        (min(xs), max(xs)),
        (min(ys) * 0.95, max(ys) * 1.02),
        ("log2 CPU hours (1 thread)", label),
        (6, ".1f", ".1f"),
    )
    line = [chart.at(np.log2(p["cpu_hours"]), p[field]) for p in late]
    if len(line) > 1:
        chart.draw.line(line, fill=0, width=2)
    start = trend.get("at_last_validation") or {}
    for hours, value in projected if start.get(field) is not None else ():
        begin = chart.at(np.log2(start["cpu_hours"]), start[field])
        chart.draw.line([begin, chart.at(np.log2(hours), value)], fill=120, width=1)
    if field == "x_jpeg2000":
        y = chart.at(min(xs), TARGET_X_JPEG2000)[1]
        chart.draw.line([chart.at(min(xs), TARGET_X_JPEG2000), (chart.width - 20, y)], fill=180)
    write_atomic(path, chart.png())


def markdown(report: dict) -> str:
    """The curve as a Markdown table, every ``report["every"]``-th validation and the last,
    and the trend in a sentence (the docs' generated tables, `benchmarks.tables`)."""
    points, every, trend = report["points"], report["every"], report["trend"]
    shown = points[::every] + ([points[-1]] if (len(points) - 1) % every else [])
    rows = [
        [
            f"{p['step']:,}",
            f"{p['cpu_hours']:.2f}",
            f"{p['psnr']:.2f}",
            f"{p['key_bpp']:.3f}",
            "n/a"
            if p["x_jpeg2000"] is None
            else (">" if p["x_jpeg2000_is_lower_bound"] else "") + f"{p['x_jpeg2000']:.2f}",
        ]
        for p in shown
    ]
    text = markdown_table(["step", "CPU h", "valid PSNR", "key bpp", "x J2K"], rows) + "\n"
    if trend.get("fit"):
        fit, target = trend["fit"], trend["target"]
        text += (
            f"\nTrend past warm-up: {fit['psnr_db_per_doubling']:+.2f} dB and "
            f"{100 * fit['key_bpp_change_per_doubling']:+.1f} % key bits per doubling of CPU "
            f"time; at {trend['at_budget']['cpu_hours']:g} h "
            f"{trend['at_budget']['psnr']:.2f} dB, x J2K {_ratio(trend['at_budget'])}; at "
            f"{trend['at_10x_budget']['cpu_hours']:g} h {trend['at_10x_budget']['psnr']:.2f} "
            f"dB, x J2K {_ratio(trend['at_10x_budget'])}; x J2K {TARGET_X_JPEG2000:g} at "
            + ("no hour within the horizon" if target is None else f"{target['cpu_hours']:.0f} h")
            + ".\n"
        )
    return text


def _ratio(point: dict) -> str:
    return "n/a" if point["x_jpeg2000"] is None else f"{point['x_jpeg2000']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a training run's folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and plot")
    parser.add_argument("--every", type=int, default=5, help="table rows: every Nth validation")
    args = parser.parse_args()
    config = load_run(args.run)
    budget_hours = config.train.max_minutes / 60
    history = [json.loads(line) for line in (args.run / "history.jsonl").read_text().splitlines()]
    anchor = jpeg2000_curve(args.run)
    points = curve_points(history, anchor)
    trend = extrapolate(points, anchor, budget_hours)
    report = {"machine": machine_info(), "points": points, "trend": trend, "every": args.every}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "training_curve.json", report)
    plot(points, trend, "psnr", "valid PSNR (dB)", args.out / "training_psnr.png")
    plot(points, trend, "x_jpeg2000", "key / JPEG 2000 bytes", args.out / "training_x_j2k.png")
    print(
        f"Machine (JPEG 2000 measured here; training times as the run logged them): "
        f"{describe_machine(report['machine'])}"
    )
    print(markdown(report))


if __name__ == "__main__":
    main()
