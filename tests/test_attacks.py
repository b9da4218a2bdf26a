"""The attacks themselves must be able to win when there is something to find."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from primis.attacks import Target, distinguisher, roc_auc
from primis.config import ObfuscationConfig
from primis.obfuscation import ambiguate
from tests.conftest import assert_clean_failure, run_cli, smooth_image


def _constant_code_target(seed: int, mask: bool) -> Target:
    """Every position carries the same code vector: neighbours give the support away
    unless the noise hides it."""
    rng = np.random.default_rng(seed)
    n, k, rows, cols, m = 32, 2, 6, 6, 2
    vector = np.zeros(n, np.int8)
    chosen = rng.permutation(n)[: 2 * k]
    vector[chosen[:k]], vector[chosen[k:]] = 1, -1
    code = np.tile(vector, (m * rows * cols, 1))
    public = ambiguate(code, k, ObfuscationConfig(fill=0.5, mask_signs=mask))
    return Target(np.zeros((8, 8), np.float32), code, public, code != 0, (rows, cols))


def test_roc_auc_matches_its_definition():
    labels = np.array([True, False, True, False])
    assert roc_auc(np.array([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    assert roc_auc(np.array([0.1, 0.9, 0.2, 0.8]), labels) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5


@pytest.mark.slow
def test_the_distinguisher_finds_structure_that_leaks():
    attacker = [_constant_code_target(s, mask=False) for s in range(6)]
    targets = [_constant_code_target(s, mask=False) for s in range(6, 9)]
    result = distinguisher(attacker, targets, m=2, steps=300)
    assert result["auc"] > 0.75, result


@pytest.mark.slow
def test_attack_command_reports_every_attack_against_prior_only(tmp_path, tiny_model_dir):
    for name, seeds in (("attacker", range(4)), ("targets", range(10, 13))):
        (tmp_path / name).mkdir()
        for s in seeds:
            image = (smooth_image(48, 64, s) * 255).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / name / f"{s}.png")
    out = tmp_path / "report"
    result = run_cli(
        "attack",
        "--model",
        tiny_model_dir,
        "--attacker-data",
        tmp_path / "attacker",
        "--target-data",
        tmp_path / "targets",
        "--out",
        out,
        "--quick",
        check=True,
    )
    report = json.loads((out / "attack.json").read_text())
    attacks = report["attacks"]
    for name in (
        "naive decode",
        "top-k decode",
        "random support guess",
        "learned inversion",
        "prior only (mean image)",
        "authorized (with key)",
    ):
        assert np.isfinite(attacks[name]["psnr"]) and "psnr_above_prior" in attacks[name]
    assert 0 <= report["distinguisher"]["auc"] <= 1
    assert report["key_space_bits_per_image"]["min"] > 128
    assert (out / "attacks.png").is_file() and "distinguisher AUC" in result.stdout
    checks = {c["target"]: c for c in report["targets"]}
    assert checks["at least 128 key bits per image"]["holds"]
    assert "## Targets" in (out / "attack.md").read_text()
    same = run_cli(
        "attack",
        "--model",
        tiny_model_dir,
        "--attacker-data",
        tmp_path / "targets",
        "--target-data",
        tmp_path / "targets",
        "--out",
        out,
        "--quick",
    )
    assert_clean_failure(same, "disjoint")


def test_evaluate_command_writes_rate_distortion(tmp_path, tiny_model_dir):
    (tmp_path / "images").mkdir()
    for s in range(2):
        image = (smooth_image(64, 64, s) * 255).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "images" / f"{s}.png")
    out = tmp_path / "eval"
    run_cli(
        "evaluate",
        "--model",
        tiny_model_dir,
        "--data",
        tmp_path / "images",
        "--out",
        out,
        "--quick",
        check=True,
    )
    report = json.loads((out / "evaluate.json").read_text())
    assert [r["k"] for r in report["rd"]] == [1, 2]
    for row in report["rd"]:
        assert row["key_bpp"] > 0 and abs(row["jpeg2000_bpp"] - row["key_bpp"]) < 0.5
    assert (out / "rate_distortion.png").is_file() and (out / "evaluate.md").is_file()


@pytest.mark.slow
def test_dice_and_the_small_unet_learn_a_simple_segmentation():
    from primis.utility import dice, segment, train_unet

    rng = np.random.default_rng(0)
    images, masks = [], []
    for _ in range(24):
        image = rng.normal(0.3, 0.05, (128, 128)).astype(np.float32)
        mask = np.zeros((128, 128), bool)
        top, left = rng.integers(10, 70, 2)
        mask[top : top + 40, left : left + 40] = True
        image[mask] += 0.4
        images.append(image)
        masks.append(mask)
    assert dice(masks[0], masks[0]) == 1.0 and dice(masks[0], ~masks[0]) == 0.0
    net = train_unet(images[:20], masks[:20], steps=60)
    scores = [dice(p, t) for p, t in zip(segment(net, images[20:]), masks[20:], strict=True)]
    assert np.mean(scores) > 0.8, scores


def test_attack_settings_are_a_validated_config(tmp_path, tiny_model_dir):
    from primis.config import QUICK_ATTACKS, AttackConfig

    config = tmp_path / "attack.yaml"
    config.write_text("inversion_step: 5\n")
    args = ["attack", "--model", tiny_model_dir, "--attacker-data", tmp_path]
    args += ["--target-data", tmp_path, "--config", config]
    assert_clean_failure(run_cli(*args), "inversion_step")
    assert_clean_failure(run_cli(*args, "--quick"), "exclude each other")
    assert QUICK_ATTACKS.inversion_steps < AttackConfig().inversion_steps
