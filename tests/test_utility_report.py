"""The utility study (`primis utility`): its statistics, its invariants, and a run on real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from primis.utility_report import (
    ATTACK,
    AUTHORIZED,
    ORIGINAL,
    PRIOR,
    StageCache,
    auc_with_interval,
    ccc,
    classification_targets,
    group_of,
    grouped_folds,
    other_refine_steps,
    paired_difference,
    study_versions,
    texture_study,
)
from tests.conftest import CXR, assert_clean_failure, run_cli, smooth_image

SHARED = CXR.parent


def test_lins_ccc_is_one_for_equal_samples_and_near_zero_for_independent_ones():
    rng = np.random.default_rng(0)
    x = rng.normal(size=2000)
    assert ccc(x, x) == pytest.approx(1.0)
    assert abs(ccc(x, rng.normal(size=2000))) < 0.1
    # A shift or a scale lowers it (unlike Pearson's r), a constant pair is concordant.
    assert ccc(x, x + 1) < 0.7
    assert ccc(x, 2 * x) < 0.9
    assert ccc(np.ones(5), np.ones(5)) == 1.0
    assert np.isnan(ccc(np.array([1.0, np.nan]), np.array([1.0, 2.0])))


def test_patients_group_where_the_file_name_says_and_folds_keep_groups_whole():
    assert group_of(Path("00001543_002.png"), "nih_cxr14") == "patient:nih_cxr14:00001543"
    assert group_of(Path("COVID-00003b.jpg"), "figure1_covid") == "patient:figure1_covid:00003"
    assert group_of(Path("COVID-00003a.jpg"), "figure1_covid") == "patient:figure1_covid:00003"
    assert group_of(Path("011.jpeg"), "covid_cxnet") == "source:covid_cxnet"
    groups = [f"g{i % 7}" for i in range(40)] + ["big"] * 12
    labels = np.arange(len(groups)) % 2 == 0
    folds = grouped_folds(groups, labels, 4, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(groups)))
    for fold in folds:
        inside = {groups[i] for i in fold}
        outside = {groups[i] for other in folds if other is not fold for i in other}
        assert not inside & outside


def test_folds_of_single_images_hold_equal_class_shares_and_a_constant_image_scores_chance():
    """Patients of one image each: every fold holds as many of each class, so scores that are
    constant within a fold (an image that shows nothing) pool to an AUC of 0.5 exactly."""
    labels = np.arange(80) < 40
    folds = grouped_folds([f"p{i}" for i in range(80)], labels, 5, seed=3)
    assert [int(labels[f].sum()) for f in folds] == [8] * 5
    assert [len(f) for f in folds] == [16] * 5
    scores = np.zeros(80)
    for offset, fold in enumerate(folds):
        scores[fold] = offset  # each fold's own network, its own constant score
    assert auc_with_interval(scores, labels, [np.arange(80)])["auc"] == 0.5


def test_the_originals_against_themselves_differ_by_zero_auc():
    rng = np.random.default_rng(1)
    labels = np.arange(60) % 2 == 0
    scores = labels + rng.normal(size=60)
    from primis.utility_report import _resamples

    resamples = _resamples(labels, 200, 0)
    same = paired_difference(scores, scores, labels, resamples)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    row = auc_with_interval(scores, labels, resamples)
    assert row["low"] <= row["auc"] <= row["high"]
    assert auc_with_interval(np.zeros(60), labels, resamples)["auc"] == 0.5


def test_chance_is_two_sided_an_inverted_ranking_is_a_signal_too():
    """An image whose AUC lies well below 0.5 ranks the classes (inverted): not at chance."""

    def rows(prior: tuple, attack: tuple) -> dict:
        interval = {"difference": 0.0, "low": -0.01, "high": 0.01}
        return {
            AUTHORIZED: {"vs_original": interval},
            PRIOR: dict(zip(("auc", "low", "high"), prior, strict=True)),
            ATTACK: dict(zip(("auc", "low", "high"), attack, strict=True)),
        }

    same = {"difference": 0.01, "low": -0.05, "high": 0.07}
    apart = {"difference": 0.5, "low": 0.4, "high": 0.6}
    at_chance = classification_targets(rows((0.48, 0.4, 0.56), (0.52, 0.45, 0.6)), apart)
    assert [t["met"] for t in at_chance] == [True, True, True]
    inverted = classification_targets(rows((0.13, 0.08, 0.18), (0.67, 0.58, 0.75)), apart)
    assert [t["met"] for t in inverted] == [True, False, False]
    # An attack that ranks as well as prior-only (paired interval holds 0) adds nothing.
    as_prior = classification_targets(rows((0.8, 0.7, 0.9), (0.82, 0.72, 0.9)), same)
    assert [t["met"] for t in as_prior] == [True, False, True]


def test_texture_originals_are_concordant_with_themselves_and_noise_is_not():
    """MIRP's IBSI features inside a mask: CCC 1 for the originals, near 0 for noise."""
    images = [smooth_image(64, 72, seed).astype(np.float32) for seed in range(10)]
    yy, xx = np.mgrid[0:64, 0:72]
    masks = [((yy - 32) ** 2 + (xx - 36) ** 2 < (14 + s) ** 2) for s in range(10)]
    rng = np.random.default_rng(0)
    noise = [rng.random(i.shape).astype(np.float32) for i in images]
    result = texture_study({ORIGINAL: images, "noise": noise}, masks, bins=32)
    families = result["versions"][ORIGINAL]["families"]
    assert set(families) == {
        "first order",
        "GLCM",
        "GLRLM",
        "GLSZM",
        "GLDM (MIRP: NGLDM)",
        "NGTDM",
        "all",
    }
    assert all(f["features"] > 0 for f in families.values())
    assert families["all"]["share_ccc_0.90"] == 1.0
    assert all(np.isclose(v, 1.0) for v in result["versions"][ORIGINAL]["ccc"].values())
    noisy = result["versions"]["noise"]["families"]["all"]
    assert abs(noisy["median_ccc"]) < 0.2
    assert noisy["share_ccc_0.75"] < 0.15


def test_a_stage_cache_keeps_results_and_images_under_the_studys_identity(tmp_path):
    images = {"a": [np.zeros((3, 4), np.float32), np.ones((5, 2), np.float32)], "b": []}
    first = StageCache(tmp_path, {"model": "m", "config": {"seed": 0}})
    assert first.load("versions") is None and first.load_images("versions") is None
    first.save("classification: covid", {"auc": 0.5})
    first.save_images("versions", images)
    same = StageCache(tmp_path, {"config": {"seed": 0}, "model": "m"})
    assert same.load("classification: covid") == {"auc": 0.5}
    loaded = same.load_images("versions")
    assert list(loaded) == ["a", "b"] and loaded["b"] == []
    assert all(np.array_equal(x, y) for x, y in zip(loaded["a"], images["a"], strict=True))
    assert same.resumed == ["classification: covid"]
    changed = StageCache(tmp_path, {"model": "m", "config": {"seed": 1}})
    assert changed.load("classification: covid") is None
    assert StageCache(None, {}).load("texture") is None  # no folder: nothing kept


def test_utility_takes_the_obfuscation_options_and_checks_them_before_reading_data(
    tmp_path, tiny_model_dir
):
    """--fill, --mask-signs and --pad-size-class reach the study's obfuscation as they reach
    `primis attack`'s, and a bad one stops the command before any image is read."""
    missing = tmp_path / "no-such-folder"
    common = ("utility", "--model", tiny_model_dir, "--data", missing, "--attacker-data", missing)
    assert_clean_failure(run_cli(*common, "--fill", "1.5"), "fill")
    # Strict settings (fill 1, masked signs) are accepted: the command goes on to the data.
    strict = run_cli(*common, "--privacy", "strict", "--pad-size-class")
    assert (
        strict.returncode != 0 and "fill" not in strict.stderr and "no-such-folder" in strict.stderr
    )


@pytest.mark.slow
def test_utility_command_runs_every_study_on_a_small_subset(tmp_path, tiny_model_dir):
    multi = SHARED / "cxr-multi"
    if not (multi / "nih_cxr14").is_dir() or not (CXR / "lung-masks").is_dir():
        pytest.skip(f"the study's data not found at {SHARED.resolve()} (../shared/data)")
    out = tmp_path / "utility"
    arguments = (
        "utility",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(SHARED),
        "--attacker-data",
        str(CXR / "images"),
        "--attackers",
        "3",
        "--per-source",
        "3",
        "--masked-images",
        "4",
        "--refine-steps",
        "2",
        "--quick",
        "--out",
        str(out),
    )
    result = run_cli(*arguments)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "utility.json").read_text())
    assert report["resumed_stages"] == []
    versions = study_versions(2)
    assert "authorized, refine 0" in versions
    # Run again, it resumes after the last completed stage: every stage, the same figures.
    again = run_cli(*arguments)
    assert again.returncode == 0, again.stderr
    resumed = json.loads((out / "utility.json").read_text())
    assert set(resumed.pop("resumed_stages")) == {
        "versions", "classification: pneumonia", "classification: covid", "texture",
        "segmentation",
    }  # fmt: skip
    for run in (report, resumed):
        del run["this_run_seconds"]
    del report["resumed_stages"]
    assert resumed == report
    assert "Resumed: versions" in (out / "utility.md").read_text()
    for name in ("pneumonia", "covid"):
        task = report["classification"][name]
        assert set(versions) <= set(task["versions"])
        original = task["versions"][ORIGINAL]["vs_original"]
        assert original == {"difference": 0.0, "low": 0.0, "high": 0.0}
        assert len(task["targets"]) == 3
    assert "different sources" in report["classification"]["covid"]["note"]
    texture = report["texture"]["versions"]
    assert texture[ORIGINAL]["families"]["all"]["share_ccc_0.90"] == 1.0
    assert set(texture) == set(versions)
    assert set(report["segmentation"]["dice"]) == set(versions)
    # The default authorized version is the attack suite's "authorized", up to 8-bit rounding.
    assert report["authorized_vs_attack_suite"]["mean"] <= 1 / 255
    assert report["key_bits_per_pixel"] > 0 and report["jpeg2000_bits_per_pixel"] > 0
    for name in ("utility.md", "auc.png", "texture.png", "versions.png"):
        assert (out / name).stat().st_size > 0
    markdown = (out / "utility.md").read_text()
    assert "Run time" in markdown and AUTHORIZED in markdown


def test_the_second_authorized_version_takes_the_path_the_default_does_not():
    """A default that refines is compared with the encoder's codes, and an unrefined default
    (the bundled model's) with refined codes: the two authorized versions never coincide."""
    from primis.config import REFINED_STEPS

    assert other_refine_steps(2) == 0 and other_refine_steps(0) == REFINED_STEPS > 0
    assert study_versions(2)[1:3] == (AUTHORIZED, "authorized, refine 0")
    assert study_versions(0)[1:3] == (AUTHORIZED, f"authorized, refine {REFINED_STEPS}")
    assert len(set(study_versions(0))) == len(study_versions(0)) == 6
