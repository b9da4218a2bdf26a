"""The training-curve benchmark's trend: a steady gain per doubling, followed to the target."""

import numpy as np
import pytest

from benchmarks.training_curve import TARGET_X_JPEG2000, curve_points, extrapolate


def test_the_trend_finds_the_hours_at_which_the_key_reaches_the_target():
    # JPEG 2000 doubles its rate every 6 dB; the run gains 2 dB per doubling of CPU time at a
    # steady 0.3 bpp, 6x JPEG 2000 at 35 dB: the target 2.5x lies 6*log2(2.4) dB further on.
    anchor = [{"bpp": 0.05 * 2 ** ((p - 35) / 6), "psnr": float(p)} for p in range(28, 52)]
    hours = np.linspace(0.5, 4.0, 15)
    history = [
        {"step": i, "seconds": 3600 * t, "psnr": 35 + 2 * np.log2(t), "key_bpp": 0.3}
        for i, t in enumerate(hours)
    ]
    points = curve_points(history, anchor)
    assert points[0]["x_jpeg2000"] == pytest.approx(0.3 / (0.05 * 2 ** (-1 / 3)))
    trend = extrapolate(points, anchor, budget_hours=4.0)
    assert trend["fit"]["psnr_db_per_doubling"] == pytest.approx(2.0)
    assert trend["fit"]["key_bpp_change_per_doubling"] == pytest.approx(0.0, abs=1e-9)
    expected = 2 ** (3 * np.log2(0.3 / 0.05 / TARGET_X_JPEG2000))  # where x J2K = 2.5
    assert trend["target"]["cpu_hours"] == pytest.approx(expected, rel=0.04)
    assert trend["target"]["x_jpeg2000"] <= TARGET_X_JPEG2000
    assert trend["at_budget"]["psnr"] == pytest.approx(39.0)
