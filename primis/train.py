"""Training: random crops, AdamW, cosine schedule, ternary annealing, validation, checkpoints."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader
from tqdm import tqdm

from primis.config import RunConfig
from primis.data import RandomCropDataset
from primis.errors import PrimisError
from primis.imageio import pad_to_multiple, read_image, write_atomic
from primis.metrics import psnr
from primis.model import SparseTernaryAutoEncoder
from primis.modelstore import save_model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PrimisError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PrimisError("--device mps: no MPS device is available")
    return torch.device(name)


def learning_rate(config: RunConfig, progress: float, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` over the run's progress."""
    t = config.train
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
    cosine = t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (
        1 + math.cos(math.pi * min(progress, 1))
    )
    return t.lr * warm * cosine


def ternary_weight(config: RunConfig, progress: float) -> float:
    """0 while training on real values, then a linear ramp to 1 (pure ternary)."""
    t = config.train
    if progress < t.real_steps:
        return 0.0
    if t.anneal_steps == 0:
        return 1.0
    return min(1.0, (progress - t.real_steps) / t.anneal_steps)


@torch.no_grad()
def validate(
    network: SparseTernaryAutoEncoder, images: list[np.ndarray], device: torch.device, k: int
) -> float:
    """Mean PSNR (dB) of pure-ternary reconstructions of whole images."""
    network.eval()
    scores = []
    for image in images:
        padded = pad_to_multiple(image, network.config.downsampling)
        x = torch.from_numpy(padded)[None, None].to(device)
        y = network.decode(network.encode(x, k))[0, 0, : image.shape[0], : image.shape[1]]
        scores.append(psnr(image, y.cpu().numpy()))
    network.train()
    return float(np.mean(scores))


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
    show_progress: bool = True,
) -> TrainResult:
    """Train a model and write the run directory ``out``.

    ``out`` receives the resolved ``config.yaml``, the best model (``model.safetensors`` and
    ``model.json``, pure-ternary validation PSNR), the last model under ``last/`` and a
    ``history.jsonl`` of validations.
    """
    t = config.train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", yaml.safe_dump(config.model_dump(), sort_keys=False).encode())
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    device = pick_device(t.device)

    network = SparseTernaryAutoEncoder(config.model).to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    dataset = RandomCropDataset(train_paths, t.crop)
    loader = DataLoader(dataset, batch_size=t.batch_size, shuffle=True, drop_last=False)
    valid_images = [read_image(p)[0] for p in valid_paths]

    history: list[dict] = []
    best = -math.inf
    start = time.monotonic()
    step = 0
    progress = 0.0
    bar = tqdm(total=t.steps, disable=not show_progress, desc="train", unit="step")
    network.train()
    while progress < 1.0:
        for batch in loader:
            elapsed = time.monotonic() - start
            progress = step / t.steps
            if t.max_minutes:
                progress = max(progress, elapsed / (60 * t.max_minutes))
            if progress >= 1.0:
                break
            lr = learning_rate(config, progress, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            weight = ternary_weight(config, progress)
            k = random.choice(t.k_choices) if t.k_choices else config.model.k
            x = batch.to(device)
            loss = torch.mean((network(x, k=k, ternary_weight=weight) - x) ** 2)
            if not torch.isfinite(loss):
                raise PrimisError(f"training diverged at step {step}: loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), t.grad_clip)
            optimizer.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2e}", tern=f"{weight:.2f}")
            if step % t.validate_every == 0:
                best = _checkpoint(
                    network,
                    valid_images,
                    device,
                    config,
                    out,
                    history,
                    step,
                    start,
                    weight,
                    best,
                    bar,
                )
    bar.close()
    if not history or history[-1]["step"] != step:
        best = _checkpoint(
            network,
            valid_images,
            device,
            config,
            out,
            history,
            step,
            start,
            ternary_weight(config, 1.0),
            best,
            bar,
        )
    return TrainResult(step, time.monotonic() - start, best, history)


def _checkpoint(
    network, valid_images, device, config, out, history, step, start, weight, best, bar
):
    """Validate, log, save ``last/`` and, when pure-ternary and better, the run's model."""
    score = validate(network, valid_images, device, config.model.k)
    record = {
        "step": step,
        "seconds": round(time.monotonic() - start, 1),
        "ternary_weight": weight,
        "psnr": round(score, 3),
    }
    history.append(record)
    with open(Path(out) / "history.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    bar.write(f"step {step}: valid PSNR {score:.2f} dB (ternary weight {weight:.2f})")
    save_model(Path(out) / "last", network, config.obfuscation)
    if (weight >= 1.0 and score > best) or not (Path(out) / "model.json").exists():
        save_model(out, network, config.obfuscation)
        return max(score, best) if weight >= 1.0 else best
    return best
