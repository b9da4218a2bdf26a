import json

import numpy as np
import pytest
import torch
from PIL import Image

from primis.config import ModelConfig, RunConfig, TrainConfig
from primis.data import RandomCropDataset, resolve_sources, split_paths
from primis.errors import PrimisError
from primis.model import SparseTernaryAutoEncoder
from primis.modelstore import load_model
from tests.conftest import TINY, assert_clean_failure, cxr_images, run_cli, smooth_image


def test_a_few_steps_on_real_images_lower_the_loss():
    paths = cxr_images()[:16]
    torch.manual_seed(0)
    network = SparseTernaryAutoEncoder(ModelConfig(stem=4, channels=[16, 32], n=64, k=2, m=2))
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    dataset = RandomCropDataset(paths, crop=64)
    batch = torch.stack([dataset[i] for i in range(len(dataset))])

    def loss() -> torch.Tensor:
        return torch.mean((network(batch, ternary_weight=1.0) - batch) ** 2)

    with torch.no_grad():
        before = loss().item()
    for _ in range(25):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.5 * before, (before, after)


def test_crops_have_the_requested_shape_even_from_small_images(tmp_path):
    small = tmp_path / "small.png"
    Image.fromarray((smooth_image(20, 30) * 255).astype(np.uint8)).save(small)
    dataset = RandomCropDataset([small], crop=48)
    crop = dataset[0]
    assert crop.shape == (1, 48, 48) and crop.dtype == torch.float32
    assert crop.min() >= 0 and crop.max() <= 1


def test_split_is_reproducible_and_disjoint(tmp_path):
    paths = [tmp_path / f"{i:03d}.png" for i in range(40)]
    first = split_paths(paths, (0.8, 0.1, 0.1), seed=3)
    assert first == split_paths(list(reversed(paths)), (0.8, 0.1, 0.1), seed=3)
    assert [len(first[p]) for p in ("train", "valid", "test")] == [32, 4, 4]
    assert sorted(p for part in first.values() for p in part) == sorted(paths)


def test_train_command_writes_a_usable_run(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray((smooth_image(40, 48, i) * 255).astype(np.uint8)).save(images / f"{i}.png")
    config = RunConfig(
        model=TINY,
        train=TrainConfig(steps=6, batch_size=2, crop=32, validate_every=3, warmup_steps=2),
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config.model_dump()))
    run = tmp_path / "run"
    run_cli("train", "--config", config_file, "--data", images, "--out", run, check=True)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6]
    assert load_model(run).network.config == TINY
    assert (run / "config.yaml").is_file() and (run / "last" / "model.json").is_file()


def test_bad_configs_and_missing_data_fail_cleanly(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  n: 64\n  colour: true\n")
    result = run_cli("train", "--config", config, "--data", tmp_path, "--out", tmp_path / "r")
    assert_clean_failure(result, "model.colour")
    listing = tmp_path / "list.txt"
    listing.write_text("missing.png\n")
    result = run_cli("train", "--data", listing, "--out", tmp_path / "r")
    assert_clean_failure(result, "missing")


def test_resolve_sources_reads_lists_relative_to_the_list(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "list.txt").write_text("# comment\na/x.png\n")
    assert resolve_sources(tmp_path / "list.txt") == [tmp_path / "a" / "x.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrimisError, match="no images"):
        resolve_sources(tmp_path / "empty")
