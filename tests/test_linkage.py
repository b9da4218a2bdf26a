"""Linkage: a public file must not tell which of the attacker's images it came from, and the
attack must find it where it can."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from primis.config import ObfuscationConfig
from primis.io.images import read_image
from primis.linkage import (
    Candidate,
    Shown,
    candidate_codes,
    containment,
    link,
    linkage_attack,
    ranks,
    usage,
)
from primis.modelstore import load_model
from primis.obfuscation import (
    ambiguate,
    ambiguate_maps,
    class_grid,
    reveals_nothing,
    size_class,
)
from primis.privacy import PRIVACY_MODES
from tests.conftest import cxr_images, run_cli, smooth_image

TARGETS, DISTRACTORS = 4, 12


def _code(rng: np.random.Generator, vectors: int, n: int, k: int) -> np.ndarray:
    code = np.zeros((vectors, n), np.int8)
    for row in code:
        atoms = rng.permutation(n)[: 2 * k]
        row[atoms[:k]], row[atoms[k:]] = 1, -1
    return code


@pytest.mark.parametrize("permuted", [False, True])
def test_the_true_support_is_always_contained_a_wrong_one_by_luck(permuted):
    rng = np.random.default_rng(0)
    maps, grid, n, k = 2, (20, 20), 32, 2
    code, other = (_code(rng, maps * 400, n, k) for _ in range(2))
    obf = ObfuscationConfig(fill=0.5, mask_signs=True, permute_atoms=permuted)
    public, _ = ambiguate_maps(code, maps, k, obf)
    shown = Shown(public, grid, maps, True, permuted)
    assert containment(shown, Candidate(code, grid)) == 1.0
    assert containment(shown, Candidate(other, grid)) < 0.9
    strict, _ = ambiguate_maps(code, maps, k, ObfuscationConfig())
    blind = Shown(strict, grid, maps, True, False)
    assert containment(blind, Candidate(code, grid)) == containment(blind, Candidate(other, grid))
    assert usage(blind, Candidate(code, grid)) == 0.0


def test_ranks_break_ties_at_random_and_size_classes_are_coarse():
    scores = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 2.0, 1.0]])
    rank = [ranks(scores, np.array([0, 2]), np.random.default_rng(s)) for s in range(40)]
    assert {int(r[0]) for r in rank} == {1, 2, 3, 4} and {int(r[1]) for r in rank} == {2}
    assert [size_class(s, 16) for s in (16, 17, 33, 398, 500, 513)] == [16, 32, 48, 512, 512, 768]
    assert class_grid((25, 32), 16) == class_grid((27, 32), 16) == (32, 32)


def test_strict_public_files_do_not_show_a_content_adaptive_count_pattern():
    """A variable-rate code (s <= k pairs per vector) gives strict public vectors that are
    independent noise: every entry non-zero, signs balanced whatever each vector's count."""
    rng = np.random.default_rng(1)
    n, k, vectors = 64, 4, 4000
    code = _code(rng, vectors, n, k)
    empty = rng.random(vectors) < 0.5  # half the vectors hold no pair at all
    code[empty] = 0
    strict = PRIVACY_MODES["strict"].settings
    assert reveals_nothing(strict)
    public = ambiguate(code, k, strict)
    assert np.all(public != 0)
    plus = (public == 1).mean(axis=1)
    assert abs(plus[empty].mean() - plus[~empty].mean()) < 0.01
    shown = Shown(public, (vectors, 1), 1, True, False)
    assert containment(shown, Candidate(code, (vectors, 1))) == 1.0
    with pytest.raises(ValueError, match="exactly"):  # the other modes refuse such a code
        ambiguate(code, k, PRIVACY_MODES["compact"].settings)


def test_the_attack_can_be_pointed_at_any_model(tiny_model_dir):
    model = load_model(tiny_model_dir)
    images = [smooth_image(48, 64, seed).astype(np.float32) for seed in range(8)]
    leaky = ObfuscationConfig(fill=0.5, mask_signs=True, permute_atoms=False)
    for obf, at_chance in ((ObfuscationConfig(), True), (leaky, False)):
        result = linkage_attack(model, images[:3], images[3:], obf)
        stats = result["by_refine"]["0"]
        assert stats["containment"]["at_chance"] == at_chance, stats["containment"]
        assert result["candidates"] == 8 and result["targets"] == 3


@pytest.fixture(scope="module")
def xrays():
    """A CI-sized set of real chest X-rays: targets first, then distractors."""
    return [read_image(path)[0] for path in cxr_images()[: TARGETS + DISTRACTORS]]


@pytest.fixture(scope="module")
def cxr_candidates(xrays):
    """The candidates' codes under each bundled model a test names, computed once."""
    made = {}

    def of(name: str):
        if name not in made:
            made[name] = candidate_codes(load_model(name), xrays)
        return made[name]

    return of


@pytest.mark.parametrize(
    ("name", "mode", "permuted", "linkable"),
    [
        ("cxr", "strict", False, False),  # an adaptive rate: strict is its only mode
        ("cxr-v3", "strict", False, False),
        ("cxr-v3", "compact", False, True),
        ("cxr-v3", "compact", True, True),
        ("cxr-v3", "paper", False, True),
        ("cxr-v3", "paper", True, True),
    ],
)
def test_on_real_xrays_strict_is_at_chance_compact_and_paper_are_linkable(
    xrays, cxr_candidates, name, mode, permuted, linkable
):
    model = load_model(name)
    cfg = model.network.config
    candidates = cxr_candidates(name)
    obf = PRIVACY_MODES[mode].settings.model_copy(update={"permute_atoms": permuted})
    shown = []
    for candidate in candidates[:TARGETS]:  # unrefined, as `refine_steps=0` shares
        public, _ = ambiguate_maps(candidate.code, cfg.m, cfg.k, obf)
        shown.append(Shown(public, candidate.grid, cfg.m, obf.mask_signs, permuted))
    metrics, scores = link(shown, candidates, list(range(TARGETS)), cfg.downsampling)
    best = metrics["containment"]
    if linkable:
        assert best["top1"] == 1.0 and best["auc"] > 0.95 and not best["at_chance"], best
    else:
        for metric in ("containment", "usage"):  # the public file carries nothing to rank by
            assert np.ptp(scores[metric], axis=1).max() == 0, metric
            assert metrics[metric]["at_chance"] and metrics[metric]["auc"] == 0.5


def test_primis_attack_linkage_writes_its_report(tmp_path, tiny_model_dir):
    folders = {name: tmp_path / name for name in ("attackers", "targets")}
    for index, folder in enumerate(folders.values()):
        folder.mkdir()
        for seed in range(3):
            pixels = (smooth_image(48, 64, 10 * index + seed) * 255).astype(np.uint8)
            np.save(folder / f"image{seed}.npy", pixels)
    result = run_cli(
        "attack",
        "--model",
        tiny_model_dir,
        "--attacker-data",
        folders["attackers"],
        "--target-data",
        folders["targets"],
        "--privacy",
        "paper",
        "--linkage",
        "--refine-steps",
        "0",
        "--out",
        tmp_path / "out",
    )
    assert result.returncode == 0, result.stderr
    assert "is not private" in result.stderr and "containment" in result.stdout
    report = json.loads((tmp_path / "out" / "linkage.json").read_text())
    assert report["candidates"] == 6 and not report["strongest"]["at_chance"]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "context_model_dir"])
def test_size_classes_hide_the_size_and_restore_the_same_image(request, fixture):
    """A strict public file padded to its size class shows the class's grid only; the key
    (no larger) restores the image exactly as the unpadded pair does; other modes refuse it."""
    import primis
    from primis.formats import KeyFile, PublicFile

    model = primis.load_model(request.getfixturevalue(fixture))
    shapes = [(70, 100), (66, 110)]
    pixels = [(smooth_image(*shape, 3) * 255).astype(np.uint8) for shape in shapes]
    padded = {"pad_size_class": True, "permute_atoms": False}
    grids, key_bytes = set(), []
    for image in pixels:
        plain = primis.share(image, model=model, refine_steps=0, privacy="strict")
        shared = primis.share(image, model=model, refine_steps=0, obfuscation=padded)
        header = PublicFile.from_bytes(shared.public).header
        grids.add(tuple(header.grid))
        assert header.privacy == "strict" and len(shared.public) > len(plain.public)
        assert KeyFile.from_bytes(shared.key).header.shape == image.shape
        key_bytes.append((len(plain.key), len(shared.key)))
        np.testing.assert_array_equal(
            primis.restore(shared.public, shared.key, model=model),
            primis.restore(plain.public, plain.key, model=model),
        )
    multiple = model.network.config.downsampling
    assert grids == {class_grid((-(-70 // multiple), -(-100 // multiple)), multiple)}
    assert len({(-(-a // multiple), -(-b // multiple)) for a, b in shapes}) == 2
    assert all(abs(a - b) <= 2 for a, b in key_bytes)  # the same key bits (header aside)
    with pytest.raises(primis.PrimisError, match="pad_size_class needs"):
        primis.share(pixels[0], model=model, privacy="compact", obfuscation={"pad_size_class": 1})


def test_an_attacker_reads_what_a_public_file_shows(tmp_path, tiny_model_dir):
    """`Shown.of_file` needs no key: a compact file links to its image, a strict one does not."""
    import primis

    model = load_model(tiny_model_dir)
    images = [smooth_image(64, 80, seed).astype(np.float32) for seed in range(4)]
    candidates = candidate_codes(model, images)
    for privacy, linked in (("compact", True), ("strict", False)):
        with pytest.warns(primis.PrivacyWarning) if linked else contextlib.nullcontext():
            shared = primis.share(images[0], model=model, refine_steps=0, privacy=privacy)
        path = tmp_path / f"{privacy}.primis"
        path.write_bytes(shared.public)
        shown = Shown.of_file(path)
        scores = [containment(shown, candidate) for candidate in candidates]
        assert (scores[0] == 1.0 and max(scores[1:]) < 1.0) == linked, scores
