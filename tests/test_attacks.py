"""The attacks themselves must be able to win when there is something to find."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from primis.attacks import (
    Target,
    distinguisher,
    learned_inversion,
    prior_map_view,
    roc_auc,
    shown_truth,
    support_guess,
)
from primis.config import AttackConfig, ObfuscationConfig
from primis.keys import fit_key_model
from primis.modelstore import load_model
from primis.obfuscation import ambiguate_maps, vectors_to_code
from tests.conftest import assert_clean_failure, run_cli, smooth_image

LEAKY = ObfuscationConfig(fill=0.25, mask_signs=False, permute_atoms=False)
STRICT = ObfuscationConfig()
GRID = (8, 8)


def _blocky_targets(model, count: int, seed: int, obf: ObfuscationConfig) -> list[Target]:
    """Codes whose vectors repeat over 2 x 2 blocks of positions (as real codes follow the
    image's structure), each image the model's decoding of its code, made public by ``obf``."""
    cfg = model.network.config
    rng = np.random.default_rng(seed)
    targets = []
    for _ in range(count):
        blocks = np.zeros((cfg.m, GRID[0] // 2, GRID[1] // 2, cfg.n), np.int8)
        for index in np.ndindex(blocks.shape[:3]):
            atoms = rng.permutation(cfg.n)[: 2 * cfg.k]
            blocks[index][atoms[: cfg.k]], blocks[index][atoms[cfg.k :]] = 1, -1
        code = blocks.repeat(2, axis=1).repeat(2, axis=2).reshape(-1, cfg.n)
        with torch.no_grad():
            image = model.network.decode(vectors_to_code(code, cfg.m, GRID))[0, 0].numpy()
        public, perms = ambiguate_maps(code, cfg.m, cfg.k, obf)
        targets.append(Target(image, code, public, shown_truth(code, perms), GRID))
    return targets


def _constant_code_target(seed: int, mask: bool) -> Target:
    """Every position carries the same code vector: neighbours give the support away
    unless the noise hides it."""
    rng = np.random.default_rng(seed)
    n, k, rows, cols, m = 32, 2, 6, 6, 2
    vector = np.zeros(n, np.int8)
    chosen = rng.permutation(n)[: 2 * k]
    vector[chosen[:k]], vector[chosen[k:]] = 1, -1
    code = np.tile(vector, (m * rows * cols, 1))
    public, perms = ambiguate_maps(code, m, k, ObfuscationConfig(fill=0.5, mask_signs=mask))
    return Target(
        np.zeros((8, 8), np.float32), code, public, shown_truth(code, perms), (rows, cols)
    )


def test_roc_auc_matches_its_definition():
    labels = np.array([True, False, True, False])
    assert roc_auc(np.array([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    assert roc_auc(np.array([0.1, 0.9, 0.2, 0.8]), labels) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5


QUICK = AttackConfig(distinguisher_steps=80, distinguisher_crop=64, inversion_crop=64)


@pytest.mark.slow
@pytest.mark.parametrize(("obf", "leaks"), [(LEAKY, True), (STRICT, False)])
def test_the_spatial_distinguisher_finds_the_support_only_where_it_leaks(
    tiny_model_dir, obf, leaks
):
    model = load_model(tiny_model_dir)
    attackers, targets = (_blocky_targets(model, n, s, obf) for n, s in ((6, 0), (2, 1)))
    k = model.network.config.k
    found = distinguisher(model, attackers, targets, obf, k, QUICK, [80])[0]
    blind = distinguisher(model, attackers, targets, obf, k, QUICK, [80], False)[0]
    assert 0.4 < blind["auc"] < 0.6, blind  # atoms are used evenly: the prior says nothing
    if leaks:
        assert found["auc"] > 0.8 and found["support_found"] > 2 * found["support_chance"], found
    else:
        assert abs(found["auc"] - blind["auc"]) < 0.05, (found, blind)
        assert found["support_found"] < 1.5 * found["support_chance"], found


@pytest.mark.parametrize(("obf", "leaks"), [(LEAKY, True), (STRICT, False)])
def test_the_learned_inversion_beats_prior_only_only_where_it_leaks(tiny_model_dir, obf, leaks):
    from primis.metrics import psnr

    model = load_model(tiny_model_dir)
    attackers, targets = (_blocky_targets(model, n, s, obf) for n, s in ((8, 2), (3, 3)))
    config = QUICK.model_copy(update={"inversion_batch": 4})
    views = learned_inversion(model, attackers, targets, obf, 2, config, [40])[0]["views"]
    mean = np.mean([a.image for a in attackers], axis=0)  # the prior-only image
    gain = np.mean(
        [psnr(t.image, v) - psnr(t.image, mean) for t, v in zip(targets, views, strict=True)]
    )
    assert (gain > 1) if leaks else (gain < 0.5), gain


def test_the_prior_map_attack_follows_the_attackers_prior(tiny_model_dir):
    """With public signs and no noise the public vector is the code: MAP decoding finds it.
    With every entry public and a prior learned from codes that always use the same atoms,
    it finds those atoms."""
    model = load_model(tiny_model_dir)
    cfg = model.network.config
    exact_copy = ObfuscationConfig(fill=0.0, mask_signs=False, permute_atoms=False)
    target = _blocky_targets(model, 1, 4, exact_copy)[0]
    prior = fit_key_model([(target.code, GRID)], cfg.k)
    exact = prior_map_view(model, target, prior, cfg.k, mask_signs=False)
    assert np.allclose(exact, target.image, atol=1e-5)
    code = np.zeros_like(target.code)
    code[:, : cfg.k], code[:, cfg.k : 2 * cfg.k] = 1, -1
    habit = fit_key_model([(code, GRID)], cfg.k)
    shown = Target(target.image, code, np.ones_like(code), code != 0, GRID)
    with torch.no_grad():
        wanted = model.network.decode(vectors_to_code(code, cfg.m, GRID))[0, 0].numpy()
    assert np.allclose(prior_map_view(model, shown, habit, cfg.k, True), wanted, atol=1e-5)


def test_support_guess_picks_the_best_ranked_candidates():
    public = np.array([[1, -1, 1, -1, 0, 1]], np.int8)
    scores = np.array([[0.1, 0.9, 0.8, 0.2, 5.0, 0.3]])
    assert support_guess(scores, public, 1, mask_signs=False).tolist() == [[0, -1, 1, 0, 0, 0]]
    assert support_guess(scores, public, 1, mask_signs=True).tolist() == [[0, -1, 1, 0, 0, 0]]


@pytest.mark.slow
def test_the_distinguisher_finds_structure_that_leaks(tiny_model_dir):
    model = load_model(tiny_model_dir)
    attacker = [_constant_code_target(s, mask=False) for s in range(6)]
    targets = [_constant_code_target(s, mask=False) for s in range(6, 9)]
    obf = ObfuscationConfig(fill=0.5, mask_signs=False)
    config = QUICK.model_copy(update={"distinguisher_crop": 48})
    result = distinguisher(model, attacker, targets, obf, 2, config, [300])[0]
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
        "--budget-check",
        check=True,
    )
    report = json.loads((out / "attack.json").read_text())
    attacks = report["attacks"]
    for name in (
        "naive decode",
        "top-k decode",
        "random support guess",
        "prior MAP support",
        "distinguisher support",
        "learned inversion",
        "prior only (mean image)",
        "authorized (with key)",
    ):
        assert np.isfinite(attacks[name]["psnr"]) and "psnr_above_prior" in attacks[name]
    assert 0 <= report["distinguisher"]["auc"] <= 1
    assert report["best_attack"]["name"] in attacks and report["key_bits_per_pixel"] > 0
    for budget in report["budget"].values():  # --budget-check: scored at 1x and 2x
        assert budget["training_images"] == 4 and len(budget["trained"]) == 2
        assert budget["trained"][1]["steps"] == 2 * budget["trained"][0]["steps"]
        assert "psnr_change_on_doubling" in budget
    assert "Budget of the learned attacks" in (out / "attack.md").read_text()
    assert report["key_space_bits_per_image"]["min"] > 128
    assert (out / "attacks.png").is_file() and "distinguisher AUC" in result.stdout
    checks = {c["target"]: c for c in report["targets"]}
    assert checks["at least 128 key bits per image"]["holds"]
    assert "## Targets" in (out / "attack.md").read_text()
    assert "## Linkage" in (out / "attack.md").read_text()
    linkage = report["linkage"]["by_refine"]["0"]["containment"]
    assert report["linkage"]["targets"] == 3 and linkage["auc"] == 0.5  # strict: nothing to rank
    assert any(c["target"].startswith("linkage") and c["holds"] for c in report["targets"])
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


@pytest.mark.slow
def test_the_frontier_scores_each_mode_per_source(tmp_path, tiny_model_dir):
    from primis.config import QUICK_ATTACKS
    from primis.frontier import frontier, modes, write_frontier

    folders = {}
    for name, seeds in (("attacker", range(4)), ("a", range(10, 12)), ("b", range(20, 22))):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for s in seeds:
            image = (smooth_image(48, 64, s) * 255).astype(np.uint8)
            Image.fromarray(image).save(folders[name] / f"{s}.png")
    sources = {name: (sorted(folders[name].iterdir()), None) for name in ("a", "b")}
    model = load_model(tiny_model_dir)
    chosen = [modes()[0], modes()[-1]]
    attackers = sorted(folders["attacker"].iterdir())
    series = frontier(model, attackers, sources, QUICK_ATTACKS, chosen=chosen)
    assert [row["mode"] for row in series["a"]] == [
        "masked signs, fill 1",
        "public signs, fill 0.25, secret order",
    ]
    strict, leaky = series["b"]
    assert strict["preset"] == "strict" and leaky["preset"] == "custom"
    assert strict["targets"] == 2 and strict["key_bpp"] > leaky["key_bpp"] > 0
    assert leaky["support_chance"] > strict["support_chance"]
    assert strict["linkage"]["candidates"] == 8  # the 4 targets of both sources and 4 attackers
    assert strict["linkage"]["at_chance"] and strict["linkage"]["auc"] == 0.5
    assert leaky["linkage"]["top1"] == 1.0 and not leaky["linkage"]["at_chance"]
    assert not leaky["private"]
    machine = {"cpu": "x", "flags": [], "kernels": "x", "threads": 1, "torch": "x", "dtype": "x"}
    text = write_frontier(series, tmp_path / "out", machine)
    assert "| public signs, fill 0.25, secret order | custom |" in text
    assert (tmp_path / "out" / "frontier.png").is_file()


def test_the_frontier_modes_and_their_names():
    from primis.frontier import mode_name, modes
    from primis.privacy import PRIVACY_MODES, privacy_preset_name

    names = [mode_name(mode) for mode in modes()]
    assert len(names) == len(set(names)) == 11  # no secret order where nothing is revealed
    assert names[0] == "masked signs, fill 1" and "masked signs, fill 1, secret order" not in names
    found = {privacy_preset_name(mode) for mode in modes()}
    assert found == {"custom", *PRIVACY_MODES}


def test_the_frontier_takes_no_single_mode_options(tmp_path):
    args = ["attack", "--attacker-data", tmp_path, "--target-data", tmp_path, "--frontier"]
    assert_clean_failure(run_cli(*args, "--fill", "0.5"), "--frontier")
