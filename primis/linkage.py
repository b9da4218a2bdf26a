"""Linkage: which of the attacker's candidate images did a public file come from?

The attacker holds public files and a set of candidate images (a leaked set, a public dataset,
another hospital's copy of a patient's radiograph) among which the originals may be. White-box:
with the public model they encode (and may refine, as `primis ambiguate` does) every candidate
and score each (public file, candidate) pair:

    containment  the share of the candidate's non-zero entries that the public vectors can
                 hold: inside the public non-zero set, with the public sign where signs are
                 public. The true support always lies there; a wrong candidate's only by luck.
                 Every vector has the same number of public non-zeros, so under the fill's
                 noise model the count of misses is the sufficient statistic (its
                 log-likelihood ratio is monotone in it). With a secret atom order each map's
                 atoms are matched to the shown columns by the assignment that holds the most
                 entries (Hungarian algorithm), which a permutation cannot hide.
    usage        the correlation between the public file's per-(map, atom) rate of non-zero
                 entries (per sign where signs are public) and the candidate's atom usage;
                 with a secret atom order each map's rates are sorted first.
    size         whether the candidate's code grid (or its padded size class) is the public
                 grid: the header shows it.

Content statistics compare the grid both share. A candidate is ranked among all candidates,
ties at random; the report gives top-1 and top-5 accuracy against chance with exact binomial
95% intervals, and the ROC AUC of "same image" over every (public file, candidate) pair.
Linkage is at chance when chance lies inside both intervals and 0.5 inside the AUC's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from primis.config import ObfuscationConfig
from primis.obfuscation import class_grid, crop_grid, pad_public

if TYPE_CHECKING:  # torch is imported where used
    from primis.config import AttackConfig
    from primis.modelstore import LoadedModel

CONTENT_STATISTICS = ("containment", "usage")
TOP = (1, 5)


@dataclass(frozen=True)
class Shown:
    """What a public file shows: vectors (m*rows*cols, n) as stored, the grid, the number of
    maps and whether signs are masked and atoms shown in a secret order."""

    vectors: np.ndarray
    grid: tuple[int, int]
    maps: int
    mask_signs: bool
    permuted: bool

    @classmethod
    def of_file(cls, path: Path) -> Shown:
        """Read a public file as an attacker does (no key, no model needed)."""
        from primis.formats import PublicFile

        public = PublicFile.from_bytes(path.read_bytes(), path.name)
        h = public.header
        return cls(public.vectors, tuple(h.grid), h.m, h.mask_signs, h.permuted)


@dataclass(frozen=True)
class Candidate:
    """A candidate image's code as the attacker computes it: vectors (m*rows*cols, n) int8 in
    `obfuscation.code_to_vectors` order, and its grid."""

    code: np.ndarray
    grid: tuple[int, int]


def _aligned(shown: Shown, candidate: Candidate) -> tuple[np.ndarray, np.ndarray]:
    """The public vectors and the candidate's code on the (top-left) grid both cover, each
    (maps, positions, n)."""
    common = (min(shown.grid[0], candidate.grid[0]), min(shown.grid[1], candidate.grid[1]))
    return tuple(
        crop_grid(vectors, shown.maps, grid, common).reshape(shown.maps, -1, vectors.shape[1])
        for vectors, grid in ((shown.vectors, shown.grid), (candidate.code, candidate.grid))
    )


def _sign_planes(vectors: np.ndarray, mask_signs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Where a true '+' and a true '-' entry may lie (public non-zero; of that sign if shown)."""
    if mask_signs:
        live = (vectors != 0).astype(np.float32)
        return live, live
    return (vectors == 1).astype(np.float32), (vectors == -1).astype(np.float32)


def containment(shown: Shown, candidate: Candidate) -> float:
    """The share of the candidate's non-zero entries (on the shared grid) that the public
    vectors can hold; with a secret atom order, under each map's best atom assignment."""
    from scipy.optimize import linear_sum_assignment

    public, code = _aligned(shown, candidate)
    plus, minus = _sign_planes(public, shown.mask_signs)
    code_plus, code_minus = (code == 1).astype(np.float32), (code == -1).astype(np.float32)
    total = float(code_plus.sum() + code_minus.sum())
    if not shown.permuted:
        return float((code_plus * plus).sum() + (code_minus * minus).sum()) / max(total, 1.0)
    held = 0.0
    for j in range(shown.maps):
        # held[a, c]: entries of candidate atom a that shown column c can hold
        matrix = code_plus[j].T @ plus[j] + code_minus[j].T @ minus[j]
        rows, cols = linear_sum_assignment(matrix, maximize=True)
        held += float(matrix[rows, cols].sum())
    return held / max(total, 1.0)


def _rates(planes: list[np.ndarray], permuted: bool) -> np.ndarray:
    """Per-(map, atom) mean of each plane (maps, positions, n), sorted per map if permuted."""
    rates = [plane.mean(axis=1) for plane in planes]
    if permuted:
        rates = [np.sort(rate, axis=1) for rate in rates]
    return np.concatenate([rate.ravel() for rate in rates])


def usage(shown: Shown, candidate: Candidate) -> float:
    """Correlation of the public per-(map, atom) non-zero rates with the candidate's atom
    usage (0 where either is constant)."""
    public, code = _aligned(shown, candidate)
    if shown.mask_signs:
        seen, used = [public != 0], [code != 0]
    else:
        seen, used = [public == 1, public == -1], [code == 1, code == -1]
    x, y = _rates(seen, shown.permuted), _rates(used, shown.permuted)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def size_match(shown: Shown, candidate: Candidate, multiple: int) -> bool:
    """Whether the candidate's grid, as is or padded to its size class, is the public grid."""
    return shown.grid in (candidate.grid, class_grid(candidate.grid, multiple))


def score_pairs(
    shown: list[Shown], candidates: list[Candidate], multiple: int
) -> dict[str, np.ndarray]:
    """(targets, candidates) score matrices: each content statistic, ``size`` (1 where the
    grids match) and each content statistic with the size as a feature (mismatched grids
    ranked last)."""
    scores = {
        "containment": np.array([[containment(s, c) for c in candidates] for s in shown]),
        "usage": np.array([[usage(s, c) for c in candidates] for s in shown]),
    }
    same = np.array([[size_match(s, c, multiple) for c in candidates] for s in shown])
    scores["size"] = same.astype(float)
    for name in CONTENT_STATISTICS:
        # Lexicographic: a matching size first, then the content score (within [-1, 1]).
        scores[f"{name} + size"] = scores[name] + 4.0 * same
    return scores


def _interval(successes: int, trials: int) -> tuple[float, float]:
    """Exact (Clopper-Pearson) binomial 95% interval of a proportion."""
    from scipy.stats import binomtest

    ci = binomtest(successes, trials).proportion_ci(0.95, method="exact")
    return float(ci.low), float(ci.high)


def _auc_interval(auc: float, positives: int, negatives: int) -> tuple[float, float]:
    """Hanley-McNeil 95% interval of a ROC AUC, within [0, 1]."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)) / (
        positives * negatives
    )
    half = 1.96 * math.sqrt(max(var, 0.25 / (positives * negatives)))
    return max(0.0, auc - half), min(1.0, auc + half)


def ranks(scores: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rank (1 = first) of each target's true candidate, ties broken at random."""
    true = scores[np.arange(len(truth)), truth][:, None]
    above = (scores > true).sum(axis=1)
    tied = (scores == true).sum(axis=1) - 1
    return 1 + above + rng.integers(0, tied + 1)


def linkage_metrics(scores: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> dict:
    """Top-1/top-5 accuracy (with chance and exact 95% intervals), the ROC AUC of "same
    image" over all pairs (with a 95% interval) and whether all of them are at chance."""
    from primis.attacks import roc_auc

    targets, count = scores.shape
    rank = ranks(scores, truth, rng)
    labels = np.zeros(scores.shape, dtype=bool)
    labels[np.arange(targets), truth] = True
    auc = roc_auc(scores.ravel(), labels.ravel())
    low, high = _auc_interval(auc, targets, labels.size - targets)
    result = {"auc": auc, "auc_interval": [low, high], "at_chance": bool(low <= 0.5 <= high)}
    for top in TOP:
        hits = int((rank <= top).sum())
        chance = min(top, count) / count
        interval = _interval(hits, targets)
        result[f"top{top}"] = hits / targets
        result[f"top{top}_chance"] = chance
        result[f"top{top}_interval"] = list(interval)
        result["at_chance"] &= bool(interval[0] <= chance <= interval[1])
    result["median_rank"] = float(np.median(rank))
    return result


def candidate_codes(
    model: LoadedModel, images: list[np.ndarray], refine_steps: int = 0
) -> list[Candidate]:
    """Each candidate image's code as `primis ambiguate` computes it (at ``refine_steps``)."""
    import torch

    from primis.obfuscation import code_to_vectors
    from primis.sharing import RateControl, encode_images

    k = model.network.config.k
    weight = RateControl().weight_for(refine_steps, model)
    with torch.no_grad():  # refinement enables the gradients it needs
        codes = encode_images(model, images, k, refine_steps, rate_weight=weight)
    return [Candidate(code_to_vectors(c), tuple(c.shape[3:])) for c in codes]


def link(
    shown: list[Shown],
    candidates: list[Candidate],
    truth: list[int],
    multiple: int,
    seed: int = 0,
) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Each statistic's linkage metrics, each public file ranked against all candidates
    (``truth[i]``: the candidate public file ``i`` came from), and the score matrices."""
    scores = score_pairs(shown, candidates, multiple)
    return _metrics(scores, np.asarray(truth), seed), scores


def _metrics(scores: dict[str, np.ndarray], truth: np.ndarray, seed: int) -> dict[str, dict]:
    return {
        name: linkage_metrics(matrix, truth, np.random.default_rng(seed))
        for name, matrix in scores.items()
    }


def subset(result: dict, part: slice, seed: int = 0) -> dict:
    """A `link_targets` result for the targets ``part`` only (against the same candidates)."""
    truth = np.arange(part.start, part.stop)
    by_refine = {
        steps: _metrics({n: np.asarray(m)[part] for n, m in scores.items()}, truth, seed)
        for steps, scores in result["scores"].items()
    }
    return result | {"targets": len(truth), "by_refine": by_refine}


def shown_files(model: LoadedModel, targets: list, obf: ObfuscationConfig) -> list[Shown]:
    """What the public files of ``targets`` (`attacks.Target`, made with ``obf``) show, padded
    as `pad_public` pads them where ``obf.pad_size_class``."""
    from primis.obfuscation import effective

    cfg = model.network.config
    permuted = effective(obf).permute_atoms
    shown = []
    for target in targets:
        grid, vectors = target.grid, target.public
        if obf.pad_size_class:
            grid, vectors = pad_public(vectors, cfg.m, grid, cfg.downsampling)
        shown.append(Shown(vectors, grid, cfg.m, obf.mask_signs, permuted))
    return shown


def link_sets(
    shown: list[Shown], candidate_sets: dict[str, list[Candidate]], multiple: int, seed: int = 0
) -> dict:
    """`link` once per set of candidate codes (e.g. per refinement), public file ``i`` made
    from candidate ``i`` of each set. Returns ``{"targets", "candidates", "by_refine": {set:
    {statistic: metrics}}, "scores": {set: {statistic: (targets, candidates) matrix}}}``."""
    truth = list(range(len(shown)))
    by_refine, scores = {}, {}
    for name, candidates in candidate_sets.items():
        by_refine[name], matrices = link(shown, candidates, truth, multiple, seed)
        scores[name] = {statistic: matrix.tolist() for statistic, matrix in matrices.items()}
    count = len(next(iter(candidate_sets.values())))
    return {"targets": len(shown), "candidates": count, "by_refine": by_refine, "scores": scores}


def link_targets(
    model: LoadedModel,
    targets: list,
    distractors: list[np.ndarray],
    obf: ObfuscationConfig,
    candidate_refine_steps: list[int] | tuple[int, ...] = (0,),
    seed: int = 0,
) -> dict:
    """`link_sets` for the public files of ``targets`` (`shown_files`) against their
    originals and the ``distractors``, the candidates' codes computed at each of
    ``candidate_refine_steps``."""
    shown = shown_files(model, targets, obf)
    images = [t.image for t in targets] + list(distractors)
    sets = {str(steps): candidate_codes(model, images, steps) for steps in candidate_refine_steps}
    result = link_sets(shown, sets, model.network.config.downsampling, seed)
    return result | {"pad_size_class": obf.pad_size_class}


def linkage_attack(
    model: LoadedModel,
    target_images: list[np.ndarray],
    distractor_images: list[np.ndarray],
    obf: ObfuscationConfig,
    target_refine_steps: int = 0,
    candidate_refine_steps: list[int] | tuple[int, ...] = (0,),
    seed: int = 0,
) -> dict:
    """`link_targets` on public files made from ``target_images`` as `primis ambiguate` makes
    them (``target_refine_steps``)."""
    import torch

    from primis.attacks import make_targets

    with torch.no_grad():
        targets = make_targets(
            model, target_images, obf, model.network.config.k, target_refine_steps
        )
    result = link_targets(model, targets, distractor_images, obf, candidate_refine_steps, seed)
    return result | {"target_refine_steps": target_refine_steps}


def strongest(result: dict) -> dict:
    """The strongest content statistic over every candidate refinement (highest AUC): its
    metrics, its name and refinement, ``at_chance`` (whether every content statistic is at
    chance at every refinement), and the same statistic with the size as a feature
    (``with_size``) and the size alone (``size``)."""
    rows = [
        stats[name] | {"statistic": name, "candidate_refine_steps": int(steps)}
        for steps, stats in result["by_refine"].items()
        for name in CONTENT_STATISTICS
    ]
    best = max(rows, key=lambda row: row["auc"])
    stats = result["by_refine"][str(best["candidate_refine_steps"])]
    return best | {
        "at_chance": all(row["at_chance"] for row in rows),
        "with_size": stats[f"{best['statistic']} + size"],
        "size": stats["size"],
    }


def linkage_table(result: dict) -> str:
    """Markdown: per candidate refinement and statistic, top-1 and top-5 (chance, 95%
    interval), the AUC (95% interval) and whether it is at chance."""
    from primis.report import markdown_table

    def share(stats: dict, top: int) -> str:
        low, high = stats[f"top{top}_interval"]
        return f"{stats[f'top{top}']:.3f} ({stats[f'top{top}_chance']:.3f}; {low:.2f}-{high:.2f})"

    rows = [
        [
            steps,
            name,
            share(stats, 1),
            share(stats, 5),
            f"{stats['auc']:.3f} ({stats['auc_interval'][0]:.2f}-{stats['auc_interval'][1]:.2f})",
            "yes" if stats["at_chance"] else "NO",
        ]
        for steps, by_name in result["by_refine"].items()
        for name, stats in by_name.items()
    ]
    header = ["candidate refine steps", "statistic", "top-1 (chance; 95% CI)"]
    header += ["top-5 (chance; 95% CI)", "AUC (95% CI)", "at chance"]
    return markdown_table(header, rows)


def run_linkage(
    model: LoadedModel,
    attacker_paths: list[Path],
    target_paths: list[Path],
    obf: ObfuscationConfig,
    config: AttackConfig,
    refine_steps: int,
    out: Path,
) -> str:
    """`primis attack --linkage`: public files of the targets made as `primis ambiguate` makes
    them (``refine_steps``), linked against the targets' originals among the attacker's images
    (candidate codes at each ``config.linkage_refine_steps``); writes OUT/linkage.json and
    OUT/linkage.md and returns the Markdown."""
    from primis.errors import PrimisError
    from primis.io.files import write_atomic
    from primis.io.images import read_image
    from primis.report import write_json

    if set(map(Path.resolve, attacker_paths)) & set(map(Path.resolve, target_paths)):
        raise PrimisError("attacker and target images must be disjoint")
    result = linkage_attack(
        model,
        [read_image(p)[0] for p in target_paths],
        [read_image(p)[0] for p in attacker_paths],
        obf,
        refine_steps,
        config.linkage_refine_steps,
        config.seed,
    )
    best = strongest(result)
    text = (
        f"# PRIMIS linkage\n\nModel `{model.hash[:16]}`, obfuscation {obf.model_dump()}, "
        f"targets refined {refine_steps} steps; {result['targets']} public files, each ranked "
        f"against {result['candidates']} candidates (its original among the attacker's "
        f"images).\n\n{linkage_table(result)}\n\nStrongest: {best['statistic']} (candidates "
        f"refined {best['candidate_refine_steps']} steps), top-1 {best['top1']:.3f} (chance "
        f"{best['top1_chance']:.3f}), AUC {best['auc']:.3f}: "
        f"{'at chance' if best['at_chance'] else 'LINKABLE'}.\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "linkage.json", result | {"model_hash": model.hash, "strongest": best})
    write_atomic(out / "linkage.md", text.encode())
    return text
