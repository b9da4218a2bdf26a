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
SEARCH_STEPS = 8  # JPEG 2000 encodings tried per layer, at most (then lossless)
SEARCH_TOLERANCE = 0.1  # dB above the target at which a try is kept without trying closer


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

    def encode(level: float | None, residual: np.ndarray = offset) -> tuple[bytes, float]:
        """The codestream of ``residual`` at OpenJPEG's setting ``level`` (None: lossless) and
        the PSNR it restores."""
        data = imagecodecs.jpeg2k_encode(
            residual, level=level, codecformat="j2k", bitspersample=bits
        )
        restored = np.clip(
            start + imagecodecs.jpeg2k_decode(data).astype(np.int32) - steps, 0, steps
        )
        error = np.mean(np.square(restored - truth, dtype=np.float32), dtype=np.float64)
        return data, math.inf if error == 0 else 10 * math.log10(steps**2 / error)

    nothing, reached = encode(None, np.full_like(offset, steps))  # the network alone
    if reached >= psnr:
        return nothing
    # OpenJPEG's setting is a PSNR over the codestream's own peak, so the PSNR reached mostly
    # moves with it dB for dB: each try corrects the setting by what the last one missed,
    # within the settings not yet ruled out (bisecting them where the correction leaves them:
    # at coarse settings the PSNR moves in steps).
    level = psnr + 20 * math.log10((2**bits - 1) / steps)
    low, high = -math.inf, math.inf  # settings known to miss and to reach the target
    best: bytes | None = None
    for _ in range(SEARCH_STEPS):
        data, reached = encode(level)
        if reached >= psnr:
            best = data if best is None or len(data) < len(best) else best
            if reached - psnr <= SEARCH_TOLERANCE or math.isinf(reached):
                break
            high = level
        else:
            low = level
        level += psnr - reached + (0.0 if reached >= psnr else SEARCH_TOLERANCE / 2)
        if not low < level < high:
            level = (low + high) / 2 if math.isfinite(low + high) else level
    return encode(None)[0] if best is None else best  # lossless where no setting reaches it


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
