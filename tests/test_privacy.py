"""The privacy modes' table (`primis.privacy`): its figures are the benchmark's, and the command
line's help and the API's warnings both come from it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import primis
from primis.modelstore import load_model
from primis.privacy import FIGURES, PRIVACY_MODES, privacy_preset_name
from tests.conftest import run_cli, smooth_image

ROOT = Path(__file__).resolve().parents[1]


def test_the_figures_are_those_the_benchmark_derives_from_its_report():
    from benchmarks.linkage import preset_figures

    report = json.loads((ROOT / "docs" / "linkage.json").read_text())
    assert json.loads(FIGURES.read_text()) == preset_figures(report)


def test_the_table_names_each_mode_by_its_settings():
    for name, mode in PRIVACY_MODES.items():
        assert privacy_preset_name(mode.settings) == name
        assert mode.private == (name == "strict") == (mode.warning is None)
        assert mode.key_ratio <= 1 and 0 <= mode.linkage.top1 <= 1


@pytest.mark.parametrize("command", ["ambiguate", "serve", "attack", "utility"])
def test_the_privacy_help_is_the_tables(command):
    text = " ".join(run_cli(command, "--help", check=True).stdout.split())
    for mode in PRIVACY_MODES.values():
        assert mode.summary() in text
    compact = PRIVACY_MODES["compact"]
    assert f"{1 - compact.key_ratio:.0%} fewer key bits" in text  # measured, not typed


def test_the_api_warns_with_the_tables_warning(tiny_model_dir):
    model = load_model(tiny_model_dir)
    pixels = (smooth_image(32, 32, 1) * 255).astype(np.uint8)
    for name, mode in PRIVACY_MODES.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            primis.share(pixels, model=model, refine_steps=0, privacy=name)
        said = [str(w.message) for w in caught if issubclass(w.category, primis.PrivacyWarning)]
        assert said == ([] if mode.warning is None else [mode.warning])


def test_a_batch_warns_once_and_the_command_line_says_it_once(
    tmp_path, image_files, tiny_model_dir
):
    from primis.cluster import share_many

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        share_many(
            image_files,
            tmp_path / "p",
            tmp_path / "k",
            tiny_model_dir,
            privacy="paper",
            refine_steps=0,
        )
    said = [w for w in caught if issubclass(w.category, primis.PrivacyWarning)]
    assert [str(w.message) for w in said] == [PRIVACY_MODES["paper"].warning]
    assert said[0].filename == __file__  # points at the caller's line
    result = run_cli(
        "ambiguate", *image_files, "--model", tiny_model_dir, "--privacy", "paper",
        "--public-dir", tmp_path / "p2", "--key-dir", tmp_path / "k2", "--refine-steps", 0,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning: ") == 1
    assert f"warning: {PRIVACY_MODES['paper'].warning}" in result.stderr
