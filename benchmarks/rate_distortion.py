"""Rate-distortion of PRIMIS keys against JPEG, JPEG 2000 and JPEG XL, per data source.

For every image of every source: the key of each model (bytes of the whole key file, and of
its payload) and the authorized PSNR / MS-SSIM; each codec swept over its quality settings on
the image's stored values (JPEG and JPEG XL at 8 bits, JPEG 2000 at 8 or 16 bits as stored);
and, per image, the bits per pixel each codec needs for the PSNR the key gives (interpolated
on the codec's curve in log-rate), and how many dB the key lacks at its own rate to cost at most
RATE_TARGET times JPEG 2000's bytes. A model's operating points are its k (--ks) times its rate
weights (--weights: rate-distortion optimised coding, `primis.sharing.RateControl`); with at
least four, BD-rate of the key against JPEG 2000 (bjontegaard, Akima) on the sources' mean
curves.

    pip install -e ".[bench]"
    python benchmarks/rate_distortion.py --models cxr cxr-v1 --json runs/rd.json
    python benchmarks/rate_distortion.py --weights 0 0.025 0.05 0.1 0.2 --json runs/rd-w.json
    python benchmarks/rate_distortion.py --models unrefined=cxr --refine-steps 0 \
        --merge runs/rd.json --json runs/rd-both.json

A model is named in the tables by its argument (a directory by its own name) or by LABEL in
LABEL=MODEL. --merge adds the models of an earlier report on the same images (their codec
curves are reused, not recomputed), so that models measured with different --refine-steps, or
at different times, share one table. --combine writes one compact report (summaries and image
counts) of reports that measured different sources, and prints it as the docs' Markdown table:

    python benchmarks/rate_distortion.py --combine runs/rd.json runs/rd-dicom.json \
        --json docs/rate_distortion.json

PSNR, SSIM and MS-SSIM are on the image's own intensity range (the [0, 1] scale PRIMIS maps it
to); "PSNR@bits" is on the image's bit depth (peak 2^bits - 1 over the stored values, DICOM's
BitsStored: a 12- or 15-bit image scored as 12 or 15 bits). Prints one table per source
(medians) and writes JSON with every per-image figure.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pillow_jxl  # noqa: F401  (registers JPEG XL with Pillow; the bench extra)
import torch
from PIL import Image

from primis.config import REFINE_STEPS
from primis.data import resolve_sources
from primis.formats import KeyFile
from primis.io.images import SourceImage, read_source
from primis.io.pixels import IntensityMapping
from primis.metrics import ms_ssim, psnr, ssim
from primis.modelstore import load_model
from primis.report import describe_machine, machine_info, markdown_table, write_json
from primis.sharing import RateControl, reconstruct, share_image

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "cxr-test": (ROOT / "splits/cxr/test.txt", 25),
    "figure1_covid": (ROOT / "splits/heldout/figure1_covid.txt", 10),
    "actualmed": (ROOT / "splits/heldout/actualmed.txt", 3),
    "dicom": (ROOT / "splits/heldout/dicom.txt", 3),
}
# The codec issue's rate target: a key at most this many times JPEG 2000's bytes at equal PSNR.
RATE_TARGET = 2.5
SWEEPS = {
    "jpeg": [5, 10, 20, 30, 50, 70, 85, 95],
    "jpeg2000": [0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0, 3.0],
    "jpegxl": [1, 3, 5, 10, 20, 35, 50, 70, 90, 95, 98],
}


def _stored(unit: np.ndarray, mapping: IntensityMapping) -> tuple[np.ndarray, int]:
    """The image as the codecs get it: 8-bit, or 16-bit for deeper data; and its peak value."""
    if np.dtype(mapping.dtype).itemsize == 1:
        return np.rint(unit * 255).astype(np.uint8), 255
    return np.rint(unit * 65535).astype(np.uint16), 65535


def codec_curve(unit: np.ndarray, mapping: IntensityMapping, codec: str) -> list[dict]:
    """(bpp, PSNR, MS-SSIM) of one image at each setting of ``codec``."""
    stored, peak = _stored(unit, mapping)
    if codec != "jpeg2000" and peak > 255:
        stored, peak = np.rint(unit * 255).astype(np.uint8), 255
    picture = Image.fromarray(stored)
    points = []
    for setting in SWEEPS[codec]:
        buffer = io.BytesIO()
        if codec == "jpeg":
            picture.save(buffer, format="JPEG", quality=setting)
        elif codec == "jpegxl":
            picture.save(buffer, format="JXL", quality=setting)
        else:
            ratio = 8 * stored.itemsize / setting
            picture.save(buffer, format="JPEG2000", quality_mode="rates", quality_layers=[ratio])
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).astype(np.float32) / peak
        points.append(
            {
                "setting": setting,
                "bpp": 8 * buffer.tell() / unit.size,
                "psnr": psnr(unit, decoded),
                "ms_ssim": ms_ssim(unit, decoded),
            }
        )
    return points


def _upper_hull(points: list[dict]) -> list[dict]:
    """A codec's points by rising rate, keeping only those that beat every cheaper one."""
    best, hull = -np.inf, []
    for point in sorted(points, key=lambda p: p["bpp"]):
        if point["psnr"] > best:
            hull.append(point)
            best = point["psnr"]
    return hull


def bpp_at(points: list[dict], target: float) -> tuple[float | None, bool]:
    """The bits per pixel a codec's curve needs for PSNR ``target`` (log-rate interpolation on
    the curve's upper hull in PSNR), and whether that is only an upper bound (the codec's
    lowest setting already exceeds the target); None above the curve."""
    hull = _upper_hull(points)
    psnrs = [p["psnr"] for p in hull]
    if not psnrs or target > psnrs[-1]:
        return None, False
    if target < psnrs[0]:
        return hull[0]["bpp"], True
    return float(np.exp(np.interp(target, psnrs, [np.log(p["bpp"]) for p in hull]))), False


def psnr_at(points: list[dict], bpp: float) -> float | None:
    """The PSNR a codec's curve gives at ``bpp`` (log-rate interpolation on its upper hull);
    None outside the rates it was swept over."""
    hull = _upper_hull(points)
    rates = [np.log(p["bpp"]) for p in hull]
    if not rates or not rates[0] <= np.log(bpp) <= rates[-1]:
        return None
    return float(np.interp(np.log(bpp), rates, [p["psnr"] for p in hull]))


def bit_depth(image: SourceImage) -> int | None:
    """The bits of the stored values (DICOM's BitsStored, else the integer dtype's); None for
    floating-point data, which has no bit depth to score on."""
    if image.pixels.dtype.kind not in "ui":
        return None
    return int(image.details.get("bits_stored") or 8 * image.pixels.dtype.itemsize)


def primis_point(
    model, image: SourceImage, unit, k: int, weight: float | None, refine_steps: int
) -> dict:
    mapping = image.mapping
    started = time.perf_counter()
    rate = RateControl(weight=weight)
    shared = share_image(
        unit, mapping, model, model.obfuscation, k, refine_steps=refine_steps, rate=rate
    )
    seconds = time.perf_counter() - started
    stored = reconstruct(shared.public, shared.key, model)[0]
    restored = mapping.forward(stored)
    bits = bit_depth(image)
    peak = float(2**bits - 1) if bits else None
    return {
        "k": k,
        "weight": shared.rate_weight,
        "bpp": shared.key_bits_per_pixel,
        "payload_bpp": 8 * len(KeyFile.from_bytes(shared.key).payload) / unit.size,
        "key_bytes": len(shared.key),
        "psnr": psnr(unit, restored),
        "ssim": ssim(unit, restored),
        "ms_ssim": ms_ssim(unit, restored),
        "bits": bits,
        "psnr_bit_depth": psnr(image.pixels / peak, stored / peak) if peak else None,
        "seconds": seconds,
        "seconds_per_megapixel": seconds / (unit.size / 1e6),
    }


def bd_rate(primis_points: list[dict], anchor_points: list[dict]) -> float | None:
    """BD-rate (%) of the key's mean curve against the anchor's; None without at least four
    key points or with too little PSNR overlap."""
    if len(primis_points) < 4:
        return None
    import bjontegaard

    try:
        return float(
            bjontegaard.bd_rate(
                [p["bpp"] for p in anchor_points],
                [p["psnr"] for p in anchor_points],
                [p["bpp"] for p in primis_points],
                [p["psnr"] for p in primis_points],
                method="akima",
                require_matching_points=False,
            )
        )
    except ValueError:
        return None


def _mean_curve(curves: list[list[dict]]) -> list[dict]:
    """Point-wise mean over images of curves with the same settings."""
    return [
        {key: float(np.mean([c[i][key] for c in curves])) for key in ("bpp", "psnr")}
        for i in range(len(curves[0]))
    ]


def measure_source(
    paths: list[Path],
    models: dict,
    points: list[tuple[int, float | None]],
    refine_steps: int,
    earlier: dict | None = None,
) -> dict:
    """Every image's codec curves and each model's points; with ``earlier`` (the same source's
    result in an earlier report, which must cover every image) its codec curves and models'
    points are reused and this run's models added to them."""
    known = {row["image"]: row for row in (earlier or {}).get("images", [])}
    images = []
    for path in paths:
        if earlier is not None and path.name not in known:
            raise SystemExit(f"the merged report lacks {path.name}: measure the same images")
        image = read_source(path)
        unit = image.mapping.forward(image.pixels)
        if path.name in known:
            row = {**known[path.name], "primis": dict(known[path.name]["primis"])}
        else:
            curves = {codec: codec_curve(unit, image.mapping, codec) for codec in SWEEPS}
            row = {"image": path.name, "shape": list(unit.shape), "codecs": curves, "primis": {}}
        for name, model in models.items():
            row["primis"][name] = [
                primis_point(model, image, unit, k, weight, refine_steps) for k, weight in points
            ]
        images.append(row)
        print(f"  {path.name} {unit.shape}", flush=True)
    return {"images": images, "summary": summarize(images)}


def summarize(images: list[dict]) -> dict:
    """Per key (model, k and rate weight): medians over the images, the key's bytes over each
    codec's at equal PSNR (a lower bound, marked, where a codec's lowest setting beats the key),
    and BD-rate against JPEG 2000."""
    summary = {}
    for name, first in images[0]["primis"].items():
        for index, point in enumerate(first):
            points = [row["primis"][name][index] for row in images]
            entry = {
                "median_key_bpp": statistics.median(p["bpp"] for p in points),
                "median_payload_bpp": statistics.median(p["payload_bpp"] for p in points),
                "median_key_bytes": statistics.median(p["key_bytes"] for p in points),
                "mean_psnr": float(np.mean([p["psnr"] for p in points])),
                "median_psnr": statistics.median(p["psnr"] for p in points),
                "worst_psnr": min(p["psnr"] for p in points),
                "median_seconds": statistics.median(p["seconds"] for p in points),
            }
            for field in ("ssim", "ms_ssim", "psnr_bit_depth", "seconds_per_megapixel"):
                values = [p[field] for p in points if p.get(field) is not None]
                entry[f"mean_{field}"] = float(np.mean(values)) if values else None
                entry[f"median_{field}"] = statistics.median(values) if values else None
            depths = [p["psnr_bit_depth"] for p in points if p.get("psnr_bit_depth") is not None]
            entry["worst_psnr_bit_depth"] = min(depths) if depths else None
            for codec in SWEEPS:
                needed = [
                    bpp_at(row["codecs"][codec], p["psnr"])
                    for row, p in zip(images, points, strict=True)
                ]
                ratios = [p["bpp"] / b for p, (b, _) in zip(points, needed, strict=True) if b]
                entry[f"key_over_{codec}_at_equal_psnr"] = (
                    statistics.median(ratios) if ratios else None
                )
                entry[f"{codec}_lower_bounds"] = sum(bound for _, bound in needed)
                entry[f"{codec}_above_curve"] = sum(b is None for b, _ in needed)
                at_key = [
                    psnr_at(row["codecs"][codec], p["bpp"])
                    for row, p in zip(images, points, strict=True)
                ]
                covered = None not in at_key  # else a mean over some images would mislead
                entry[f"{codec}_mean_psnr_at_key_bpp"] = float(np.mean(at_key)) if covered else None
                entry[f"{codec}_worst_psnr_at_key_bpp"] = min(at_key) if covered else None
            # What the target asks in dB: JPEG 2000's PSNR at 1 / RATE_TARGET of the key's
            # rate, less the key's (images whose target rate lies off JPEG 2000's sweep left out).
            short = [
                psnr_at(row["codecs"]["jpeg2000"], p["bpp"] / RATE_TARGET)
                for row, p in zip(images, points, strict=True)
            ]
            gaps = [q - p["psnr"] for q, p in zip(short, points, strict=True) if q is not None]
            entry["psnr_short_of_rate_target"] = statistics.median(gaps) if gaps else None
            entry["rate_target_images"] = len(gaps)
            summary[f"{name} k={point['k']} w={point.get('weight', 0):g}"] = entry
        mean_key = [
            {
                key: float(np.mean([row["primis"][name][i][key] for row in images]))
                for key in ("bpp", "psnr")
            }
            for i in range(len(first))
        ]
        anchor = _mean_curve([row["codecs"]["jpeg2000"] for row in images])
        summary[f"{name} bd_rate_vs_jpeg2000_percent"] = bd_rate(mean_key, anchor)
    return summary


def _shown(entry: dict, field: str, digits: int) -> str:
    value = entry.get(field)
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_report(report: dict) -> None:
    steps = report.get("refine_steps_by_model") or {"all models": report["refine_steps"]}
    shown = ", ".join(f"{name} {count}" for name, count in steps.items())
    print(describe_machine(report["machine"]), f"refine steps: {shown}")
    for name, result in report["sources"].items():
        print(f"\n{name} ({len(result['images'])} images):")
        print(
            f"  {'key':22s} {'key bpp':>8s} {'payload':>8s} {'PSNR':>6s} {'mean':>6s} "
            f"{'worst':>6s} {'SSIM':>6s} {'MS-SSIM':>7s} {'PSNR@bits':>9s} {'s/MP':>6s} "
            f"{'/J2K':>7s} {'/JPEG':>7s} {'/JXL':>7s}"
        )
        for key, entry in result["summary"].items():
            if "bd_rate" in key:
                print(f"  {key}: {'n/a' if entry is None else f'{entry:+.1f} %'}")
                continue
            cells = []
            for codec in ("jpeg2000", "jpeg", "jpegxl"):
                ratio = entry[f"key_over_{codec}_at_equal_psnr"]
                bound = ">" if entry[f"{codec}_lower_bounds"] else " "
                cells.append("    n/a" if ratio is None else f"{bound}{ratio:6.2f}")
            depth = _shown(entry, "median_psnr_bit_depth", 2)
            speed = _shown(entry, "median_seconds_per_megapixel", 1)
            print(
                f"  {key:22s} {entry['median_key_bpp']:8.3f} {entry['median_payload_bpp']:8.3f} "
                f"{entry['median_psnr']:6.2f} {entry['mean_psnr']:6.2f} {entry['worst_psnr']:6.2f} "
                f"{_shown(entry, 'mean_ssim', 4):>6s} {_shown(entry, 'mean_ms_ssim', 4):>7s} "
                f"{depth:>9s} {speed:>6s} "
                f"{' '.join(cells)}"
            )
        for key, entry in result["summary"].items():
            if entry is not None and entry.get("psnr_short_of_rate_target") is not None:
                print(
                    f"  {key:22s} short of {RATE_TARGET}x JPEG 2000's bytes by "
                    f"{entry['psnr_short_of_rate_target']:+.2f} dB (median of "
                    f"{entry['rate_target_images']} images)"
                )
        print("  each codec at the key's bits per pixel, PSNR mean / worst image:")
        for key, entry in result["summary"].items():
            if "bd_rate" not in key:
                cells = [
                    f"{label} {_shown(entry, f'{codec}_mean_psnr_at_key_bpp', 2)} / "
                    f"{_shown(entry, f'{codec}_worst_psnr_at_key_bpp', 2)}"
                    for codec, label in (("jpeg2000", "J2K"), ("jpeg", "JPEG"), ("jpegxl", "JXL"))
                ]
                print(f"  {key:22s} {'   '.join(cells)}")
    print(
        "\nPSNR, mean and worst: median, mean and minimum over images; SSIM and MS-SSIM: means;"
        " PSNR@bits: on the bit depth; s/MP: sharing seconds per megapixel"
        "\n/J2K etc.: the key's bytes over the codec's at the key's PSNR (median over images; "
        "'>' where the codec's lowest setting already beats the key on some images)"
        f"\nshort of {RATE_TARGET}x: JPEG 2000's PSNR at the key's rate / {RATE_TARGET} less the"
        " key's (what the key must gain at its rate to cost at most that; below 0: it does)"
    )


def markdown(report: dict) -> str:
    """The report as a Markdown table (the docs' generated tables, `benchmarks.tables`): per
    source and key, its refinement steps, the key's rate, PSNR median / mean / worst, MS-SSIM,
    its bytes over JPEG 2000's and JPEG XL's at equal PSNR ('>': a lower bound), JPEG 2000's
    PSNR at the key's rate and the dB the key lacks for the rate target."""
    header = ["source (images)", "model", "refine", "key bpp", "PSNR", "mean", "worst"]
    header += ["MS-SSIM"]
    steps = report.get("refine_steps_by_model", {})
    header += ["x J2K", "x JXL", "J2K at the key's bpp", f"dB short of {RATE_TARGET}x J2K"]
    rows = []
    for source, result in report["sources"].items():
        for key, entry in result["summary"].items():
            if "bd_rate" in key:
                continue
            ratios = []
            for codec in ("jpeg2000", "jpegxl"):
                ratio = entry[f"key_over_{codec}_at_equal_psnr"]
                bound = ">" if entry[f"{codec}_lower_bounds"] else ""
                ratios.append("n/a" if ratio is None else f"{bound}{ratio:.2f}")
            label = key.split(" k=")[0]
            rows.append(
                [
                    f"{source} ({image_count(result)})",
                    f"`{Path(label).name}`",
                    str(steps.get(label, report["refine_steps"])),
                    f"{entry['median_key_bpp']:.3f}",
                    f"{entry['median_psnr']:.2f}",
                    f"{entry['mean_psnr']:.2f}",
                    f"{entry['worst_psnr']:.2f}",
                    _shown(entry, "mean_ms_ssim", 4),
                    *ratios,
                    _shown(entry, "jpeg2000_mean_psnr_at_key_bpp", 2),
                    _shown(entry, "psnr_short_of_rate_target", 2),
                ]
            )
    return markdown_table(header, rows) + "\n"


def image_count(result: dict) -> int:
    """How many images a source's result measured (a combined report keeps only the count)."""
    return result["image_count"] if "image_count" in result else len(result["images"])


def combined(reports: list[dict]) -> dict:
    """One compact report of reports that measured different sources (as the baselines of a
    release, measured over several sessions): each source's summary and image count, every
    model with its refinement steps, and each report's machine; the per-image points stay in
    the reports. SystemExit where two reports measured one source, or one label names two
    models."""
    sources, models, steps = {}, {}, {}
    for report in reports:
        for name, result in report["sources"].items():
            if name in sources:
                raise SystemExit(f"source {name} is in more than one report")
            sources[name] = {"image_count": image_count(result), "summary": result["summary"]}
        for label, digest in report["models"].items():
            if models.setdefault(label, digest) != digest:
                raise SystemExit(f"{label} names two different models in these reports")
        steps |= report.get("refine_steps_by_model") or dict.fromkeys(
            report["models"], report["refine_steps"]
        )
    return {
        "machines": [report["machine"] for report in reports],
        "refine_steps": reports[0]["refine_steps"],
        "models": models,
        "refine_steps_by_model": steps,
        "sources": sources,
    }


def model_label(argument: str) -> tuple[str, str]:
    """(label, model) of a --models argument: LABEL=MODEL, or the model named by itself (a
    directory by its own name)."""
    label, sep, model = argument.partition("=")
    if sep:
        return label, model
    return (Path(argument).name if Path(argument).is_dir() else argument), argument


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cxr"], help="MODEL or LABEL=MODEL")
    parser.add_argument("--ks", type=int, nargs="+", default=[4], help="k per key (default 4)")
    parser.add_argument(
        "--weights",
        type=float,
        nargs="+",
        help="rate weights per key (default: the sharing default for the refine steps)",
    )
    parser.add_argument(
        "--source",
        action="append",
        help=f"NAME or NAME=LIST[:LIMIT] (default: {', '.join(SOURCES)})",
    )
    parser.add_argument("--limit", type=int, help="images per source (default per source)")
    parser.add_argument("--refine-steps", type=int, default=REFINE_STEPS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("runs/rate_distortion.json"))
    parser.add_argument("--summarize", type=Path, help="print (and re-summarize) a saved JSON")
    parser.add_argument("--merge", type=Path, help="add the models of this earlier report")
    parser.add_argument(
        "--combine", type=Path, nargs="+", help="write one compact report of these (--json)"
    )
    args = parser.parse_args()
    if args.combine:
        report = combined([json.loads(path.read_text()) for path in args.combine])
        write_json(args.json, report)
        print(markdown(report), end="")
        print(f"JSON: {args.json}")
        return
    if args.summarize:
        report = json.loads(args.summarize.read_text())
        for result in report["sources"].values():
            result["summary"] = summarize(result["images"])
        print_report(report)
        return
    torch.set_num_threads(args.threads)

    sources = {}
    for text in args.source or list(SOURCES):
        name, _, spec = text.partition("=")
        listing, _, limit = spec.partition(":") if spec else ("", "", "")
        path, default_limit = (Path(listing), int(limit or 10**9)) if spec else SOURCES[name]
        sources[name] = resolve_sources(path)[: args.limit or default_limit]
    models = {label: load_model(model) for label, model in map(model_label, args.models)}
    earlier = json.loads(args.merge.read_text()) if args.merge else {"sources": {}, "models": {}}
    clash = set(models) & set(earlier["models"])
    if clash:
        raise SystemExit(f"{', '.join(sorted(clash))}: already in {args.merge}; use LABEL=MODEL")
    steps = earlier.get("refine_steps_by_model", {})
    report = {
        "machine": machine_info(),
        "numeric_type": "float32 (bfloat16 decoder during refinement where native)",
        "refine_steps": args.refine_steps,
        "models": {**earlier["models"], **{name: model.hash for name, model in models.items()}},
        "refine_steps_by_model": {**steps, **{name: args.refine_steps for name in models}},
        "merged_from": str(args.merge) if args.merge else None,
        "sources": {},
    }
    for name, paths in sources.items():
        print(f"{name}: {len(paths)} images", flush=True)
        points = [(k, w) for k in args.ks for w in (args.weights or [None])]
        before = earlier["sources"].get(name) if args.merge else None
        if args.merge and before is None:
            raise SystemExit(f"{args.merge} has no source {name}")
        report["sources"][name] = measure_source(paths, models, points, args.refine_steps, before)
        write_json(args.json, report)
    print_report(report)
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
