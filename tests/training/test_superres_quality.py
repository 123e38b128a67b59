"""PSNR / SSIM / sharpness against known values and scikit-image's reference SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage import data as skdata
from skimage.metrics import structural_similarity

from training.image_quality import (
    gaussian_window,
    gradient_energy,
    laplacian_variance,
    psnr,
    rgb_to_y,
    ssim,
    y_psnr_ssim,
)


def test_identical_images() -> None:
    image = skdata.astronaut()
    y_psnr, y_ssim = y_psnr_ssim(image, image)
    assert y_psnr == math.inf
    assert y_ssim == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_noise_level() -> None:
    rng = np.random.default_rng(0)
    reference = np.full((256, 256), 128.0)
    assert psnr(reference, reference + 5.0) == pytest.approx(10 * math.log10(255**2 / 25))
    noisy = reference + rng.normal(0, 10.0, reference.shape)
    assert psnr(reference, noisy) == pytest.approx(20 * math.log10(255 / 10), abs=0.05)


def test_bt601_luma_range() -> None:
    black = np.zeros((2, 2, 3), np.uint8)
    white = np.full((2, 2, 3), 255, np.uint8)
    assert rgb_to_y(black) == pytest.approx(16.0)
    assert rgb_to_y(white) == pytest.approx(235.0, abs=1e-3)
    assert rgb_to_y(white.astype(np.float64) / 255.0) == pytest.approx(235.0, abs=1e-3)


def test_ssim_matches_scikit_image_reference() -> None:
    rng = np.random.default_rng(1)
    reference = skdata.camera().astype(np.float64)[:200, :200]
    for sigma in (5.0, 20.0):
        noisy = np.clip(reference + rng.normal(0, sigma, reference.shape), 0, 255)
        expected = structural_similarity(reference, noisy, data_range=255,
                                         gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False)
        assert ssim(reference, noisy) == pytest.approx(expected, abs=1e-6)
    assert ssim(reference, np.clip(reference + 20, 0, 255)) < 1.0


def test_gaussian_window_is_normalised() -> None:
    window = gaussian_window(11, 1.5)
    assert window.sum() == pytest.approx(1.0)
    assert window.argmax() == 5


def test_sharpness_drops_with_blur() -> None:
    image = skdata.camera().astype(np.float64)
    blurred = (image[:-2, :-2] + image[1:-1, 1:-1] + image[2:, 2:]) / 3.0
    sharp = image[1:-1, 1:-1]
    assert laplacian_variance(blurred) < laplacian_variance(sharp)
    assert gradient_energy(blurred) < gradient_energy(sharp)
    assert laplacian_variance(np.full((32, 32), 7.0)) == 0.0
