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
