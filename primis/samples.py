"""The sample radiographs that ship with PRIMIS (provenance and licence in
`primis/sample_images/SOURCES.md`): a first run for users without images of their own."""

from __future__ import annotations

from pathlib import Path

from primis.io.files import write_atomic

SAMPLES_DIR = Path(__file__).resolve().parent / "sample_images"
SAMPLE_SUFFIXES = (".png", ".jpg")
DEMO_SAMPLE = "chest-cr-8bit.jpg"


def sample_paths() -> list[Path]:
    """The bundled sample radiographs, sorted by name."""
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix in SAMPLE_SUFFIXES)


def copy_samples(out_dir: Path) -> list[Path]:
    """Copy the sample radiographs and their SOURCES.md into ``out_dir`` (created if needed;
    each file written atomically, an existing file with the same content left alone) and
    return the copied images' paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for source in [*sample_paths(), SAMPLES_DIR / "SOURCES.md"]:
        target = out_dir / source.name
        data = source.read_bytes()
        if not (target.is_file() and target.read_bytes() == data):
            write_atomic(target, data)
        if source.suffix in SAMPLE_SUFFIXES:
            copied.append(target)
    return copied
