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

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from primis.config import FinetuneConfig
from primis.data import code_crops
from primis.imageio import pad_to_multiple, read_image, write_atomic
from primis.model import use_autocast
from primis.modelstore import LoadedModel, pick_device, save_model
from primis.sharing import encode_images
from primis.train import _tensorboard, validate


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
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "finetune.yaml", yaml.safe_dump(config.model_dump()).encode())
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
    writer = _tensorboard(out)
    history: list[dict] = []
    started = time.monotonic()

    def keep_if_best(step: int, best: float) -> float:
        result = validate(network, valid_images, device, model.obfuscation, 2, config.refine_steps)
        record = {
            "step": step,
            "seconds": round(time.monotonic() - started, 1),
            "psnr": round(result.psnr, 3),
            "ssim": round(result.ssim, 4),
        }
        history.append(record)
        with open(out / "history.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        writer.add_scalar("finetune/valid_psnr", result.psnr, step)
        writer.add_scalar("finetune/valid_ssim", result.ssim, step)
        grid = result.grid.clip(0, 1)[None]
        writer.add_image("finetune/original|authorized|attacker", grid, step)
        tqdm.write(f"step {step}: refined valid PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f}")
        if result.psnr > best:
            save_model(out, network, model.obfuscation)
            return result.psnr
        return best

    start_psnr = best = keep_if_best(0, -math.inf)
    step = 0
    budget = 60 * config.max_minutes if config.max_minutes else math.inf
    try:
        for round_index in range(config.rounds):
            round_started = time.monotonic()
            codes = encode_images(model, images, cfg.k, config.refine_steps)
            pairs = list(zip(padded, [code.to(device) for code in codes], strict=True))
            share = (budget - (round_started - started)) / (config.rounds - round_index)
            bar = tqdm(
                range(config.steps),
                desc=f"finetune round {round_index + 1}/{config.rounds}",
                total=None if config.max_minutes else config.steps,  # a time budget ends it
                disable=not show_progress,
                mininterval=1.0,
            )
            for index in bar:
                code, x = code_crops(pairs, cells, cfg.downsampling, config.batch_size, rng)
                x = x.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    y = network.synthesis(network.magnitudes(code))
                loss = torch.mean((y.float() - x) ** 2)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.set_postfix(loss=f"{loss.item():.2e}")
                if step % 10 == 0:
                    writer.add_scalar("finetune/loss", loss.item(), step)
                out_of_time = time.monotonic() - round_started >= share
                last = out_of_time or index == config.steps - 1
                if step % config.validate_every == 0 or last:
                    best = keep_if_best(step, best)
                if out_of_time:
                    break
            bar.close()
    finally:
        writer.close()
    return FinetuneResult(step, start_psnr, best, history)
