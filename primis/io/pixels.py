"""A decoded image, and the intensity mapping between its values and the model's range.

Every reader (`primis.io.images`, `primis.io.dicom`) returns a :class:`SourceImage`;
:class:`IntensityMapping` takes its pixels to [0, 1] and back, and is what the key records so
the authorized output gets the input's dtype, range and orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from primis.limits import MAX_PIXELS


def _bands(array: np.ndarray) -> list[slice]:
    """Slices of ``array``'s first axis of about a million values each."""
    rows = max(1, (1 << 20) // max(1, array[0].size)) if array.ndim > 1 else max(1, len(array))
    return [slice(start, start + rows) for start in range(0, len(array), rows)]


@dataclass(frozen=True)
class IntensityMapping:
    """Affine map from the file's values [low, high] to the model's [0, 1], and back.

    ``invert`` flips the scale (DICOM MONOCHROME1, where high values are dark), so the model
    always sees bright bone on a dark background.
    """

    dtype: str
    low: float
    high: float
    invert: bool = False

    @classmethod
    def of(cls, pixels: np.ndarray, invert: bool = False) -> IntensityMapping:
        low, high = float(pixels.min()), float(pixels.max())
        return cls(str(pixels.dtype), low, high if high > low else low + 1.0, invert)

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """The file's values as float32 in [0, 1] (in float64, a band of rows at a time, so a
        large image needs no full-size float64 copies)."""
        out = np.empty(pixels.shape, dtype=np.float32)
        for band in _bands(pixels):
            unit = (pixels[band].astype(np.float64) - self.low) / (self.high - self.low)
            out[band] = 1.0 - unit if self.invert else unit
        return out

    def inverse(self, unit: np.ndarray) -> np.ndarray:
        """[0,1] pixels back to the input's dtype and range (banded as `forward` is)."""
        dtype = np.dtype(self.dtype)
        out = np.empty(unit.shape, dtype=dtype)
        for band in _bands(unit):
            part = np.clip(unit[band].astype(np.float64), 0.0, 1.0)
            values = (1.0 - part if self.invert else part) * (self.high - self.low) + self.low
            if dtype.kind in "ui":
                values = np.clip(np.rint(values), self.low, self.high)
            out[band] = values
        return out

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "low": self.low, "high": self.high, "invert": self.invert}

    @classmethod
    def from_dict(cls, data: dict) -> IntensityMapping:
        dtype = np.dtype(str(data["dtype"]))
        if dtype.kind not in "uif" or not float(data["high"]) > float(data["low"]):
            raise ValueError("invalid intensity mapping")
        return cls(dtype.name, float(data["low"]), float(data["high"]), bool(data["invert"]))


@dataclass(frozen=True)
class SourceImage:
    """A decoded input: 2-D pixels in the file's dtype, and private facts about the file.

    ``details`` (format, DICOM photometric interpretation, rescale, window, bit depth) is
    private: it goes into the key, never into the public file.
    """

    pixels: np.ndarray
    details: dict
    invert: bool = False

    @property
    def mapping(self) -> IntensityMapping:
        return IntensityMapping.of(self.pixels, self.invert)


def gray(pixels: np.ndarray) -> np.ndarray:
    """Colour (last axis 3 or 4) to luminance (ITU-R 601), keeping the dtype."""
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        luma = pixels[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.rint(luma).astype(pixels.dtype) if pixels.dtype.kind in "ui" else luma
    return pixels


def check_size(pixels: int, path: Path) -> None:
    """Refuse an image whose header declares more than MAX_PIXELS pixels (all pages or frames
    together), before it is decoded."""
    MAX_PIXELS.check(pixels, str(path))


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Reflect-pad the bottom and right edges up to a multiple (edge-pad tiny images)."""
    h, w = image.shape
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return image
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(image, ((0, ph), (0, pw)), mode=mode)
