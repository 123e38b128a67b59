"""services/common/alpha.py: the colour hidden under alpha 0 reaches no visible pixel."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.alpha import BAND_ROWS, over_white, resize_with_alpha

COLOUR = (100, 150, 200)


def disc_on_hidden_black(side: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly coloured disc, hard-edged, on fully transparent black."""
    yy, xx = np.mgrid[:side, :side]
    inside = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2
    rgb = np.zeros((side, side, 3), np.uint8)
    rgb[inside] = COLOUR
    return rgb, np.where(inside, 255, 0).astype(np.uint8)


@pytest.mark.parametrize("longest", [512, 300, 97])
def test_resizing_with_alpha_keeps_every_colour_that_of_the_visible_pixels(
        longest: int) -> None:
    """Every pixel of the resized image, visible or filled, is the disc's colour: no black
    from under the transparency, and no colour rebuilt from the one or two levels an 8-bit
    premultiplied resize keeps of a barely visible pixel (that was up to 200 levels off)."""
    rgb, alpha = disc_on_hidden_black()
    small, small_alpha = resize_with_alpha(rgb, alpha, longest)
    assert small.shape == (longest, longest, 3) and small_alpha.shape == (longest, longest)
    assert 0 < (small_alpha > 0).mean() < 1 and (small_alpha < 255).sum() > 0
    assert np.abs(small.astype(int) - COLOUR).max() == 0


def test_over_white_is_the_image_as_seen_on_a_white_page() -> None:
    """Opaque pixels keep their colour, transparent ones become white, and the rest blend,
    rounded to the nearest level: the exact formula, on every colour and alpha level, in
    more rows than one band."""
    rows = BAND_ROWS + 44
    colour, level = np.meshgrid(np.arange(256), np.arange(rows) % 256)  # every pair
    rgb = np.repeat(colour[..., None], 3, axis=2).astype(np.uint8)
    alpha = level.astype(np.uint8)
    flat = over_white(rgb, alpha)
    a = alpha[..., None] / 255
    expected = np.round(rgb * a + 255 * (1 - a))
    assert flat.dtype == np.uint8 and flat.shape == rgb.shape
    assert np.abs(flat - expected).max() == 0
    assert np.array_equal(flat[alpha == 255], rgb[alpha == 255])
    assert (flat[alpha == 0] == 255).all()


def test_over_white_without_alpha_is_the_image_itself() -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    assert over_white(rgb, None) is rgb
