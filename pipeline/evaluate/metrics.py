"""PSNR and SSIM exactly as super-resolution papers report them (pure numpy).

Why this module exists: a benchmark number is only comparable when every convention matches
the one the literature used (spec section 5): SR output quantised to 8 bits, luminance Y of
MATLAB's ``rgb2ycbcr`` (BT.601, studio range, *not* rounded), ``scale`` pixels shaved from
every border, HR cropped to ``scale`` times the LR size, SSIM with an 11x11 Gaussian window
(sigma 1.5) over the *valid* region (MATLAB ``ssim_index`` / BasicSR), K1 0.01, K2 0.03, L 255.

Grey images: MATLAB evaluation scripts use a single-channel ground truth directly as Y. When
the other image is RGB (a model's output for a grey input), it is reduced to grey with the
full-range BT.601 luma (0.299, 0.587, 0.114), which equals ``(Y - 16) * 255 / 219`` and
maps a neutral pixel (v, v, v) back to v, so both sides are on the grey image's own scale.
Treating the grey image as three equal channels and taking its Y instead would inflate PSNR
by ~1.3 dB on Set14's bridge.
"""

from __future__ import annotations

import numpy as np

# MATLAB rgb2ycbcr, Y row, for RGB in [0, 1] -> Y in [16, 235] (scaled to 0..255 inputs below).
_Y_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 255.0
# Full-range BT.601 luma; exactly _Y_WEIGHTS * 255 / 219.
_GRAY_WEIGHTS = np.array([65.481, 128.553, 24.966]) / 219.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
PEAK = 255.0


def _as_float(img: np.ndarray) -> np.ndarray:
    """uint8 0..255 or float already on the 0..255 scale -> float64."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64)
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"expected a numeric image array, got dtype {arr.dtype}")
    return arr.astype(np.float64)


def _check_image(img: np.ndarray, what: str) -> None:
    if img.ndim == 3 and img.shape[2] == 3:
        return
    if img.ndim == 2:
        return
    raise ValueError(f"{what}: expected an HxWx3 or HxW image, got shape {img.shape}")


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Luminance Y of MATLAB ``rgb2ycbcr`` on the 0..255 scale, float64, unrounded.

    ``img`` is HxWx3 uint8 (or float on the 0..255 scale). An HxW grey image is returned as
    float64 unchanged: the benchmark protocol treats a grey image as its own Y.
    """
    arr = _as_float(img)
    _check_image(arr, "rgb_to_y")
    if arr.ndim == 2:
        return arr
    return 16.0 + arr @ _Y_WEIGHTS


def rgb_to_gray(img: np.ndarray) -> np.ndarray:
    """Full-range BT.601 luma (0..255, float64): the grey value an RGB image stands for."""
    arr = _as_float(img)
    _check_image(arr, "rgb_to_gray")
    if arr.ndim == 2:
        return arr
    return arr @ _GRAY_WEIGHTS


def luminance_pair(sr: np.ndarray, hr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two single-channel images that PSNR/SSIM compare (see the module docstring)."""
    sr_a, hr_a = np.asarray(sr), np.asarray(hr)
    _check_image(sr_a, "sr")
    _check_image(hr_a, "hr")
    if sr_a.shape[:2] != hr_a.shape[:2]:
        raise ValueError(
            f"SR is {sr_a.shape[1]}x{sr_a.shape[0]} but HR is {hr_a.shape[1]}x{hr_a.shape[0]}"
        )
    if hr_a.ndim == 2 or sr_a.ndim == 2:
        return rgb_to_gray(sr_a), rgb_to_gray(hr_a)
    return rgb_to_y(sr_a), rgb_to_y(hr_a)


def shave(img: np.ndarray, border: int) -> np.ndarray:
    """Drop ``border`` pixels from every side (the first two axes)."""
    if border <= 0:
        return img
    if img.shape[0] <= 2 * border or img.shape[1] <= 2 * border:
        raise ValueError(
            f"image {img.shape[1]}x{img.shape[0]} is too small to shave {border} px per side"
        )
    return img[border:-border, border:-border]


def crop_to_multiple(img: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB ``modcrop``: keep the top-left part whose sides are multiples of ``scale``."""
    h, w = img.shape[0], img.shape[1]
    return img[: h - h % scale, : w - w % scale]


def match_sizes(hr: np.ndarray, lr_shape: tuple[int, ...], scale: int) -> np.ndarray:
    """HR cropped from the top-left to exactly ``scale`` times the LR size (as the reference).

    Raises ValueError when HR is smaller than that (the LR does not belong to this HR).
    """
    th, tw = scale * lr_shape[0], scale * lr_shape[1]
    if hr.shape[0] < th or hr.shape[1] < tw:
        raise ValueError(f"HR is {hr.shape[1]}x{hr.shape[0]}, smaller than scale x LR = {tw}x{th}")
    return hr[:th, :tw]


def mse(sr: np.ndarray, hr: np.ndarray, scale: int, y_channel: bool = True) -> float:
    """Mean squared error (0..255 scale) after luminance conversion and shaving ``scale`` px."""
    if y_channel:
        a, b = luminance_pair(sr, hr)
    else:
        a, b = _as_float(sr), _as_float(hr)
        if a.shape != b.shape:
            raise ValueError(f"SR shape {a.shape} != HR shape {b.shape}")
    diff = shave(a, scale) - shave(b, scale)
    return float(np.mean(diff * diff))


def psnr(sr: np.ndarray, hr: np.ndarray, scale: int, y_channel: bool = True) -> float:
    """PSNR in dB (peak 255) on Y with ``scale`` px shaved; ``inf`` for identical images.

    ``y_channel=False`` compares all RGB channels (the reference's rule for DIV2K validation,
    where the caller passes ``scale + 6`` as the shave).
    """
    err = mse(sr, hr, scale, y_channel)
    if err == 0.0:
        return float("inf")
    return float(10.0 * np.log10(PEAK * PEAK / err))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D normalised Gaussian; its outer product is MATLAB ``fspecial('gaussian', size, sigma)``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with ``g`` x ``g``, 'valid' region only (no border windows)."""
    k = g.size
    h, w = img.shape
    rows = np.zeros((h - k + 1, w), dtype=np.float64)
    for i in range(k):
        rows += g[i] * img[i : i + h - k + 1]
    out = np.zeros((h - k + 1, w - k + 1), dtype=np.float64)
    for j in range(k):
        out += g[j] * rows[:, j : j + w - k + 1]
    return out


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM map of two single-channel float images (0..255 scale), valid region."""
    g = gaussian_window()
    if a.shape[0] < g.size or a.shape[1] < g.size:
        raise ValueError(
            f"image {a.shape[1]}x{a.shape[0]} is smaller than the {g.size}x{g.size} SSIM window"
        )
    c1 = (SSIM_K1 * PEAK) ** 2
    c2 = (SSIM_K2 * PEAK) ** 2
    mu_a = _filter_valid(a, g)
    mu_b = _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a * mu_a
    var_b = _filter_valid(b * b, g) - mu_b * mu_b
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return num / den


def ssim(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
    """Mean SSIM on Y (grey as Y) with ``scale`` px shaved first, as BasicSR/MATLAB compute it."""
    a, b = luminance_pair(sr, hr)
    return float(ssim_map(shave(a, scale), shave(b, scale)).mean())


def quantize(sr: np.ndarray, rgb_range: float = 1.0) -> np.ndarray:
    """Model output in [0, rgb_range] (any float array) -> uint8, as the reference saves it."""
    arr = np.asarray(sr, dtype=np.float64) * (255.0 / rgb_range)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The official repository's own Python evaluation (``--protocol official``), for comparison
# ---------------------------------------------------------------------------------------------

# Its Y row: the +16 offset dropped (it cancels in PSNR's difference; it does not in SSIM).
_OFFICIAL_Y = np.array([65.738, 129.057, 25.064]) / 256.0


def official_y(img: np.ndarray) -> np.ndarray:
    """Y as the reference's test loop computes it: grey images are repeated to three channels
    first (its data loader does that), then the offset-free Y row. On a grey image this is
    0.859 x the grey value, which is why its PSNR on grey images is ~1.3 dB higher."""
    arr = _as_float(img)
    _check_image(arr, "official_y")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr @ _OFFICIAL_Y


def psnr_official(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
    """The reference's ``calc_psnr`` on a benchmark: Y difference, shave = scale, peak 255."""
    a, b = official_y(sr), official_y(hr)
    if a.shape != b.shape:
        raise ValueError(f"SR shape {a.shape} != HR shape {b.shape}")
    diff = shave(a, scale) - shave(b, scale)
    err = float(np.mean(diff * diff))
    return float("inf") if err == 0.0 else float(10.0 * np.log10(PEAK * PEAK / err))


def ssim_official(sr: np.ndarray, hr: np.ndarray, scale: int) -> float:
    """The reference's ``--ssim``: offset-free Y, shave = scale, 11x11 Gaussian over the
    *whole* image (``convolve2d`` mode 'same', symmetric boundary: border windows included)."""
    a, b = shave(official_y(sr), scale), shave(official_y(hr), scale)
    half = SSIM_WINDOW // 2
    if min(a.shape) <= half:  # a symmetric pad needs that many pixels to mirror
        raise ValueError(f"image {a.shape[1]}x{a.shape[0]} is too small for the SSIM window")
    g = gaussian_window()
    c1 = (SSIM_K1 * PEAK) ** 2
    c2 = (SSIM_K2 * PEAK) ** 2

    def filt(x: np.ndarray) -> np.ndarray:
        return _filter_valid(np.pad(x, half, mode="symmetric"), g)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a * mu_a
    var_b = filt(b * b) - mu_b * mu_b
    cov = filt(a * b) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return float((num / den).mean())


PROTOCOLS = {"standard": (psnr, ssim), "official": (psnr_official, ssim_official)}
