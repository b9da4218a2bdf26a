"""The utility study (issue 27): classification, texture and segmentation on every version.

Each study image exists in six versions: the original; the authorized reconstruction by the
default path (`primis.share`, restored through `primis.RestoredDataset`) and by the other path
(`other_refine_steps`: unrefined where the default refines, else refined); JPEG 2000 at the
bytes of that image's key (what a user would otherwise ship); the best attack's image and the
prior-only image, both from the attack suite (`primis.attacks.attack_images`, trained on an
attacker set disjoint from the study images).

    classification  a small CNN trained on originals with grouped k-fold cross-validation
                    (groups: the patient where the file name gives it, else the source); the
                    out-of-fold ROC AUC of each version with a bootstrap 95% interval and a
                    paired bootstrap of its difference to the originals; and the other
                    direction: trained on authorized reconstructions, tested on originals
    texture         IBSI features (MIRP: first order, GLCM, GLRLM, GLSZM, GLDM, NGTDM) inside
                    the lung masks, Lin's concordance correlation coefficient (CCC) between
                    the originals and each version per feature, and the share of features with
                    CCC >= 0.90 and >= 0.75 per family
    segmentation    the lung Dice study of `primis.utility` on the same versions

`standard_tasks` builds the paper's two tasks from the shared data folder; `utility_report`
runs everything and `write_utility_report` writes utility.md, utility.json and the plots.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from skimage.transform import resize
from torch import nn
from tqdm import tqdm

from primis.attacks import _best_attack, attack_images, roc_auc
from primis.config import REFINE_STEPS, REFINED_STEPS, ObfuscationConfig, UtilityConfig
from primis.data import resolve_sources
from primis.errors import PrimisError
from primis.evaluation import _codec_round_trip
from primis.formats import key_path, public_path
from primis.io.files import write_atomic
from primis.io.images import list_images, read_image, read_pixels
from primis.modelstore import LoadedModel

ORIGINAL = "original"
AUTHORIZED = "authorized"
JPEG2000 = "JPEG 2000 at the key's bytes"
ATTACK = "best attack"
PRIOR = "prior only"


def other_refine_steps(refine_steps: int) -> int:
    """The second authorized version's refinement: none where the default path refines, else
    `REFINED_STEPS` (what refinement would buy)."""
    return 0 if refine_steps else REFINED_STEPS


def other_authorized(refine_steps: int) -> str:
    """The name of the second authorized version for a default path of ``refine_steps``."""
    return f"authorized, refine {other_refine_steps(refine_steps)}"


def study_versions(refine_steps: int) -> tuple[str, ...]:
    """Every version the study compares, in the order of its tables and plots."""
    return (ORIGINAL, AUTHORIZED, other_authorized(refine_steps), JPEG2000, ATTACK, PRIOR)


SUITE_AUTHORIZED = "attack suite's authorized"  # kept to compare with AUTHORIZED

# MIRP's feature families (column prefixes) and the names the issue uses for them.
FAMILIES = {
    "stat": "first order",
    "ih": "first order",
    "cm": "GLCM",
    "rlm": "GLRLM",
    "szm": "GLSZM",
    "ngl": "GLDM (MIRP: NGLDM)",
    "ngt": "NGTDM",
}
MIRP_FAMILIES = ["statistics", "intensity_histogram", "glcm", "glrlm", "glszm", "ngldm", "ngtdm"]
CCC_LEVELS = (0.90, 0.75)


@dataclass(frozen=True)
class Sample:
    """One labelled image of a classification task."""

    path: Path
    label: bool  # True: the task's positive class
    group: str  # cross-validation group: "patient:<source>:<id>" or "source:<source>"
    source: str


@dataclass(frozen=True)
class Task:
    """A binary classification task: its samples and what its classes are."""

    name: str
    positive: str
    negative: str
    samples: list[Sample]
    note: str = ""


@dataclass(frozen=True)
class MaskedImage:
    """An image with its lung mask (texture and segmentation)."""

    path: Path
    mask: Path


# Patient identifiers in file names: NIH ChestX-ray14 PATIENT_FOLLOWUP.png; Figure 1's
# COVID-NNNNN with a letter per further image of the same patient.
PATIENT_PATTERNS = (re.compile(r"^(\d{8})_\d{3}$"), re.compile(r"^COVID-(\d+)[a-z]?$"))


def group_of(path: Path, source: str) -> str:
    """The cross-validation group of an image: its patient where the file name gives one,
    else its source (every image of a source without patient identifiers in one group)."""
    for pattern in PATIENT_PATTERNS:
        found = pattern.match(path.stem)
        if found:
            return f"patient:{source}:{found.group(1)}"
    return f"source:{source}"


def _source_samples(folder: Path, source: str, label: bool, cap: int | None, seed: int) -> list:
    if not folder.is_dir():
        raise PrimisError(f"{folder}: no such folder (the utility study's data)")
    paths = list_images([folder])
    if cap is not None and len(paths) > cap:
        paths = sorted(random.Random(f"{seed}:{source}").sample(paths, cap))
    return [Sample(p, label, group_of(p, source), source) for p in paths]


def standard_tasks(
    root: Path, per_source: int | None = None, seed: int = 0, names: tuple[str, ...] = ()
) -> list[Task]:
    """The paper's classification tasks from the shared data folder ``root`` (holding ``cxr``
    and ``cxr-multi``), at most ``per_source`` images of each source folder (a seeded choice):

    - ``pneumonia``: NIH ChestX-ray14 pneumonia against no findings (one source);
    - ``covid``: COVID-19 (COVID-CXNet and Figure 1) against normal (the NIH no-findings
      images and ``cxr``, whose README describes every image as a normal radiograph).

    ``names`` picks tasks by name (default: both)."""
    multi, nih = root / "cxr-multi", root / "cxr-multi" / "nih_cxr14"
    tasks = {}
    if not names or "pneumonia" in names:
        tasks["pneumonia"] = Task(
            "pneumonia",
            "pneumonia",
            "no findings",
            _source_samples(nih / "pneumonia", "nih_cxr14", True, per_source, seed)
            + _source_samples(nih / "no_findings", "nih_cxr14", False, per_source, seed),
            "Both classes come from one source (NIH ChestX-ray14, 1024 x 1024 PNG).",
        )
    if not names or "covid" in names:
        tasks["covid"] = Task(
            "covid",
            "COVID-19",
            "normal",
            _source_samples(multi / "covid_cxnet", "covid_cxnet", True, per_source, seed)
            + _source_samples(multi / "figure1_covid", "figure1_covid", True, per_source, seed)
            + _source_samples(nih / "no_findings", "nih_cxr14", False, per_source, seed)
            + _source_samples(root / "cxr" / "images", "cxr", False, per_source, seed),
            "The classes come from different sources (COVID-19: COVID-CXNet and Figure 1, "
            "many hospitals, portable films, JPEG; normal: NIH PNGs and the cxr teaching set). "
            "A classifier can separate them by source (size, compression, markers, exposure) "
            "without seeing disease, so this AUC is an upper bound on what it says about "
            "COVID-19, and a version that keeps the source's look keeps the AUC.",
        )
    unknown = set(names) - set(tasks)
    if unknown:
        raise PrimisError(f"unknown task(s) {sorted(unknown)}: expected pneumonia, covid")
    return list(tasks.values())


def masked_images(root: Path, count: int | None = None, seed: int = 0) -> list[MaskedImage]:
    """The images of ``root`` (``cxr``'s layout: images/<stem>.jpg, lung-masks/<stem>.png),
    at most ``count`` of them (a seeded choice)."""
    from primis.utility import mask_for

    paths = list_images([root / "images"]) if (root / "images").is_dir() else []
    if not paths:
        raise PrimisError(f"{root / 'images'}: no images (the texture and segmentation set)")
    if count is not None and len(paths) > count:
        paths = sorted(random.Random(f"{seed}:masked").sample(paths, count))
    return [MaskedImage(p, mask_for(p, root / "lung-masks")) for p in paths]


def prepare(path: Path, max_side: int) -> np.ndarray:
    """The image as 8-bit grey spanning 0..255, its longer side at most ``max_side``
    (anti-aliased): every version is made from these pixels; the original is they / 255."""
    unit = read_image(path)[0]
    scale = max_side / max(unit.shape)
    if scale < 1:
        shape = tuple(max(1, round(s * scale)) for s in unit.shape)
        unit = resize(unit, shape, anti_aliasing=True)
    # Stretched to span 0..255 again (as `read_image` spans [0, 1]), so that sharing maps the
    # 8-bit pixels to [0, 1] by / 255: every version lies in the originals' scale.
    low, high = float(unit.min()), float(unit.max())
    unit = (unit - low) / (high - low) if high > low else np.zeros_like(unit)
    return np.rint(unit * 255).astype(np.uint8)


def prepare_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    mask = read_pixels(path) > 0
    return resize(mask.astype(np.float32), shape, order=0, anti_aliasing=False) > 0.5


# --- versions ----------------------------------------------------------------------------


def authorized_versions(
    model: LoadedModel,
    images: list[np.ndarray],
    refine_steps: int,
    obfuscation: ObfuscationConfig,
    progress: str,
) -> tuple[list[np.ndarray], list[int]]:
    """Share each 8-bit image, write its public file and key, and restore them all through
    `primis.RestoredDataset` (what a user training on shared data reads): the images in
    [0, 1] and each key's bytes."""
    from primis.api import RestoredDataset, share

    key_bytes = []
    with tempfile.TemporaryDirectory(prefix="primis-utility-") as folder:
        public_dir, key_dir = Path(folder) / "public", Path(folder) / "keys"
        public_dir.mkdir()
        key_dir.mkdir()
        for index, image in enumerate(tqdm(images, desc=progress, leave=False, disable=None)):
            shared = share(image, model, refine_steps=refine_steps, obfuscation=obfuscation)
            public_path(public_dir, f"{index:06d}").write_bytes(shared.public)
            key_path(key_dir, f"{index:06d}").write_bytes(shared.key)
            key_bytes.append(len(shared.key))
        dataset = RestoredDataset(public_dir, key_dir, model)
        restored = [dataset[i][0].numpy().astype(np.float32) for i in range(len(dataset))]
    return restored, key_bytes


def jpeg2000_versions(
    images: list[np.ndarray], key_bytes: list[int]
) -> tuple[list[np.ndarray], list[float]]:
    """Each image through JPEG 2000 at its key's bits per pixel: images and the bpp spent."""
    out = [
        _codec_round_trip(i, "jpeg2000", 8 * b / i.size)
        for i, b in zip(images, key_bytes, strict=True)
    ]
    return [o for o, _ in out], [b for _, b in out]


# --- statistics ---------------------------------------------------------------------------


def _resamples(labels: np.ndarray, count: int, seed: int) -> list[np.ndarray]:
    """Stratified bootstrap resamples (positives and negatives drawn separately)."""
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
    return [
        np.concatenate(
            [rng.choice(positives, len(positives)), rng.choice(negatives, len(negatives))]
        )
        for _ in range(count)
    ]


def auc_with_interval(scores: np.ndarray, labels: np.ndarray, resamples: list) -> dict:
    """ROC AUC and its bootstrap 95% percentile interval."""
    values = [roc_auc(scores[r], labels[r]) for r in resamples]
    low, high = np.percentile(values, [2.5, 97.5])
    return {"auc": roc_auc(scores, labels), "low": float(low), "high": float(high)}


def paired_difference(
    scores: np.ndarray, reference: np.ndarray, labels: np.ndarray, resamples: list
) -> dict:
    """AUC(scores) - AUC(reference) on the same images, with a paired bootstrap 95% interval
    (both AUCs on each resample)."""
    values = [roc_auc(scores[r], labels[r]) - roc_auc(reference[r], labels[r]) for r in resamples]
    low, high = np.percentile(values, [2.5, 97.5])
    return {
        "difference": roc_auc(scores, labels) - roc_auc(reference, labels),
        "low": float(low),
        "high": float(high),
    }


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's concordance correlation coefficient of two samples (population moments); 1 for
    two equal constants, NaN where fewer than three pairs are finite."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = np.asarray(x, float)[keep], np.asarray(y, float)[keep]
    if len(x) < 3:
        return float("nan")
    mx, my = x.mean(), y.mean()
    covariance = np.mean((x - mx) * (y - my))
    denominator = x.var() + y.var() + (mx - my) ** 2
    if denominator == 0:
        return 1.0
    return float(2 * covariance / denominator)


# --- classification ----------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-pool stages and a linear head: (B,1,S,S) -> one logit per image."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for out in (width, 2 * width, 4 * width, 8 * width):
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5).mean((2, 3)))[:, 0]


def square(image: np.ndarray, size: int) -> np.ndarray:
    return resize(image, (size, size), anti_aliasing=True).astype(np.float32)


def train_cnn(images: np.ndarray, labels: np.ndarray, steps: int, seed: int) -> SmallCNN:
    """Train on (N,S,S) images with balanced batches of 32 and horizontal flips."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = SmallCNN()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    x_all, y_all = torch.from_numpy(images)[:, None], torch.from_numpy(labels.astype(np.float32))
    classes = [np.flatnonzero(labels == c) for c in (False, True) if (labels == c).any()]
    for _ in range(steps):
        index = np.concatenate([rng.choice(c, 32 // len(classes)) for c in classes])
        x, y = x_all[index], y_all[index]
        if rng.random() < 0.5:
            x = x.flip(3)
        loss = nn.functional.binary_cross_entropy_with_logits(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def cnn_scores(net: SmallCNN, images: np.ndarray) -> np.ndarray:
    return torch.cat([net(torch.from_numpy(c)[:, None]) for c in np.array_split(images, 8)]).numpy()


def grouped_folds(groups: list[str], labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Indices of ``folds`` test folds, stratified where the groups allow: every group in one
    fold; groups (largest first, ties in a seeded order) each to the fold holding the fewest
    images of the group's majority class, then the fewest images. Folds of equal class shares
    keep the pooled out-of-fold AUC of a classifier that cannot tell the classes apart at 0.5
    (with unequal shares each fold's training balance tilts its scores, and the pooled AUC of
    even a constant image falls below 0.5)."""
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    order = sorted(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))
    chosen: list[list[int]] = [[] for _ in range(folds)]
    for group in order:
        label = bool(np.mean(labels[members[group]]) >= 0.5)
        fold = min(chosen, key=lambda f: (int(np.sum(labels[f] == label)) if f else 0, len(f)))
        fold.extend(members[group])
    return [np.array(sorted(f)) for f in chosen if f]


def classification_study(
    task: Task,
    views: dict[str, list[np.ndarray]],
    config: UtilityConfig,
) -> dict:
    """Out-of-fold scores of a CNN trained on originals for every version, one trained on
    authorized reconstructions scored on originals; AUCs, intervals and paired differences."""
    labels = np.array([s.label for s in task.samples])
    small = {
        name: np.stack([square(i, config.cnn_size) for i in images])
        for name, images in views.items()
    }
    folds = grouped_folds([s.group for s in task.samples], labels, config.folds, config.seed)
    scores = {name: np.zeros(len(labels)) for name in views}
    reverse = np.zeros(len(labels))
    single_class = 0
    for number, test in enumerate(
        tqdm(folds, desc=f"{task.name}: folds", leave=False, disable=None)
    ):
        train = np.setdiff1d(np.arange(len(labels)), test)
        single_class += len(set(labels[train])) < 2
        seed = config.seed + number
        net = train_cnn(small[ORIGINAL][train], labels[train], config.cnn_steps, seed)
        for name in views:
            scores[name][test] = cnn_scores(net, small[name][test])
        net = train_cnn(small[AUTHORIZED][train], labels[train], config.cnn_steps, seed)
        reverse[test] = cnn_scores(net, small[ORIGINAL][test])
    resamples = _resamples(labels, config.bootstrap, config.seed)
    rows = {}
    for name, values in scores.items():
        rows[name] = auc_with_interval(values, labels, resamples)
        rows[name]["vs_original"] = paired_difference(values, scores[ORIGINAL], labels, resamples)
    reversed_row = auc_with_interval(reverse, labels, resamples)
    reversed_row["vs_original"] = paired_difference(reverse, scores[ORIGINAL], labels, resamples)
    rows["trained on authorized, tested on originals"] = reversed_row
    attack_vs_prior = paired_difference(scores[ATTACK], scores[PRIOR], labels, resamples)
    return {
        "task": task.name,
        "positive": task.positive,
        "negative": task.negative,
        "note": task.note,
        "images": len(labels),
        "positives": int(labels.sum()),
        "sources": sorted({s.source for s in task.samples}),
        "groups": len({s.group for s in task.samples}),
        "folds": [len(f) for f in folds],
        "folds_trained_on_one_class": int(single_class),
        "versions": rows,
        "attack_vs_prior_only": attack_vs_prior,
    }


def classification_targets(rows: dict, attack_vs_prior: dict) -> list[dict]:
    """The issue's targets: authorized within 0.02 AUC of the originals (paired difference);
    the attacker's images and the prior-only image no better than chance or prior-only. Chance
    is two-sided: an AUC well below 0.5 ranks the classes too (inverted), so an image is at
    chance only where its 95% interval holds 0.5, and the attack is no better than prior-only
    only where their paired difference's interval holds 0."""
    authorized = rows[AUTHORIZED]["vs_original"]
    prior, attack = rows[PRIOR], rows[ATTACK]
    return [
        {
            "target": "authorized AUC within 0.02 of the originals' (paired difference)",
            "value": authorized["difference"],
            "interval": [authorized["low"], authorized["high"]],
            "met": authorized["difference"] >= -0.02,
            "shown_by_interval": authorized["low"] >= -0.02,
        },
        {
            "target": "prior-only image at chance (95% interval holds 0.5)",
            "value": prior["auc"],
            "interval": [prior["low"], prior["high"]],
            "met": _holds(prior, 0.5),
        },
        {
            "target": "best attack at chance, or no different from the prior-only image "
            "(paired interval holds 0)",
            "value": attack["auc"],
            "interval": [attack["low"], attack["high"]],
            "met": _holds(attack, 0.5) or _holds(attack_vs_prior, 0.0),
        },
    ]


def _holds(interval: dict, value: float) -> bool:
    return interval["low"] <= value <= interval["high"]


# --- texture ------------------------------------------------------------------------------


def texture_features(image: np.ndarray, mask: np.ndarray, bins: int) -> dict[str, float]:
    """IBSI features of MIRP inside ``mask`` (2-D), intensities in [0, 1] discretised to a
    fixed number of ``bins`` over the mask's range (IBSI "fixed bin number")."""
    try:
        from mirp import extract_features
    except ImportError:
        raise PrimisError("the texture study needs MIRP: pip install 'primis[utility]'") from None

    # MIRP logs each image at INFO through the root logger (and configures it on first use):
    # silenced, and the root logger's handlers and level left as they were.
    root, disabled = logging.getLogger(), logging.root.manager.disable
    handlers, level = list(root.handlers), root.level
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = extract_features(
                image=np.asarray(image, np.float32)[None],
                mask=np.asarray(mask, bool)[None],
                by_slice=True,
                base_feature_families=MIRP_FAMILIES,
                base_discretisation_method="fixed_bin_number",
                base_discretisation_n_bins=bins,
            )[0]
    finally:
        logging.disable(disabled)
        root.handlers[:], root.level = handlers, level
    return {
        column: float(table[column].iloc[0])
        for column in table.columns
        if column.split("_")[0] in FAMILIES
    }


def family_of(feature: str) -> str:
    return FAMILIES[feature.split("_")[0]]


def texture_study(views: dict[str, list[np.ndarray]], masks: list[np.ndarray], bins: int) -> dict:
    """Per version: each feature's CCC against the originals (``views`` holds ORIGINAL) and,
    per family, how many features reach each of CCC_LEVELS."""
    features = {
        name: [
            texture_features(i, m, bins)
            for i, m in tqdm(
                zip(images, masks, strict=True),
                desc=f"texture: {name}",
                leave=False,
                total=len(masks),
                disable=None,
            )
        ]
        for name, images in views.items()
    }
    names = list(features[ORIGINAL][0])
    reference = {f: np.array([row[f] for row in features[ORIGINAL]]) for f in names}
    result = {}
    for version, rows in features.items():
        values = {f: ccc(reference[f], np.array([row[f] for row in rows])) for f in names}
        families: dict[str, dict] = {}
        for family in dict.fromkeys(FAMILIES.values()):
            scores = [v for f, v in values.items() if family_of(f) == family and np.isfinite(v)]
            families[family] = {
                "features": len(scores),
                **{f"share_ccc_{level:.2f}": _share(scores, level) for level in CCC_LEVELS},
                "median_ccc": float(np.median(scores)) if scores else float("nan"),
            }
        finite = [v for v in values.values() if np.isfinite(v)]
        families["all"] = {
            "features": len(finite),
            **{f"share_ccc_{level:.2f}": _share(finite, level) for level in CCC_LEVELS},
            "median_ccc": float(np.median(finite)) if finite else float("nan"),
        }
        result[version] = {"families": families, "ccc": values}
    return {"images": len(masks), "bins": bins, "versions": result}


def _share(scores: list[float], level: float) -> float:
    return float(np.mean(np.array(scores) >= level)) if scores else float("nan")


# --- the whole study ----------------------------------------------------------------------


@dataclass
class UtilityInputs:
    """What `utility_report` measures: classification tasks, masked images (texture and
    segmentation) and the attacker's own images (dropped where they are study images)."""

    tasks: list[Task]
    masked: list[MaskedImage]
    attacker_paths: list[Path]
    attackers: int | None = 60
    notes: list[str] = field(default_factory=list)


def study_inputs(
    root: Path,
    attacker_data: Path,
    attackers: int | None,
    tasks: str,
    per_source: int | None,
    masked: int | None,
    seed: int,
) -> UtilityInputs:
    """The inputs of `primis utility`: the ``tasks`` named (comma-separated; empty: none) and
    at most ``masked`` masked images (0: none; None: all) from the shared data folder ``root``
    (see `standard_tasks`), and the attacker's images of ``attacker_data`` (folder or list)."""
    names = tuple(n.strip() for n in tasks.split(",") if n.strip())
    return UtilityInputs(
        standard_tasks(root, per_source, seed, names) if names else [],
        [] if masked == 0 else masked_images(root / "cxr", masked, seed),
        resolve_sources(attacker_data),
        attackers,
    )


class StageCache:
    """The completed stages of one study, kept in ``folder`` under a digest of everything that
    decides their results (``identity``), so that the same study run again resumes after its
    last completed stage, and a changed one starts afresh. Without a folder nothing is kept."""

    def __init__(self, folder: Path | None, identity: dict) -> None:
        text = json.dumps(identity, sort_keys=True, default=str).encode()
        self.folder = folder / hashlib.sha256(text).hexdigest()[:16] if folder else None
        self.resumed: list[str] = []

    def _path(self, stage: str, suffix: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / (re.sub(r"[^a-z0-9]+", "-", stage.lower()) + suffix)

    def load(self, stage: str) -> dict | None:
        """A completed stage's results (JSON), or None."""
        path = self._path(stage, ".json")
        if path is None or not path.is_file():
            return None
        self.resumed.append(stage)
        return json.loads(path.read_text())

    def save(self, stage: str, results: dict) -> None:
        if (path := self._path(stage, ".json")) is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(results).encode())

    def load_images(self, stage: str) -> dict[str, list[np.ndarray]] | None:
        """A completed stage's images by name, or None."""
        path = self._path(stage, ".npz")
        if path is None or not path.is_file():
            return None
        with np.load(path) as stored:
            names = json.loads(str(stored["names"]))
            return {
                name: [stored[f"{j}_{i}"] for i in range(count)]
                for j, (name, count) in enumerate(names)
            }

    def save_images(self, stage: str, images: dict[str, list[np.ndarray]]) -> None:
        if (path := self._path(stage, ".npz")) is None:
            return
        arrays = {
            f"{j}_{i}": image
            for j, group in enumerate(images.values())
            for i, image in enumerate(group)
        }
        names = json.dumps([[name, len(group)] for name, group in images.items()])
        buffer = io.BytesIO()
        np.savez_compressed(buffer, names=np.array(names), **arrays)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buffer.getvalue())


def _shared_versions(
    model: LoadedModel,
    eight_bit: list[np.ndarray],
    originals: list[np.ndarray],
    attacker_images: list[np.ndarray],
    config: UtilityConfig,
    refine_steps: int,
    obfuscation: ObfuscationConfig,
) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """The versions that sharing, JPEG 2000 and the attack suite make (the study's costly
    part), with their figures and each part's seconds."""
    seconds = {}
    start = time.perf_counter()
    authorized, key_bytes = authorized_versions(
        model, eight_bit, refine_steps, obfuscation, "sharing (default)"
    )
    other = other_refine_steps(refine_steps)
    authorized_other, other_key_bytes = authorized_versions(
        model, eight_bit, other, obfuscation, f"sharing (refine {other})"
    )
    seconds["sharing"] = time.perf_counter() - start
    start = time.perf_counter()
    jpeg2000, jpeg2000_bpp = jpeg2000_versions(originals, key_bytes)
    seconds["jpeg2000"] = time.perf_counter() - start
    start = time.perf_counter()
    attack_report, attack_views, _ = attack_images(
        model, attacker_images, originals, obfuscation, config.attack, refine_steps
    )
    seconds["attacks"] = time.perf_counter() - start
    best = _best_attack(attack_report["attacks"])["name"]
    figures = {
        "key_bytes": key_bytes,
        "other_key_bytes": other_key_bytes,
        "jpeg2000_bpp": jpeg2000_bpp,
        "best_attack": best,
        "attack_psnr": {n: r["psnr"] for n, r in attack_report["attacks"].items()},
        "seconds": seconds,
    }
    versions = {
        AUTHORIZED: authorized,
        other_authorized(refine_steps): authorized_other,
        JPEG2000: jpeg2000,
        ATTACK: attack_views[best],
        PRIOR: attack_views["prior only (mean image)"],
        SUITE_AUTHORIZED: attack_views["authorized (with key)"],
    }
    return figures, versions


def utility_report(
    model: LoadedModel,
    inputs: UtilityInputs,
    config: UtilityConfig | None = None,
    refine_steps: int = REFINE_STEPS,
    obfuscation: ObfuscationConfig | None = None,
    cache: Path | None = None,
) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """Run the utility study (module docstring) on ``inputs`` with ``model``; returns the
    report (JSON-ready) and every version's images (for figures).

    ``refine_steps`` is the default path's refinement (the second authorized version takes
    `other_refine_steps`); ``obfuscation`` defaults to the model's. The attack suite trains as
    ``config.attack`` says on at most ``inputs.attackers`` attacker images (a seeded choice)
    that are not study images. With ``cache`` (a folder) each completed stage is kept there
    (`StageCache`): the same study run again resumes after its last completed stage."""
    config = config or UtilityConfig()
    obfuscation = obfuscation or model.obfuscation
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    paths = list(
        dict.fromkeys(
            [s.path.resolve() for t in inputs.tasks for s in t.samples]
            + [m.path.resolve() for m in inputs.masked]
        )
    )
    if not paths:
        raise PrimisError("the utility study needs labelled or masked images")
    study = set(paths)
    attacker_paths = [p for p in inputs.attacker_paths if p.resolve() not in study]
    dropped = len(inputs.attacker_paths) - len(attacker_paths)
    if inputs.attackers is not None and len(attacker_paths) > inputs.attackers:
        attacker_paths = sorted(random.Random(config.seed).sample(attacker_paths, inputs.attackers))
    if len(attacker_paths) < 2:
        raise PrimisError("the attack suite needs at least 2 attacker images outside the study")
    eight_bit = [
        prepare(p, config.max_side) for p in tqdm(paths, desc="reading", leave=False, disable=None)
    ]
    originals = [i.astype(np.float32) / 255 for i in eight_bit]
    attacker_images = [prepare(p, config.max_side).astype(np.float32) / 255 for p in attacker_paths]
    stages = StageCache(
        cache,
        {
            "model": model.hash,
            "config": config.model_dump(),
            "refine_steps": refine_steps,
            "other_refine_steps": other_refine_steps(refine_steps),
            "obfuscation": obfuscation.model_dump(),
            "study": [str(p) for p in paths],
            "attackers": [str(p) for p in attacker_paths],
        },
    )
    figures, versions = stages.load("versions"), stages.load_images("versions")
    if figures is None or versions is None:
        figures, versions = _shared_versions(
            model, eight_bit, originals, attacker_images, config, refine_steps, obfuscation
        )
        stages.save_images("versions", versions)
        stages.save("versions", figures)
    timings = dict(figures["seconds"])
    key_bytes, other_key_bytes = figures["key_bytes"], figures["other_key_bytes"]
    best = figures["best_attack"]
    views = {ORIGINAL: originals} | {
        v: versions[v] for v in study_versions(refine_steps) if v != ORIGINAL
    }

    def staged(stage: str, run: Callable[[], dict]) -> dict:
        """A stage's results, from the cache or run (and kept), its seconds in ``timings``."""
        done = stages.load(stage)
        if done is None:
            start = time.perf_counter()
            done = {"results": run(), "seconds": time.perf_counter() - start}
            stages.save(stage, done)
        timings[stage] = done["seconds"]
        return done["results"]

    index = {p: i for i, p in enumerate(paths)}
    pixels = [i.size for i in originals]
    from primis.metrics import psnr

    report: dict = {
        "model_hash": model.hash,
        "refine_steps": refine_steps,
        "other_refine_steps": other_refine_steps(refine_steps),
        "obfuscation": obfuscation.model_dump(),
        "config": config.model_dump(),
        "study_images": len(paths),
        "attacker_images": len(attacker_paths),
        "attacker_images_dropped_as_study_images": dropped,
        "best_attack": best,
        "attack_psnr": figures["attack_psnr"],
        "key_bits_per_pixel": float(8 * np.sum(key_bytes) / np.sum(pixels)),
        "key_bits_per_pixel_other": float(8 * np.sum(other_key_bytes) / np.sum(pixels)),
        "jpeg2000_bits_per_pixel": float(
            np.sum(np.multiply(figures["jpeg2000_bpp"], pixels)) / np.sum(pixels)
        ),
        "psnr": {
            name: float(np.mean([psnr(o, v) for o, v in zip(originals, images, strict=True)]))
            for name, images in views.items()
            if name != ORIGINAL
        },
        # The default authorized version against the attack suite's "authorized (with key)"
        # (the same codes, up to 8-bit rounding and the batching of the refinement).
        "authorized_vs_attack_suite": _differences(
            versions[AUTHORIZED], versions[SUITE_AUTHORIZED]
        ),
        "notes": list(inputs.notes),
    }
    report["classification"] = {}
    for task in inputs.tasks:
        chosen = [index[s.path.resolve()] for s in task.samples]
        task_views = {name: [images[i] for i in chosen] for name, images in views.items()}
        result = staged(
            f"classification: {task.name}",
            lambda task=task, task_views=task_views: classification_study(task, task_views, config),
        )
        # Judged here, not kept with the stage: a resumed study meets today's targets.
        targets = classification_targets(result["versions"], result["attack_vs_prior_only"])
        report["classification"][task.name] = result | {"targets": targets}
    if inputs.masked:
        chosen = [index[m.path.resolve()] for m in inputs.masked]
        masks = [
            prepare_mask(m.mask, originals[i].shape)
            for m, i in zip(inputs.masked, chosen, strict=True)
        ]
        masked_views = {name: [images[i] for i in chosen] for name, images in views.items()}
        report["texture"] = staged(
            "texture", lambda: texture_study(masked_views, masks, config.texture_bins)
        )
        report["segmentation"] = staged(
            "segmentation", lambda: segmentation_study(views, chosen, inputs.masked, config)
        )
    # Every stage's seconds, whichever run measured it; "total" sums them.
    report["seconds"] = {**timings, "total": sum(timings.values())}
    report["resumed_stages"] = stages.resumed
    report["this_run_seconds"] = time.perf_counter() - started
    return report, views


def _differences(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    gaps = [np.abs(x - y) for x, y in zip(a, b, strict=True)]
    return {
        "max": float(max(g.max() for g in gaps)),
        "mean": float(np.mean([g.mean() for g in gaps])),
    }


def segmentation_study(
    views: dict[str, list[np.ndarray]], chosen: list[int], masked: list, config: UtilityConfig
) -> dict:
    """`primis.utility.utility_study` on the masked images: U-Nets trained on a seeded half
    (originals; authorized reconstructions), Dice on the other half in every version."""
    from primis.utility import load_mask, utility_study

    order = list(range(len(chosen)))
    random.Random(config.seed).shuffle(order)
    half = len(order) // 2
    train, test = order[:half], order[half:]
    if not train or not test:
        return {"skipped": "fewer than 2 masked images"}
    masks = [load_mask(m.mask) for m in masked]
    dice = utility_study(
        [views[ORIGINAL][chosen[i]] for i in train],
        [masks[i] for i in train],
        lambda _: [views[AUTHORIZED][chosen[i]] for i in train],
        {name: [images[chosen[i]] for i in test] for name, images in views.items()},
        [masks[i] for i in test],
        steps=config.unet_steps,
    )
    return {"train_images": len(train), "test_images": len(test), "dice": dice}


# --- report -------------------------------------------------------------------------------


def _interval(row: dict, key: str = "auc") -> str:
    return f"{row[key]:.3f} [{row['low']:.3f}, {row['high']:.3f}]"


def write_utility_report(
    report: dict, views: dict[str, list[np.ndarray]], out: Path, machine: dict
) -> str:
    """utility.md, utility.json, auc.png, texture.png and versions.png in ``out``; returns
    a summary line."""
    from primis.io.files import write_atomic
    from primis.report import describe_machine, image_rows, markdown_table, write_json

    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "machine": machine}
    write_json(out / "utility.json", report)
    image_rows(views, min(4, len(views[ORIGINAL])), out / "versions.png")
    write_atomic(out / "auc.png", auc_plot(report))
    if "texture" in report:
        write_atomic(out / "texture.png", texture_plot(report["texture"]))
    seconds = report["seconds"]
    parts = [
        "# Utility study: classification, texture and segmentation on every version\n",
        f"Model `{report['model_hash'][:12]}`, default path with {report['refine_steps']} "
        f"refinement steps; obfuscation {report['obfuscation']}. {report['study_images']} "
        f"study images, each first resized to at most {report['config']['max_side']} px on "
        f"its longer side (8-bit); attack suite trained on {report['attacker_images']} "
        f"attacker images (none of them a study image). Run time "
        f"{seconds['total']:.0f} s on {describe_machine(machine)}.\n",
        "## Versions\n",
        markdown_table(
            ["version", "PSNR dB vs original", "bits per pixel"],
            [
                [AUTHORIZED, report["psnr"][AUTHORIZED], report["key_bits_per_pixel"]],
                [
                    other_authorized(report["refine_steps"]),
                    report["psnr"][other_authorized(report["refine_steps"])],
                    report["key_bits_per_pixel_other"],
                ],
                [JPEG2000, report["psnr"][JPEG2000], report["jpeg2000_bits_per_pixel"]],
                [f"{ATTACK} ({report['best_attack']})", report["psnr"][ATTACK], "public file only"],
                [PRIOR, report["psnr"][PRIOR], "none"],
            ],
        ),
        "\nBits per pixel: the key files (authorized) and the JPEG 2000 files, each made at its "
        "image's key size. Figure: versions.png (one row per image).\n",
    ]
    for name, task in report.get("classification", {}).items():
        rows = [
            [
                version,
                _interval(row),
                _interval(row["vs_original"], "difference"),
            ]
            for version, row in task["versions"].items()
        ]
        parts += [
            f"## Classification: {task['positive']} against {task['negative']} ({name})\n",
            f"{task['images']} images ({task['positives']} {task['positive']}), sources "
            f"{', '.join(task['sources'])}; {task['groups']} cross-validation groups in "
            f"{len(task['folds'])} folds of {task['folds']} images"
            + (
                f" ({task['folds_trained_on_one_class']} trained on one class only: a source "
                "without patient identifiers is one group)"
                if task["folds_trained_on_one_class"]
                else ""
            )
            + ". A small CNN trained on the originals scores each version of the held-out "
            "fold; the last row is a CNN trained on authorized reconstructions scoring the "
            "originals. ROC AUC of the pooled out-of-fold scores with stratified bootstrap "
            "95% intervals; the difference to the originals is paired (same resamples).\n",
            markdown_table(["version", "ROC AUC [95% CI]", "AUC - original [95% CI]"], rows),
            f"\n{task['note']}\n",
            _targets(task["targets"]),
        ]
    if "texture" in report:
        texture = report["texture"]
        rows = [
            [
                version,
                family,
                row["features"],
                row["share_ccc_0.90"],
                row["share_ccc_0.75"],
                row["median_ccc"],
            ]
            for version, entry in texture["versions"].items()
            if version != ORIGINAL
            for family, row in entry["families"].items()
        ]
        parts += [
            "## Texture: IBSI features inside the lung masks\n",
            f"{texture['images']} masked images; MIRP (IBSI-compliant) in 2-D: first order "
            "(statistics, intensity histogram), GLCM, GLRLM, GLSZM, GLDM (MIRP's NGLDM) and "
            "NGTDM, texture matrices averaged over directions; intensities in [0, 1] "
            f"discretised to a fixed bin number of {texture['bins']} over the mask's range. "
            "Lin's CCC between the originals and each version per feature, across images. "
            "Plot: texture.png (share with CCC >= 0.90).\n",
            markdown_table(
                ["version", "family", "features", "CCC >= 0.90", "CCC >= 0.75", "median CCC"],
                rows,
            ),
            "",
            _texture_verdict(texture),
        ]
    if "segmentation" in report and "dice" in report["segmentation"]:
        seg = report["segmentation"]
        parts += [
            "## Segmentation: lung Dice\n",
            f"U-Nets trained on {seg['train_images']} masked images (originals; authorized "
            f"reconstructions), Dice on the other {seg['test_images']} in every version.\n",
            markdown_table(
                ["version", "U-Net trained on originals", "trained on authorized"],
                [
                    [v, d["trained_on_originals"], d["trained_on_reconstructions"]]
                    for v, d in seg["dice"].items()
                ],
            ),
            "",
        ]
    resumed = report.get("resumed_stages") or []
    parts += [
        "## Run time\n",
        ", ".join(f"{stage} {value:.0f} s" for stage, value in seconds.items()) + ".",
        *(
            [f"Resumed: {', '.join(resumed)} (kept from an earlier run of the same study)."]
            if resumed
            else []
        ),
    ]
    parts += [f"\n{note}" for note in report.get("notes", [])]
    write_atomic(out / "utility.md", ("\n".join(parts) + "\n").encode())
    return one_line(report)


def _targets(targets: list[dict]) -> str:
    lines = []
    for t in targets:
        interval = t.get("interval")
        shown = f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
        lines.append(
            f"- {t['target']}: {t['value']:+.3f}{shown}: {'met' if t['met'] else 'NOT met'}"
        )
    return "Targets:\n\n" + "\n".join(lines) + "\n"


def _texture_verdict(texture: dict) -> str:
    authorized = texture["versions"][AUTHORIZED]["families"]["all"]["share_ccc_0.90"]
    codec = texture["versions"][JPEG2000]["families"]["all"]["share_ccc_0.90"]
    verdict = "at least as reproducible as" if authorized >= codec else "less reproducible than"
    return (
        f"Authorized reconstructions are {verdict} JPEG 2000 at the key's bytes: "
        f"{authorized:.0%} of features at CCC >= 0.90 against {codec:.0%}.\n"
    )


def one_line(report: dict) -> str:
    """The study in one line: each task's AUC difference, texture and Dice of the authorized
    version."""
    parts = []
    for name, task in report.get("classification", {}).items():
        d = task["versions"][AUTHORIZED]["vs_original"]
        parts.append(f"{name}: authorized AUC {d['difference']:+.3f} vs originals")
    if "texture" in report:
        row = report["texture"]["versions"][AUTHORIZED]["families"]["all"]
        parts.append(f"texture: {row['share_ccc_0.90']:.0%} of features CCC >= 0.90")
    seg = report.get("segmentation", {}).get("dice")
    if seg:
        parts.append(f"lung Dice {seg[AUTHORIZED]['trained_on_originals']:.3f}")
    parts.append(f"{report['seconds']['total']:.0f} s")
    return "; ".join(parts)


# Each version's grey in the plots; the second authorized version (its name follows its
# refinement) takes the one left.
SHADES = {ORIGINAL: 0, AUTHORIZED: 60, JPEG2000: 150, ATTACK: 190, PRIOR: 215}


def _shade(version: str) -> int:
    return SHADES.get(version, 110)


def auc_plot(report: dict) -> bytes:
    """Each task's AUC per version with its 95% interval (one block of whiskers per task)."""
    from primis.report import Chart

    tasks = report.get("classification", {})
    versions = study_versions(report["refine_steps"])
    chart = Chart(
        (120 + 260 * max(1, len(tasks)), 420),
        50,
        (0, max(1, len(tasks))),
        (0.0, 1.0),
        ("task (versions left to right, dark to light)", "ROC AUC"),
        (max(2, len(tasks) + 1), "", ".1f"),
    )
    for t, (name, task) in enumerate(tasks.items()):
        chart.draw.text(chart.at(t + 0.05, 0.04), name, fill=0)
        for v, version in enumerate(versions):
            row = task["versions"][version]
            x = t + 0.1 + 0.8 * v / (len(versions) - 1)
            chart.draw.line(
                [chart.at(x, row["low"]), chart.at(x, row["high"])],
                fill=_shade(version),
            )
            cx, cy = chart.at(x, row["auc"])
            chart.draw.rectangle([cx - 4, cy - 4, cx + 4, cy + 4], fill=_shade(version))
    chart.draw.line([chart.at(0, 0.5), chart.at(max(1, len(tasks)), 0.5)], fill=200)
    _legend(chart, versions)
    return chart.png()


def texture_plot(texture: dict) -> bytes:
    """Share of features with CCC >= 0.90, per family (groups) and version (bars)."""
    from primis.report import Chart

    families = [*dict.fromkeys(FAMILIES.values()), "all"]
    versions = [v for v in texture["versions"] if v != ORIGINAL]
    chart = Chart(
        (140 + 110 * len(families), 420),
        60,
        (0, len(families)),
        (0.0, 1.0),
        ("feature family", "share with CCC >= 0.90"),
        (2, "", ".1f"),
    )
    for f, family in enumerate(families):
        chart.draw.text((chart.at(f + 0.05, 0.0)[0], chart.height - 40), family[:16], fill=0)
        for v, version in enumerate(versions):
            share = texture["versions"][version]["families"][family]["share_ccc_0.90"]
            if not np.isfinite(share):
                continue
            left, right = f + 0.1 + 0.8 * v / len(versions), f + 0.1 + 0.8 * (v + 1) / len(versions)
            (x0, y0), (x1, y1) = chart.at(left, share), chart.at(right, 0.0)
            chart.draw.rectangle([x0, y0, x1 - 1, y1], fill=_shade(version), outline=0)
    _legend(chart, versions)
    return chart.png()


def _legend(chart, versions) -> None:
    for v, version in enumerate(versions):
        x, y = chart.width - chart.margin - 190, 8 + 14 * v
        chart.draw.rectangle([x, y + 2, x + 9, y + 11], fill=_shade(version), outline=0)
        chart.draw.text((x + 14, y), version, fill=0)
