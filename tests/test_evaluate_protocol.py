"""`--protocol official` (issue 15, item 6): the DNLAN repository's own Python evaluation, which
gives other numbers than the MATLAB-style protocol papers report (Set14 x2 bicubic 30.33 vs
30.23 dB; 30.325 and 30.230 to three decimals), reproduced for comparison and checked against an independent scipy computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import convolve2d

from pipeline.config import EvalConfig, load_config
from pipeline.evaluate import metrics
from pipeline.evaluate.driver import evaluate


def _scipy_official_ssim(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
    """The spec's description of the reference's SSIM, written with scipy (the reference's
    own tool): offset-free Y, shave, convolve2d 'same' + symmetric boundary, mean of the map."""
    coeffs = np.array([65.738, 129.057, 25.064]) / 256

    def y(img):
        img = img.astype(np.float64)
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
        return (img @ coeffs)[scale:-scale, scale:-scale]

    a, b = y(sr), y(hr)
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def f(z):
        return convolve2d(z, w, mode="same", boundary="symm")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ma, mb = f(a), f(b)
    va, vb, cov = f(a * a) - ma**2, f(b * b) - mb**2, f(a * b) - ma * mb
    return float((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean())


def test_official_metrics_against_scipy_and_the_grey_offset():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    assert metrics.ssim_official(sr, hr, 3) == pytest.approx(_scipy_official_ssim(sr, hr, 3), abs=1e-12)
    assert metrics.ssim_official(sr, hr, 3) != pytest.approx(metrics.ssim(sr, hr, 3), abs=1e-4)
    # colour: the offset cancels and the Y rows agree, so PSNR is the standard one
    assert metrics.psnr_official(sr, hr, 3) == pytest.approx(metrics.psnr(sr, hr, 3), abs=1e-5)
    # grey: repeated to RGB first, so the difference shrinks by 219.859/256 (+1.32 dB)
    g_sr, g_hr = sr[..., 0], hr[..., 0]
    gain = -20 * np.log10((65.738 + 129.057 + 25.064) / 256)
    assert metrics.psnr_official(g_sr, g_hr, 3) - metrics.psnr(g_sr, g_hr, 3) == pytest.approx(gain)
    assert metrics.ssim_official(g_sr, g_hr, 3) == pytest.approx(_scipy_official_ssim(g_sr, g_hr, 3), abs=1e-12)


def test_set14_x2_bicubic_under_both_protocols(shared_data, tmp_path):
    def run(protocol):
        cfg = load_config(EvalConfig, overrides={
            "method": "bicubic", "benchmarks": ["Set14"], "scales": [2], "data_dir": str(shared_data),
            "mlflow": False, "out": str(tmp_path / protocol), "figure_images": 0, "protocol": protocol,
        })  # fmt: skip
        (summary,) = evaluate(cfg).outcome.summaries
        return summary.psnr

    # the table prints 3 decimals: 30.230 (the literature's MATLAB number is 30.24) and 30.325,
    # the "30.33" of the issue
    assert f"{run('standard'):.3f}" == "30.230"
    assert f"{run('official'):.3f}" == "30.325"
