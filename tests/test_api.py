"""The Python API (`primis.share`, `restore`, `share_file`, `restore_file`, `RestoredDataset`)
used directly, and against the command line it serves."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import primis
from primis.errors import PrimisError
from primis.formats import KeyFile, PublicFile
from primis.io.images import PIL_SUFFIXES
from primis.io.pixels import IntensityMapping
from primis.metrics import psnr
from tests.conftest import cxr_images, run_cli, smooth_image


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return primis.load_model(tiny_model_dir, device="cpu")


@pytest.fixture
def fixed_randomness(monkeypatch):
    """os.urandom (every random draw of sharing) from a seeded generator; calling the fixture's
    value starts the same sequence again."""
    state = {}

    def restart() -> None:
        state["rng"] = np.random.default_rng(7)

    restart()
    monkeypatch.setattr(os, "urandom", lambda count: state["rng"].bytes(count))
    return restart


def _png(folder, name: str, height: int, width: int, seed: int):
    folder.mkdir(exist_ok=True)
    path = folder / name
    Image.fromarray((smooth_image(height, width, seed) * 255).round().astype(np.uint8)).save(path)
    return path


def test_an_array_comes_back_with_its_size_dtype_and_range(model):
    pixels = (smooth_image(37, 51, 3) * 3000 + 500).astype(np.uint16)
    shared = primis.share(pixels, model=model, refine_steps=0)
    assert isinstance(shared.public, bytes) and isinstance(shared.key, bytes)
    assert shared.pixels == pixels.size and len(shared.file_id) == 32
    restored = primis.restore(shared.public, shared.key, model=model)
    assert restored.shape == pixels.shape and restored.dtype == np.uint16
    assert pixels.min() <= restored.min() and restored.max() <= pixels.max()
    view = primis.attacker_view(shared.public, model=model)
    assert view.dtype == np.float32 and view.shape[0] >= 37 and view.shape[1] >= 51
    # The pixels come back: with the bundled model the reconstruction is close to the input
    # (an unrelated image of the same range scores about 11 dB here).
    real = primis.load_model("cxr", device="cpu")
    shared = primis.share(pixels, model=real, refine_steps=0)
    restored = primis.restore(shared.public, shared.key, model=real)
    assert psnr(pixels / pixels.max(), restored / pixels.max()) > 20


def test_options_reach_the_files(tmp_path, model):
    path = _png(tmp_path, "x.png", 40, 48, 1)
    shared = primis.share(
        str(path),
        model=model,
        k=1,
        maps=[0],
        refine_steps=1,
        obfuscation={"fill": 0.5, "mask_signs": False},
    )
    public = PublicFile.from_bytes(shared.public)
    key = KeyFile.from_bytes(shared.key)
    assert (public.header.k, public.header.mask_signs) == (1, False)
    assert key.header.maps == [0] and key.header.source["format"] == "png"
    restored = primis.restore(shared.public, shared.key, model=model)
    assert restored.shape == (40, 48) and restored.dtype == np.uint8


@pytest.mark.parametrize(
    ("privacy", "obfuscation", "leaks"),
    [
        ("strict", None, None),
        ("compact", None, "links each public file to its image"),
        ("paper", None, "leaks the image"),
        ("compact", {"fill": 0.25}, "leaks the image"),
    ],
)
def test_modes_measured_to_leak_warn(model, privacy, obfuscation, leaks):
    pixels = (smooth_image(32, 32, 4) * 255).astype(np.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        primis.share(pixels, model=model, refine_steps=0, privacy=privacy, obfuscation=obfuscation)
    said = [w for w in caught if issubclass(w.category, primis.PrivacyWarning)]
    assert len(said) == int(leaks is not None), [str(w.message) for w in caught]
    assert not leaks or leaks in str(said[0].message)
    assert all(w.filename == __file__ for w in said)  # points at the caller's line


def test_bad_input_is_one_clear_error(tmp_path, model):
    cases = [
        (lambda: primis.share(np.zeros((2, 3, 4, 5)), model=model), "2-D"),
        (lambda: primis.share(np.array([["a"]]), model=model), "non-numeric"),
        (lambda: primis.share(np.full((8, 8), np.nan), model=model), "NaN"),
        (lambda: primis.share(tmp_path / "missing.png", model=model), "no such file"),
        (lambda: primis.share(np.zeros((8, 8)), model=model, obfuscation={"fill": 2}), "fill"),
        (lambda: primis.share(np.zeros((8, 8)), model=model, obfuscation=0.5), "mapping"),
        (lambda: primis.share(np.zeros((8, 8)), model=model, k=99), "k must"),
        (lambda: primis.load_model(tmp_path / "nowhere"), "no such run directory"),
        (lambda: primis.RestoredDataset(tmp_path / "nowhere", tmp_path, model), "no such"),
    ]
    for call, fragment in cases:
        with pytest.raises(PrimisError, match=fragment) as caught:
            call()
        assert "\n" not in str(caught.value)
    one = primis.share(np.eye(16), model=model, refine_steps=0)
    other = primis.share(np.eye(16), model=model, refine_steps=0)
    with pytest.raises(PrimisError, match="another public file"):
        primis.restore(one.public, other.key, model=model)


def test_share_file_and_restore_file_do_what_the_commands_do_per_file(tmp_path, model):
    path = _png(tmp_path / "in", "scan.png", 33, 41, 2)
    public_dir, key_dir, out_dir = tmp_path / "public", tmp_path / "keys", tmp_path / "out"
    done = primis.share_file(path, public_dir, key_dir, model, names="stem", refine_steps=0)
    assert done.public_path == (public_dir / "scan.primis").absolute()
    assert done.key_path.stat().st_mode & 0o777 == 0o600
    assert done.key_bytes == done.key_path.stat().st_size and done.key_bits_per_pixel > 0
    assert str(path.absolute()) in (key_dir / "manifest.jsonl").read_text()
    assert done.file_id in (public_dir / "manifest.jsonl").read_text()
    stem = {"names": "stem"}
    assert primis.share_file(path, public_dir, key_dir, model, **stem) is None  # outputs exist
    redone = primis.share_file(
        path, public_dir, key_dir, model, refine_steps=0, overwrite=True, **stem
    )
    assert redone.file_id != done.file_id
    by_id = primis.share_file(path, tmp_path / "p2", tmp_path / "k2", model, refine_steps=0)
    assert by_id.public_path.stem == by_id.file_id  # the default: nothing of the input's name

    target = primis.restore_file(done.public_path, key_dir, out_dir, model)
    assert target == out_dir / "scan.png" and target.stat().st_mode & 0o777 == 0o600
    expected = primis.restore(done.public_path.read_bytes(), done.key_path.read_bytes(), model)
    np.testing.assert_array_equal(np.asarray(Image.open(target)), expected)
    assert primis.restore_file(done.public_path, key_dir, out_dir, model) is None
    view = primis.attacker_view_file(done.public_path, tmp_path / "view", model)
    assert view.suffix == ".png" and view.is_file()
    with pytest.raises(PrimisError, match="no such file"):
        primis.restore_file(done.public_path, tmp_path / "nokeys", out_dir, model, overwrite=True)


def test_api_and_command_line_give_the_same_bytes(tmp_path, tiny_model_dir, fixed_randomness):
    """Same image, same random draws: `share_file` and `primis ambiguate` write identical
    files, and `restore_file` and `primis disambiguate` identical images."""
    path = _png(tmp_path / "in", "scan.png", 45, 38, 4)
    options = {"k": 1, "refine_steps": 2, "obfuscation": {"fill": 0.5}}
    api, cli = tmp_path / "api", tmp_path / "cli"
    model = primis.load_model(tiny_model_dir)
    fixed_randomness()
    primis.share_file(path, api / "public", api / "keys", model, names="stem", **options)
    primis.restore_file(api / "public" / "scan.primis", api / "keys", api / "out", model)
    fixed_randomness()
    run_cli(
        "ambiguate",
        "--names",
        "stem",
        path,
        "--model",
        tiny_model_dir,
        "--public-dir",
        cli / "public",
        "--key-dir",
        cli / "keys",
        "--k",
        "1",
        "--refine-steps",
        "2",
        "--fill",
        "0.5",
        check=True,
    )
    run_cli(
        "disambiguate",
        cli / "public" / "scan.primis",
        "--model",
        tiny_model_dir,
        "--key-dir",
        cli / "keys",
        "--out-dir",
        cli / "out",
        check=True,
    )
    for name in ("public/scan.primis", "keys/scan.primiskey", "out/scan.png"):
        assert (api / name).read_bytes() == (cli / name).read_bytes(), name


def test_restored_dataset_serves_authorized_images(tmp_path, model):
    folder = tmp_path / "in"
    for i in range(3):
        _png(folder, f"img{i}.png", 32, 40, 10 + i)
    public_dir, key_dir = tmp_path / "public", tmp_path / "keys"
    for path in sorted(folder.iterdir()):
        primis.share_file(path, public_dir, key_dir, model, names="stem", refine_steps=0)
    dataset = primis.RestoredDataset(public_dir, key_dir, model, transform=lambda x: x * 2)
    assert len(dataset) == 3 and [p.stem for p in dataset.paths] == ["img0", "img1", "img2"]
    (batch,) = list(torch.utils.data.DataLoader(dataset, batch_size=3))
    assert batch.shape == (3, 1, 32, 40) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 2
    key = (key_dir / "img1.primiskey").read_bytes()
    restored = primis.restore((public_dir / "img1.primis").read_bytes(), key, model)
    mapping = IntensityMapping.from_dict(KeyFile.from_bytes(key).header.intensity)
    np.testing.assert_array_equal(dataset[1][0].numpy(), 2 * mapping.forward(restored))
    (key_dir / "img2.primiskey").unlink()
    with pytest.raises(PrimisError, match="no key for 1 of 3"):
        primis.RestoredDataset(public_dir, key_dir, model)


def test_wrapped_keys_open_with_an_identity_or_passphrase(tmp_path, model):
    from primis.keywrap import generate_identity, load_recipient, wrap

    private_pem, public_pem = generate_identity()
    (tmp_path / "alice").write_bytes(private_pem)
    (tmp_path / "alice.pub").write_bytes(public_pem)

    shared = primis.share(np.eye(24) * 200, model=model, refine_steps=0)
    wrapped = wrap(shared.key, [load_recipient(tmp_path / "alice.pub")], "secret words")
    plain = primis.restore(shared.public, shared.key, model)
    for opener in ({"identity": tmp_path / "alice"}, {"passphrase": "secret words"}):
        np.testing.assert_array_equal(
            primis.restore(shared.public, wrapped, model, **opener), plain
        )
    with pytest.raises(PrimisError, match="is wrapped"):
        primis.restore(shared.public, wrapped, model)


def test_the_package_stays_light_until_the_api_is_used():
    code = (
        "import sys, primis, primis.cli\n"
        "print('torch' in sys.modules or 'numba' in sys.modules, callable(primis.share))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["False", "True"], result.stderr


def test_a_real_chest_xray_round_trip_with_the_bundled_model():
    from primis.modelstore import bundled_models

    if "cxr" not in bundled_models():
        pytest.skip("the bundled 'cxr' model is not installed")
    path = cxr_images()[0]
    model = primis.load_model("cxr", device="cpu")
    shared = primis.share(path, model=model, refine_steps=0)
    restored = primis.restore(shared.public, shared.key, model=model).astype(np.float64)
    original = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    psnr = 10 * np.log10(255**2 / np.mean((restored - original) ** 2))
    assert restored.shape == original.shape and psnr > 25, psnr
    assert 8 * len(shared.key) / original.size < 1.0


def test_export_model_fits_a_key_model_that_keys_then_use(tmp_path, tiny_model_dir):
    images = []
    for seed in range(3):
        images.append(tmp_path / f"train{seed}.png")
        Image.fromarray((smooth_image(64, 80, seed) * 255).astype(np.uint8)).save(images[-1])
    plain = primis.export_model(tiny_model_dir, tmp_path / "plain", half=True)
    digest = primis.export_model(tiny_model_dir, tmp_path / "keyed", key_images=images)
    keyed = primis.load_model(tmp_path / "keyed")
    assert keyed.hash == digest != plain and keyed.key_model is not None
    assert primis.load_model(tmp_path / "plain").key_model is None
    shared = primis.share(images[0], model=keyed)
    assert KeyFile.from_bytes(shared.key).header.coding == "context"
    assert primis.restore(shared.public, shared.key, model=keyed).shape == (64, 80)


def test_share_sets_the_key_size_by_weight_or_target():
    model = primis.load_model("cxr")  # its key model prices the atoms
    image = (smooth_image(160, 192, 5) * 4095).astype(np.uint16)
    plain = primis.share(image, model=model, refine_steps=2, rate_weight=0.0)
    weighted = primis.share(image, model=model, refine_steps=2, rate_weight=0.2)
    assert weighted.key_bits_per_pixel < plain.key_bits_per_pixel
    assert (plain.rate_weight, weighted.rate_weight, plain.psnr) == (0.0, 0.2, None)
    budget = primis.share(image, model=model, refine_steps=2, key_bpp=weighted.key_bits_per_pixel)
    assert budget.key_bits_per_pixel <= weighted.key_bits_per_pixel and budget.psnr > 20
    restored = primis.restore(budget.public, budget.key, model=model)
    assert restored.dtype == np.uint16 and restored.shape == image.shape
    with pytest.raises(PrimisError, match="not both"):
        primis.share(image, model=model, key_bpp=0.3, quality=30.0)


def test_a_miniswhite_lzw_tiff_is_restored_as_miniswhite_with_its_values(tmp_path):
    import tifffile

    model = primis.load_model("cxr", device="cpu")
    pixels = (smooth_image(128, 96, 5) * 60000).astype(np.uint16)
    path = tmp_path / "white.tif"
    tifffile.imwrite(path, pixels, photometric="miniswhite", compression="lzw")
    public_dir, key_dir = tmp_path / "public", tmp_path / "keys"
    primis.share_file(path, public_dir, key_dir, model, names="stem", refine_steps=0)
    restored = primis.restore_file(public_dir / "white.primis", key_dir, tmp_path / "out", model)
    with tifffile.TiffFile(restored) as tiff:
        assert tiff.pages[0].photometric == tifffile.PHOTOMETRIC.MINISWHITE
        values = tiff.asarray()
    assert values.dtype == np.uint16 and values.shape == pixels.shape
    assert np.corrcoef(values.ravel().astype(float), pixels.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("suffix", sorted(PIL_SUFFIXES))
def test_every_pillow_format_the_reader_takes_shares_and_restores(tmp_path, model, suffix):
    pixels = (smooth_image(40, 56, 2) * 255).round().astype(np.uint8)
    path = tmp_path / f"scan{suffix}"
    Image.fromarray(pixels).save(path, **({"lossless": True} if suffix == ".webp" else {}))
    written = primis.share_file(path, tmp_path / "public", tmp_path / "keys", model, refine_steps=0)
    key = KeyFile.from_bytes(written.key_path.read_bytes())
    assert key.header.source["format"] == suffix.lstrip(".")
    restored = primis.restore_file(written.public_path, tmp_path / "keys", tmp_path / "out", model)
    assert np.asarray(Image.open(restored)).shape == pixels.shape
