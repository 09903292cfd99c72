"""PSNR and SSIM on the Y channel, as the SR literature computes them.

Both take two (H, W) luma images on the [0, 255] scale (any float or integer dtype) and a
``crop_border`` with no default: SR papers shave ``scale`` pixels from each side before
measuring (VDSR, SRCNN and BasicSR all do). SSIM is Wang et al. 2004 (``ssim_index.m``): an
11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, L = 255, statistics over the 'valid'
region of the window, averaged over the map.
"""

from __future__ import annotations

import numpy as np

DATA_RANGE = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _prepare(image: np.ndarray, reference: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    if image.shape != reference.shape:
        raise ValueError(f"images differ in shape: {image.shape} vs reference {reference.shape}")
    if image.ndim != 2:
        raise ValueError(f"expected (H, W) luma images, got shape {image.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        image = image[crop_border:-crop_border, crop_border:-crop_border]
        reference = reference[crop_border:-crop_border, crop_border:-crop_border]
    return image.astype(np.float64), reference.astype(np.float64)


def psnr(image: np.ndarray, reference: np.ndarray, *, crop_border: int) -> float:
    """PSNR in dB = 10 log10(255^2 / MSE) after shaving ``crop_border`` pixels; inf if identical."""
    image, reference = _prepare(image, reference, crop_border)
    mse = np.mean((image - reference) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(DATA_RANGE**2 / mse))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """1-D normalised Gaussian; its outer product is MATLAB's ``fspecial('gaussian', 11, 1.5)``."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering with a symmetric 1-D window (MATLAB ``filter2(w, x, 'valid')``)."""
    n = window.size
    rows = np.lib.stride_tricks.sliding_window_view(image, n, axis=0) @ window  # (H-n+1, W)
    return np.lib.stride_tricks.sliding_window_view(rows, n, axis=1) @ window  # (H-n+1, W-n+1)


def ssim(image: np.ndarray, reference: np.ndarray, *, crop_border: int) -> float:
    """Mean SSIM (Wang et al. 2004, eq. 13) after shaving ``crop_border`` pixels."""
    image, reference = _prepare(image, reference, crop_border)
    if min(image.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} after cropping, got {image.shape}")
    c1 = (0.01 * DATA_RANGE) ** 2
    c2 = (0.03 * DATA_RANGE) ** 2
    window = gaussian_window()
    mu_x = _filter_valid(image, window)
    mu_y = _filter_valid(reference, window)
    sigma_x2 = _filter_valid(image * image, window) - mu_x**2
    sigma_y2 = _filter_valid(reference * reference, window) - mu_y**2
    sigma_xy = _filter_valid(image * reference, window) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_x2 + sigma_y2 + c2))
    return float(ssim_map.mean())
