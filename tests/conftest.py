"""Shared fixtures: a tiny untrained model on disk, synthetic images, and the real CXR folder."""

from __future__ import annotations

import contextlib
import io
import subprocess
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from primis.cli import main
from primis.config import ModelConfig, ObfuscationConfig
from primis.model import SparseTernaryAutoEncoder
from primis.modelstore import load_model, save_model
from primis.sharing import fit_image_keys

CXR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cxr"
TINY = ModelConfig(stem=4, channels=[8, 16], blocks=1, n=32, k=2, m=2)


def cxr_images() -> list[Path]:
    folder = CXR / "images"
    if not folder.is_dir():
        pytest.skip(f"real chest X-rays not found at {folder.resolve()} (../shared/data/cxr)")
    return sorted(folder.glob("*.jpg"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model")
    save_model(directory, SparseTernaryAutoEncoder(TINY).eval(), ObfuscationConfig())
    return directory


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A synthetic 'radiograph': smooth blobs plus a little texture, float in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.zeros((height, width))
    for _ in range(6):
        cy, cx, s = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        image += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
    image += 0.02 * rng.standard_normal((height, width))
    image -= image.min()
    return image / image.max()


def random_code(vectors: int, n: int, k: int, seed: int = 0) -> np.ndarray:
    """(vectors, n) int8 code vectors of k random entries +1 and k random entries -1 each."""
    rng = np.random.default_rng(seed)
    code = np.zeros((vectors, n), dtype=np.int8)
    for row in code:
        chosen = rng.permutation(n)[: 2 * k]
        row[chosen[:k]], row[chosen[k:]] = 1, -1
    return code


@pytest.fixture(scope="session")
def context_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a key model fitted to the codes of a few synthetic images."""
    model = load_model(tiny_model_dir)
    units = [smooth_image(64, 80, seed).astype(np.float32) for seed in range(6)]
    key_model = fit_image_keys(model, iter(units))
    assert key_model.fits(model.network.config.m, model.network.config.n, model.network.config.k)
    directory = tmp_path_factory.mktemp("context-model")
    save_model(directory, model.network, model.obfuscation, key_model=key_model)
    return directory


@pytest.fixture
def image_files(tmp_path) -> list[Path]:
    """An 8-bit grayscale PNG of odd size, a colour JPEG, and a 16-bit PNG."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    gray = (smooth_image(61, 75, 1) * 255).round().astype(np.uint8)
    Image.fromarray(gray).save(folder / "patient_gray.png")
    colour = (np.stack([smooth_image(50, 40, s) for s in (2, 3, 4)], -1) * 255).astype(np.uint8)
    Image.fromarray(colour, mode="RGB").save(folder / "patient_colour.jpg", quality=95)
    deep = (smooth_image(40, 52, 5) * 4095).round().astype(np.uint16)
    Image.fromarray(deep).save(folder / "patient_deep.png")
    return sorted(folder.iterdir())


def run_cli(*args: object, check: bool = False) -> subprocess.CompletedProcess:
    """Run `primis ARGS` in this process (fast); an escaping exception counts as a traceback."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 99
    result = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and result.returncode != 0:
        raise AssertionError(f"primis {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def ambiguate_cli(model: Path, *inputs: Path, out: Path, extra=()) -> subprocess.CompletedProcess:
    """`primis ambiguate INPUTS` into OUT/public and OUT/keys with the given model; outputs
    named by the inputs' stems unless ``extra`` says --names."""
    names = [] if "--names" in extra else ["--names", "stem"]
    return run_cli(
        "ambiguate",
        *inputs,
        "--model",
        model,
        "--public-dir",
        out / "public",
        "--key-dir",
        out / "keys",
        *names,
        *extra,
    )


def assert_restored_alike(ours: np.ndarray, theirs: np.ndarray, label: str) -> None:
    """Two restorations of the same public file and key: the key decodes exactly, but the
    decoder's float32 sums may round differently with another thread count or kernel set,
    which moves a few pixels by one unit of the stored depth and no more."""
    difference = np.abs(np.asarray(ours, np.int64) - np.asarray(theirs, np.int64))
    assert difference.shape == np.shape(theirs), label
    assert difference.max() <= 1 and np.mean(difference > 0) < 0.01, (
        label,
        int(difference.max()),
        float(np.mean(difference > 0)),
    )


def assert_clean_failure(result: subprocess.CompletedProcess, fragment: str) -> None:
    """Non-zero exit, no traceback, and an 'error:' line that mentions ``fragment``."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors, result.stderr
    assert any(fragment.lower() in line.lower() for line in errors), result.stderr
