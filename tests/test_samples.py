import numpy as np
import pytest

import primis
from primis.io.images import read_source
from primis.samples import DEMO_SAMPLE, SAMPLES_DIR, copy_samples, sample_paths
from tests.conftest import run_cli


def test_the_samples_are_the_documented_radiographs():
    names = [path.name for path in sample_paths()]
    assert names == ["chest-cr-15bit.png", "chest-cr-8bit.jpg", "tibia-cr-10bit.png"]
    assert DEMO_SAMPLE in names
    sources = (SAMPLES_DIR / "SOURCES.md").read_text()
    for name in names:
        assert name in sources  # each file's provenance is written down
    stored_bits = {"chest-cr-15bit.png": 15, "chest-cr-8bit.jpg": 8, "tibia-cr-10bit.png": 10}
    for path in sample_paths():
        pixels = read_source(path).pixels
        bits = stored_bits[path.name]
        assert pixels.ndim == 2 and max(pixels.shape) == 384
        assert 2 ** (bits - 1) <= pixels.max() < 2**bits  # the bit depth the name promises


def test_copy_samples_writes_identical_files_and_is_idempotent(tmp_path):
    copied = copy_samples(tmp_path / "in")
    assert [path.name for path in copied] == [path.name for path in sample_paths()]
    for path, source in zip(copied, sample_paths(), strict=True):
        assert path.read_bytes() == source.read_bytes()
    assert (tmp_path / "in" / "SOURCES.md").is_file()
    before = {path: path.stat().st_mtime_ns for path in copied}
    assert copy_samples(tmp_path / "in") == copied
    assert {path: path.stat().st_mtime_ns for path in copied} == before


@pytest.mark.parametrize("path", sample_paths(), ids=lambda path: path.name)
def test_the_bundled_model_restores_each_sample(path):
    model = primis.load_model("cxr")
    original = read_source(path).pixels
    shared = primis.share(path, model=model, refine_steps=0)
    restored = primis.restore(shared.public, shared.key, model=model)
    assert restored.dtype == original.dtype and restored.shape == original.shape
    span = float(original.max()) - float(original.min())
    error = np.mean((restored.astype(np.float64) - original.astype(np.float64)) ** 2)
    assert 10 * np.log10(span**2 / error) > 28


def test_primis_samples_copies_them_for_a_first_run(tmp_path):
    result = run_cli("samples", tmp_path / "in", check=True)
    assert result.stdout.split() == [str(tmp_path / "in" / p.name) for p in sample_paths()]
    missing = run_cli("samples")
    assert missing.returncode == 2 and "Missing argument 'OUT_DIR'" in missing.stderr
