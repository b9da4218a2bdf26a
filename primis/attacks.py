"""Attacks on the public files (SECURITY.md: threat model), against the prior-only baseline.

The attacker holds every public file, the model, the code and images of the same kind (the
attacker set, disjoint from the targets), but no key. Every attack produces an image per
target; each is scored by PSNR and SSIM against the target and compared with the prior-only
baseline: the attacker set's mean image, which needs no public file at all.

    naive          decode the public vectors as they are
    top-k          per vector, keep the k +/- entries whose atoms the decoder weighs most
    random guess   a support drawn at random, consistent with the public vector
    prior MAP      the most probable support under the attacker's prior over codes (atom
                   usage in the context of the neighbours' codes, with couplings,
                   `keys.KeyModel` fitted to the attacker's own true codes), among the public
                   candidates
    distinguisher  a convolutional classifier over the whole public tensor (every map, every
                   position, spatial context: each entry with its neighbours of the same atom,
                   summaries of its vector and a learned embedding of its atom), trained on
                   the attacker's own public files against their true supports: ROC AUC,
                   the share of each vector's support it finds, and the image its guess
                   decodes to
    inversion      a spatial-context network from the whole public tensor to the decoder's
                   input, trained with a copy of the public decoder on the attacker's own
                   (public file, image) pairs
    key space      the key's coded bits an exhaustive search faces per image
    linkage        which of the attacker's images (the targets' originals among the attacker
                   set) each public file came from (`primis.linkage`): top-1, top-5 and
                   ROC AUC against chance

Learned attacks train on crops of the attacker's true codes, made public with fresh noise at
every step (as many public files per image as steps), and report their budget: training
images, steps, crops and seconds. With ``AttackConfig.budget_check`` each trains twice as long
and is scored at both budgets: a difference under 0.5 dB says the budget suffices.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from primis.config import AttackConfig, ObfuscationConfig
from primis.data import code_crops
from primis.errors import PrimisError
from primis.io.images import read_image
from primis.io.pixels import pad_to_multiple
from primis.keys import KeyModel, encode_key, fit_key_model, key_spec
from primis.keys.context import most_probable_code
from primis.metrics import psnr, ssim
from primis.modelstore import LoadedModel
from primis.obfuscation import (
    allowed_atoms,
    ambiguate_maps,
    code_to_vectors,
    noise_count,
    shuffle_atoms,
    vectors_to_code,
)
from primis.sharing import MIN_KEY_BITS, REFINE_STEPS, RateControl, encode_images

# Adam's learning rates of the learned attacks, and the side at which the prior-only baseline
# averages the attacker's images.
DISTINGUISHER_LR = 2e-3
INVERSION_LR = 3e-4
PRIOR_SIDE = 256


@dataclass
class Target:
    """A target image, its true code and its public vectors (as the data owner made them)."""

    image: np.ndarray
    code: np.ndarray  # (V, n) int8, atoms in the model's order
    public: np.ndarray  # (V, n) int8, as shown in the public file
    truth: np.ndarray  # (V, n) bool: which shown entries are true ones (the secret)
    grid: tuple[int, int]
    key_bits: float = 0.0  # the key's information: its coded payload (as `ambiguate` codes it)


def shown_truth(code: np.ndarray, perms: list[np.ndarray | None]) -> np.ndarray:
    """(V, n) bool: which entries of the public vectors, as shown, are true ones."""
    truth = code != 0
    rows = len(code) // len(perms)
    for j, perm in enumerate(perms):
        if perm is not None:
            part = slice(j * rows, (j + 1) * rows)
            truth[part] = shuffle_atoms(truth[part], perm)
    return truth


def make_targets(
    model: LoadedModel,
    images: list[np.ndarray],
    obf: ObfuscationConfig,
    k: int,
    refine_steps: int = REFINE_STEPS,
    keys: bool = False,
) -> list[Target]:
    """Each image's code and public vectors, made as `primis ambiguate` makes them; with
    ``keys``, also the size of the key that opens every map."""
    targets = []
    maps = model.network.config.m
    weight = RateControl().weight_for(refine_steps, model)
    codes = encode_images(model, images, k, refine_steps, rate_weight=weight)
    for image, code in zip(images, codes, strict=True):
        grid = tuple(code.shape[3:])
        code = code_to_vectors(code)
        public, perms = ambiguate_maps(code, maps, k, obf)
        bits = 0.0
        if keys:
            spec = key_spec(model.key_coder, list(range(maps)), grid, k, obf, perms)
            bits = encode_key(model.key_coder, code, public, perms, spec)[1]
        targets.append(Target(image, code, public, shown_truth(code, perms), grid, bits))
    return targets


def _decode(model: LoadedModel, vectors: np.ndarray, target: Target) -> np.ndarray:
    cfg = model.network.config
    code = vectors_to_code(vectors, cfg.m, target.grid)
    out = model.network.decode(code)[0, 0].numpy()
    return out[: target.image.shape[0], : target.image.shape[1]]


def authorized_view(model: LoadedModel, target: Target) -> np.ndarray:
    """What the key restores: the target's code decoded and, for a model with a high-fidelity
    layer (`primis.fidelity`), the layer added, as `primis.sharing.reconstruct` adds it."""
    view = _decode(model, target.code, target)
    psnr = model.network.config.residual_psnr
    if psnr is None:
        return view
    from primis.fidelity import MAX_STEPS, add_residual, code_residual

    return add_residual(view, code_residual(target.image, view, MAX_STEPS, psnr), MAX_STEPS)


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


def prior_map_view(
    model: LoadedModel, target: Target, prior: KeyModel, k: int, mask_signs: bool
) -> np.ndarray:
    """Decode the support the attacker's ``prior`` finds most probable among the public
    candidates (`keys.context.most_probable_code`): with public signs, k of the '+' entries and
    k of the '-' entries; with masked signs, 2k of the non-zero entries, signs from the prior."""
    allowed = allowed_atoms(target.public, mask_signs)
    return _decode(model, most_probable_code(prior, target.grid, k, allowed), target)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) statistic, ties averaged."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    positives = labels.sum()
    negatives = len(labels) - positives
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _as_code(vectors: np.ndarray, m: int, grid: tuple[int, int]) -> torch.Tensor:
    """Vectors (V, n) -> a float code tensor (1, m, n, rows, cols): the public tensor."""
    return vectors_to_code(vectors, m, grid).float()


def _training_pairs(model: LoadedModel, attackers: list[Target]) -> list:
    """(padded image, true code) of each attacker image, for `code_crops`."""
    cfg = model.network.config
    return [
        (pad_to_multiple(a.image, cfg.downsampling), vectors_to_code(a.code, cfg.m, a.grid))
        for a in attackers
    ]


def _public_crops(
    pairs: list,
    model: LoadedModel,
    obf: ObfuscationConfig,
    k: int,
    cells: int,
    batch: int,
    rng: random.Random,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random crops of the attacker's codes, each made public with fresh noise (and a fresh
    atom order, where the obfuscation shuffles): public tensors (B, m, n, cells, cells), which
    of their entries are true (same shape, float) and the pixels they cover."""
    cfg = model.network.config
    codes, pixels = code_crops(pairs, cells, cfg.downsampling, batch, rng)
    shown, truth = [], []
    for row in range(batch):
        vectors = code_to_vectors(codes[row : row + 1])
        public, perms = ambiguate_maps(vectors, cfg.m, k, obf)
        shown.append(_as_code(public, cfg.m, (cells, cells)))
        truth.append(_as_code(shown_truth(vectors, perms).astype(np.int8), cfg.m, (cells, cells)))
    return torch.cat(shown), torch.cat(truth), pixels


def _cells(model: LoadedModel, attackers: list[Target], crop: int) -> int:
    """Code positions per side of the training crops: ``crop`` pixels, within every image."""
    return min([crop // model.network.config.downsampling] + [min(a.grid) for a in attackers])


def _train(
    parameters: list[nn.Parameter],
    loss: Callable[[], torch.Tensor],
    budgets: list[int],
    evaluate: Callable[[], dict],
    lr: float,
    desc: str,
) -> list[dict]:
    """Adam at a constant rate for max(``budgets``) steps; after each budget's step count,
    ``evaluate()`` with the steps and training seconds so far added."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    results, seconds = [], 0.0
    for step in tqdm(range(1, max(budgets) + 1), desc=desc, leave=False, disable=None):
        started = time.perf_counter()
        value = loss()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        seconds += time.perf_counter() - started
        if step in budgets:
            results.append({"steps": step, "seconds": seconds} | evaluate())
    return results


class SupportNet(nn.Module):
    """Per entry of the public tensor (B, m, n, rows, cols): the logit that it is a true one.

    One small convolutional network runs over each atom's plane (an entry and its neighbours
    of the same atom, 7 x 7 positions of context), shared by all atoms, with four inputs per
    entry: its value, whether it is non-zero, and its vector's mean value and share of
    non-zeros; plus a learned embedding of its (map, atom), which carries the model's atom
    preferences where atoms are shown in their own order (and nothing where the order is
    secret). ``sees_public`` False zeroes the four public inputs: the prior-only classifier.
    """

    def __init__(
        self, m: int, n: int, sees_public: bool = True, width: int = 32, embedding: int = 8
    ) -> None:
        super().__init__()
        self.sees_public = sees_public
        self.atoms = nn.Parameter(0.1 * torch.randn(m, n, embedding))
        self.net = nn.Sequential(
            nn.Conv2d(4 + embedding, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 1, 1),
        )

    def planes(self, public: torch.Tensor) -> torch.Tensor:
        """Public tensors (B, m, n, h, w) -> one input plane per entry's atom (B*m*n, F, h, w)."""
        b, m, n, h, w = public.shape
        live = public.abs()
        seen = torch.stack(
            [
                public,
                live,
                public.mean(2, keepdim=True).expand_as(public),
                live.mean(2, keepdim=True).expand_as(public),
            ],
            3,
        )
        if not self.sees_public:
            seen = torch.zeros_like(seen)
        atoms = self.atoms.view(1, m, n, -1, 1, 1).expand(b, m, n, -1, h, w)
        return torch.cat([seen, atoms], 3).flatten(0, 2)

    def forward(self, public: torch.Tensor, chunk: int = 128) -> torch.Tensor:
        """Logits of the shape of ``public``, computed ``chunk`` planes at a time."""
        planes = self.planes(public)
        logits = torch.cat([self.net(planes[i : i + chunk]) for i in range(0, len(planes), chunk)])
        return logits.view(public.shape)


def support_guess(scores: np.ndarray, public: np.ndarray, k: int, mask_signs: bool) -> np.ndarray:
    """Per vector, the support that ``scores`` (V, n) rank highest among the public candidates:
    k of the '+' entries and k of the '-' entries with public signs, else 2k of the non-zero
    entries; valued as the public vector shows them."""
    guess = np.zeros_like(public)
    parts = [public != 0] if mask_signs else [public == 1, public == -1]
    for candidates in parts:
        ranked = np.argsort(np.where(candidates, -scores, np.inf), axis=1, kind="stable")
        chosen = ranked[:, : 2 * k // len(parts)]
        np.put_along_axis(guess, chosen, np.take_along_axis(public, chosen, axis=1), axis=1)
    return guess


def distinguisher(
    model: LoadedModel,
    attackers: list[Target],
    targets: list[Target],
    obf: ObfuscationConfig,
    k: int,
    config: AttackConfig,
    budgets: list[int],
    sees_public: bool = True,
) -> list[dict]:
    """Train a `SupportNet` on the attacker's public crops (balanced loss over their non-zero
    entries) and score it on the targets' non-zero entries at each budget: ROC AUC, balanced
    accuracy, ``support_found`` (the share of each vector's true entries among the 2k it ranks
    first, against ``support_chance`` for a random pick) and the decoded guess (``views``)."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    cfg = model.network.config
    net = SupportNet(cfg.m, cfg.n, sees_public)
    pairs = _training_pairs(model, attackers)
    cells = _cells(model, attackers, config.distinguisher_crop)

    def loss() -> torch.Tensor:
        public, truth, _ = _public_crops(
            pairs, model, obf, k, cells, config.distinguisher_batch, rng
        )
        planes = net.planes(public)
        pick = torch.randperm(len(planes))[: config.distinguisher_planes]
        logits = net.net(planes[pick])[:, 0]
        live = public.flatten(0, 2)[pick] != 0
        label = truth.flatten(0, 2)[pick][live]
        share = label.mean().clamp(1e-3, 1 - 1e-3)  # true entries weigh as much as noise
        return nn.functional.binary_cross_entropy_with_logits(
            logits[live], label, pos_weight=(1 - share) / share
        )

    def evaluate() -> dict:
        scores, labels, found, views = [], [], [], []
        with torch.no_grad():
            for target in targets:
                score = code_to_vectors(net(_as_code(target.public, cfg.m, target.grid)))
                live = target.public != 0
                scores.append(score[live])
                labels.append(target.truth[live])
                guess = support_guess(score, target.public, k, obf.mask_signs)
                found.append(float(((guess != 0) & target.truth).sum() / target.truth.sum()))
                views.append(_decode(model, guess, target))
        pooled, truth = np.concatenate(scores), np.concatenate(labels)
        right = (pooled > 0) == truth
        return {
            "auc": roc_auc(pooled, truth),
            "balanced_accuracy": float((right[truth].mean() + right[~truth].mean()) / 2),
            "support_found": float(np.mean(found)),
            "auc_per_image": [roc_auc(*pair) for pair in zip(scores, labels, strict=True)],
            "support_found_per_image": found,
            "views": views,
        }

    results = _train(
        list(net.parameters()), loss, budgets, evaluate, DISTINGUISHER_LR, "distinguisher"
    )
    live = 2 * k + noise_count(cfg.n, k, obf.fill)
    for result in results:
        result |= {"test_entries": int(sum((t.public != 0).sum() for t in targets))}
        result["support_chance"] = 2 * k / live
    return results


class ContextInversion(nn.Module):
    """The public tensor (B, m, n, h, w) -> an image: a convolutional network with spatial
    context (every map and atom in, values and where they are non-zero, 5 x 5 positions)
    adds its output to the decoder input that the public vectors give, and a copy of the
    public decoder (tuned too) makes the image. Its last layer starts at zero: training starts
    from the naive decode."""

    def __init__(self, model: LoadedModel, width: int = 128) -> None:
        super().__init__()
        # Evaluation mode throughout: only what decoding uses is tuned.
        self.network = copy.deepcopy(model.network).eval()
        channels = model.network.config.m * model.network.config.n
        self.context = nn.Sequential(
            nn.Conv2d(2 * channels, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, channels, 1),
        )
        nn.init.zeros_(self.context[-1].weight)
        nn.init.zeros_(self.context[-1].bias)

    def forward(self, public: torch.Tensor) -> torch.Tensor:
        values = self.network.magnitudes(public)
        seen = torch.cat([public.flatten(1, 2), public.flatten(1, 2).abs()], 1)
        context = self.context(seen).view_as(values)
        return self.network.synthesis(values + context)


def learned_inversion(
    model: LoadedModel,
    attackers: list[Target],
    targets: list[Target],
    obf: ObfuscationConfig,
    k: int,
    config: AttackConfig,
    budgets: list[int],
) -> list[dict]:
    """Train a `ContextInversion` on the attacker's public crops against their pixels, then
    apply it to the targets' public files at each budget (``views``)."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    net = ContextInversion(model)
    pairs = _training_pairs(model, attackers)
    cells = _cells(model, attackers, config.inversion_crop)
    cfg = model.network.config

    def loss() -> torch.Tensor:
        public, _, pixels = _public_crops(pairs, model, obf, k, cells, config.inversion_batch, rng)
        return torch.mean((net(public) - pixels) ** 2)

    def evaluate() -> dict:
        views = []
        with torch.no_grad():
            for target in targets:
                out = net(_as_code(target.public, cfg.m, target.grid)).clamp(0, 1)[0, 0].numpy()
                views.append(out[: target.image.shape[0], : target.image.shape[1]])
        return {"views": views}

    trainable = [p for p in net.parameters() if p.requires_grad]
    return _train(trainable, loss, budgets, evaluate, INVERSION_LR, "learned inversion")


def prior_only(attacker_images: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """The attacker set's mean image, resized to ``shape``: no public file needed."""
    from skimage.transform import resize

    side = (PRIOR_SIDE, PRIOR_SIDE)
    mean = np.mean([resize(i, side, anti_aliasing=True) for i in attacker_images], axis=0)
    return resize(mean, shape, anti_aliasing=True).astype(np.float32)


def _scores(images: list[np.ndarray], targets: list[Target]) -> dict:
    p = [psnr(t.image, i) for t, i in zip(targets, images, strict=True)]
    s = [ssim(t.image, i) for t, i in zip(targets, images, strict=True)]
    return {
        "psnr": float(np.mean(p)),
        "ssim": float(np.mean(s)),
        "psnr_per_image": p,
        "ssim_per_image": s,
    }


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
    returns (report, images for the figure). The report names the model, states each learned
    attack's budget (and, with ``config.budget_check``, its scores at half that budget), sums
    up the best attack and checks the targets (`target_checks`).

    Codes are made as `primis ambiguate` makes them (``refine_steps`` as there). With ``masks``
    (a folder of lung masks named like the images) the report adds the lung segmentation
    utility study of :mod:`primis.utility` for every view.
    """
    config = config or AttackConfig()
    if set(map(Path.resolve, attacker_paths)) & set(map(Path.resolve, target_paths)):
        raise PrimisError("attacker and target images must be disjoint")
    attacker_images = [read_image(p)[0] for p in attacker_paths]
    target_images = [read_image(p)[0] for p in target_paths]
    report, views, attackers = attack_images(
        model, attacker_images, target_images, obf, config, refine_steps
    )
    if masks is not None:
        from primis.utility import load_mask, mask_for, utility_study

        def authorized(images: list[np.ndarray]) -> list[np.ndarray]:
            with torch.no_grad():
                return [authorized_view(model, t) for t in attackers]

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


def attack_images(
    model: LoadedModel,
    attacker_images: list[np.ndarray],
    target_images: list[np.ndarray],
    obf: ObfuscationConfig,
    config: AttackConfig,
    refine_steps: int = REFINE_STEPS,
) -> tuple[dict, dict[str, list[np.ndarray]], list[Target]]:
    """`run_attacks` on images in [0, 1] already read (the attacker's and the targets'):
    (report without the model hash and target checks, each attack's image per target, the
    attacker's own codes)."""
    k = model.network.config.k
    with torch.no_grad():
        targets = make_targets(model, target_images, obf, k, refine_steps, keys=True)
        attackers = make_targets(model, attacker_images, obf, k, refine_steps)
        views = _untrained_views(model, targets, attackers, obf, k, config.seed)
    learned, prior_only_distinguisher = _learned_attacks(model, attackers, targets, obf, config)
    for name, results in learned.items():
        views[name] = results[-1]["views"]
    views[PRIOR_ONLY] = [prior_only(attacker_images, t.image.shape) for t in targets]
    rows = _score_rows(views, targets)
    report = {
        "attacker_images": len(attacker_images),
        "target_images": len(target_images),
        "obfuscation": obf.model_dump(),
        "refine_steps": refine_steps,
        "attacks": rows,
        "best_attack": _best_attack(rows),
        "distinguisher": _without_views(learned["distinguisher support"][-1]),
        "distinguisher_prior_only": _without_views(prior_only_distinguisher),
        "budget": {
            name: _budget(results, targets, len(attackers), config, name)
            for name, results in learned.items()
        },
        **_key_space(targets),
    }
    from primis.linkage import link_targets

    report["linkage"] = link_targets(
        model, targets, attacker_images, obf, config.linkage_refine_steps, config.seed
    )
    return report, views, attackers


def _untrained_views(
    model: LoadedModel,
    targets: list[Target],
    attackers: list[Target],
    obf: ObfuscationConfig,
    k: int,
    seed: int,
) -> dict[str, list[np.ndarray]]:
    """The authorized view and those of the attacks that train nothing, per target: naive and
    top-k decoding, a random support guess (drawn with ``seed``) and the support most probable
    under the prior fitted to the attacker's own codes."""
    prior = fit_key_model(((a.code, a.grid) for a in attackers), k, couplings=True)
    rng = np.random.default_rng(seed)
    return {
        AUTHORIZED: [authorized_view(model, t) for t in targets],
        "naive decode": [naive_view(model, t) for t in targets],
        "top-k decode": [topk_view(model, t, k) for t in targets],
        "random support guess": [
            random_guess_view(model, t, k, rng, obf.mask_signs) for t in targets
        ],
        "prior MAP support": [prior_map_view(model, t, prior, k, obf.mask_signs) for t in targets],
    }


def _learned_attacks(
    model: LoadedModel,
    attackers: list[Target],
    targets: list[Target],
    obf: ObfuscationConfig,
    config: AttackConfig,
) -> tuple[dict[str, list[dict]], dict]:
    """The attacks that train, each scored at its budget (and, with ``config.budget_check``,
    at twice it), and the prior-only distinguisher (blind to the public inputs: ``sees_public``
    off) at the largest budget."""
    k = model.network.config.k
    factor = [1, 2] if config.budget_check else [1]
    distinguisher_budgets = [f * config.distinguisher_steps for f in factor]
    learned = {
        "distinguisher support": distinguisher(
            model, attackers, targets, obf, k, config, distinguisher_budgets
        ),
        "learned inversion": learned_inversion(
            model, attackers, targets, obf, k, config, [f * config.inversion_steps for f in factor]
        ),
    }
    prior_only_distinguisher = distinguisher(
        model, attackers, targets, obf, k, config, [max(distinguisher_budgets)], False
    )[0]
    return learned, prior_only_distinguisher


def _score_rows(views: dict[str, list[np.ndarray]], targets: list[Target]) -> dict[str, dict]:
    """Each view's scores (`_scores`), with its PSNR and SSIM above prior-only's."""
    rows = {name: _scores(images, targets) for name, images in views.items()}
    prior_row = rows[PRIOR_ONLY]
    for row in rows.values():
        row["psnr_above_prior"] = row["psnr"] - prior_row["psnr"]
        row["ssim_above_prior"] = row["ssim"] - prior_row["ssim"]
    return rows


def _key_space(targets: list[Target]) -> dict:
    """The key's coded bits per target (min, median, each) and per pixel, and the targets'
    pixel counts."""
    pixels = [t.image.size for t in targets]
    key_bits = [t.key_bits for t in targets]
    return {
        "key_space_bits_per_image": {
            "min": float(min(key_bits)),
            "median": float(np.median(key_bits)),
        },
        "key_bits_per_pixel": float(np.sum(key_bits) / np.sum(pixels)),
        "key_bits_per_image": key_bits,
        "pixels_per_image": pixels,
    }


AUTHORIZED = "authorized (with key)"
PRIOR_ONLY = "prior only (mean image)"
NOT_ATTACKS = (AUTHORIZED, PRIOR_ONLY)
# A mode is private when every attack stays within these margins of prior-only and linkage is
# at chance (`private`).
PSNR_MARGIN = 1.0
SSIM_MARGIN = 0.05
# ... and the distinguisher's ROC AUC within this of the prior-only classifier's; the lung
# segmentation keeps this share of its Dice on authorized reconstructions.
AUC_MARGIN = 0.02
DICE_SHARE = 0.97
BUDGET_FIELDS = ("training_images", "crops_per_step", "crop_pixels")


def _best_attack(rows: dict) -> dict:
    """The attack of highest PSNR (and the highest SSIM of any attack), against prior-only."""
    attacks = {name: row for name, row in rows.items() if name not in NOT_ATTACKS}
    best = max(attacks, key=lambda name: attacks[name]["psnr"])
    return {
        "name": best,
        "psnr": attacks[best]["psnr"],
        "psnr_above_prior": attacks[best]["psnr_above_prior"],
        "ssim": max(row["ssim"] for row in attacks.values()),
        "ssim_above_prior": max(row["ssim_above_prior"] for row in attacks.values()),
    }


def _without_views(result: dict) -> dict:
    return {name: value for name, value in result.items() if name != "views"}


def _budget(
    results: list[dict], targets: list[Target], images: int, config: AttackConfig, name: str
) -> dict:
    """A learned attack's budget and its score at each budget trained (PSNR of its view)."""
    inversion = name == "learned inversion"
    crop = config.inversion_crop if inversion else config.distinguisher_crop
    batch = config.inversion_batch if inversion else config.distinguisher_batch
    trained = []
    for result in results:
        scores = _scores(result["views"], targets)
        row = {"steps": result["steps"], "seconds": result["seconds"], "psnr": scores["psnr"]}
        trained.append(row | ({} if inversion else {"auc": result["auc"]}))
    budget = {
        "training_images": images,
        "crops_per_step": batch,
        "crop_pixels": crop,
        "trained": trained,
    }
    if len(trained) > 1:
        budget["psnr_change_on_doubling"] = trained[-1]["psnr"] - trained[-2]["psnr"]
    return budget


def target_checks(report: dict) -> list[dict]:
    """The privacy and utility targets, each with its measured value and whether it holds."""
    worst_psnr = report["best_attack"]["psnr_above_prior"]
    worst_ssim = report["best_attack"]["ssim_above_prior"]
    checks = [
        {
            "target": f"every attack within {PSNR_MARGIN:g} dB PSNR of prior-only",
            "value": worst_psnr,
            "holds": worst_psnr <= PSNR_MARGIN,
        },
        {
            "target": f"every attack within {SSIM_MARGIN:g} SSIM of prior-only",
            "value": worst_ssim,
            "holds": worst_ssim <= SSIM_MARGIN,
        },
        {
            # The attacker's prior alone (which atoms the model likes) ranks true entries above
            # noise; what the public file adds to it is the leak.
            "target": f"distinguisher ROC AUC within {AUC_MARGIN:g} of the prior-only classifier's",
            "value": report["distinguisher"]["auc"] - report["distinguisher_prior_only"]["auc"],
            "holds": report["distinguisher"]["auc"]
            <= report["distinguisher_prior_only"]["auc"] + AUC_MARGIN,
        },
        {
            "target": f"at least {MIN_KEY_BITS} key bits per image",
            "value": report["key_space_bits_per_image"]["min"],
            "holds": report["key_space_bits_per_image"]["min"] >= MIN_KEY_BITS,
        },
    ]
    if "linkage" in report:
        from primis.linkage import strongest

        link = strongest(report["linkage"])
        checks.append(
            {
                "target": "linkage to the original among the candidates at chance (top-1, "
                "top-5 and AUC within their 95% intervals)",
                "value": link["auc"],
                "holds": link["at_chance"],
            }
        )
    if "utility_dice" in report:
        dice = report["utility_dice"]
        ratio = dice[AUTHORIZED]["trained_on_originals"] / max(
            dice["original"]["trained_on_originals"], 1e-9
        )
        checks.append(
            {
                "target": f"lung Dice on authorized >= {DICE_SHARE:g} x Dice on originals",
                "value": ratio,
                "holds": ratio >= DICE_SHARE,
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
    best = report["best_attack"]
    budget = markdown_table(
        ["attack", "training images", "crops/step", "crop px", "steps", "seconds", "PSNR dB"],
        [
            [name, *(b[f] for f in BUDGET_FIELDS), *(t[f] for f in ("steps", "seconds", "psnr"))]
            for name, b in report["budget"].items()
            for t in b["trained"]
        ],
    )
    text = (
        f"# PRIMIS attack report\n\nModel `{report['model_hash'][:16]}`, obfuscation "
        f"{report['obfuscation']}, refine steps {report['refine_steps']}; "
        f"{report['attacker_images']} attacker images, {report['target_images']} targets "
        f"(disjoint). Key: {report['key_bits_per_pixel']:.3f} bits per pixel (coded "
        f"payload).\n\n{table}\n\n"
        f"Best attack: {best['name']}, {best['psnr_above_prior']:+.2f} dB PSNR and "
        f"{best['ssim_above_prior']:+.3f} SSIM (best of any attack) against prior-only.\n\n"
        f"Distinguisher (true vs noise entries, spatial context): ROC AUC {d['auc']:.3f}, "
        f"balanced accuracy {d['balanced_accuracy']:.3f} on {d['test_entries']} target entries; "
        f"its top 2k entries per vector hold {d['support_found']:.3f} of the true support "
        f"(a random pick: {d['support_chance']:.3f}). The same classifier on the atom and map "
        f"alone (prior only, no public data): ROC AUC "
        f"{report['distinguisher_prior_only']['auc']:.3f}.\n\n"
        f"Key space: median {key_space['median']:.0f} bits per image "
        f"(minimum {key_space['min']:.0f}).\n\n## Budget of the learned attacks\n\n{budget}\n"
        "\nEach trains on fresh public crops of the attacker images at every step; with the "
        "budget check it is scored at half its steps too.\n\n![attacks](attacks.png)\n"
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
    if "linkage" in report:
        from primis.linkage import linkage_table

        link = report["linkage"]
        text += (
            f"\n## Linkage\n\nEach of the {link['targets']} public files ranked against "
            f"{link['candidates']} candidates (its original among the attacker's images); "
            f"'+ size' uses the public grid too.\n\n{linkage_table(link)}\n"
        )
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
        f"distinguisher AUC {d['auc']:.3f}, support found {d['support_found']:.3f} (chance "
        f"{d['support_chance']:.3f}); best attack {best['name']} {best['psnr_above_prior']:+.2f}"
        f" dB over prior-only; key {report['key_bits_per_pixel']:.3f} bpp, key space median "
        f"{key_space['median']:.0f} bits/image",
    ]
    return "\n".join(summary)
