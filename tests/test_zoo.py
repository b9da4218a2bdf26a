"""The bundled chest X-ray model: loads offline, and keeps its promises on real images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from primis.config import ObfuscationConfig
from primis.evaluation import measure_sharing
from primis.modelstore import DEFAULT_MODEL, bundled_models, load_model
from tests.conftest import cxr_images, run_cli

pytestmark = pytest.mark.skipif(
    DEFAULT_MODEL not in bundled_models(), reason="no bundled model in this checkout"
)


def test_default_model_loads_without_a_name_or_network():
    model = load_model(None)
    assert model.directory.name == DEFAULT_MODEL
    assert model.hash == load_model("cxr").hash


def test_quality_and_key_size_on_real_chest_xrays():
    paths = cxr_images()[-6:]
    model = load_model(None)
    records = [measure_sharing(model, p, ObfuscationConfig()) for p in paths]
    assert np.median([r.authorized_psnr for r in records]) > 34.0
    assert max(r.key_bits_per_pixel for r in records) < 0.55
    assert max(r.without_key_psnr for r in records) < 20.0


def test_refinement_improves_every_code_on_real_chest_xrays():
    model = load_model(None)
    for path in cxr_images()[-3:]:
        plain = measure_sharing(model, path, ObfuscationConfig(), refine_steps=0)
        refined = measure_sharing(model, path, ObfuscationConfig())
        assert refined.authorized_psnr > plain.authorized_psnr + 2.0, path.name
        assert refined.key_bytes == plain.key_bytes


def test_attacks_stay_near_prior_only_on_real_chest_xrays(tmp_path):
    images = cxr_images()
    attacker, targets = tmp_path / "attacker.txt", tmp_path / "targets.txt"
    attacker.write_text("".join(f"{p}\n" for p in images[:12]))
    targets.write_text("".join(f"{p}\n" for p in images[-4:]))
    out = tmp_path / "attack"
    run_cli(
        "attack",
        "--attacker-data",
        attacker,
        "--target-data",
        targets,
        "--out",
        out,
        "--quick",
        check=True,
    )
    report = json.loads((out / "attack.json").read_text())
    for name, row in report["attacks"].items():
        if name != "authorized (with key)":
            assert row["psnr_above_prior"] < 1.0 and row["ssim_above_prior"] < 0.05, name
    # With atoms shown in a secret order per file, neither the public entries nor the model's
    # preference for some atoms tells true entries from noise.
    assert report["distinguisher"]["auc"] < 0.55, report["distinguisher"]
    assert report["distinguisher_prior_only"]["auc"] < 0.55, report["distinguisher_prior_only"]
    assert report["attacks"]["authorized (with key)"]["psnr_above_prior"] > 10
    assert all(check["holds"] for check in report["targets"]), report["targets"]
