"""PSNR/SSIM/Y conversion checked against independent code written here (scipy, skimage)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import convolve2d
from scipy.signal.windows import gaussian

from pipeline.evaluate import metrics
from pipeline.imageio import read_image

# ---------------------------------------------------------------------------------------------
# independent reference implementations (deliberately written differently from the module)
# ---------------------------------------------------------------------------------------------


def y_reference(rgb: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr Y written from its published matrix (inputs scaled to [0, 1])."""
    r, g, b = (rgb[..., i].astype(np.float64) / 255.0 for i in range(3))
    return 16.0 + 65.481 * r + 128.553 * g + 24.966 * b


def psnr_reference(a: np.ndarray, b: np.ndarray, border: int) -> float:
    a = a[border:-border, border:-border]
    b = b[border:-border, border:-border]
    return 20.0 * np.log10(255.0) - 10.0 * np.log10(np.mean((a - b) ** 2))


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM with a 2-D scipy convolution over the valid region (MATLAB ssim_index style)."""
    w1 = gaussian(11, 1.5)
    win = np.outer(w1, w1)
    win /= win.sum()

    def filt(x):
        return convolve2d(x, np.rot90(win, 2), mode="valid")

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = filt(a), filt(b)
    s11 = filt(a * a) - mu1**2
    s22 = filt(b * b) - mu2**2
    s12 = filt(a * b) - mu1 * mu2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return float(m.mean())


@pytest.fixture(scope="module")
def butterfly(set5_dir) -> np.ndarray:
    img, _ = read_image(set5_dir / "butterfly.png")
    return img


def _noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(img + rng.normal(0, sigma, img.shape)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Y conversion
# ---------------------------------------------------------------------------------------------


def test_y_of_known_colours():
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    y = metrics.rgb_to_y(px)
    np.testing.assert_allclose(
        y[0], [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-9
    )
    assert y.dtype == np.float64


def test_y_matches_independent_formulas(butterfly):
    from skimage.color import rgb2ycbcr

    y = metrics.rgb_to_y(butterfly)
    np.testing.assert_allclose(y, y_reference(butterfly), atol=1e-9)
    np.testing.assert_allclose(y, rgb2ycbcr(butterfly)[..., 0], atol=1e-9)
    # not rounded: MATLAB's uint8 path would round, the SR protocol (BasicSR, reference) does not
    assert not np.allclose(y, np.round(y))


def test_grey_is_its_own_y_and_rgb_grey_maps_back():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(metrics.rgb_to_y(grey), grey.astype(np.float64))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    # a neutral RGB pixel (v, v, v) stands for grey v (not its studio-range Y)
    np.testing.assert_allclose(metrics.rgb_to_gray(rgb), grey, atol=1e-9)
    a, b = metrics.luminance_pair(rgb, grey)
    np.testing.assert_allclose(a, b, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# PSNR and shave
# ---------------------------------------------------------------------------------------------


def test_psnr_constant_offset_on_grey():
    hr = np.full((40, 40), 100, np.uint8)
    sr = hr + 5
    assert metrics.psnr(sr, hr, scale=2) == pytest.approx(20 * np.log10(255 / 5), abs=1e-9)


def test_psnr_matches_independent_code(butterfly):
    sr = _noisy(butterfly, 8.0)
    for scale in (2, 3, 4):
        want = psnr_reference(y_reference(sr), y_reference(butterfly), scale)
        assert metrics.psnr(sr, butterfly, scale) == pytest.approx(want, abs=1e-9)


def test_psnr_matches_skimage(butterfly):
    from skimage.metrics import peak_signal_noise_ratio

    sr = _noisy(butterfly, 5.0, seed=3)
    s = 3
    want = peak_signal_noise_ratio(
        y_reference(butterfly)[s:-s, s:-s], y_reference(sr)[s:-s, s:-s], data_range=255
    )
    assert metrics.psnr(sr, butterfly, s) == pytest.approx(want, abs=1e-9)


def test_psnr_rgb_mode_uses_all_channels():
    rng = np.random.default_rng(1)
    hr = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    sr = hr.copy()
    sr[..., 2] = np.clip(sr[..., 2].astype(int) + 10, 0, 255)  # blue only
    d = (sr.astype(float) - hr)[8:-8, 8:-8]
    want = 10 * np.log10(255**2 / np.mean(d**2))
    assert metrics.psnr(sr, hr, 8, y_channel=False) == pytest.approx(want, abs=1e-9)


def test_shave_ignores_exactly_scale_pixels():
    hr = np.full((32, 32, 3), 120, np.uint8)
    sr = hr.copy()
    sr[:3, :, :] = 0  # damage inside the 3-px border
    sr[:, -3:, :] = 255
    assert metrics.psnr(sr, hr, scale=3) == float("inf")
    sr[3, 10, :] = 130  # first row inside the border counts
    assert np.isfinite(metrics.psnr(sr, hr, scale=3))
    assert metrics.psnr(sr, hr, scale=4) == float("inf")


def test_identical_images():
    img = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    assert metrics.psnr(img, img, 2) == float("inf")
    assert metrics.ssim(img, img, 2) == pytest.approx(1.0)


def test_size_mismatch_and_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="SR is 10x12 but HR is 10x10"):
        metrics.psnr(np.zeros((12, 10, 3), np.uint8), np.zeros((10, 10, 3), np.uint8), 2)
    with pytest.raises(ValueError, match="expected an HxWx3 or HxW"):
        metrics.rgb_to_y(np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="too small to shave"):
        metrics.psnr(np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8), 2)


# ---------------------------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------------------------


def test_gaussian_window_is_fspecial():
    g = metrics.gaussian_window()
    w2 = np.outer(g, g)
    x, y = np.meshgrid(np.arange(-5, 6), np.arange(-5, 6))
    want = np.exp(-(x**2 + y**2) / (2 * 1.5**2))
    np.testing.assert_allclose(w2, want / want.sum(), atol=1e-15)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_ssim_matches_scipy_reference(butterfly, scale):
    sr = _noisy(butterfly, 12.0, seed=scale)
    a = y_reference(sr)[scale:-scale, scale:-scale]
    b = y_reference(butterfly)[scale:-scale, scale:-scale]
    assert metrics.ssim(sr, butterfly, scale) == pytest.approx(ssim_reference(a, b), abs=1e-10)


def test_ssim_matches_skimage(butterfly):
    from skimage.metrics import structural_similarity

    sr = _noisy(butterfly, 20.0, seed=7)
    s = 2
    a = y_reference(sr)[s:-s, s:-s]
    b = y_reference(butterfly)[s:-s, s:-s]
    want = structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    assert metrics.ssim(sr, butterfly, s) == pytest.approx(want, abs=1e-6)


def test_ssim_on_grey_pair_uses_grey_directly():
    rng = np.random.default_rng(5)
    hr = rng.integers(0, 256, (40, 36), dtype=np.uint8)
    sr = _noisy(hr, 10.0)
    want = ssim_reference(hr[2:-2, 2:-2].astype(float), sr[2:-2, 2:-2].astype(float))
    assert metrics.ssim(sr, hr, 2) == pytest.approx(want, abs=1e-10)
    # an RGB SR of a grey HR is compared on the grey scale
    sr_rgb = np.repeat(sr[..., None], 3, axis=2)
    assert metrics.ssim(sr_rgb, hr, 2) == pytest.approx(want, abs=1e-10)


# ---------------------------------------------------------------------------------------------
# cropping and quantisation
# ---------------------------------------------------------------------------------------------


def test_crop_helpers():
    img = np.zeros((101, 77, 3), np.uint8)
    assert metrics.crop_to_multiple(img, 4).shape == (100, 76, 3)
    assert metrics.crop_to_multiple(img, 3).shape == (99, 75, 3)
    assert metrics.match_sizes(img, (33, 25), 3).shape == (99, 75, 3)
    with pytest.raises(ValueError, match="smaller than scale x LR"):
        metrics.match_sizes(img, (34, 25), 3)


def test_quantize_rounds_and_clamps():
    x = np.array([-0.1, 0.0, 0.5 / 255, 1.5 / 255, 100.4 / 255, 1.0, 1.2])
    np.testing.assert_array_equal(metrics.quantize(x), [0, 0, 0, 2, 100, 255, 255])
    np.testing.assert_array_equal(metrics.quantize(np.array([127.6]), rgb_range=255), [128])
