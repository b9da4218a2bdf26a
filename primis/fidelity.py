"""The key's high-fidelity layer: what the network's reconstruction leaves of the image, coded
with JPEG 2000 (OpenJPEG, through imagecodecs) to the PSNR a model asks for
(``model.residual_psnr``; the bundled ``cxr-hq``).

The layer lives in the key only: the public file, and so all an attacker sees, is the same
with or without it. The residual is in integer levels of the image's own range: its stored
values for integer images of up to 16 bits of range, `MAX_STEPS` steps of the range otherwise.
The restored image reaches the PSNR (over that range, as `primis.metrics.psnr` on the model's
[0, 1] scale) on the machine that shared it; elsewhere up to the decoder's last-bit rounding.
"""

from __future__ import annotations

import math

import numpy as np

from primis.errors import PrimisError
from primis.io.pixels import IntensityMapping

MAX_STEPS = 65535
SEARCH_STEPS = 8  # bisection steps over JPEG 2000's quality setting (about 0.1 dB apart)
SEARCH_SPAN = 16.0  # dB either side of the setting the target suggests


def grid_steps(mapping: IntensityMapping) -> int:
    """Levels of the image's range the residual counts in: one per stored value for integer
    images, `MAX_STEPS` for wider ranges and floating-point images."""
    span = mapping.high - mapping.low
    if np.dtype(mapping.dtype).kind in "ui" and span <= MAX_STEPS:
        return max(1, round(span))
    return MAX_STEPS


def _levels(unit: np.ndarray, steps: int) -> np.ndarray:
    """[0, 1] values as whole levels 0..steps (int32)."""
    return np.rint(np.clip(unit, 0.0, 1.0).astype(np.float32) * steps).astype(np.int32)


def code_residual(unit: np.ndarray, base: np.ndarray, steps: int, psnr: float) -> bytes:
    """A JPEG 2000 codestream of the residual between ``unit`` (the image on [0, 1]) and
    ``base`` (the network's reconstruction, same shape) in ``steps`` levels, the smallest of
    those the search tries with which `add_residual` restores ``unit`` to at least ``psnr`` dB;
    lossless where no lossy setting reaches it."""
    import imagecodecs

    truth = unit.astype(np.float32) * steps  # in levels: float images need not sit on one
    start = _levels(base, steps)
    bits = (2 * steps).bit_length()  # the residual, offset by ``steps``, lies in 0..2*steps
    offset = (_levels(unit, steps) - start + steps).astype(np.uint16 if bits <= 16 else np.uint32)
    worst = steps**2 * 10 ** (-psnr / 10)  # the largest mean squared error in levels allowed

    def encode(level: float | None) -> tuple[bytes, bool]:
        data = imagecodecs.jpeg2k_encode(offset, level=level, codecformat="j2k", bitspersample=bits)
        restored = np.clip(
            start + imagecodecs.jpeg2k_decode(data).astype(np.int32) - steps, 0, steps
        )
        error = np.mean(np.square(restored - truth, dtype=np.float32), dtype=np.float64)
        return data, error <= worst

    # OpenJPEG's setting is a PSNR over the codestream's own peak: the target moved there.
    guess = psnr + 20 * math.log10((2**bits - 1) / steps)
    low, high = guess - SEARCH_SPAN, guess + SEARCH_SPAN
    best, reached = encode(high)
    if not reached:
        return encode(None)[0]  # lossless
    for _ in range(SEARCH_STEPS):
        middle = (low + high) / 2
        data, reached = encode(middle)
        if reached:
            best, high = data, middle
        else:
            low = middle
    return best


def add_residual(base: np.ndarray, data: bytes, steps: int, name: str = "key") -> np.ndarray:
    """The image on [0, 1] (float32): ``base`` (the network's reconstruction) plus the residual
    `code_residual` coded in ``data``; PrimisError (naming the key ``name``) when ``data`` is
    not such a residual."""
    import imagecodecs

    try:
        residual = imagecodecs.jpeg2k_decode(data)
    except Exception as err:  # imagecodecs raises its own error types per codec
        raise PrimisError(f"{name}: unreadable high-fidelity layer ({err})") from None
    if residual.shape != base.shape:
        raise PrimisError(f"{name}: the high-fidelity layer does not fit the image")
    levels = np.clip(_levels(base, steps) + residual.astype(np.int32) - steps, 0, steps)
    return (levels / np.float32(steps)).astype(np.float32)
