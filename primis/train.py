"""Training: random crops, AdamW, cosine schedule, ternary annealing, validation, checkpoints.

A run directory holds everything::

    RUN/config.yaml                 the resolved configuration
    RUN/train.txt, valid.txt        the images it trains and validates on (`new_run`)
    RUN/model.safetensors, .json    the best pure-ternary model so far (use it as --model)
    RUN/checkpoint/                 the resumable state (see primis.checkpoint)
    RUN/history.jsonl               one line per validation
    RUN/tensorboard/                TensorBoard events: losses, PSNR, SSIM, key bpp, lr, images

Runs on CUDA, MPS or CPU; under `torchrun` each process trains on its own crops with
DistributedDataParallel (gloo on CPU, NCCL on CUDA) and rank 0 writes the run directory.

`fit` is the loop of every training stage (this one and `primis.finetune`): steps until the
budget is spent, the loss logged, validation with keep-best (`RunLog`) and checkpoints at their
intervals and at the end.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from primis.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from primis.config import (
    ObfuscationConfig,
    RunConfig,
    TrainConfig,
    parse_config,
    save_config,
    with_later_options,
)
from primis.data import RandomCropDataset, resolve_sources, scan_images, split_paths
from primis.errors import PrimisError
from primis.io.files import write_atomic
from primis.io.images import read_image
from primis.keys.enumerative import image_key_bits, strict_key_bits
from primis.metrics import psnr, ssim
from primis.model import SparseTernaryAutoEncoder, use_autocast
from primis.modelstore import LoadedModel, load_model, pick_device, save_model
from primis.obfuscation import ambiguate_maps, code_to_vectors, vectors_to_code
from primis.sharing import decode_codes, encode_images

# A resumed run reseeds torch with seed + RESUME_SEED_STRIDE * steps done, so that its crops are
# not those of the slice before; each step draws its k from a generator seeded with
# seed * K_SEED_STRIDE + step, the same on every rank and in every slice.
RESUME_SEED_STRIDE = 7919
K_SEED_STRIDE = 1_000_003
# Crops are drawn with replacement from an endless sampler: the budget, not epochs, ends a run.
ENDLESS = 10**9
# Share of the data that validates when a run is given no validation images.
VALID_SHARE = 0.05


def learning_rate(config: RunConfig, progress: float, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` over the run's progress."""
    t = config.train
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return t.lr * warm * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cosine)


def random_map_mask(batch: int, maps: int, dropout: float, device) -> torch.Tensor | None:
    """Per sample, keep each code map with probability 1-dropout, and always at least one."""
    if not dropout:
        return None
    keep = torch.rand(batch, maps) >= dropout
    rescue = torch.randint(0, maps, (batch,))
    keep[torch.arange(batch), rescue] |= ~keep.any(dim=1)
    return keep.to(device)


def ternary_weight(config: RunConfig, progress: float) -> float:
    """0 while training on real values, then a linear ramp to 1 (pure ternary)."""
    t = config.train
    if progress < t.real_steps:
        return 0.0
    if t.anneal_steps == 0:
        return 1.0
    return min(1.0, (progress - t.real_steps) / t.anneal_steps)


@dataclass
class Validation:
    psnr: float
    ssim: float
    key_bits_per_pixel: float
    grid: np.ndarray  # rows of original | authorized | attacker's view, for TensorBoard


@torch.no_grad()
def validate(
    network: SparseTernaryAutoEncoder,
    images: list[np.ndarray],
    obfuscation: ObfuscationConfig,
    grid_rows: int = 2,
    refine_steps: int = 0,
) -> Validation:
    """Pure-ternary quality, key size and a picture of what sharing produces, on whole images
    coded and decoded as sharing does (`sharing.encode_images`, refined by ``refine_steps`` as
    `primis ambiguate --refine-steps` does, and `sharing.decode_codes`), one image at a time.
    The key size is the ideal one of the public vectors (`image_key_bits`); an adaptive-rate
    model's is the strict mode's, for the counts its codes hold (`strict_key_bits`)."""
    was_training = network.training
    network.eval()
    cfg = network.config
    model = LoadedModel(network, obfuscation, hash="", directory=Path())  # in training: unsaved
    scores, similarities, bits, pixels, rows = [], [], 0.0, 0, []
    for index, image in enumerate(images):
        code = encode_images(model, [image], cfg.k, refine_steps)[0]
        out = _decoded(model, code, image.shape)
        scores.append(psnr(image, out))
        similarities.append(ssim(image, out))
        vectors = code_to_vectors(code)
        public, _ = ambiguate_maps(vectors, cfg.m, cfg.k, obfuscation)
        if cfg.adaptive_rate:
            bits += strict_key_bits(vectors)
        else:
            bits += image_key_bits(public, cfg.m, cfg.k, obfuscation)
        pixels += image.size
        if index < grid_rows:
            attacker = _decoded(model, vectors_to_code(public, cfg.m, code.shape[3:]), image.shape)
            rows.append(np.concatenate([image, out, attacker], axis=1))
    network.train(was_training)
    width = max(r.shape[1] for r in rows) if rows else 0
    grid = (
        np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows])
        if rows
        else np.zeros((1, 1))
    )
    return Validation(float(np.mean(scores)), float(np.mean(similarities)), bits / pixels, grid)


def _decoded(model: LoadedModel, code: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """A code decoded (`sharing.decode_codes`) and cropped to the image's ``shape``."""
    return decode_codes(model, [code])[0][: shape[0], : shape[1]]


class RunLog:
    """What a training stage writes to its directory as it goes: the training scalars and, per
    validation, a line of ``history.jsonl``, TensorBoard scalars and images, and the model
    (`save_model`) whenever it beats the best so far (``best``).

    "Best" is the validation PSNR or, under a ``rate_weight`` (an adaptive-rate model, whose
    key size moves as it trains), the training objective in dB: -10 log10(MSE + rate_weight *
    key bpp), the MSE being the validation PSNR's."""

    def __init__(
        self,
        out: Path,
        obfuscation: ObfuscationConfig,
        valid_images: list[np.ndarray],
        refine_steps: int = 0,
        best: float = -math.inf,
        rate_weight: float = 0.0,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.out, self.obfuscation, self.valid_images = Path(out), obfuscation, valid_images
        self.refine_steps, self.best = refine_steps, best
        self.rate_weight = rate_weight
        self.history: list[dict] = []
        self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Training scalars as ``train/NAME`` (with the PSNR of a ``loss``)."""
        if "loss" in values:
            values = values | {"psnr": -10 * math.log10(max(values["loss"], 1e-12))}
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)

    def validate(
        self,
        network: SparseTernaryAutoEncoder,
        step: int,
        seconds: float,
        keep: bool = True,
        **fields,
    ) -> Validation:
        """Validate, log (``fields`` join the history line and the message), and save the model
        when ``keep`` allows and it is the best so far."""
        result = validate(network, self.valid_images, self.obfuscation, 2, self.refine_steps)
        record = {
            "step": step,
            "seconds": round(seconds, 1),
            **fields,
            "psnr": round(result.psnr, 3),
            "ssim": round(result.ssim, 4),
            "key_bpp": round(result.key_bits_per_pixel, 4),
        }
        self.history.append(record)
        with open(self.out / "history.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        self.writer.add_scalar("valid/psnr", result.psnr, step)
        self.writer.add_scalar("valid/ssim", result.ssim, step)
        self.writer.add_scalar("valid/key_bits_per_pixel", result.key_bits_per_pixel, step)
        image = result.grid.clip(0, 1)[None]
        self.writer.add_image("valid/original|authorized|attacker", image, step)
        tqdm.write(
            f"step {step}: valid PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f}, key "
            f"{result.key_bits_per_pixel:.3f} bpp"
            + "".join(f", {name.replace('_', ' ')} {value}" for name, value in fields.items())
        )
        score = self.score(result)
        if keep and score > self.best:
            self.best = score
            save_model(self.out, network, self.obfuscation)
        return result

    def score(self, result: Validation) -> float:
        """What keep-best maximises (see the class): the PSNR, or the objective in dB."""
        if not self.rate_weight:
            return result.psnr
        mse = 10 ** (-result.psnr / 10)
        return -10 * math.log10(mse + self.rate_weight * result.key_bits_per_pixel)

    def close(self) -> None:
        self.writer.close()


class ProcessGroup:
    """The processes that train together: torchrun's (`from_environment`), or this one alone."""

    def __init__(self, world: int = 1, rank: int = 0) -> None:
        self.world, self.rank = world, rank
        self.owned = False  # whether this object started torch.distributed's group

    @classmethod
    def from_environment(cls, device: torch.device) -> ProcessGroup:
        group = cls(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")))
        if group.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            group.owned = True
        return group

    def close(self) -> None:
        """End the group this object started, before the process exits (left to the exit,
        gloo's threads can abort the process after the run has finished)."""
        if self.owned and dist.is_initialized():
            dist.barrier()  # every rank is done with the group
            dist.destroy_process_group()
            self.owned = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over all ranks."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank."""
        if self.world == 1:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())


def fit(
    step: Callable[[int], dict[str, float] | None],
    progress: Callable[[int], float],
    validation: Callable[[int, dict[str, float]], object],
    validate_every: int,
    log: RunLog | None,
    start: int = 0,
    desc: str = "train",
    show_progress: bool = True,
    group: ProcessGroup | None = None,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_every: int = 1,
) -> int:
    """The training loop: call ``step(n)`` (one optimisation step; its scalars, or None for a
    skipped step) until ``progress(n)`` (the fraction of the budget spent after n steps)
    reaches 1. Every 10 steps the scalars go to ``log``; every ``validate_every`` steps and at
    the end ``validation(n, scalars)`` runs on the main process, and so does ``checkpoint(n)``
    every ``checkpoint_every`` steps and at the end. Returns the step count reached."""
    group = group or ProcessGroup()
    # The bar counts percent of the budget (steps or time), so its ETA is honest either way.
    bar = tqdm(
        total=100.0,
        disable=not (show_progress and group.main),
        desc=desc,
        unit="%",
        dynamic_ncols=True,
        mininterval=1.0,
        bar_format="{l_bar}{bar}| {n:.1f}/100% [{elapsed}<{remaining}{postfix}]",
    )
    try:
        while not group.any(progress(start) >= 1.0):
            values = step(start)
            if values is None:
                continue
            start += 1
            fraction = progress(start)
            done = fraction >= 1.0
            bar.update(100 * min(fraction, 1.0) - bar.n)
            bar.set_postfix(step=start, **{name: f"{v:.3g}" for name, v in values.items()})
            if log and start % 10 == 0:
                log.scalars(start, values)
            if start % validate_every == 0 or done:
                if group.main:
                    validation(start, values)
                group.barrier()
            if checkpoint is not None and (start % checkpoint_every == 0 or done):
                if group.main:
                    checkpoint(start)
                group.barrier()
    finally:
        bar.close()
    return start


@dataclass
class TrainResult:
    steps: int
    seconds: float
    best_psnr: float
    history: list[dict]


def train(
    config: RunConfig,
    train_paths: list[Path],
    valid_paths: list[Path],
    out: Path,
    resume: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train (or, with ``resume``, continue) the run in directory ``out``."""
    t = config.train
    out = Path(out)
    device = pick_device(t.device)
    group = ProcessGroup.from_environment(device)
    if t.threads:
        torch.set_num_threads(t.threads)
    if group.main:
        save_config(out / "config.yaml", config)
    torch.manual_seed(t.seed + group.rank)
    random.seed(t.seed)
    network = SparseTernaryAutoEncoder(config.model).to(device)
    if t.init and not resume:
        _load_initial_weights(network, t.init)
    parameters = _trainable_parameters(network, t.trainable)
    optimizer = torch.optim.AdamW(
        _parameter_groups(network, parameters, t), lr=t.lr, weight_decay=t.weight_decay
    )
    state = _new_state(t)
    if resume:
        _resume(out, network, optimizer, state, config, group)
    log = None
    if group.main:
        valid_images = [read_image(p)[0] for p in valid_paths]
        best = state["best_psnr"]
        log = RunLog(out, config.obfuscation, valid_images, best=best, rate_weight=t.rate_weight)
    trainer = Trainer(config, network, optimizer, parameters, train_paths, group, state, out, log)
    try:
        step = trainer.run(show_progress)
    finally:
        if log:
            log.close()
    group.close()
    if group.main and not (out / "model.json").exists():
        save_model(out, network, config.obfuscation)
    best, history = (log.best, log.history) if log else (state["best_psnr"], [])
    return TrainResult(step, trainer.elapsed(), best, history)


def _new_state(t: TrainConfig) -> dict:
    """The training state a new run starts from (what `save_checkpoint` keeps)."""
    return {
        "step": 0,
        "elapsed": 0.0,
        "best_psnr": -math.inf,
        "nonfinite_total": 0,
        "magnitudes_fitted": bool(t.init),  # a trained model's magnitudes fit its code already
    }


def _resume(
    out: Path,
    network: SparseTernaryAutoEncoder,
    optimizer: torch.optim.Optimizer,
    state: dict,
    config: RunConfig,
    group: ProcessGroup,
) -> None:
    """Restore the run's checkpoint into ``network``, ``optimizer`` and ``state``, and reseed
    torch so that the crops from here on are not those of the slice before."""
    saved = load_checkpoint(out, network, optimizer)
    saved.setdefault("magnitudes_fitted", True)  # a run from before fitting goes on as begun
    state.update(saved)
    if group.main:
        print(f"resuming {out} at step {state['step']}", flush=True)
    torch.manual_seed(config.train.seed + group.rank + RESUME_SEED_STRIDE * state["step"])


class Trainer:
    """The steps of one training run as `fit` calls them (`step`, `progress`, `validation`,
    `checkpoint`), over what they share: the network (wrapped for DistributedDataParallel on
    several processes), its optimizer, the endless batches of crops, the training ``state``
    that checkpoints keep and the main process's `RunLog`."""

    def __init__(
        self,
        config: RunConfig,
        network: SparseTernaryAutoEncoder,
        optimizer: torch.optim.Optimizer,
        parameters: list,
        train_paths: list[Path],
        group: ProcessGroup,
        state: dict,
        out: Path,
        log: RunLog | None,
    ) -> None:
        self.config, self.network, self.optimizer = config, network, optimizer
        self.parameters, self.group, self.out, self.log = parameters, group, out, log
        self.state = state
        self.device = next(network.parameters()).device
        # Pure-ternary steps leave the encoder without gradients, real-valued ones the magnitudes.
        self.model = (
            DistributedDataParallel(network, find_unused_parameters=True)
            if group.world > 1
            else network
        )
        self.autocast = use_autocast(self.device, config.train.amp)
        self.started = time.monotonic() - state["elapsed"]
        self.nonfinite = 0  # non-finite steps in a row
        self.batches = iter(_crop_loader(train_paths, config.train))

    def run(self, show_progress: bool = True) -> int:
        """Train until the budget is spent (`fit`); returns the step count reached."""
        _training_mode(self.network, self.config.train)
        return fit(
            self.step,
            self.progress,
            self.validation,
            self.config.train.validate_every,
            self.log,
            self.state["step"],
            show_progress=show_progress,
            group=self.group,
            checkpoint=self.checkpoint,
            checkpoint_every=self.config.train.checkpoint_every,
        )

    def elapsed(self) -> float:
        """Seconds of training so far, earlier slices of a resumed run included."""
        return time.monotonic() - self.started

    def progress(self, step: int) -> float:
        return _progress(self.config, step, self.elapsed())

    def step(self, step: int) -> dict[str, float] | None:
        """One optimisation step: its scalars, or None when its loss or gradient was not
        finite (the step is skipped; too many in a row stop the run)."""
        t = self.config.train
        done = self.progress(step)
        lr = learning_rate(self.config, done, step)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr * param_group.get("lr_scale", 1.0)
        weight = ternary_weight(self.config, done)
        if weight > 0 and not self.state["magnitudes_fitted"]:
            k = self.config.model.k
            _fit_magnitudes(self.network, self.batches, self.device, k, self.group)
            self.state["magnitudes_fitted"] = True
        k = random.Random(t.seed * K_SEED_STRIDE + step).choice(
            t.k_choices or [self.config.model.k]
        )
        x = next(self.batches).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, error, bpp = _batch_loss(self.model, x, self.config, k, weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, t.grad_clip)
        if self.group.any(not (torch.isfinite(loss) and torch.isfinite(norm))):
            self._skip(step)
            return None
        self.nonfinite = 0
        self.optimizer.step()
        # "loss" is the MSE (logged with its PSNR); an adaptive rate adds the code's key "bpp".
        values = {"loss": error.item(), "lr": lr, "ternary_weight": weight, "k": k}
        return values if bpp is None else values | {"bpp": bpp.item()}

    def _skip(self, step: int) -> None:
        """Count a non-finite step; PrimisError after ``train.nonfinite_patience`` in a row."""
        self.nonfinite += 1
        self.state["nonfinite_total"] += 1
        tqdm.write(f"step {step}: non-finite loss or gradient, step skipped")
        if self.nonfinite >= self.config.train.nonfinite_patience:
            raise PrimisError(
                f"training diverged: {self.nonfinite} non-finite steps in a row at step {step}; "
                "lower train.lr or raise train.grad_clip, then --resume"
            )

    def validation(self, step: int, values: dict[str, float]) -> None:
        """Validate on the main process, keeping the model only once it is pure ternary."""
        weight = values["ternary_weight"]
        self.log.validate(
            self.network, step, self.elapsed(), weight >= 1.0, ternary_weight=round(weight, 4)
        )
        _training_mode(self.network, self.config.train)  # validation left all training

    def checkpoint(self, step: int) -> None:
        self.state.update(step=step, elapsed=self.elapsed(), best_psnr=self.log.best)
        save_checkpoint(self.out, self.network, self.optimizer, self.state)


def _crop_loader(paths: list[Path], t: TrainConfig) -> DataLoader:
    """Batches of augmented random crops of ``paths``, drawn with replacement, without end."""
    dataset = RandomCropDataset(
        paths, t.crop, t.hflip, t.gamma_jitter, t.scale_jitter, t.invert, t.noise, t.bit_depths
    )
    return DataLoader(
        dataset,
        batch_size=t.batch_size,
        sampler=RandomSampler(dataset, replacement=True, num_samples=ENDLESS),
        num_workers=t.workers,
        persistent_workers=t.workers > 0,
    )


def _batch_loss(
    model: torch.nn.Module, x: torch.Tensor, config: RunConfig, k: int, weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, MSE, key bits per pixel or None) of one batch: the MSE, plus ``rate_weight`` times
    the code's key bits per pixel for an adaptive-rate model."""
    t, adaptive = config.train, config.model.adaptive_rate
    output = model(
        x,
        k=k,
        ternary_weight=weight,
        straight_through=t.straight_through,
        map_mask=random_map_mask(len(x), config.model.m, t.map_dropout, x.device),
        with_bits=adaptive,
    )
    y, bits = output if adaptive else (output, None)
    error = torch.mean((y.float() - x) ** 2)
    if bits is None:
        return error, error, None
    bpp = bits.sum() / x.numel()
    return error + t.rate_weight * bpp, error, bpp


@dataclass
class RunInputs:
    """The images a run trains and validates on, and the unreadable ones left out."""

    train: list[Path]
    valid: list[Path]
    skipped: list[str]


def new_run(
    out: Path, config: RunConfig, data: Path, valid: Path | None = None, strict: bool = False
) -> RunInputs:
    """Set up run directory ``out``: the readable images of ``data`` (folder or list) to train
    on, and of ``valid`` or else a 5 % split of ``data`` to validate on, written to
    ``train.txt`` and ``valid.txt``. Unreadable images are left out (``strict``: an error)."""
    paths = resolve_sources(data)
    if valid is not None:
        valid_paths = resolve_sources(valid)
    else:
        parts = split_paths(paths, (1 - VALID_SHARE, VALID_SHARE, 0.0), config.train.seed)
        paths, valid_paths = parts["train"], parts["valid"] or parts["train"][:1]
    paths, problems = scan_images(paths, strict)
    valid_paths, valid_problems = scan_images(valid_paths, strict)
    problems += valid_problems
    if not paths or not valid_paths:
        unreadable = f" ({len(problems)} unreadable, e.g. {problems[0]})" if problems else ""
        raise PrimisError(f"no readable training or validation images{unreadable}")
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, part in (("train.txt", paths), ("valid.txt", valid_paths)):
        write_atomic(Path(out) / name, "".join(f"{p.resolve()}\n" for p in part).encode())
    return RunInputs(paths, valid_paths, problems)


def load_run(out: Path) -> RunConfig:
    """The resolved configuration a run directory was started with."""
    path = Path(out) / "config.yaml"
    if not path.is_file() or not (Path(out) / CHECKPOINT).exists():
        raise PrimisError(f"{out}: not a resumable run (needs config.yaml and {CHECKPOINT}/)")
    data = with_later_options(yaml.safe_load(path.read_text()))  # runs from before those options
    return parse_config(RunConfig, data, str(path))


def resumed_run(out: Path) -> tuple[RunConfig, RunInputs]:
    """The configuration and the images of the run in directory ``out``, to go on with it."""
    config = load_run(out)
    train_paths, valid_paths = (resolve_sources(Path(out) / n) for n in ("train.txt", "valid.txt"))
    return config, RunInputs(train_paths, valid_paths, [])


def _load_initial_weights(network: SparseTernaryAutoEncoder, init: str) -> None:
    """Copy a trained model's weights (and running statistics) into ``network``. The run may
    add encoder blocks (``model.encoder_blocks``), which start as the identity (the last
    convolution of each one's residual branch is zero), and may turn on the adaptive rate
    (``model.adaptive_rate``), whose thresholds start below every pair's strength; either way
    the network starts as the trained model codes and decodes. It may also keep more pairs per
    vector (a larger ``model.k``: a higher-rate model grown from a trained one), which the
    decoder then learns to use."""
    start = load_model(init)
    added = network.config.encoder_blocks - start.network.config.encoder_blocks
    adds_rate = network.config.adaptive_rate and not start.network.config.adaptive_rate
    grown = {"encoder_blocks": network.config.encoder_blocks, "k": network.config.k}
    same = start.network.config.model_copy(update=grown | {"adaptive_rate": False})
    fewer = added < 0 or network.config.k < start.network.config.k
    if same != network.config.model_copy(update={"adaptive_rate": False}) or fewer:
        raise PrimisError(
            f"train.init {init}: its model configuration differs from the run's model section"
            " (beyond encoder blocks added, pairs per vector raised or the adaptive rate turned on)"
        )
    if start.network.config.adaptive_rate and not network.config.adaptive_rate:
        raise PrimisError(f"train.init {init}: an adaptive-rate model cannot lose its thresholds")
    missing, unexpected = network.load_state_dict(start.network.state_dict(), strict=False)
    deepest = network.encoder_stages[-1]
    first_new = len(deepest) - added
    new_blocks = list(deepest)[first_new:]
    prefix = f"encoder_stages.{len(network.encoder_stages) - 1}"
    expected = {
        f"{prefix}.{first_new + i}.{name}"
        for i, block in enumerate(new_blocks)
        for name, _ in block.named_parameters()
    } | ({"thresholds"} if adds_rate else set())
    assert set(missing) == expected and not unexpected, (missing, unexpected)
    with torch.no_grad():
        for block in new_blocks:
            block.body[-1].weight.zero_()
            block.body[-1].bias.zero_()


def _trainable_parameters(network: SparseTernaryAutoEncoder, which: str) -> list:
    """The parameters ``train.trainable`` names; the others are frozen (no gradient)."""
    if which == "all":
        return list(network.parameters())
    chosen = network.encoder_parameters() if which == "encoder" else network.decoder_parameters()
    keep = {id(p) for p in chosen}
    for parameter in network.parameters():
        parameter.requires_grad_(id(parameter) in keep)
    return chosen


def _parameter_groups(
    network: SparseTernaryAutoEncoder, parameters: list, t: TrainConfig
) -> list[dict]:
    """The optimizer's parameter groups: one, or with ``threshold_lr_scale`` an adaptive-rate
    model's thresholds in a group of their own whose learning rate is scaled by it (its
    ``lr_scale``) and that has no weight decay."""
    thresholds = network.thresholds
    others = [p for p in parameters if p is not thresholds]
    if t.threshold_lr_scale == 1 or len(others) == len(parameters):
        return [{"params": parameters}]
    scaled = {"params": [thresholds], "lr_scale": t.threshold_lr_scale, "weight_decay": 0.0}
    return [{"params": others}, scaled]


def _training_mode(network: SparseTernaryAutoEncoder, train: TrainConfig) -> None:
    """Train mode, except that the atom standardisation runs as deployed (its running
    statistics, kept) unless everything trains without ``deployed_atom_norm``, so an encoder
    trained against a fixed decoder, or a trained model trained on, learns the code that
    inference will compute."""
    network.train()
    deployed = train.trainable != "all" or train.deployed_atom_norm
    if deployed and network.atom_norm is not None:
        network.atom_norm.eval()


def _fit_magnitudes(network, batches, device, k: int, group: ProcessGroup, count: int = 8) -> None:
    """Before the first ternary step: magnitudes from the real code on ``count`` batches.

    A real-valued phase trains the encoder while the magnitudes stay where they started, so by
    the time the blend to ternary begins the selected scores and the magnitudes no longer
    match, and the decoder's input would jump; starting the blend from magnitudes fitted to
    the code keeps it where it was.
    """
    sums = sum(network.selected_score_sums(next(batches).to(device), k) for _ in range(count))
    network.fit_magnitudes(group.sum(sums))


def _progress(config: RunConfig, step: int, elapsed: float) -> float:
    """Fraction of the run done: by steps, or by time when a time budget is set."""
    t = config.train
    progress = step / t.steps
    if t.max_minutes:
        progress = max(progress, elapsed / (60 * t.max_minutes))
    return progress
