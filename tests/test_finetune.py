"""Adapting a decoder to refined codes: only the decoding side changes, the best model is kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from primis.config import FinetuneConfig, ObfuscationConfig
from primis.finetune import finetune
from primis.io.images import read_image
from primis.modelstore import load_model
from primis.train import validate
from tests.conftest import assert_clean_failure, run_cli, smooth_image


def _images(folder, count: int) -> list:
    folder.mkdir()
    for i in range(count):
        pixels = (smooth_image(48, 64, 10 + i) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return sorted(folder.iterdir())


@pytest.mark.slow
def test_finetune_trains_the_decoder_only_and_keeps_the_best(tmp_path, tiny_model_dir):
    paths = _images(tmp_path / "images", 4)
    config = FinetuneConfig(
        refine_steps=2, rounds=2, steps=6, validate_every=3, crop=32, batch_size=4, lr=3e-3
    )
    result = finetune(load_model(tiny_model_dir), paths[:3], paths[3:], tmp_path / "out", config)
    history = [json.loads(line) for line in (tmp_path / "out" / "history.jsonl").open()]
    assert [r["step"] for r in history] == [0, 3, 6, 9, 12] and result.steps == 12
    assert result.best_psnr == pytest.approx(max(r["psnr"] for r in history), abs=1e-3)
    assert result.best_psnr > result.start_psnr

    kept = load_model(tmp_path / "out").network
    images = [read_image(p)[0] for p in paths[3:]]
    check = validate(kept, images, ObfuscationConfig(), refine_steps=2)
    assert check.psnr == pytest.approx(result.best_psnr, abs=1e-4)

    before = load_model(tiny_model_dir).network
    after = dict(kept.named_parameters())
    decoding = {id(p) for p in before.decoder_parameters()}
    changed = {name: not torch.equal(p, after[name]) for name, p in before.named_parameters()}
    encoder = [name for name, p in before.named_parameters() if id(p) not in decoding]
    assert encoder and not any(changed[name] for name in encoder)
    assert any(changed.values())
    assert torch.equal(before.atom_norm.running_mean, kept.atom_norm.running_mean)


def test_finetune_command_runs_and_rejects_bad_settings(tmp_path, tiny_model_dir):
    _images(tmp_path / "images", 3)
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump({"refine_steps": 1, "steps": 2, "crop": 32}))
    args = ["finetune", "--model", tiny_model_dir, "--data", tmp_path / "images"]
    args += ["--valid", tmp_path / "images", "--out", tmp_path / "out", "--config", config]
    result = run_cli(*args, check=True)
    assert "refined validation PSNR" in result.stdout
    assert load_model(tmp_path / "out").hash
    config.write_text(yaml.safe_dump({"refine_step": 1}))
    assert_clean_failure(run_cli(*args), "refine_step")
