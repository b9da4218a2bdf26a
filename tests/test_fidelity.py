"""The key's high-fidelity layer: the residual reaches its PSNR, lives in the key alone, and
models that carry it (``cxr-hq``) share and restore wherever ``--model`` works."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from primis.errors import PrimisError
from primis.fidelity import MAX_STEPS, add_residual, code_residual, grid_steps
from primis.formats import KeyFile, PublicFile
from primis.io.pixels import IntensityMapping
from primis.metrics import psnr
from primis.modelstore import bundled_models, load_model
from primis.sharing import reconstruct, share_image
from tests.conftest import (
    ambiguate_cli,
    assert_clean_failure,
    cxr_images,
    run_cli,
    smooth_image,
)


def _blurred(unit: np.ndarray) -> np.ndarray:
    """A stand-in for the network's reconstruction: the image with its detail smoothed away."""
    image = Image.fromarray(unit.astype(np.float32), mode="F")
    small = image.resize((unit.shape[1] // 4, unit.shape[0] // 4), Image.BILINEAR)
    return np.asarray(small.resize(image.size, Image.BICUBIC), dtype=np.float32)


def _real_chest_xray() -> tuple[np.ndarray, IntensityMapping]:
    pixels = np.asarray(Image.open(cxr_images()[0]).convert("L"))
    mapping = IntensityMapping.of(pixels)
    return mapping.forward(pixels), mapping


@pytest.mark.parametrize("target", [38.0, 42.0, 46.0])
def test_the_residual_restores_a_real_chest_xray_to_its_psnr(target):
    unit, mapping = _real_chest_xray()
    base = _blurred(unit)
    steps = grid_steps(mapping)
    data = code_residual(unit, base, steps, target)
    restored = add_residual(base, data, steps)
    assert target <= psnr(unit, restored) < target + 1.0
    # On the image's own grid: the restored values are the file's values, as integers.
    stored = mapping.inverse(restored)
    assert np.array_equal(mapping.forward(stored), restored)


def test_a_higher_psnr_costs_more_bytes_and_an_unreachable_one_is_lossless():
    unit, mapping = _real_chest_xray()
    base = _blurred(unit)
    steps = grid_steps(mapping)
    sizes = [len(code_residual(unit, base, steps, target)) for target in (36.0, 42.0, 48.0)]
    assert sizes[0] < sizes[1] < sizes[2]
    exact = add_residual(base, code_residual(unit, base, steps, 100.0), steps)
    assert np.array_equal(mapping.inverse(exact), mapping.inverse(unit))


def test_where_the_network_alone_reaches_the_target_the_layer_is_empty():
    unit, mapping = _real_chest_xray()
    steps = grid_steps(mapping)
    base = _blurred(unit)
    reached = psnr(unit, base)
    empty = code_residual(unit, base, steps, reached - 1.0)
    assert len(empty) < 200
    restored = add_residual(base, empty, steps)
    assert np.array_equal(np.rint(restored * steps), np.rint(np.clip(base, 0, 1) * steps))


def test_a_16_bit_and_a_floating_point_image_count_in_their_own_levels():
    rng = np.random.default_rng(0)
    deep = np.rint(smooth_image(96, 80) * 40000 + rng.normal(0, 30, (96, 80))).astype(np.uint16)
    real = smooth_image(96, 80, seed=1).astype(np.float32) * 3.5 - 1.0
    for pixels, steps in ((deep, int(deep.max()) - int(deep.min())), (real, MAX_STEPS)):
        mapping = IntensityMapping.of(pixels)
        assert grid_steps(mapping) == steps
        unit = mapping.forward(pixels)
        restored = add_residual(
            _blurred(unit), code_residual(unit, _blurred(unit), steps, 45.0), steps
        )
        assert psnr(unit, restored) >= 45.0


def test_a_residual_that_is_not_one_fails_cleanly():
    base = np.zeros((32, 32), dtype=np.float32)
    with pytest.raises(PrimisError, match=r"scan\.primiskey: unreadable high-fidelity layer"):
        add_residual(base, b"not a codestream", 255, "scan.primiskey")
    data = code_residual(np.ones((16, 16), np.float32) / 2, np.zeros((16, 16)), 255, 40.0)
    with pytest.raises(PrimisError, match="does not fit the image"):
        add_residual(base, data, 255)


@pytest.fixture(scope="module")
def fidelity_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny test model exported with a high-fidelity layer at 44 dB."""
    out = tmp_path_factory.mktemp("fidelity") / "model"
    run_cli("export", tiny_model_dir, "--out", out, "--residual-psnr", 44, check=True)
    return out


def test_a_fidelity_model_restores_to_its_psnr_and_its_public_file_is_unchanged(
    tiny_model_dir, fidelity_model_dir
):
    plain, fine = load_model(tiny_model_dir), load_model(fidelity_model_dir)
    assert fine.hash != plain.hash and fine.network.config.residual_psnr == 44.0
    pixels = np.rint(smooth_image(80, 96) * 4000).astype(np.uint16)
    mapping = IntensityMapping.of(pixels)
    unit = mapping.forward(pixels)
    shared = {}
    for name, model in (("plain", plain), ("fine", fine)):
        shared[name] = share_image(unit, mapping, model, model.obfuscation, refine_steps=0)
        restored, key = reconstruct(shared[name].public, shared[name].key, model)
        shared[name + "_psnr"] = psnr(unit, mapping.forward(restored))
        shared[name + "_key"] = key
    assert shared["fine_psnr"] >= 44.0 > shared["plain_psnr"]
    # The layer is in the key alone: the public file is as large and shows as many vectors.
    public = {name: PublicFile.from_bytes(shared[name].public) for name in ("plain", "fine")}
    assert len(shared["fine"].public) == len(shared["plain"].public)
    assert public["fine"].vectors.shape == public["plain"].vectors.shape
    key = shared["fine_key"]
    assert key.header.residual == len(key.residual_payload) > 0
    assert shared["fine"].key[8:10] == b"\x00\x05" and shared["plain"].key[8:10] == b"\x00\x04"
    assert (
        shared["plain_key"].header.residual is None and shared["plain_key"].residual_payload == b""
    )


def test_a_fidelity_key_needs_every_code_map(tmp_path, fidelity_model_dir):
    source = tmp_path / "scan.png"
    Image.fromarray(np.rint(smooth_image(64, 64) * 255).astype(np.uint8)).save(source)
    result = ambiguate_cli(fidelity_model_dir, source, out=tmp_path / "out", extra=["--maps", "0"])
    assert_clean_failure(result, "needs every code map")


def test_a_version_5_key_without_its_layer_is_refused(fidelity_model_dir):
    fine = load_model(fidelity_model_dir)
    unit = smooth_image(64, 64).astype(np.float32)
    shared = share_image(unit, IntensityMapping.of(unit), fine, fine.obfuscation, refine_steps=0)
    key = KeyFile.from_bytes(shared.key)
    stripped = KeyFile(key.header.model_copy(update={"residual": None}), key.payload).to_bytes()
    forged = stripped[:8] + b"\x00\x05" + stripped[10:-32]
    with pytest.raises(PrimisError, match="residual does not fit version 5"):
        KeyFile.from_bytes(forged + hashlib.sha256(forged).digest())


@pytest.mark.skipif("cxr-hq" not in bundled_models(), reason="no cxr-hq in this checkout")
def test_the_bundled_high_fidelity_model_reaches_42_db_on_real_chest_xrays():
    paths = cxr_images()[-3:]
    model = load_model("cxr-hq")
    default = load_model("cxr")
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("L"))
        mapping = IntensityMapping.of(pixels)
        unit = mapping.forward(pixels)
        shared = share_image(unit, mapping, model, model.obfuscation, refine_steps=0)
        restored, _ = reconstruct(shared.public, shared.key, model)
        assert psnr(unit, mapping.forward(restored)) >= 42.0, path.name
        plain = share_image(unit, mapping, default, default.obfuscation, refine_steps=0)
        assert len(shared.public) == len(plain.public)


def test_a_fidelity_models_strict_public_file_size_depends_only_on_the_image_size(
    fidelity_model_dir,
):
    from primis.privacy import PRIVACY_MODES

    model = load_model(fidelity_model_dir)
    sizes, keys = set(), set()
    for seed in range(3):  # three images of one size, of different detail
        unit = smooth_image(96, 112, seed).astype(np.float32) ** (1 + seed)
        mapping = IntensityMapping.of(unit)
        strict = PRIVACY_MODES["strict"].settings
        shared = share_image(unit, mapping, model, strict, refine_steps=0)
        sizes.add(len(shared.public))
        keys.add(len(shared.key))
    assert len(sizes) == 1 and len(keys) == 3  # only the key follows the content


def test_the_attack_suites_authorized_view_carries_the_layer(tiny_model_dir, fidelity_model_dir):
    from primis.attacks import authorized_view, make_targets

    unit = smooth_image(80, 96, seed=4).astype(np.float32)
    for directory, at_least in ((tiny_model_dir, None), (fidelity_model_dir, 44.0)):
        model = load_model(directory)
        target = make_targets(model, [unit], model.obfuscation, model.network.config.k, 0)[0]
        view = authorized_view(model, target)
        if at_least is None:
            assert psnr(unit, view) < 44.0
        else:
            assert psnr(unit, view) >= at_least


def test_rate_control_reports_the_psnr_a_layer_keys_holder_restores():
    """Rate control scores each try without decoding its key; the PSNR it reports is the one
    the holder of the key restores, layer included."""
    from primis.sharing import RateControl

    model = load_model("cxr-hq")
    unit, mapping = _real_chest_xray()
    unit = unit[:192, :160]
    shared = share_image(
        unit, mapping, model, model.obfuscation, refine_steps=0, rate=RateControl(quality=40.0)
    )
    restored = mapping.forward(reconstruct(shared.public, shared.key, model)[0])
    assert shared.psnr == pytest.approx(psnr(unit, restored), abs=1e-9)
    assert shared.psnr >= model.network.config.residual_psnr
