"""The bundled model zoo (``primis/zoo/NAME``), without loading any model: where it lives, the
default model's name and the names of the models it holds (for the command line's help)."""

from __future__ import annotations

from pathlib import Path

ZOO = Path(__file__).resolve().parent / "zoo"
DEFAULT_MODEL = "cxr"
CONFIG = "model.json"


def bundled_models() -> list[str]:
    """Names of the pretrained models shipped inside the package."""
    return sorted(p.name for p in ZOO.iterdir() if (p / CONFIG).is_file()) if ZOO.is_dir() else []
