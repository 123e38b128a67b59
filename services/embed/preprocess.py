"""The embedding service's image input: EfficientNet-Lite0 takes a 224 x 224 RGB square.

Only numpy and Pillow: a test bounds its memory in a process without torch."""

from __future__ import annotations

import numpy as np
from PIL import Image

INPUT_SIZE = 224
#: The shorter side a JPEG is decoded at, at least, for the model (libjpeg's reduced-size
#: decoding: images.decode_image's ``draft_min_side``): twice the input, so that the
#: bicubic reduction to INPUT_SIZE still averages over two source pixels a side, as from
#: the full picture. For the 24 JPEG photos of 0.9-4 MP in data/photos and scikit-image
#: that it reduces, the served ConSE vectors had cosine 0.985 at worst (median 0.9999) to
#: those of the full decode, and 23 kept their top label; LabelImage of a 2560 x 1600
#: JPEG was 1.5-1.7x faster (medians of interleaved runs on the 2-core CPU).
DECODE_MIN_SIDE = 2 * INPUT_SIZE


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
