"""Adapting a trained model's decoder to refined codes (`primis finetune`).

`SparseTernaryAutoEncoder.refine` finds better codes than the encoder's single pass, but a
decoder trained on the encoder's codes has never seen them. This stage refines the code of
every training image, then trains the decoding side alone (magnitudes, inverse projection,
synthesis) on random crops of (code, image) pairs; the encoder and its running statistics stay
as they are, so codes, keys and public files keep their kind and size. Each round refines the
training codes anew with the decoder as it then is. Validation uses refined codes, as
`primis ambiguate` makes them, and the best model is kept (the starting one included)::

    training images --encode, refine--> codes --random crops--> decoder --MSE-- pixels
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from primis.config import FinetuneConfig, save_config
from primis.data import code_crops
from primis.io.images import read_image
from primis.io.pixels import pad_to_multiple
from primis.model import use_autocast
from primis.modelstore import LoadedModel, pick_device
from primis.sharing import encode_images
from primis.train import RunLog, fit


@dataclass
class FinetuneResult:
    steps: int
    start_psnr: float
    best_psnr: float
    history: list[dict]


def finetune(
    model: LoadedModel,
    train_paths: list[Path],
    valid_paths: list[Path],
    out: Path,
    config: FinetuneConfig,
    show_progress: bool = True,
) -> FinetuneResult:
    """Adapt ``model``'s decoder to refined codes; write the best model to directory ``out``."""
    out = Path(out)
    save_config(out / "finetune.yaml", config)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = pick_device(config.device)
    network = model.network.to(device).eval()
    model.network = network
    cfg = network.config
    images = [read_image(p)[0] for p in train_paths]
    valid_images = [read_image(p)[0] for p in valid_paths]
    padded = [pad_to_multiple(image, cfg.downsampling) for image in images]
    grids = [min(p.shape) // cfg.downsampling for p in padded]
    cells = min([config.crop // cfg.downsampling, *grids])
    optimizer = torch.optim.Adam(network.decoder_parameters(), lr=config.lr)
    autocast = use_autocast(device, config.amp)
    log = RunLog(out, model.obfuscation, valid_images, config.refine_steps)
    started = time.monotonic()

    def validation(step: int, _: dict[str, float]) -> None:
        log.validate(network, step, time.monotonic() - started)

    def train_step(_: int) -> dict[str, float]:
        code, x = code_crops(pairs, cells, cfg.downsampling, config.batch_size, rng)
        x = x.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            y = network.synthesis(network.magnitudes(code))
        loss = torch.mean((y.float() - x) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    step = 0
    budget = 60 * config.max_minutes if config.max_minutes else math.inf
    try:
        start_psnr = log.validate(network, 0, 0.0).psnr  # the starting model may stay the best
        for round_index in range(config.rounds):
            share = (budget - (time.monotonic() - started)) / (config.rounds - round_index)
            progress = _round_progress(step, config.steps, share)
            codes = encode_images(model, images, cfg.k, config.refine_steps)
            pairs = list(zip(padded, [code.to(device) for code in codes], strict=True))
            step = fit(
                train_step,
                progress,
                validation,
                config.validate_every,
                log,
                step,
                desc=f"finetune round {round_index + 1}/{config.rounds}",
                show_progress=show_progress,
            )
    finally:
        log.close()
    return FinetuneResult(step, start_psnr, log.best, log.history)


def _round_progress(first: int, steps: int, seconds: float) -> Callable[[int], float]:
    """Progress through a round that ends after ``steps`` steps from step ``first`` or after
    ``seconds`` from now (its share of the time budget; re-encoding the codes counts),
    whichever comes first."""
    started = time.monotonic()

    def progress(step: int) -> float:
        spent = (time.monotonic() - started) / seconds if seconds > 0 else math.inf
        return max((step - first) / steps, spent)

    return progress
