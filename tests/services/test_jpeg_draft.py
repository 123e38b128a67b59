"""decode_image's ``draft_min_side``: a large JPEG decoded by libjpeg at 1/2, 1/4 or 1/8
scale (its shorter side still at least the minimum), for models that shrink it anyway;
every other check of the decoder still holds (the pixel cap on the declared size,
truncation, EXIF orientation, colour profiles), and other formats are untouched."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image

from services.common.errors import InvalidArgument
from services.common.images import decode_image
from tests.fixtures import bad_images, icc

CAP = 64_000_000
MIN_SIDE = 448  # the embedding service's: twice its 224-pixel input


def _resized(photo: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.BICUBIC))


def _jpeg(rgb: np.ndarray, **params: object) -> bytes:
    return bad_images.save(Image.fromarray(rgb), "JPEG", quality=90, **params)


def _shrunk(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` reduced to ``size`` = (width, height) by averaging: what a scaled inverse
    DCT approximates."""
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def _retina() -> bytes:
    """scikit-image's retina.jpg: a real 1411 x 1411 photo, as its file."""
    import skimage

    return (Path(skimage.__file__).parent / "data" / "retina.jpg").read_bytes()


@pytest.mark.parametrize(("width", "height", "min_side", "scale"), [
    (2560, 1600, 448, 2),  # 1600 // 448 = 3: half size, 800 px
    (1600, 2560, 448, 2),  # portrait alike
    (3600, 1800, 448, 4),  # 1800 // 448 = 4: a quarter, 450 px
    (4000, 3600, 224, 8),  # 1/8 at most (libjpeg's smallest scale): 450 px
    (1000, 895, 448, 1),   # 895 // 448 = 1: too small to halve
])
def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_the_minimum_side(
        photo: np.ndarray, width: int, height: int, min_side: int, scale: int) -> None:
    rgb = _resized(photo, width, height)
    decoded = decode_image(_jpeg(rgb), max_pixels=CAP, draft_min_side=min_side)
    expected = (math.ceil(height / scale), math.ceil(width / scale))
    assert decoded.rgb.shape == (*expected, 3)
    assert min(expected) >= min_side
    # the same picture: close to the full decode averaged down to that size
    full = decode_image(_jpeg(rgb), max_pixels=CAP).rgb
    error = np.abs(decoded.rgb.astype(int) - _shrunk(full, expected[::-1])).mean()
    assert error < 2.0, error


def test_a_real_photo_is_decoded_at_half_size() -> None:
    data = _retina()
    full = decode_image(data, max_pixels=CAP)
    decoded = decode_image(data, max_pixels=CAP, draft_min_side=MIN_SIDE)
    assert full.rgb.shape == (1411, 1411, 3) and decoded.rgb.shape == (706, 706, 3)
    error = np.abs(decoded.rgb.astype(int) - _shrunk(full.rgb, (706, 706))).mean()
    assert error < 2.0, error


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_still_applies_to_the_reduced_picture(photo: np.ndarray,
                                                               orientation: int) -> None:
    """A camera's sideways JPEG (stored 2400 x 1600, EXIF says turn it) comes out upright
    at half size, as the full decode does at full size."""
    stored = _resized(photo, 2400, 1600)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    data = _jpeg(stored, exif=exif)
    full = decode_image(data, max_pixels=CAP).rgb
    decoded = decode_image(data, max_pixels=CAP, draft_min_side=MIN_SIDE).rgb
    upright = (2400, 1600) if orientation == 3 else (1600, 2400)  # (width, height)
    assert full.shape == (upright[1], upright[0], 3)
    assert decoded.shape == (upright[1] // 2, upright[0] // 2, 3)
    error = np.abs(decoded.astype(int) - _shrunk(full, (upright[0] // 2, upright[1] // 2)))
    assert error.mean() < 2.0, error.mean()


def test_a_png_is_untouched(photo: np.ndarray) -> None:
    data = bad_images.save(Image.fromarray(_resized(photo, 1800, 1200)), "PNG")
    plain = decode_image(data, max_pixels=CAP)
    asked = decode_image(data, max_pixels=CAP, draft_min_side=MIN_SIDE)
    assert asked.rgb.shape == (1200, 1800, 3)
    np.testing.assert_array_equal(asked.rgb, plain.rgb)


def test_a_cmyk_jpeg_is_decoded_whole(photo: np.ndarray) -> None:
    """A CMYK JPEG goes through its press profile at full size, as without the option."""
    cmyk = Image.fromarray(_resized(photo, 1800, 1200)).convert("CMYK")
    data = bad_images.save(cmyk, "JPEG", icc_profile=icc.cmyk_profile(), quality=90)
    plain = decode_image(data, max_pixels=CAP, srgb=True)
    asked = decode_image(data, max_pixels=CAP, srgb=True, draft_min_side=MIN_SIDE)
    np.testing.assert_array_equal(asked.rgb, plain.rgb)


def test_a_grey_jpeg_is_reduced_and_comes_out_rgb(photo: np.ndarray) -> None:
    grey = Image.fromarray(_resized(photo, 1800, 1200)).convert("L")
    decoded = decode_image(bad_images.save(grey, "JPEG", quality=90), max_pixels=CAP,
                           draft_min_side=MIN_SIDE)
    assert decoded.rgb.shape == (600, 900, 3)
    assert (decoded.rgb[..., 0] == decoded.rgb[..., 2]).all()


def test_a_multi_picture_jpeg_is_reduced_to_its_first_picture(photo: np.ndarray) -> None:
    """A camera's MPO (a JPEG followed by more pictures): its first picture, reduced."""
    first = Image.fromarray(_resized(photo, 1800, 1200))
    data = bad_images.save(first, "MPO", save_all=True, quality=90,
                           append_images=[Image.fromarray(_resized(photo, 900, 600)[::-1])])
    full = decode_image(data, max_pixels=CAP).rgb
    decoded = decode_image(data, max_pixels=CAP, draft_min_side=MIN_SIDE).rgb
    assert full.shape == (1200, 1800, 3) and decoded.shape == (600, 900, 3)
    assert np.abs(decoded.astype(int) - _shrunk(full, (900, 600))).mean() < 2.0


def test_a_tagged_jpeg_is_converted_to_srgb_after_the_reduction(photo: np.ndarray) -> None:
    rgb = _resized(photo, 1800, 1200)
    data = bad_images.with_icc_profile(rgb, "RGB", icc.rgb_profile(), "JPEG")
    decoded = decode_image(data, max_pixels=CAP, srgb=True, draft_min_side=MIN_SIDE)
    stored = decode_image(data, max_pixels=CAP, draft_min_side=MIN_SIDE)
    assert decoded.rgb.shape == stored.rgb.shape == (600, 900, 3)
    assert decoded.icc_profile is None and stored.icc_profile == icc.rgb_profile()
    error = np.abs(decoded.rgb.astype(int) - icc.reference_to_srgb(stored.rgb))
    assert error.max() <= 1


def test_the_pixel_cap_holds_for_the_size_the_header_declares(photo: np.ndarray) -> None:
    """Reduced, the picture would fit the cap; the image as sent does not, and is
    refused as before."""
    data = _jpeg(_resized(photo, 2400, 1600))
    with pytest.raises(InvalidArgument, match="over the cap") as refused:
        decode_image(data, max_pixels=2400 * 1600 - 1, draft_min_side=MIN_SIDE)
    assert refused.value.reason == "IMAGE_OVER_PIXEL_CAP"


def test_a_truncated_jpeg_is_still_refused_as_truncated(photo: np.ndarray) -> None:
    data = bad_images.truncated_jpeg(_resized(photo, 2400, 1600))
    with pytest.raises(InvalidArgument, match="truncated") as refused:
        decode_image(data, max_pixels=CAP, draft_min_side=MIN_SIDE)
    assert refused.value.reason == "IMAGE_TRUNCATED"
