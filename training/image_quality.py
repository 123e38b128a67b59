"""Image quality measures for super-resolution evaluation (numpy only).

- Luma: ITU-R BT.601 Y' in the studio range [16, 235], as SR papers compute it (MATLAB
  ``rgb2ycbcr``): ``Y = 16 + (65.481 R + 128.553 G + 24.966 B)`` for R, G, B in [0, 1].
- PSNR: ``10 log10(peak^2 / MSE)`` with peak 255, on Y with a ``scale``-pixel border shaved
  (the SR convention for 4x: 4 pixels).
- SSIM: Wang, Bovik, Sheikh & Simoncelli 2004, "Image Quality Assessment: From Error
  Visibility to Structural Similarity", eq. 13, with their reference settings: an 11x11
  Gaussian window with sigma 1.5 (normalised), K1 = 0.01, K2 = 0.03, L = 255, statistics
  over the 'valid' window positions only, and the mean of the SSIM map (their MSSIM). This
  matches ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255)`` (a test checks it).
- Sharpness: variance of the (4-neighbour) Laplacian, and gradient energy (mean squared
  finite-difference gradient), each also reported relative to the original image.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_BT601 = np.array([65.481, 128.553, 24.966])


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB (uint8 0-255, or float 0-1) -> float64 BT.601 luma in [16, 235]."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    rgb = image.astype(np.float64)
    if image.dtype == np.uint8:
        rgb /= 255.0
    return 16.0 + rgb @ _BT601


def shave(image: np.ndarray, border: int) -> np.ndarray:
    """Drops ``border`` pixels on every side (SR evaluation ignores the borders)."""
    if border <= 0:
        return image
    return image[border:-border, border:-border]


def psnr(reference: np.ndarray, test: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    if reference.shape != test.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {test.shape}")
    mse = float(np.mean((reference.astype(np.float64) - test.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """The normalised 1-D Gaussian; the 2-D SSIM window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D image with ``outer(kernel, kernel)``."""
    k = kernel.shape[0]
    rows = sliding_window_view(image, k, axis=1) @ kernel
    return sliding_window_view(rows, k, axis=0) @ kernel


def ssim(reference: np.ndarray, test: np.ndarray, peak: float = 255.0, window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM of two single-channel images (Wang et al. 2004, eq. 13); 1.0 if identical."""
    if reference.shape != test.shape or reference.ndim != 2:
        raise ValueError(f"expected two equal 2-D images, got {reference.shape}, {test.shape}")
    if min(reference.shape) < window:
        raise ValueError(f"images must be at least {window}x{window}, got {reference.shape}")
    x = reference.astype(np.float64)
    y = test.astype(np.float64)
    g = gaussian_window(window, sigma)
    mu_x = _filter_valid(x, g)
    mu_y = _filter_valid(y, g)
    var_x = _filter_valid(x * x, g) - mu_x * mu_x
    var_y = _filter_valid(y * y, g) - mu_y * mu_y
    cov = _filter_valid(x * y, g) - mu_x * mu_y
    c1 = (k1 * peak) ** 2
    c2 = (k2 * peak) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / \
        ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def laplacian_variance(image: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of a 2-D image (higher = sharper)."""
    x = image.astype(np.float64)
    lap = (x[:-2, 1:-1] + x[2:, 1:-1] + x[1:-1, :-2] + x[1:-1, 2:]) - 4.0 * x[1:-1, 1:-1]
    return float(lap.var())


def gradient_energy(image: np.ndarray) -> float:
    """Mean squared forward-difference gradient of a 2-D image (higher = sharper)."""
    x = image.astype(np.float64)
    dx = x[:, 1:] - x[:, :-1]
    dy = x[1:, :] - x[:-1, :]
    return float((dx[:-1, :] ** 2 + dy[:, :-1] ** 2).mean())


def y_psnr_ssim(reference: np.ndarray, test: np.ndarray, border: int = 4) -> tuple[float, float]:
    """Y-channel PSNR and SSIM of two RGB images with ``border`` pixels shaved."""
    ref_y = shave(rgb_to_y(reference), border)
    test_y = shave(rgb_to_y(test), border)
    return psnr(ref_y, test_y), ssim(ref_y, test_y)
