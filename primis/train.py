"""Training: random crops, AdamW, cosine schedule, ternary annealing, validation, checkpoints.

A run directory holds everything::

    RUN/config.yaml                 the resolved configuration
    RUN/model.safetensors, .json    the best pure-ternary model so far (use it as --model)
    RUN/checkpoint/                 the resumable state (see primis.checkpoint)
    RUN/history.jsonl               one line per validation
    RUN/tensorboard/                TensorBoard events: losses, PSNR, SSIM, key bpp, lr, images

Runs on CUDA, MPS or CPU; under `torchrun` each process trains on its own crops with
DistributedDataParallel (gloo on CPU, NCCL on CUDA) and rank 0 writes the run directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
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
from primis.config import ObfuscationConfig, RunConfig, parse_config, with_later_options
from primis.data import RandomCropDataset
from primis.errors import PrimisError
from primis.imageio import pad_to_multiple, read_image, write_atomic
from primis.metrics import psnr, ssim
from primis.model import SparseTernaryAutoEncoder, use_autocast
from primis.modelstore import load_model, pick_device, save_model
from primis.obfuscation import ambiguate_maps, code_to_vectors, image_key_bits, vectors_to_code


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
    device: torch.device,
    obfuscation: ObfuscationConfig,
    grid_rows: int = 2,
    refine_steps: int = 0,
) -> Validation:
    """Pure-ternary quality, key size and a picture of what sharing produces, on whole images
    (codes refined by ``refine_steps``, as `primis ambiguate --refine-steps` does)."""
    was_training = network.training
    network.eval()
    scores, similarities, bits, pixels, rows = [], [], 0.0, 0, []
    cfg = network.config
    for index, image in enumerate(images):
        padded = pad_to_multiple(image, cfg.downsampling)
        x = torch.from_numpy(padded)[None, None].to(device)
        valid = torch.zeros_like(x)
        valid[..., : image.shape[0], : image.shape[1]] = 1
        code = network.encode(x, refine_steps=refine_steps, valid=valid)
        out = network.decode(code)[0, 0, : image.shape[0], : image.shape[1]].float().cpu().numpy()
        scores.append(psnr(image, out))
        similarities.append(ssim(image, out))
        vectors = code_to_vectors(code)
        public, _ = ambiguate_maps(vectors, cfg.m, cfg.k, obfuscation)
        bits += image_key_bits(public, cfg.m, cfg.k, obfuscation)
        pixels += image.size
        if index < grid_rows:
            public_code = vectors_to_code(public, cfg.m, tuple(code.shape[3:])).to(device)
            attacker = network.decode(public_code)[0, 0, : image.shape[0], : image.shape[1]]
            rows.append(np.concatenate([image, out, attacker.float().cpu().numpy()], axis=1))
    network.train(was_training)
    width = max(r.shape[1] for r in rows) if rows else 0
    grid = (
        np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows])
        if rows
        else np.zeros((1, 1))
    )
    return Validation(float(np.mean(scores)), float(np.mean(similarities)), bits / pixels, grid)


@dataclass
class TrainResult:
    steps: int
    seconds: float
    best_psnr: float
    history: list[dict]


class _Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

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
    group = _Distributed(device)
    if t.threads:
        torch.set_num_threads(t.threads)
    if group.main:
        out.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config.model_dump(), sort_keys=False).encode()
        write_atomic(out / "config.yaml", text)
    torch.manual_seed(t.seed + group.rank)
    random.seed(t.seed)

    network = SparseTernaryAutoEncoder(config.model).to(device)
    if t.init and not resume:
        _load_initial_weights(network, t.init)
    parameters = _trainable_parameters(network, t.trainable)
    optimizer = torch.optim.AdamW(parameters, lr=t.lr, weight_decay=t.weight_decay)
    state = {
        "step": 0,
        "elapsed": 0.0,
        "best_psnr": -math.inf,
        "nonfinite_total": 0,
        "magnitudes_fitted": bool(t.init),  # a trained model's magnitudes fit its code already
    }
    if resume:
        saved = load_checkpoint(out, network, optimizer)
        saved.setdefault("magnitudes_fitted", True)  # a run from before fitting goes on as begun
        state.update(saved)
        if group.main:
            print(f"resuming {out} at step {state['step']}", flush=True)
        torch.manual_seed(t.seed + group.rank + 7919 * state["step"])
    # Pure-ternary steps leave the encoder without gradients, real-valued ones the magnitudes.
    model = (
        DistributedDataParallel(network, find_unused_parameters=True)
        if group.world > 1
        else network
    )
    dataset = RandomCropDataset(
        train_paths,
        t.crop,
        t.hflip,
        t.gamma_jitter,
        t.scale_jitter,
        t.invert,
        t.noise,
        t.bit_depths,
    )
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**9)
    loader = DataLoader(
        dataset,
        batch_size=t.batch_size,
        sampler=sampler,
        num_workers=t.workers,
        persistent_workers=t.workers > 0,
    )
    valid_images = [read_image(p)[0] for p in valid_paths] if group.main else []
    writer = _tensorboard(out) if group.main else None
    autocast = use_autocast(device, t.amp)

    history: list[dict] = []
    step = state["step"]
    start = time.monotonic() - state["elapsed"]
    nonfinite = 0
    # The bar counts percent of the run (steps or time budget), so its ETA is honest either way.
    bar = tqdm(
        total=100.0,
        disable=not (show_progress and group.main),
        desc="train",
        unit="%",
        dynamic_ncols=True,
        mininterval=1.0,
        bar_format="{l_bar}{bar}| {n:.1f}/100% [{elapsed}<{remaining}{postfix}]",
    )
    batches = iter(loader)
    _training_mode(network, t.trainable)
    try:
        while True:
            progress = _progress(config, step, time.monotonic() - start)
            if group.any(progress >= 1.0):
                break
            lr = learning_rate(config, progress, step)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            weight = ternary_weight(config, progress)
            if weight > 0 and not state["magnitudes_fitted"]:
                _fit_magnitudes(network, batches, device, config.model.k, group)
                state["magnitudes_fitted"] = True
            k = random.Random(t.seed * 1_000_003 + step).choice(t.k_choices or [config.model.k])
            x = next(batches).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                y = model(
                    x,
                    k=k,
                    ternary_weight=weight,
                    straight_through=t.straight_through,
                    map_mask=random_map_mask(len(x), config.model.m, t.map_dropout, x.device),
                )
                loss = torch.mean((y.float() - x) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(parameters, t.grad_clip)
            if group.any(not (torch.isfinite(loss) and torch.isfinite(norm))):
                nonfinite += 1
                state["nonfinite_total"] += 1
                bar.write(f"step {step}: non-finite loss or gradient, step skipped")
                if nonfinite >= t.nonfinite_patience:
                    raise PrimisError(
                        f"training diverged: {nonfinite} non-finite steps in a row at step {step}; "
                        "lower train.lr or raise train.grad_clip, then --resume"
                    )
                continue
            nonfinite = 0
            optimizer.step()
            step += 1
            bar.update(100 * min(progress, 1.0) - bar.n)
            bar.set_postfix(step=step, loss=f"{loss.item():.2e}", ternary=f"{weight:.2f}", k=k)
            if writer and step % 10 == 0:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/psnr", -10 * math.log10(max(loss.item(), 1e-12)), step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/ternary_weight", weight, step)
            done = _progress(config, step, time.monotonic() - start) >= 1.0
            if step % t.validate_every == 0 or done:
                if group.main:
                    _validate_and_keep(
                        network,
                        valid_images,
                        device,
                        config,
                        out,
                        state,
                        step,
                        weight,
                        time.monotonic() - start,
                        history,
                        writer,
                        bar,
                    )
                    _training_mode(network, t.trainable)  # validation left every module training
                group.barrier()
            if step % t.checkpoint_every == 0 or done:
                state.update(step=step, elapsed=time.monotonic() - start)
                if group.main:
                    save_checkpoint(out, network, optimizer, state)
                group.barrier()
    finally:
        bar.close()
        if writer:
            writer.close()
    if group.main and not (out / "model.json").exists():
        save_model(out, network, config.obfuscation)
    return TrainResult(step, time.monotonic() - start, state["best_psnr"], history)


def _load_initial_weights(network: SparseTernaryAutoEncoder, init: str) -> None:
    """Copy a trained model's weights (and running statistics) into ``network``."""
    start = load_model(init)
    if start.network.config != network.config:
        raise PrimisError(
            f"train.init {init}: its model configuration differs from the run's model section"
        )
    network.load_state_dict(start.network.state_dict())


def _trainable_parameters(network: SparseTernaryAutoEncoder, which: str) -> list:
    """The parameters ``train.trainable`` names; the others are frozen (no gradient)."""
    if which == "all":
        return list(network.parameters())
    chosen = network.encoder_parameters() if which == "encoder" else network.decoder_parameters()
    keep = {id(p) for p in chosen}
    for parameter in network.parameters():
        parameter.requires_grad_(id(parameter) in keep)
    return chosen


def _training_mode(network: SparseTernaryAutoEncoder, trainable: str) -> None:
    """Train mode, except that a part that is not trained as a whole runs as deployed: the atom
    standardisation keeps its running statistics unless everything trains, so an encoder
    trained against a fixed decoder learns the code that inference will compute."""
    network.train()
    if trainable != "all" and network.atom_norm is not None:
        network.atom_norm.eval()


def _fit_magnitudes(network, batches, device, k: int, group: _Distributed, count: int = 8) -> None:
    """Before the first ternary step: magnitudes from the real code on ``count`` batches.

    A real-valued phase trains the encoder while the magnitudes stay where they started (a
    35-minute run of that schedule ended with selected scores near 0.9 against magnitudes of
    2.4, and its training loss jumped when the blend began); starting the blend from
    matching magnitudes keeps the decoder's input where it was.
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


def _validate_and_keep(
    network, valid_images, device, config, out, state, step, weight, elapsed, history, writer, bar
) -> None:
    """Validate, log, and save the run's model when pure-ternary and the best so far."""
    result = validate(network, valid_images, device, config.obfuscation)
    record = {
        "step": step,
        "seconds": round(elapsed, 1),
        "ternary_weight": round(weight, 4),
        "psnr": round(result.psnr, 3),
        "ssim": round(result.ssim, 4),
        "key_bpp": round(result.key_bits_per_pixel, 4),
    }
    history.append(record)
    with open(Path(out) / "history.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    if writer:
        writer.add_scalar("valid/psnr", result.psnr, step)
        writer.add_scalar("valid/ssim", result.ssim, step)
        writer.add_scalar("valid/key_bits_per_pixel", result.key_bits_per_pixel, step)
        writer.add_image("valid/original|authorized|attacker", result.grid.clip(0, 1)[None], step)
    bar.write(
        f"step {step}: valid PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f}, "
        f"key {result.key_bits_per_pixel:.3f} bpp (ternary weight {weight:.2f})"
    )
    if weight >= 1.0 and result.psnr > state["best_psnr"]:
        state["best_psnr"] = result.psnr
        save_model(out, network, config.obfuscation)


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(out) / "tensorboard"))


def load_run(out: Path) -> RunConfig:
    """The resolved configuration a run directory was started with."""
    path = Path(out) / "config.yaml"
    if not path.is_file() or not (Path(out) / CHECKPOINT).exists():
        raise PrimisError(f"{out}: not a resumable run (needs config.yaml and {CHECKPOINT}/)")
    data = with_later_options(yaml.safe_load(path.read_text()))  # runs from before those options
    return parse_config(RunConfig, data, str(path))
