"""The colour under fully transparent pixels, made harmless before an image model runs.

An image model's output at a pixel depends on its neighbours, so the invisible colour
under alpha 0 (often black, as most exporters write it) would bleed into the visible edge
of a logo or cut-out. Services whose result keeps the alpha (PNG, WebP) fill those pixels
from their visible neighbours first; a JPEG result, which has no alpha, is that of the
colours as stored.
"""

from __future__ import annotations

import numpy as np

#: Output formats that hold an alpha channel; a JPEG result is that of the colours as stored.
ALPHA_FORMATS = ("PNG", "WEBP")


def fill_transparent(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb`` with the colour of its fully transparent pixels replaced by the alpha-weighted
    mean colour of the nearest visible ones; visible pixels (alpha > 0) are unchanged.

    The colour under alpha 0 is invisible, and often black (as most exporters write it), but
    the network's output at a pixel depends on its neighbours (and its bicubic base on 4x4
    of them): without this it draws that colour into the visible edge, a dark halo round a
    logo, which Pillow's own resizing (weighting colours by alpha) does not draw.
    Pull-push: colours times alpha, and alpha, are summed over 2x2 blocks until every block
    holds a visible pixel; each hidden pixel takes its block's mean at the finest level
    that has one."""
    hidden = alpha == 0
    if not hidden.any() or hidden.all():
        return rgb
    weight = alpha.astype(np.float32) / 255.0
    colour = rgb.astype(np.float32) * weight[..., None]
    levels: list[tuple[np.ndarray, np.ndarray, int, int]] = []  # colour, weight, factors
    while not (weight > 0).all():
        height, width = weight.shape
        fy, fx = (2 if height > 1 else 1), (2 if width > 1 else 1)
        levels.append((colour, weight, fy, fx))
        pad = ((0, -height % fy), (0, -width % fx))
        weight = np.pad(weight, pad).reshape(-1, fy, (width + pad[1][1]) // fx, fx).sum((1, 3))
        colour = np.pad(colour, (*pad, (0, 0))).reshape(
            weight.shape[0], fy, weight.shape[1], fx, 3).sum((1, 3))
    filled = colour / weight[..., None]
    for index in range(len(levels) - 1, -1, -1):
        colour, weight, fy, fx = levels[index]
        height, width = weight.shape
        coarse = np.repeat(np.repeat(filled, fy, axis=0), fx, axis=1)[:height, :width]
        if index == 0:  # the image itself: only its hidden pixels change
            out = rgb.copy()
            out[hidden] = np.clip(np.round(coarse[hidden]), 0, 255).astype(np.uint8)
            return out
        with np.errstate(invalid="ignore", divide="ignore"):
            filled = np.where(weight[..., None] > 0, colour / weight[..., None], coarse)
    raise AssertionError("unreachable: some pixel is hidden, so there is a level")
