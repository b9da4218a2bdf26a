"""Image quality metrics on arrays in [0, 1]."""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (inf for identical images)."""
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(reference: np.ndarray, test: np.ndarray) -> float:
    """Structural similarity (Gaussian window, as in Wang et al. 2004) for images in [0, 1]."""
    return float(
        structural_similarity(
            reference.astype(np.float64),
            test.astype(np.float64),
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _ssim_terms(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term (Gaussian window, sigma 1.5)."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = 0.01**2, 0.03**2
    mx, my = gaussian_filter(x, 1.5), gaussian_filter(y, 1.5)
    vx = gaussian_filter(x * x, 1.5) - mx * mx
    vy = gaussian_filter(y * y, 1.5) - my * my
    cov = gaussian_filter(x * y, 1.5) - mx * my
    cs = (2 * cov + c2) / (vx + vy + c2)
    luminance = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return float(np.mean(luminance * cs)), float(np.mean(cs))


def ms_ssim(reference: np.ndarray, test: np.ndarray) -> float | None:
    """Multi-scale SSIM (Wang, Simoncelli and Bovik 2003), 5 scales; None below 176 px."""
    if min(reference.shape) < 11 * 2 ** (len(MS_SSIM_WEIGHTS) - 1):
        return None
    x, y = reference.astype(np.float64), test.astype(np.float64)
    value = 1.0
    for scale, weight in enumerate(MS_SSIM_WEIGHTS):
        full, cs = _ssim_terms(x, y)
        last = scale == len(MS_SSIM_WEIGHTS) - 1
        value *= max(full if last else cs, 0.0) ** weight
        if not last:
            h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
            x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    return float(value)
