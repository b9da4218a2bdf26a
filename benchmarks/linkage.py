"""Linkage per privacy mode: which of the attacker's images each public file came from.

Targets are the cxr test split, shared as `primis ambiguate` shares them (refined
--target-refine steps, and unrefined); candidates are the targets' originals among distractors
of the cxr training split (--distractors), their codes computed by the attacker unrefined and
refined (--candidate-refine). Every mode of the frontier is measured, plus the extra settings
tried to keep a key saving unlinkable, the strict mode's size channel with and without size
classes, and, across images, NIH patients with two radiographs (the public file made from one,
the other among the candidates).

    python benchmarks/linkage.py --out /work/runs/linkage

Writes OUT/linkage.json and OUT/linkage.md and prints the tables, and OUT/privacy.json: the
figures of the named modes that `primis.privacy` reads (published as docs/linkage.json and
primis/privacy.json; `python -m benchmarks.tables` then remakes docs/linkage.md's tables from
docs/linkage.json). ``--from-report LINKAGE_JSON`` writes only OUT/privacy.json, from a report
measured before.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from primis.attacks import Target
from primis.config import REFINE_STEPS, ObfuscationConfig
from primis.data import resolve_sources
from primis.frontier import mode_name, modes
from primis.io.files import write_atomic
from primis.io.images import read_image
from primis.keys.enumerative import key_size
from primis.linkage import candidate_codes, link_sets, shown_files, strongest
from primis.modelstore import load_model
from primis.obfuscation import ambiguate_maps
from primis.privacy import PRIVACY_MODES, privacy_preset_name
from primis.report import describe_machine, machine_info, markdown_table, write_json

ROOT = Path(__file__).resolve().parents[1]
NIH = ROOT / ".." / "shared" / "data" / "cxr-multi" / "nih_cxr14"
# Settings tried for a key saving that does not link: fills near 1 with a secret atom order.
EXTRA = [ObfuscationConfig(fill=fill, mask_signs=True, permute_atoms=True) for fill in (0.9, 0.98)]


def targets_of(model, codes: list, images: list, obf: ObfuscationConfig) -> list[Target]:
    """Public vectors of each code as `primis ambiguate` makes them."""
    cfg = model.network.config
    made = []
    for candidate, image in zip(codes, images, strict=True):
        public, _ = ambiguate_maps(candidate.code, cfg.m, cfg.k, obf)
        made.append(Target(image, candidate.code, public, None, candidate.grid))
    return made


def key_bits(model, codes: list, obf: ObfuscationConfig) -> float:
    """Mean enumerative key bits per image of ``codes`` under ``obf`` (atom orders included)."""
    cfg = model.network.config
    bits = []
    for candidate in codes:
        public, perms = ambiguate_maps(candidate.code, cfg.m, cfg.k, obf)
        parts = zip(np.split(public, cfg.m), perms, strict=True)
        bits.append(sum(key_size(p, cfg.k, obf.mask_signs, o is not None)[0] for p, o in parts))
    return float(np.mean(bits))


METRICS = ("statistic", "candidate_refine_steps", "top1", "top5", "auc")
METRICS += ("top1_chance", "top5_chance", "at_chance")


def row(name: str, result: dict, extra: dict) -> dict:
    """One table row: the strongest content statistic (`linkage.strongest`), with the size as
    a feature and alone."""
    best = strongest(result)
    channels = {c: {f: best[c][f] for f in ("top1", "top5", "auc")} for c in ("with_size", "size")}
    counts = {"targets": result["targets"], "candidates": result["candidates"]}
    return {"mode": name, **extra, **counts} | {f: best[f] for f in METRICS} | channels


def table(rows: list[dict]) -> str:
    header = [
        "mode",
        "preset",
        "key bits vs strict",
        "targets refined",
        "candidates (#)",
        "top-1 (chance)",
        "top-5 (chance)",
        "AUC",
        "statistic (candidate refine)",
        "at chance",
        "+ size: top-1 / AUC",
    ]
    lines = [
        [
            r["mode"],
            r.get("preset", ""),
            f"{r['key_ratio']:.3f}" if "key_ratio" in r else "",
            r["target_refine_steps"],
            r["candidates"],
            f"{r['top1']:.2f} ({r['top1_chance']:.3f})",
            f"{r['top5']:.2f} ({r['top5_chance']:.3f})",
            f"{r['auc']:.3f}",
            f"{r['statistic']} ({r['candidate_refine_steps']})",
            "yes" if r["at_chance"] else "NO",
            f"{r['with_size']['top1']:.2f} / {r['with_size']['auc']:.3f}",
        ]
        for r in rows
    ]
    return markdown_table(header, lines)


def preset_figures(report: dict) -> dict:
    """What `primis.privacy` reads of a report: per named mode, its key bits against strict's
    (unrefined codes) and its strongest linkage (refined targets or not)."""
    figures = {}
    for name in PRIVACY_MODES:
        settings = PRIVACY_MODES[name].settings.model_dump()
        rows = [r for r in report["rows"] if r["obfuscation"] == settings]
        unrefined = min(rows, key=lambda r: r["target_refine_steps"])
        linked = max(rows, key=lambda r: (r["top1"], r["auc"]))
        figures[name] = {
            "key_ratio": unrefined["key_ratio"],
            "linkage": {
                "top1": linked["top1"],
                "auc": linked["auc"],
                "chance": linked["top1_chance"],
                "candidates": linked["candidates"],
                "at_chance": linked["at_chance"],
            },
        }
    return {"source": "benchmarks/linkage.py (docs/linkage.json)", "modes": figures}


TITLE = "Linkage per mode"


def markdown(report: dict) -> str:
    """The report's tables (per mode, the strict mode's size channel and, where measured,
    across images) with the machine they were measured on: docs/linkage.md's body."""
    size_table = markdown_table(
        ["strict public grid", "size alone: top-1 / top-5 / AUC", "candidates", "targets"],
        [
            [
                ("size classes" if r["pad_size_class"] else "the image's (16 px)"),
                f"{r['size']['top1']:.2f} / {r['size']['top5']:.2f} / {r['size']['auc']:.3f}",
                r["candidates"],
                r["targets"],
            ]
            for r in report["size_channel"]
        ],
    )
    text = f"Measured on {describe_machine(report['machine'])}.\n\n{table(report['rows'])}\n"
    text += f"\n## Size channel (strict)\n\n{size_table}\n"
    if report["cross_image"]:
        across = table(report["cross_image"])
        text += f"\n## Across images (NIH patients with two radiographs)\n\n{across}\n"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cxr")
    parser.add_argument("--targets", type=int, default=25, help="images of the cxr test split")
    parser.add_argument("--distractors", type=int, default=75, help="images of the train split")
    parser.add_argument("--target-refine", type=int, default=REFINE_STEPS)
    parser.add_argument("--candidate-refine", type=int, default=REFINE_STEPS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/linkage"))
    parser.add_argument("--from-report", type=Path, help="a linkage.json: write privacy.json only")
    args = parser.parse_args()
    if args.from_report:
        args.out.mkdir(parents=True, exist_ok=True)
        report = json.loads(args.from_report.read_text())
        write_json(args.out / "privacy.json", preset_figures(report))
        return

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    info = machine_info()
    model = load_model(args.model)
    multiple = model.network.config.downsampling
    split = ROOT / "splits" / "cxr"
    target_images = [read_image(p)[0] for p in resolve_sources(split / "test.txt")[: args.targets]]
    distractors = [
        read_image(p)[0] for p in resolve_sources(split / "train.txt")[: args.distractors]
    ]
    everything = target_images + distractors
    candidates = {"0": candidate_codes(model, everything, 0)}
    owner = {0: candidates["0"][: len(target_images)]}
    if args.target_refine:
        owner[args.target_refine] = candidate_codes(model, target_images, args.target_refine)
    if args.candidate_refine:
        refined = candidate_codes(model, distractors, args.candidate_refine)
        # recomputed as the attacker would, even where the owner's refinement is the same
        same = candidate_codes(model, target_images, args.candidate_refine)
        candidates[str(args.candidate_refine)] = same + refined
    print(f"codes in {time.monotonic() - started:.0f} s", flush=True)
    strict_bits = key_bits(model, owner[0], ObfuscationConfig())
    rows = []
    for obf in modes() + EXTRA:
        for steps, codes in owner.items():
            shown = shown_files(model, targets_of(model, codes, target_images, obf), obf)
            result = link_sets(shown, candidates, multiple)
            extra = {
                "preset": privacy_preset_name(obf),
                "obfuscation": obf.model_dump(),
                "target_refine_steps": steps,
            }
            extra["key_ratio"] = key_bits(model, owner[0], obf) / strict_bits
            rows.append(row(mode_name(obf), result, extra))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    size_rows = []
    for pad in (False, True):
        strict = ObfuscationConfig(permute_atoms=False, pad_size_class=pad)
        made = targets_of(model, owner[0], target_images, strict)
        result = link_sets(shown_files(model, made, strict), {"0": candidates["0"]}, multiple)
        best = strongest(result)
        size_rows.append(
            {
                "pad_size_class": pad,
                "size": best["size"],
                "with_size": best["with_size"],
                "candidates": result["candidates"],
                "targets": result["targets"],
            }
        )
    cross = cross_image(model, multiple)
    report = {
        "machine": info,
        "rows": rows,
        "size_channel": size_rows,
        "cross_image": cross,
        "seconds": time.monotonic() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "linkage.json", report)
    write_json(args.out / "privacy.json", preset_figures(report))
    text = f"# {TITLE}\n\n{markdown(report)}"
    write_atomic(args.out / "linkage.md", text.encode())
    print(text)


def cross_image(model, multiple: int) -> list[dict]:
    """Public file made from one radiograph of a patient, the candidates being every other
    NIH image (the patient's other radiograph among them); unrefined codes."""
    paths = sorted(NIH.glob("*/*.png")) if NIH.is_dir() else []
    by_patient = defaultdict(list)
    for path in paths:
        by_patient[path.name.split("_")[0]].append(path)
    pairs = [sorted(found)[:2] for found in by_patient.values() if len(found) > 1]
    if not pairs:
        return []
    first = [a for a, _ in pairs]
    others = [b for _, b in pairs] + [
        p for p in paths if p not in first and all(p != b for _, b in pairs)
    ]
    codes = candidate_codes(model, [read_image(p)[0] for p in first], 0)
    candidates = {"0": candidate_codes(model, [read_image(p)[0] for p in others], 0)}
    rows = []
    for name in ("strict", "compact", "paper"):
        obf = PRIVACY_MODES[name].settings
        shown = shown_files(model, targets_of(model, codes, [None] * len(codes), obf), obf)
        result = link_sets(shown, candidates, multiple)
        rows.append(row(name, result, {"preset": name, "target_refine_steps": 0}))
    return rows


if __name__ == "__main__":
    main()
