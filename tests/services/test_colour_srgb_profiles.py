"""An image tagged with an sRGB ICC profile is taken as sRGB without a pass through
littlecms (services/common/colour.py is_srgb_profile); every other RGB profile is still
converted. The profiles are real ones: the IEC 61966-2.1 sRGB profile and Adobe RGB (1998)
that scikit-image's photos embed, an Apple display's ("Color LCD"), littlecms's own sRGB,
and the test fixture's Display P3 and gamma-2.2 profiles, written byte by byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from services.common.colour import is_srgb_profile, to_srgb
from services.common.images import decode_image
from tests.fixtures import bad_images, icc

CAP = 64_000_000


def _embedded_profile(name: str) -> bytes:
    """The ICC profile embedded in scikit-image's bundled image ``name``."""
    import skimage

    with Image.open(Path(skimage.__file__).parent / "data" / name) as image:
        profile = image.info["icc_profile"]
    assert isinstance(profile, bytes)
    return profile


SRGB_PROFILES = {
    "IEC 61966-2.1 (astronaut.png)": lambda: _embedded_profile("astronaut.png"),
    "littlecms built-in": lambda: ImageCms.ImageCmsProfile(
        ImageCms.createProfile("sRGB")).tobytes(),
}
OTHER_RGB_PROFILES = {
    "Display P3 (fixture)": icc.rgb_profile,
    "Adobe RGB 1998 (rocket.jpg)": lambda: _embedded_profile("rocket.jpg"),
    "Apple Color LCD (color.png)": lambda: _embedded_profile("color.png"),
    # sRGB's primaries, but a plain gamma 2.2 curve for sRGB's: dark colours move 9 levels
    "sRGB primaries, gamma 2.2 (fixture)": lambda: icc.rgb_profile(
        icc.SRGB_PRIMARIES, name="percept test sRGB primaries gamma 2.2"),
}


def _photo_jpeg(photo: np.ndarray, profile: bytes) -> bytes:
    return bad_images.with_icc_profile(photo, "RGB", profile, "JPEG")


@pytest.mark.parametrize("name", SRGB_PROFILES)
def test_an_srgb_tagged_photo_is_taken_as_it_is(photo: np.ndarray, name: str) -> None:
    """No conversion (the very pixels come back), and they are within one level of what
    the conversion would have made of them."""
    profile = SRGB_PROFILES[name]()
    assert is_srgb_profile(profile)
    assert to_srgb(photo, profile) is photo
    data = _photo_jpeg(photo, profile)
    kept = decode_image(data, max_pixels=CAP)  # the stored pixels, profile carried on
    decoded = decode_image(data, max_pixels=CAP, srgb=True)
    assert decoded.icc_profile is None  # it is sRGB now, as far as the caller knows
    np.testing.assert_array_equal(decoded.rgb, kept.rgb)
    converted = icc.littlecms_to_srgb(kept.rgb, profile)
    assert np.abs(decoded.rgb.astype(int) - converted).max() <= 1


@pytest.mark.parametrize("name", OTHER_RGB_PROFILES)
def test_any_other_rgb_profile_is_still_converted(photo: np.ndarray, name: str) -> None:
    profile = OTHER_RGB_PROFILES[name]()
    assert not is_srgb_profile(profile)
    data = _photo_jpeg(photo, profile)
    kept = decode_image(data, max_pixels=CAP)
    decoded = decode_image(data, max_pixels=CAP, srgb=True)
    converted = icc.littlecms_to_srgb(kept.rgb, profile)
    assert np.abs(decoded.rgb.astype(int) - converted).max() <= 1
    moved = np.abs(decoded.rgb.astype(int) - kept.rgb)
    assert moved.max() >= 5 and moved.mean() > 0.5, (moved.max(), moved.mean())


@pytest.mark.parametrize("profile", [icc.cmyk_profile(), icc.grey_profile(), b"\xff" * 300,
                                     bad_images.icc_profile(b"RGB ")],
                         ids=["cmyk", "grey", "garbage", "header-only"])
def test_a_profile_that_converts_no_rgb_is_no_srgb_profile(profile: bytes) -> None:
    """What littlecms cannot convert RGB from is not called sRGB (to_srgb then takes
    the pixels as sRGB anyway: test_colour.py)."""
    assert not is_srgb_profile(profile)
