"""Reading and writing images, and the intensity mapping between file values and model range.

Every reader returns a 2-D array plus the :class:`IntensityMapping` that takes it to [0, 1];
the mapping is what the key records so the authorized output gets the input's dtype and range.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from primis.errors import PrimisError

PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
INPUT_SUFFIXES = PIL_SUFFIXES | {".npy"}
MAX_PIXELS = 1 << 28
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


@dataclass(frozen=True)
class IntensityMapping:
    """Affine map from the file's values [low, high] to the model's [0, 1], and back."""

    dtype: str
    low: float
    high: float

    @classmethod
    def of(cls, pixels: np.ndarray) -> IntensityMapping:
        low, high = float(pixels.min()), float(pixels.max())
        return cls(str(pixels.dtype), low, high if high > low else low + 1.0)

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        return ((pixels.astype(np.float64) - self.low) / (self.high - self.low)).astype(np.float32)

    def inverse(self, unit: np.ndarray) -> np.ndarray:
        values = np.clip(unit.astype(np.float64), 0.0, 1.0) * (self.high - self.low) + self.low
        dtype = np.dtype(self.dtype)
        if dtype.kind in "ui":
            values = np.clip(np.rint(values), self.low, self.high)
        return values.astype(dtype)

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, data: dict) -> IntensityMapping:
        dtype = np.dtype(str(data["dtype"]))
        if dtype.kind not in "uif" or not float(data["high"]) > float(data["low"]):
            raise ValueError("invalid intensity mapping")
        return cls(dtype.name, float(data["low"]), float(data["high"]))


def _to_gray(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L"):
        pixels = np.asarray(image)
        return pixels.astype(np.uint16) if image.mode.startswith("I;16") else pixels
    if image.mode == "1":
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("L"))


def read_pixels(path: Path) -> np.ndarray:
    """A 2-D grayscale array with the file's own dtype (colour becomes luminance)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            pixels = np.load(path, allow_pickle=False)
            if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
                pixels = pixels[..., :3] @ np.array([0.299, 0.587, 0.114])
        elif suffix in PIL_SUFFIXES:
            with Image.open(path) as image:
                image.load()
                pixels = _to_gray(image)
        else:
            raise PrimisError(f"{path}: unsupported image type '{suffix or path.name}'")
    except PrimisError:
        raise
    except FileNotFoundError:
        raise PrimisError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise PrimisError(f"{path}: cannot read image ({err})".splitlines()[0]) from None
    if pixels.ndim != 2:
        raise PrimisError(f"{path}: expected a 2-D grayscale image, got shape {pixels.shape}")
    if pixels.size == 0 or pixels.dtype.kind not in "uifb":
        raise PrimisError(f"{path}: empty or non-numeric image")
    if pixels.dtype.kind == "b":
        pixels = pixels.astype(np.uint8)
    if not np.isfinite(pixels).all():
        raise PrimisError(f"{path}: image contains NaN or infinite values")
    return pixels


def read_image(path: Path) -> tuple[np.ndarray, IntensityMapping]:
    """The image as float32 in [0, 1] and the mapping that restores the file's values."""
    pixels = read_pixels(path)
    mapping = IntensityMapping.of(pixels)
    return mapping.forward(pixels), mapping


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_image(pixels: np.ndarray, suffix: str) -> bytes:
    """Serialise a 2-D array as PNG/TIFF (keeping 8 or 16 bits) or .npy."""
    import io

    buffer = io.BytesIO()
    if suffix == ".npy":
        np.save(buffer, pixels, allow_pickle=False)
    else:
        if pixels.dtype == np.uint8:
            image = Image.fromarray(pixels, mode="L")
        elif pixels.dtype.kind in "ui" and pixels.max(initial=0) < 65536 and pixels.min() >= 0:
            image = Image.fromarray(pixels.astype(np.uint16))
        else:
            raise PrimisError(f"cannot store {pixels.dtype} pixels as {suffix}; use .npy")
        image.save(buffer, format="TIFF" if suffix in (".tif", ".tiff") else "PNG")
    return buffer.getvalue()


def output_suffix(pixels_dtype: str) -> str:
    """The natural output type for restored pixels: PNG for 8/16-bit integers, else .npy."""
    dtype = np.dtype(pixels_dtype)
    return ".png" if dtype in (np.uint8, np.uint16) else ".npy"


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad the bottom and right edges up to a multiple (edge-pad tiny images)."""
    h, w = image.shape
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return image
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(image, ((0, ph), (0, pw)), mode=mode)


def list_images(paths: list[Path]) -> list[Path]:
    """Expand files and folders (recursively) into the image files they hold, sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.suffix.lower() in INPUT_SUFFIXES)
        else:
            found.append(path)
    return found
