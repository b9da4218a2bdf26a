"""The bundled chest X-ray model: loads offline, and keeps its promises on real images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from primis.config import REFINED_STEPS, ObfuscationConfig
from primis.evaluation import measure_sharing
from primis.modelstore import DEFAULT_MODEL, bundled_models, load_model
from tests.conftest import (
    assert_clean_failure,
    assert_restored_alike,
    cxr_images,
    run_cli,
    smooth_image,
)

pytestmark = pytest.mark.skipif(
    DEFAULT_MODEL not in bundled_models(), reason="no bundled model in this checkout"
)


# Every model a release bundled, by the hash its public files name (the hash under the name it
# was released as). A bundled model never changes: a newer one takes the name and the old one
# moves to NAME-vN, so that its pairs still open; NAME-vN never changes.
RELEASED = {
    "cxr-v1": "dc22173e52818b27104561ec7fdf9774881dd8bb8b09ecc1546e2f1e8c4959e3",
    "cxr-v2": "45f4050d72885c081bd066cc882e2ee24e1e529daaa51ee85e4f78e24cd634a0",
    "cxr-v3": "a40d353ec3946d0fb66beac7a4148a1128ce0b27bb3ced6fbb1a8648d05fca90",
    "cxr-hq-v1": "bc9c44643e356b41dae926bdc48c673c641729447e2f9f5e91126b0531c856e3",
    "cxr": "e5cc492edb905800d3f74cbf57ea1aa8127dc1397ef83a48ed4a89f9a7605d6e",
    "cxr-hq": "8723026296440b417ef01b6d56c3fa48a1fe233d49f8445b6c95a49365364ef1",
}


def test_every_released_model_is_bundled_unchanged():
    bundled = {name: load_model(name).hash for name in bundled_models()}
    missing = {name: digest for name, digest in RELEASED.items() if digest not in bundled.values()}
    assert not missing, f"released models no longer bundled: {missing}"
    for name, digest in RELEASED.items():
        if re.search(r"-v\d+$", name):
            assert bundled.get(name) == digest, name


@pytest.mark.parametrize("command", ["ambiguate", "disambiguate", "attack", "utility"])
def test_the_model_option_lists_every_bundled_model(command):
    text = " ".join(run_cli(command, "--help", check=True).stdout.split())
    listed = re.search(r"bundled model name: ([a-z0-9, -]+) \(default: cxr", text)
    assert listed and listed.group(1).split(", ") == bundled_models()


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
        plain = measure_sharing(model, path, ObfuscationConfig())  # the default: none
        refined = measure_sharing(model, path, ObfuscationConfig(), refine_steps=REFINED_STEPS)
        # The figures per model are in MODEL_CARD.md.
        assert refined.authorized_psnr > plain.authorized_psnr + 1.0, path.name
        # Refinement prices each atom's key bits (the default rate weight): the key stays near
        # the encoder's (an adaptive model's flat regions hold few pairs, and refinement may
        # keep more there), not the much larger one a less predictable code would take.
        assert 0.8 * plain.key_bytes < refined.key_bytes < 1.4 * plain.key_bytes


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


PAIRS = Path(__file__).parent / "data"


def test_the_model_an_adaptive_models_refusal_names_is_bundled_and_shares_in_every_mode():
    """An adaptive model refused in another privacy mode points to a fixed-rate bundled model;
    the default `cxr` itself is adaptive and refuses."""
    from primis.config import ADAPTIVE_STRICT_ONLY

    named = ADAPTIVE_STRICT_ONLY.split("--model ")[1].split()[0]
    assert named in bundled_models() and not load_model(named).network.config.adaptive_rate
    assert load_model("cxr").network.config.adaptive_rate


@pytest.mark.parametrize(
    ("release", "name"),
    [
        ("v1", "cxr-v1"),
        ("v2", "cxr-v2"),
        ("v3", "cxr-v3"),
        ("hq1", "cxr-hq-v1"),
        ("v4", "cxr"),
        ("hq2", "cxr-hq"),
    ],
)
def test_a_pair_made_by_an_earlier_release_decodes_with_its_bundled_model(tmp_path, release, name):
    """tests/data/v1 holds a public file and key that release 0.1 (format version 2, atoms
    shuffled) made with the then default model, now `cxr-v1`, and what it restored;
    tests/data/v2 the same from the next release's default model, now `cxr-v2`; tests/data/v3
    from v3, now `cxr-v3` (a 15-bit scan, strict mode); tests/data/hq1 from the first `cxr-hq`,
    now `cxr-hq-v1` (key format version 5, with its high-fidelity layer); tests/data/v4 and hq2
    from v4 (`cxr`: an adaptive rate, each vector's count in the key) and the `cxr-hq` built on
    it."""
    pair = PAIRS / release
    public = pair / f"{release}-scan.primis"
    result = run_cli(
        "disambiguate", public, "--model", name, "--key-dir", pair, "--out-dir", tmp_path
    )
    assert result.returncode == 0, result.stderr
    restored = np.asarray(Image.open(tmp_path / f"{release}-scan.png"))
    expected = np.asarray(Image.open(pair / "expected" / f"{release}-scan.png"))
    assert_restored_alike(restored, expected, release)
    if load_model(None).hash != load_model(name).hash:
        other = run_cli("disambiguate", public, "--key-dir", pair, "--out-dir", tmp_path / "o")
        assert other.returncode != 0 and f"use --model {name}" in other.stderr


def test_a_model_stored_as_its_difference_from_a_bundled_base_keeps_its_hash(tmp_path):
    """Bundled models that share a part store it once: an export with ``--base`` holds only
    the tensors that differ, and loads as the same model (hash, key model, outputs)."""
    import torch

    whole, delta = tmp_path / "whole", tmp_path / "delta"
    run_cli("export", "cxr-v2", "--out", whole, "--half", check=True)
    run_cli("export", "cxr-v2", "--out", delta, "--half", "--base", "cxr-v1", check=True)
    size = (delta / "model.safetensors").stat().st_size
    assert size < 0.6 * (whole / "model.safetensors").stat().st_size
    models = [load_model(d) for d in (whole, delta, "cxr-v2")]
    assert len({m.hash for m in models}) == 1
    assert all(m.key_model is not None for m in models)
    code = models[0].network.encode(torch.rand(1, 1, 64, 64))
    torch.testing.assert_close(
        models[1].network.decode(code), models[0].network.decode(code), atol=0, rtol=0
    )
    # A key model fitted on export (here to one synthetic image) is stored with the rest, for
    # a model without one (cxr-v1) on a base with one (cxr-v3).
    image = tmp_path / "scan.png"
    Image.fromarray((smooth_image(64, 80, 3) * 255).astype(np.uint8)).save(image)
    refit = tmp_path / "refit"
    keyed = ["--base", "cxr-v3", "--key-data", image]
    run_cli("export", "cxr-v1", "--out", refit, "--half", *keyed, check=True)
    refitted = load_model(refit)
    assert refitted.key_model is not None and load_model("cxr-v1").key_model is None
    assert not np.array_equal(refitted.key_model.atom_weights, models[0].key_model.atom_weights)
    config = json.loads((delta / "model.json").read_text())
    (delta / "model.json").write_text(json.dumps(config | {"base": "no-such-model"}))
    assert_clean_failure(run_cli("info", delta), "base no-such-model is not another bundled")
