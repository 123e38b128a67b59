"""Images converted to sRGB through their ICC profiles by littlecms
(services/common/colour.py): tagged RGB checked against the conversion computed from the
profile's primaries in numpy, CMYK against its press profile's table, grey against its
curve."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from services.common.colour import to_srgb
from services.common.images import decode_image
from tests.fixtures import bad_images, icc

CAP = 64_000_000


def _rgb_cube(step: int = 5) -> np.ndarray:
    """Every colour on a grid of the RGB cube, as a (N, 1, 3) uint8 image."""
    levels = np.arange(0, 256, step)
    return np.stack(np.meshgrid(levels, levels, levels), axis=-1).reshape(-1, 1, 3) \
        .astype(np.uint8)


def test_display_p3_is_converted_as_its_primaries_say() -> None:
    cube = _rgb_cube()
    converted = to_srgb(cube, icc.rgb_profile())
    error = np.abs(converted.astype(int) - icc.reference_to_srgb(cube))
    assert error.max() <= 1  # 16-bit interpolation inside littlecms
    # and it is no identity: P3's colours are more saturated than the same numbers in sRGB
    assert np.abs(converted.astype(int) - cube).mean() > 5


def test_an_srgb_profile_leaves_the_pixels_as_they_are() -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cube = _rgb_cube(15)
    np.testing.assert_array_equal(to_srgb(cube, srgb), cube)


@pytest.mark.parametrize("profile", [None, bad_images.icc_profile(b"RGB "), b"\xff" * 300],
                         ids=["none", "header-only", "garbage"])
def test_without_a_usable_profile_the_pixels_are_taken_as_srgb(profile: bytes | None) -> None:
    cube = _rgb_cube(15)
    assert to_srgb(cube, profile) is cube


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_decoding_for_an_srgb_model_converts_a_tagged_image(small_photo: np.ndarray,
                                                            fmt: str) -> None:
    profile = icc.rgb_profile()
    data = bad_images.with_icc_profile(small_photo, "RGB", profile, fmt)
    kept = decode_image(data, max_pixels=CAP)
    assert kept.icc_profile == profile  # what super-resolution carries on
    converted = decode_image(data, max_pixels=CAP, srgb=True)
    assert converted.icc_profile is None
    np.testing.assert_array_equal(converted.rgb, to_srgb(kept.rgb, profile))
    error = np.abs(converted.rgb.astype(int) - icc.reference_to_srgb(kept.rgb))
    assert error.max() <= 1


def test_decoding_for_an_srgb_model_keeps_the_alpha(small_photo: np.ndarray) -> None:
    alpha = np.full(small_photo.shape[:2], 255, np.uint8)
    alpha[: alpha.shape[0] // 2] = 40
    data = bad_images.save_rgba_with_icc_profile(small_photo, alpha, icc.rgb_profile())
    converted = decode_image(data, max_pixels=CAP, srgb=True)
    assert converted.alpha is not None and converted.icc_profile is None
    np.testing.assert_array_equal(converted.alpha, alpha)
    np.testing.assert_array_equal(converted.rgb, to_srgb(small_photo, icc.rgb_profile()))


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_a_cmyk_image_is_converted_through_its_press_profile(fmt: str) -> None:
    rng = np.random.default_rng(0)
    cmyk = rng.integers(0, 256, (48, 64, 4), dtype=np.uint8)
    image = Image.frombytes("CMYK", (64, 48), cmyk.tobytes())
    data = bad_images.save(image, fmt, icc_profile=icc.cmyk_profile(), quality=100)
    with Image.open(io.BytesIO(data)) as stored:  # JPEG's CMYK, as the decoder reads it
        stored_cmyk = np.asarray(stored.convert("CMYK"))
        plain = np.asarray(stored.convert("RGB")).astype(int)
    decoded = decode_image(data, max_pixels=CAP)
    assert decoded.icc_profile is None  # the result is sRGB
    error = np.abs(decoded.rgb.astype(int) - icc.reference_cmyk_to_srgb(stored_cmyk))
    # littlecms's precomputed table: deep shadows a few levels off, the rest within one
    assert error.mean() < 0.25 and np.percentile(error, 99) <= 1
    assert np.abs(plain - icc.reference_cmyk_to_srgb(stored_cmyk)).mean() > 50  # Pillow's


def test_a_cmyk_profile_littlecms_cannot_use_falls_back_to_the_plain_formula() -> None:
    rng = np.random.default_rng(1)
    image = Image.frombytes("CMYK", (32, 16), rng.integers(0, 256, (16, 32, 4), np.uint8)
                            .tobytes())
    data = bad_images.save(image, "TIFF", icc_profile=bad_images.icc_profile(b"CMYK"))
    decoded = decode_image(data, max_pixels=CAP)
    np.testing.assert_array_equal(decoded.rgb, np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_a_grey_image_is_converted_through_its_grey_profile(fmt: str) -> None:
    """A grey gamma (or a press's dot-gain) curve: the levels mean other luminances than
    sRGB's, 12 levels apart on average for gamma 1.8."""
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16).repeat(2, axis=0)
    data = bad_images.save(Image.fromarray(grey), fmt, icc_profile=icc.grey_profile(),
                           quality=100)
    with Image.open(io.BytesIO(data)) as stored:
        stored_grey = np.asarray(stored)
    decoded = decode_image(data, max_pixels=CAP)
    assert decoded.icc_profile is None and decoded.alpha is None
    reference = icc.reference_grey_to_srgb(stored_grey)
    assert np.abs(decoded.rgb.astype(int) - reference).max() <= 1
    assert np.abs(np.dstack([stored_grey] * 3).astype(int) - reference).mean() > 10


def _tiff_big_endian_grey16(grey: np.ndarray, profile: bytes) -> bytes:
    """A 16-bit grey TIFF stored big-endian ("MM"), as Photoshop on a Mac writes it."""
    image = Image.frombytes("I;16B", grey.shape[::-1], grey.astype(">u2").tobytes())
    return bad_images.save(image, "TIFF", icc_profile=profile)


@pytest.mark.parametrize("container", ["PNG", "TIFF", "TIFF big-endian"])
def test_a_16_bit_grey_image_is_converted_through_its_grey_profile(container: str) -> None:
    """All 65,536 levels through the curve at their own depth, not first cut to 8 bits:
    within 1 level of the curve at every one of them."""
    grey = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    profile = icc.grey_profile()
    data = (_tiff_big_endian_grey16(grey, profile) if container == "TIFF big-endian"
            else bad_images.save(Image.fromarray(grey), container, icc_profile=profile))
    with Image.open(io.BytesIO(data)) as stored:
        assert stored.mode.startswith("I;16")
        assert np.array_equal(np.asarray(stored).astype(np.uint16), grey)
    decoded = decode_image(data, max_pixels=CAP)
    assert decoded.icc_profile is None and decoded.alpha is None
    reference = icc.reference_grey_to_srgb(grey)
    assert np.abs(decoded.rgb.astype(int) - reference).max() <= 1
    plain = np.rint(grey / 257.0).astype(np.uint8)
    assert np.abs(np.dstack([plain] * 3).astype(int) - reference).mean() > 10


def test_grey_with_alpha_keeps_its_alpha_through_the_profile() -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    alpha = np.where(np.arange(16)[:, None] < 8, 255, 30).repeat(16, axis=1).astype(np.uint8)
    data = bad_images.save(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG",
                           icc_profile=icc.grey_profile())
    decoded = decode_image(data, max_pixels=CAP)
    assert decoded.alpha is not None
    np.testing.assert_array_equal(decoded.alpha, alpha)
    assert np.abs(decoded.rgb.astype(int) - icc.reference_grey_to_srgb(grey)).max() <= 1
