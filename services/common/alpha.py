"""The colour under transparent pixels, made harmless before an image model runs.

An image model's output at a pixel depends on its neighbours, so the invisible colour
under alpha 0 (often black, as most exporters write it) would bleed into the visible edge
of a logo or cut-out. Services whose result keeps the alpha (PNG, WebP) fill those pixels
from their visible neighbours first (:func:`fill_transparent`). Where the result has no
alpha (a JPEG result, an embedding), the model sees the image as it looks on a white
page (:func:`over_white`), not the colour hidden under its transparent parts.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Output formats that hold an alpha channel; a JPEG result is that of the image over white.
ALPHA_FORMATS = ("PNG", "WEBP")


#: Rows of the image handled at once at full resolution (even, so that the 2x2 blocks of
#: the first reduction never straddle two bands): the float copies stay this small.
BAND_ROWS = 256


def over_white(rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 composited over white by ``alpha`` (H, W) uint8, as a viewer
    shows it on a white page (and as image editors flatten an image for JPEG): opaque
    pixels keep their colour, fully transparent ones become white. ``rgb`` itself when
    there is no alpha. In exact integers, :data:`BAND_ROWS` rows at a time, so that the
    wider copies stay small."""
    if alpha is None:
        return rgb
    out = np.empty_like(rgb)
    for top in range(0, rgb.shape[0], BAND_ROWS):
        weight = alpha[top:top + BAND_ROWS, :, None].astype(np.uint32)
        blended = rgb[top:top + BAND_ROWS] * weight + 255 * (255 - weight) + 127
        out[top:top + BAND_ROWS] = blended // 255
    return out


def _block_sums(colour: np.ndarray, weight: np.ndarray, fy: int, fx: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``colour`` (H, W, 3) and ``weight`` (H, W) over fy x fx blocks (zero-padded)."""
    height, width = weight.shape
    pad = ((0, -height % fy), (0, -width % fx))
    blocks_x = (width + pad[1][1]) // fx
    summed_weight = np.pad(weight, pad).reshape(-1, fy, blocks_x, fx).sum((1, 3))
    summed_colour = np.pad(colour, (*pad, (0, 0))).reshape(
        summed_weight.shape[0], fy, blocks_x, fx, 3).sum((1, 3))
    return summed_colour, summed_weight


def _upsampled(filled: np.ndarray, fy: int, fx: int, height: int, width: int) -> np.ndarray:
    return np.repeat(np.repeat(filled, fy, axis=0), fx, axis=1)[:height, :width]


def fill_transparent(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb`` with the colour of its fully transparent pixels replaced by the alpha-weighted
    mean colour of the nearest visible ones; visible pixels (alpha > 0) are unchanged.

    The colour under alpha 0 is invisible, and often black (as most exporters write it), but
    the network's output at a pixel depends on its neighbours (and its bicubic base on 4x4
    of them): without this it draws that colour into the visible edge, a dark halo round a
    logo, which Pillow's own resizing (weighting colours by alpha) does not draw.
    Pull-push: colours times alpha, and alpha, are summed over 2x2 blocks until every block
    holds a visible pixel; each hidden pixel takes its block's mean at the finest level
    that has one. The full-resolution steps go through :data:`BAND_ROWS` rows at a time,
    so that besides the result it needs about 15 bytes a pixel (the half-resolution
    pyramid), not 60."""
    hidden_any = not bool(alpha.all())
    if not hidden_any or not alpha.any():
        return rgb
    height, width = alpha.shape
    fy, fx = (2 if height > 1 else 1), (2 if width > 1 else 1)
    sums = [_block_sums(rgb[top:top + BAND_ROWS].astype(np.float32)
                        * (alpha[top:top + BAND_ROWS, :, None] / np.float32(255)),
                        alpha[top:top + BAND_ROWS] / np.float32(255), fy, fx)
            for top in range(0, height, BAND_ROWS)]
    colour = np.concatenate([c for c, _ in sums])
    weight = np.concatenate([w for _, w in sums])
    del sums
    levels: list[tuple[np.ndarray, np.ndarray, int, int]] = []  # colour, weight, factors
    while not (weight > 0).all():
        level_height, level_width = weight.shape
        level_fy, level_fx = (2 if level_height > 1 else 1), (2 if level_width > 1 else 1)
        levels.append((colour, weight, level_fy, level_fx))
        colour, weight = _block_sums(colour, weight, level_fy, level_fx)
    filled = colour / weight[..., None]
    for colour, weight, level_fy, level_fx in reversed(levels):
        coarse = _upsampled(filled, level_fy, level_fx, *weight.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            filled = np.where(weight[..., None] > 0, colour / weight[..., None], coarse)
    out = rgb.copy()  # the image itself: only its hidden pixels change, a band at a time
    for top in range(0, height, BAND_ROWS):
        band_hidden = alpha[top:top + BAND_ROWS] == 0
        if band_hidden.any():
            rows = filled[top // fy:-(-(top + band_hidden.shape[0]) // fy)]
            coarse = _upsampled(rows, fy, fx, band_hidden.shape[0], width)
            out[top:top + BAND_ROWS][band_hidden] = np.clip(
                np.round(coarse[band_hidden]), 0, 255).astype(np.uint8)
    return out


def resize_with_alpha(rgb: np.ndarray, alpha: np.ndarray, longest: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` and ``alpha`` resized so that the longest side is ``longest`` (bicubic),
    with colours weighted by alpha and what is still hidden then filled
    (:func:`fill_transparent`): the colour hidden under alpha 0 reaches no pixel. The
    weighting is done in float32, one plane at a time, not in Pillow's 8-bit premultiplied
    RGBa, which rebuilds the colour of a barely visible pixel from a level or two."""
    height, width = alpha.shape
    scale = longest / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))

    def resized(plane: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(plane, "F").resize(size, Image.Resampling.BICUBIC))

    weight = alpha.astype(np.float32) / 255
    small_weight = resized(weight)
    colour = np.stack([resized(rgb[..., channel] * weight) for channel in range(3)], axis=-1)
    del weight
    small_alpha = np.clip(np.round(small_weight * 255), 0, 255).astype(np.uint8)
    with np.errstate(invalid="ignore", divide="ignore"):
        unweighted = colour / small_weight[..., None]
    small_rgb = np.where(small_alpha[..., None] > 0, np.clip(np.round(unweighted), 0, 255), 0
                         ).astype(np.uint8)
    return fill_transparent(small_rgb, small_alpha), small_alpha
