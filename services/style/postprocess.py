"""Pixel-wise finishing of a stylised image: colour preservation, strength, mask.

Applied in bands of rows, so a large image never needs full-size float copies."""

from __future__ import annotations

import numpy as np
import torch

from training.perceptual.colour import blend_with_mask, preserve_colour

BAND_ROWS = 256


def _tensor(rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rows, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0


def is_identity(*, preserve_color: bool, strength: float, mask: np.ndarray | None) -> bool:
    """Whether :func:`finish` returns the stylisation as it is (no work, no thread hop)."""
    return not preserve_color and strength >= 1.0 and mask is None


def finish(content: np.ndarray, stylised: np.ndarray, *, preserve_color: bool, strength: float,
           mask: np.ndarray | None) -> np.ndarray:
    """content, stylised: (H, W, 3) uint8; mask: (H, W) float in [0, 1] (1 = stylise).

    preserve_color keeps the content's chroma (YCbCr) under the stylised luminance (Gatys et
    al. 2016b); strength blends linearly from the content (0) to the stylisation (1); the
    mask then limits the result to its white part."""
    if is_identity(preserve_color=preserve_color, strength=strength, mask=mask):
        return stylised
    out = np.empty_like(stylised)
    for top in range(0, content.shape[0], BAND_ROWS):
        rows = slice(top, top + BAND_ROWS)
        source, result = _tensor(content[rows]), _tensor(stylised[rows])
        if preserve_color:
            result = preserve_colour(result, source)
        if strength < 1.0:
            result = source + strength * (result - source)
        if mask is not None:
            result = blend_with_mask(result, source, torch.from_numpy(mask[rows])[None, None])
        out[rows] = (result[0].clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).numpy()
    return out
