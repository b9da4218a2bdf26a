"""Attacks on the public files (DESIGN §3), measured against the prior-only baseline.

The attacker holds every public file, the model, the code and images of the same kind (the
attacker set, disjoint from the targets), but no key. Every attack produces an image per
target; each is scored by PSNR and SSIM against the target and compared with the prior-only
baseline: the attacker set's mean image, which needs no public file at all.

    naive          decode the public vectors as they are
    top-k          per vector, keep the k +/- entries whose atoms the decoder weighs most
    random guess   a support drawn at random, consistent with the public vector
    distinguisher  a classifier on per-entry features (value, atom, map, neighbours, other
                   maps) trained on the attacker's own public files: accuracy and ROC AUC
    inversion      the public decoder fine-tuned on the attacker's (public file, image) pairs
    key space      ideal key bits an exhaustive search faces per image
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from primis.config import AttackConfig, ObfuscationConfig
from primis.data import code_crops
from primis.io.images import read_image
from primis.io.pixels import pad_to_multiple
from primis.metrics import psnr, ssim
from primis.modelstore import LoadedModel
from primis.obfuscation import (
    ambiguate_maps,
    code_to_vectors,
    image_key_bits,
    shuffle_atoms,
    vectors_to_code,
)
from primis.sharing import REFINE_STEPS, encode_images


@dataclass
class Target:
    """A target image, its true code and its public vectors (as the data owner made them)."""

    image: np.ndarray
    code: np.ndarray  # (V, n) int8, atoms in the model's order
    public: np.ndarray  # (V, n) int8, as shown in the public file
    truth: np.ndarray  # (V, n) bool: which shown entries are true ones (the secret)
    grid: tuple[int, int]


def make_targets(
    model: LoadedModel,
    images: list[np.ndarray],
    obf: ObfuscationConfig,
    k: int,
    refine_steps: int = REFINE_STEPS,
) -> list[Target]:
    """Each image's code and public vectors, made as `primis ambiguate` makes them."""
    targets = []
    maps = model.network.config.m
    for image, code in zip(images, encode_images(model, images, k, refine_steps), strict=True):
        grid = tuple(code.shape[3:])
        code = code_to_vectors(code)
        public, perms = ambiguate_maps(code, maps, k, obf)
        truth = code != 0
        rows = len(code) // maps
        for j, perm in enumerate(perms):
            if perm is not None:
                truth[j * rows : (j + 1) * rows] = shuffle_atoms(
                    truth[j * rows : (j + 1) * rows], perm
                )
        targets.append(Target(image, code, public, truth, grid))
    return targets


def _decode(model: LoadedModel, vectors: np.ndarray, target: Target) -> np.ndarray:
    cfg = model.network.config
    code = vectors_to_code(vectors, cfg.m, target.grid)
    out = model.network.decode(code)[0, 0].numpy()
    return out[: target.image.shape[0], : target.image.shape[1]]


def naive_view(model: LoadedModel, target: Target) -> np.ndarray:
    return _decode(model, target.public, target)


def topk_view(model: LoadedModel, target: Target, k: int) -> np.ndarray:
    """Keep, per vector, the k '+' and k '-' public entries with the largest magnitudes."""
    rows_per_map = target.grid[0] * target.grid[1]
    guess = np.zeros_like(target.public)
    for sign, beta in ((1, model.network.beta_pos), (-1, model.network.beta_neg)):
        weight = np.repeat(beta.detach().numpy(), rows_per_map, axis=0)  # (V, n)
        score = np.where(target.public == sign, weight, -np.inf)
        top = np.argsort(-score, axis=1)[:, :k]
        np.put_along_axis(guess, top, sign, axis=1)
    return _decode(model, guess, target)


def random_guess_view(
    model: LoadedModel, target: Target, k: int, rng: np.random.Generator, mask_signs: bool
) -> np.ndarray:
    """A support drawn uniformly among those consistent with the public vector."""
    public = target.public
    keys = rng.random(public.shape)
    guess = np.zeros_like(public)
    if mask_signs:
        chosen = np.argsort(np.where(public != 0, keys, 2.0), axis=1)[:, : 2 * k]
        np.put_along_axis(guess, chosen[:, :k], 1, axis=1)
        np.put_along_axis(guess, chosen[:, k:], -1, axis=1)
    else:
        for sign in (1, -1):
            chosen = np.argsort(np.where(public == sign, keys, 2.0), axis=1)[:, :k]
            np.put_along_axis(guess, chosen, sign, axis=1)
    return _decode(model, guess, target)


def entry_features(target: Target, m: int) -> np.ndarray:
    """Per public entry: value, atom index, map, spatial-neighbour mean of the same atom,
    the same entry in the other maps, and the vector's count of non-zeros."""
    rows, cols = target.grid
    n = target.public.shape[1]
    grid = target.public.reshape(m, rows, cols, n).astype(np.float32)
    padded = np.pad(grid, ((0, 0), (1, 1), (1, 1), (0, 0)))
    neighbours = (
        sum(
            padded[:, 1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if dy or dx
        )
        / 8.0
    )
    other_maps = (grid.sum(axis=0, keepdims=True) - grid) / max(m - 1, 1)
    atom = np.broadcast_to(np.arange(n) / n, grid.shape)
    which = np.broadcast_to(np.arange(m)[:, None, None, None] / max(m, 1), grid.shape)
    live = np.broadcast_to((grid != 0).sum(axis=3, keepdims=True) / n, grid.shape)
    features = np.stack([grid, np.abs(grid), atom, which, neighbours, other_maps, live], -1)
    features = features.astype(np.float32)
    return features.reshape(-1, features.shape[-1])


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) statistic, ties averaged."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def distinguisher(
    attacker: list[Target],
    targets: list[Target],
    m: int,
    steps: int,
    seed: int = 0,
    columns: slice = slice(None),
) -> dict:
    """An MLP on entry features, trained on the attacker's entries (true vs noise, balanced),
    tested on the targets' non-zero public entries. ``columns`` picks features: atom and map
    alone (2:4) make the prior-only distinguisher, which never looks at the public file."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    def data(items: list[Target]) -> tuple[np.ndarray, np.ndarray]:
        features = np.concatenate([entry_features(t, m) for t in items])
        labels = np.concatenate([t.truth.reshape(-1) for t in items])
        live = features[:, 1] > 0  # only non-zero public entries can be true
        return np.ascontiguousarray(features[live][:, columns]), labels[live]

    x_train, y_train = data(attacker)
    x_test, y_test = data(targets)
    positives, negatives = np.flatnonzero(y_train), np.flatnonzero(~y_train)
    net = nn.Sequential(
        nn.Linear(x_train.shape[1], 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in tqdm(range(steps), desc="distinguisher", leave=False, disable=None):
        batch = np.concatenate([rng.choice(positives, 256), rng.choice(negatives, 256)])
        x = torch.from_numpy(x_train[batch])
        y = torch.from_numpy(y_train[batch].astype(np.float32))
        loss = nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = net(torch.from_numpy(x_test))[:, 0].numpy()
    balanced = ((scores > 0) == y_test)[y_test].mean() + ((scores > 0) == y_test)[~y_test].mean()
    return {
        "auc": roc_auc(scores, y_test),
        "balanced_accuracy": float(balanced / 2),
        "test_entries": len(y_test),
        "true_share": float(y_test.mean()),
    }


def learned_inversion(
    model: LoadedModel,
    attackers: list[Target],
    targets: list[Target],
    obf: ObfuscationConfig,
    k: int,
    steps: int,
    crop: int = 128,
    batch: int = 8,
    seed: int = 0,
) -> list[np.ndarray]:
    """Fine-tune a copy of the public decoder on the attacker's own (public code, image) pairs:
    crops of the attacker images' codes, made public with fresh noise every step. Then apply it
    to the targets' public vectors."""
    import copy

    torch.manual_seed(seed)
    rng = random.Random(seed)
    # Evaluation mode throughout: the codes come from the deployed encoder (running statistics,
    # where the model has them); only what decoding uses is tuned.
    network = copy.deepcopy(model.network).eval()
    cfg = network.config
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-4)
    cells = min([crop // cfg.downsampling] + [min(a.grid) for a in attackers])
    pairs = [
        (
            pad_to_multiple(a.image, cfg.downsampling),
            vectors_to_code(a.code, cfg.m, a.grid),
        )
        for a in attackers
    ]
    for _ in tqdm(range(steps), desc="learned inversion", leave=False, disable=None):
        codes, truth = code_crops(pairs, cells, cfg.downsampling, batch, rng)
        publics = []
        for row in range(batch):
            shown, _ = ambiguate_maps(code_to_vectors(codes[row : row + 1]), cfg.m, k, obf)
            publics.append(vectors_to_code(shown, cfg.m, (cells, cells)))
        values = network.magnitudes(torch.cat(publics))
        loss = torch.mean((network.synthesis(values) - truth) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    views = []
    with torch.no_grad():
        for target in targets:
            code = vectors_to_code(target.public, cfg.m, target.grid)
            out = network.synthesis(network.magnitudes(code)).clamp(0, 1)[0, 0].numpy()
            views.append(out[: target.image.shape[0], : target.image.shape[1]])
    return views


def prior_only(attacker_images: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The attacker set's mean image, resized to ``shape``: no public file needed."""
    from skimage.transform import resize

    mean = np.mean([resize(i, (256, 256), anti_aliasing=True) for i in attacker_images], axis=0)
    return resize(mean, shape, anti_aliasing=True).astype(np.float32)


def _scores(images: list[np.ndarray], targets: list[Target]) -> dict:
    p = [psnr(t.image, i) for t, i in zip(targets, images, strict=True)]
    s = [ssim(t.image, i) for t, i in zip(targets, images, strict=True)]
    return {"psnr": float(np.mean(p)), "ssim": float(np.mean(s)), "psnr_per_image": p}


def run_attacks(
    model: LoadedModel,
    attacker_paths: list[Path],
    target_paths: list[Path],
    obf: ObfuscationConfig,
    config: AttackConfig | None = None,
    masks: Path | None = None,
    refine_steps: int = REFINE_STEPS,
) -> tuple[dict, dict]:
    """Every attack on the targets, trained as ``config`` says (default: `AttackConfig()`);
    returns (report, images for the figure). The report names the model and checks the
    targets (`target_checks`).

    Codes are made as `primis ambiguate` makes them (``refine_steps`` as there). With ``masks``
    (a folder of lung masks named like the images) the report adds the lung segmentation
    utility study of :mod:`primis.utility` for every view.
    """
    config = config or AttackConfig()
    seed = config.seed
    if set(map(Path.resolve, attacker_paths)) & set(map(Path.resolve, target_paths)):
        from primis.errors import PrimisError

        raise PrimisError("attacker and target images must be disjoint")
    k = model.network.config.k
    attacker_images = [read_image(p)[0] for p in attacker_paths]
    target_images = [read_image(p)[0] for p in target_paths]
    with torch.no_grad():
        targets = make_targets(model, target_images, obf, k, refine_steps)
        attackers = make_targets(model, attacker_images, obf, k, refine_steps)
        rng = np.random.default_rng(seed)
        views = {
            "authorized (with key)": [_decode(model, t.code, t) for t in targets],
            "naive decode": [naive_view(model, t) for t in targets],
            "top-k decode": [topk_view(model, t, k) for t in targets],
            "random support guess": [
                random_guess_view(model, t, k, rng, obf.mask_signs) for t in targets
            ],
        }
    views["learned inversion"] = learned_inversion(
        model,
        attackers,
        targets,
        obf,
        k,
        config.inversion_steps,
        config.inversion_crop,
        config.inversion_batch,
        seed,
    )
    views["prior only (mean image)"] = [prior_only(attacker_images, t.image.shape) for t in targets]
    rows = {name: _scores(images, targets) for name, images in views.items()}
    prior = rows["prior only (mean image)"]
    for row in rows.values():
        row["psnr_above_prior"] = row["psnr"] - prior["psnr"]
        row["ssim_above_prior"] = row["ssim"] - prior["ssim"]
    key_bits = [image_key_bits(t.public, model.network.config.m, k, obf) for t in targets]
    report = {
        "attacker_images": len(attacker_paths),
        "target_images": len(target_paths),
        "obfuscation": obf.model_dump(),
        "attacks": rows,
        "distinguisher": distinguisher(
            attackers, targets, model.network.config.m, config.distinguisher_steps, seed
        ),
        "distinguisher_prior_only": distinguisher(
            attackers,
            targets,
            model.network.config.m,
            config.distinguisher_steps,
            seed,
            columns=slice(2, 4),
        ),
        "key_space_bits_per_image": {
            "min": float(min(key_bits)),
            "median": float(np.median(key_bits)),
        },
    }
    if masks is not None:
        from primis.utility import load_mask, mask_for, utility_study

        def authorized(images: list[np.ndarray]) -> list[np.ndarray]:
            with torch.no_grad():
                return [_decode(model, t.code, t) for t in attackers]

        report["utility_dice"] = utility_study(
            attacker_images,
            [load_mask(mask_for(p, masks)) for p in attacker_paths],
            authorized,
            {"original": target_images, **views},
            [load_mask(mask_for(p, masks)) for p in target_paths],
            steps=config.utility_steps,
        )
    report["model_hash"] = model.hash
    report["targets"] = target_checks(report)
    return report, {"originals": target_images, **views}


def target_checks(report: dict) -> list[dict]:
    """The privacy and utility targets, each with its measured value and whether it holds."""
    attacks = {
        n: r
        for n, r in report["attacks"].items()
        if n not in ("authorized (with key)", "prior only (mean image)")
    }
    worst_psnr = max(r["psnr_above_prior"] for r in attacks.values())
    worst_ssim = max(r["ssim_above_prior"] for r in attacks.values())
    checks = [
        {
            "target": "every attack within 1 dB PSNR of prior-only",
            "value": worst_psnr,
            "holds": worst_psnr <= 1.0,
        },
        {
            "target": "every attack within 0.05 SSIM of prior-only",
            "value": worst_ssim,
            "holds": worst_ssim <= 0.05,
        },
        {
            "target": "distinguisher ROC AUC at most 0.55",
            "value": report["distinguisher"]["auc"],
            "holds": report["distinguisher"]["auc"] <= 0.55,
        },
        {
            "target": "at least 128 key bits per image",
            "value": report["key_space_bits_per_image"]["min"],
            "holds": report["key_space_bits_per_image"]["min"] >= 128,
        },
    ]
    if "utility_dice" in report:
        dice = report["utility_dice"]
        ratio = dice["authorized (with key)"]["trained_on_originals"] / max(
            dice["original"]["trained_on_originals"], 1e-9
        )
        checks.append(
            {
                "target": "lung Dice on authorized >= 0.97 x Dice on originals",
                "value": ratio,
                "holds": ratio >= 0.97,
            }
        )
    return checks


def write_report(report: dict, views: dict, out: Path) -> str:
    """Write OUT/attack.json, OUT/attack.md (tables of every attack, the distinguisher, the key
    space, the utility study and the targets) and OUT/attacks.png (``views`` of the first
    four targets); return the summary to print."""
    from primis.io.files import write_atomic
    from primis.report import image_rows, markdown_table, write_json

    rows = [
        [name, r["psnr"], r["ssim"], r["psnr_above_prior"], r["ssim_above_prior"]]
        for name, r in report["attacks"].items()
    ]
    table = markdown_table(["image", "PSNR dB", "SSIM", "PSNR - prior", "SSIM - prior"], rows)
    d = report["distinguisher"]
    key_space = report["key_space_bits_per_image"]
    text = (
        f"# PRIMIS attack report\n\nModel `{report['model_hash'][:16]}`, obfuscation "
        f"{report['obfuscation']}; {report['attacker_images']} attacker images, "
        f"{report['target_images']} targets (disjoint).\n\n{table}\n\n"
        f"Distinguisher (true vs noise entries): ROC AUC {d['auc']:.3f}, balanced accuracy "
        f"{d['balanced_accuracy']:.3f} on {d['test_entries']} target entries; the same "
        f"classifier on atom and map index alone (prior only, no public data): ROC AUC "
        f"{report['distinguisher_prior_only']['auc']:.3f}.\n\n"
        f"Key space: median {key_space['median']:.0f} bits per image "
        f"(minimum {key_space['min']:.0f}).\n\n![attacks](attacks.png)\n"
    )
    summary = []
    if "utility_dice" in report:
        dice_table = markdown_table(
            ["image", "Dice (U-Net on originals)", "Dice (U-Net on reconstructions)"],
            [
                [name, r["trained_on_originals"], r["trained_on_reconstructions"]]
                for name, r in report["utility_dice"].items()
            ],
        )
        text += f"\n## Lung segmentation utility\n\n{dice_table}\n"
        summary.append(dice_table)
    targets = markdown_table(
        ["target", "measured", "holds"],
        [[c["target"], c["value"], "yes" if c["holds"] else "NO"] for c in report["targets"]],
    )
    text += f"\n## Targets\n\n{targets}\n"
    write_json(out / "attack.json", report)
    write_atomic(out / "attack.md", text.encode())
    columns = {"original" if name == "originals" else name: v for name, v in views.items()}
    image_rows(columns, 4, out / "attacks.png")
    summary += [
        targets,
        table,
        f"distinguisher AUC {d['auc']:.3f}; key space median {key_space['median']:.0f} bits/image",
    ]
    return "\n".join(summary)
