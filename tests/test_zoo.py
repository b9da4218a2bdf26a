"""The bundled chest X-ray model: loads offline, and keeps its promises on real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


@pytest.mark.slow
def test_quality_and_key_size_on_real_chest_xrays():
    paths = cxr_images()[-6:]
    model = load_model(None)
    records = [measure_sharing(model, p, ObfuscationConfig()) for p in paths]
    assert np.median([r.authorized_psnr for r in records]) > 34.0
    assert max(r.key_bits_per_pixel for r in records) < 0.55
    assert max(r.without_key_psnr for r in records) < 20.0


@pytest.mark.slow
def test_refinement_improves_every_code_on_real_chest_xrays():
    model = load_model(None)
    for path in cxr_images()[-3:]:
        plain = measure_sharing(model, path, ObfuscationConfig(), refine_steps=0)
        refined = measure_sharing(model, path, ObfuscationConfig())
        assert refined.authorized_psnr > plain.authorized_psnr + 2.0, path.name
        # Refinement prices each atom's key bits (the default rate weight): a key of about the
        # same size, not the larger one a less predictable code would take.
        assert 0.8 * plain.key_bytes < refined.key_bytes < 1.1 * plain.key_bytes


@pytest.mark.slow
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
    # The default public vectors are random bits: the classifier that sees them tells true
    # entries from noise no better than one that knows only the model's atom preferences.
    seen, prior = report["distinguisher"]["auc"], report["distinguisher_prior_only"]["auc"]
    assert seen <= prior + 0.02, (seen, prior)
    assert report["attacks"]["authorized (with key)"]["psnr_above_prior"] > 10
    assert all(check["holds"] for check in report["targets"]), report["targets"]


V1_PAIR = Path(__file__).parent / "data" / "v1"


def test_a_pair_made_by_the_previous_release_decodes_with_cxr_v1(tmp_path):
    """tests/data/v1 holds a public file and key that release 0.1 (format version 2, atoms
    shuffled) made with the then default model, now `cxr-v1`, and what it restored."""
    public = V1_PAIR / "v1-scan.primis"
    result = run_cli(
        "disambiguate", public, "--model", "cxr-v1", "--key-dir", V1_PAIR, "--out-dir", tmp_path
    )
    assert result.returncode == 0, result.stderr
    restored = np.asarray(Image.open(tmp_path / "v1-scan.png"))
    assert np.array_equal(restored, np.asarray(Image.open(V1_PAIR / "expected" / "v1-scan.png")))
    if load_model(None).hash != load_model("cxr-v1").hash:
        other = run_cli("disambiguate", public, "--key-dir", V1_PAIR, "--out-dir", tmp_path / "o")
        assert other.returncode != 0 and "use --model cxr-v1" in other.stderr
