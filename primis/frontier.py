"""The privacy frontier: every obfuscation mode PRIMIS offers, against the attacks of
`primis.attacks`.

A mode is an `ObfuscationConfig`: signs masked or public, a fill of 1, 0.5 or 0.25, and the
atom order secret or shown (meaningless where the public vectors reveal nothing, so not
offered there). For each mode the frontier measures what the key costs (bits per pixel of its
coded payload), the authorized PSNR, the best attack's PSNR and SSIM against the prior-only
baseline, the lung segmentation Dice of the best attack's images against prior-only (with
lung masks), the distinguisher's ROC AUC against the prior-only classifier's, and linkage
(`primis.linkage`: top-1, top-5 and AUC of finding each target's original among the attacker's
images). A mode is called private only where linkage is at chance and the best attack's image
within the margins of prior-only. `primis
attack --frontier` and `benchmarks/privacy_frontier.py` write it as JSON, a Markdown table and
a plot of key bits per pixel against attack gain.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from primis.config import AttackConfig, ObfuscationConfig
from primis.modelstore import LoadedModel
from primis.obfuscation import reveals_nothing
from primis.privacy import privacy_preset_name

FILLS = (1.0, 0.5, 0.25)


def modes() -> list[ObfuscationConfig]:
    """Every mode of the frontier: signs masked or public x fill x atom order secret or not,
    less the secret order where the public vectors reveal nothing (it is not applied there)."""
    every = [
        ObfuscationConfig(fill=fill, mask_signs=mask, permute_atoms=order)
        for fill in FILLS
        for mask in (True, False)
        for order in (False, True)
    ]
    return [mode for mode in every if not (mode.permute_atoms and reveals_nothing(mode))]


def mode_name(mode: ObfuscationConfig) -> str:
    """A short label: 'masked signs, fill 0.5, secret order'."""
    signs = "masked" if mode.mask_signs else "public"
    order = ", secret order" if mode.permute_atoms and not reveals_nothing(mode) else ""
    return f"{signs} signs, fill {mode.fill:g}{order}"


def frontier(
    model: LoadedModel,
    attacker_paths: list[Path],
    sources: dict[str, tuple[list[Path], Path | None]],
    config: AttackConfig,
    refine_steps: int = 0,
    chosen: list[ObfuscationConfig] | None = None,
    on_row: Callable[[str, dict], None] | None = None,
) -> dict[str, list[dict]]:
    """Per source of targets (name: (paths, lung mask folder or None)), one row per mode
    (default: `modes()`). Each mode's attacks are trained once (`attacks.run_attacks` on every
    source's targets together) and scored per source; ``on_row(source, row)`` hears of each
    row as it is done. Where a source has masks, a U-Net trained once on the attacker's
    originals segments its views (`primis.utility`). A source's distinguisher AUC is the mean
    of its images' AUCs."""
    from primis.attacks import run_attacks

    targets = [path for paths, _ in sources.values() for path in paths]
    bounds = np.cumsum([0] + [len(paths) for paths, _ in sources.values()])
    segmenters = {
        name: _segmenter(attacker_paths, paths, masks, config)
        for name, (paths, masks) in sources.items()
        if masks is not None
    }
    series: dict[str, list[dict]] = {name: [] for name in sources}
    for mode in chosen or modes():
        report, views = run_attacks(
            model, attacker_paths, targets, mode, config, refine_steps=refine_steps
        )
        for index, name in enumerate(sources):
            part = slice(int(bounds[index]), int(bounds[index + 1]))
            row = _row(mode, report, part)
            if name in segmenters:
                shown = {n: v[part] for n, v in views.items() if n != "originals"}
                row |= _dice(segmenters[name](shown))
            series[name].append(row)
            if on_row is not None:
                on_row(name, row)
    return series


def _row(mode: ObfuscationConfig, report: dict, part: slice) -> dict:
    """One mode's figures on the targets ``part`` of the report."""
    from primis.attacks import NOT_ATTACKS

    def mean(values: list) -> float:
        return float(np.mean(values[part]))

    rows = report["attacks"]
    psnr = {name: mean(row["psnr_per_image"]) for name, row in rows.items()}
    ssim = {name: mean(row["ssim_per_image"]) for name, row in rows.items()}
    prior = "prior only (mean image)"
    best = max((n for n in rows if n not in NOT_ATTACKS), key=psnr.get)
    found, blind = report["distinguisher"], report["distinguisher_prior_only"]
    best_ssim = max(v for n, v in ssim.items() if n not in NOT_ATTACKS)
    return {
        "mode": mode_name(mode),
        "preset": privacy_preset_name(mode),
        "obfuscation": mode.model_dump(),
        "targets": part.stop - part.start,
        "key_bpp": float(
            np.sum(report["key_bits_per_image"][part]) / np.sum(report["pixels_per_image"][part])
        ),
        "authorized_psnr": psnr["authorized (with key)"],
        "prior_psnr": psnr[prior],
        "prior_ssim": ssim[prior],
        "best_attack": best,
        "best_psnr": psnr[best],
        "psnr_gain": psnr[best] - psnr[prior],
        "best_ssim": best_ssim,
        "ssim_gain": best_ssim - ssim[prior],
        "attacks_psnr": psnr,
        "auc": mean(found["auc_per_image"]),
        "auc_prior_only": mean(blind["auc_per_image"]),
        "support_found": mean(found["support_found_per_image"]),
        "support_found_prior_only": mean(blind["support_found_per_image"]),
        "support_chance": found["support_chance"],
        "budget": report["budget"],
    } | _linkage(report, part, psnr[best] - psnr[prior], best_ssim - ssim[prior])


def _linkage(report: dict, part: slice, psnr_gain: float, ssim_gain: float) -> dict:
    """A row's linkage columns (the strongest content statistic on the targets ``part``, with
    and without the size) and whether the mode is private there: linkage at chance and the
    best attack within the margins of prior-only (`attacks.PSNR_MARGIN`, `SSIM_MARGIN`)."""
    from primis.attacks import PSNR_MARGIN, SSIM_MARGIN
    from primis.linkage import strongest, subset

    link = strongest(subset(report["linkage"], part))
    fields = ("top1", "top5", "auc")
    return {
        "linkage": {f: link[f] for f in (*fields, "top1_chance", "top5_chance", "at_chance")}
        | {
            "statistic": link["statistic"],
            "candidate_refine_steps": link["candidate_refine_steps"],
            "candidates": report["linkage"]["candidates"],
            "with_size": {f: link["with_size"][f] for f in fields},
        },
        "private": bool(
            link["at_chance"] and psnr_gain <= PSNR_MARGIN and ssim_gain <= SSIM_MARGIN
        ),
    }


def _dice(dice: dict) -> dict:
    """The lung Dice figures of a row: authorized, prior-only and the best attack's."""
    from primis.attacks import NOT_ATTACKS

    attack_dice = {n: d for n, d in dice.items() if n not in NOT_ATTACKS}
    strongest = max(attack_dice, key=attack_dice.get)
    return {
        "dice_authorized": dice["authorized (with key)"],
        "dice_prior_only": dice["prior only (mean image)"],
        "dice_best_attack": attack_dice[strongest],
        "dice_best_attack_name": strongest,
    }


def _segmenter(
    attacker_paths: list[Path], target_paths: list[Path], masks: Path, config: AttackConfig
) -> Callable[[dict], dict]:
    """Mean lung Dice of each view's images, by a U-Net trained on the attacker's originals."""
    from primis.io.images import read_image
    from primis.utility import dice, load_mask, mask_for, segment, small, train_unet

    images = [small(read_image(p)[0]) for p in attacker_paths]
    net = train_unet(
        images, [load_mask(mask_for(p, masks)) for p in attacker_paths], config.utility_steps
    )
    truth = [load_mask(mask_for(p, masks)) for p in target_paths]

    def mean_dice(views: dict) -> dict:
        result = {}
        for name, shown in views.items():
            found = segment(net, [small(i) for i in shown])
            result[name] = float(np.mean([dice(p, t) for p, t in zip(found, truth, strict=True)]))
        return result

    return mean_dice


def frontier_table(rows: list[dict]) -> str:
    """The frontier as a Markdown table."""
    from primis.report import markdown_table

    dice = "dice_best_attack" in rows[0] if rows else False
    header = ["mode", "preset", "key bpp", "authorized dB", "best attack", "PSNR dB (gain)"]
    header += ["SSIM (gain)"] + (["lung Dice: attack / prior"] if dice else [])
    header += ["AUC (prior-only)", "support found (prior-only, random)"]
    header += ["linkage top-1 / top-5 (chance)", "linkage AUC (+ size)", "private"]
    table = []
    for r in rows:
        line = [r["mode"], r["preset"], f"{r['key_bpp']:.3f}", f"{r['authorized_psnr']:.2f}"]
        line += [r["best_attack"], f"{r['best_psnr']:.2f} ({r['psnr_gain']:+.2f})"]
        line += [f"{r['best_ssim']:.3f} ({r['ssim_gain']:+.3f})"]
        if dice:
            line += [f"{r['dice_best_attack']:.3f} / {r['dice_prior_only']:.3f}"]
        line += [f"{r['auc']:.3f} ({r['auc_prior_only']:.3f})"]
        blind = r.get("support_found_prior_only")
        blind = "" if blind is None else f"{blind:.3f}, "
        line += [f"{r['support_found']:.3f} ({blind}{r['support_chance']:.3f})"]
        link = r["linkage"]
        line += [
            f"{link['top1']:.2f} / {link['top5']:.2f} ({link['top1_chance']:.2f} / "
            f"{link['top5_chance']:.2f})",
            f"{link['auc']:.3f} ({link['with_size']['auc']:.3f})",
            "yes" if r["private"] else "no",
        ]
        table.append(line)
    return markdown_table(header, table)


def frontier_plot(series: dict[str, list[dict]], path: Path) -> None:
    """Key bits per pixel (x) against the best attack's PSNR gain over prior-only (y), one
    marker shape per series (e.g. per image source), the first series' points labelled by
    mode (m/p: masked or public signs, then the fill, +o: secret atom order), as PNG."""
    from primis.io.files import write_atomic
    from primis.report import Chart

    points = [r for rows in series.values() for r in rows]
    xs, ys = [r["key_bpp"] for r in points], [r["psnr_gain"] for r in points]
    x0, x1 = max(0.0, min(xs) - 0.03), max(xs) + 0.03
    chart = Chart(
        (720, 460),
        56,
        (x0, x1),
        (min(-1.0, min(ys) - 1), max(1.0, max(ys) + 1)),
        ("key bits per pixel", "best attack PSNR - prior-only (dB)"),
        (6, ".3f", "+.1f"),
    )
    draw, at = chart.draw, chart.at
    draw.line([at(x0, 0), at(x1, 0)], fill=160)  # prior-only
    draw.text((at(x1, 0)[0] - 70, at(x1, 0)[1] - 14), "prior only", fill=100)
    legend = ["m/p: masked/public signs, then fill; +o: secret atom order"]
    for index, (name, rows) in enumerate(series.items()):
        for number, r in enumerate(rows):
            px, py = at(r["key_bpp"], r["psnr_gain"])
            box = [px - 4, py - 4, px + 4, py + 4]
            (draw.ellipse if index == 0 else draw.rectangle)(box, outline=0, width=2)
            if index == 0:
                mode = r["obfuscation"]
                label = f"{'m' if mode['mask_signs'] else 'p'}{mode['fill']:g}"
                label += "+o" if "secret order" in r["mode"] else ""
                draw.text((px + 6, py - 6 + 12 * (number % 3 - 1)), label, fill=60)
        legend.append(f"{'o' if index == 0 else '[]'} {name}")
    for line, text in enumerate(legend):
        draw.text((chart.margin + 10, 22 + 13 * line), text, fill=0)
    write_atomic(path, chart.png())


def write_frontier(series: dict[str, list[dict]], out: Path, machine: dict) -> str:
    """Write OUT/frontier.json (every row, with each learned attack's budget, and the
    ``machine`` of `report.machine_info`), OUT/frontier.md (one table per series) and
    OUT/frontier.png; return the Markdown."""
    from primis.io.files import write_atomic
    from primis.report import describe_machine, write_json

    write_json(out / "frontier.json", {"machine": machine, "series": series})
    text = f"# PRIMIS privacy frontier\n\nMeasured on {describe_machine(machine)}.\n"
    for name, rows in series.items():
        text += f"\n## {name}\n\n{frontier_table(rows)}\n"
    text += "\n![frontier](frontier.png)\n"
    write_atomic(out / "frontier.md", text.encode())
    frontier_plot(series, out / "frontier.png")
    return text
