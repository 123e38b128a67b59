"""The embedding service's image input: EfficientNet-Lite0 takes a 224 x 224 RGB square.

Only numpy and Pillow: a test bounds its memory in a process without torch."""

from __future__ import annotations

import numpy as np
from PIL import Image

INPUT_SIZE = 224


def preprocess(rgb: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """The centred square of ``rgb``, resized to ``size`` x ``size`` (bicubic): resize
    the shortest side, centre-crop, never pad. uint8.

    The square is cut in the image's own pixels before resizing: resizing the whole image
    first would make a 1 x 10,000 strip, a 124-byte PNG, a 224 x 2,240,000 intermediate
    (1.5 GB). Cut first, no pass holds more than the image and the 224-pixel square."""
    height, width = rgb.shape[:2]
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = Image.fromarray(rgb[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0))
