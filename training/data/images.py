"""Decoding images to 3-channel RGB, fast, and the resize-shortest-side + crop geometry.

DESIGN.md, "Fast data preparation": resize the shortest side, then centre-crop (never pad
with black), force 3-channel RGB, and get the speed from pillow-simd's SIMD resampling, from
JPEG ``draft()`` (libjpeg's reduced-size DCT: decoding at 1/2, 1/4 or 1/8 scale costs a
fraction of a full decode) and from ``reduce()`` (integer box reduction) before the final
BICUBIC step (``Image.resize(..., reducing_gap=...)``).

Boxes are ``(left, top, right, bottom)`` in the coordinates of the image *as displayed*
(after its EXIF orientation is applied).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

Box = tuple[float, float, float, float]

#: Image file suffixes the preparation accepts.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

#: reduce() before resampling when shrinking by more than this factor (pillow's
#: ``reducing_gap``; 3.0 is indistinguishable from a plain resize at a fraction of the cost).
REDUCING_GAP = 3.0

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not stop the decode
        return 1


def displayed_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as displayed (EXIF orientation applied); header only."""
    with Image.open(path) as image:
        width, height = image.size
        if _orientation(image) in _TRANSPOSED_ORIENTATIONS:
            return height, width
        return width, height


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Forces any PIL mode to 8-bit, 3-channel RGB.

    Grey (``1``, ``L``) is replicated, palette images are expanded, CMYK/YCbCr/LAB are
    converted, 16/32-bit integer and float greys are scaled to 0-255, and transparency
    (``RGBA``, ``LA``, ``PA``, palette with a transparent index) is composited over
    ``background`` (white) instead of being dropped, which would expose whatever colour the
    transparent pixels happen to hold (often black).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    elif mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if values.max(initial=0.0) > 255.0 else 255.0
        grey = np.clip(np.rint(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        image = Image.fromarray(grey, mode="L")
    elif mode == "L" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image).convert("RGB")
    return image.convert("RGB")


def decode_rgb(path: Path, need: tuple[int, int] | None = None) -> Image.Image:
    """Decodes ``path`` to RGB, oriented as displayed.

    ``need`` is the smallest (width, height), in displayed orientation, the caller needs;
    JPEGs are then decoded with ``draft()`` at the smallest DCT scale (1/1, 1/2, 1/4, 1/8)
    that still gives at least that many pixels. Callers map their boxes with
    :func:`scale_box` using the decoded size.
    """
    image: Image.Image = Image.open(path)
    orientation = _orientation(image)
    if need is not None and image.format == "JPEG" and hasattr(image, "draft"):
        request = need[::-1] if orientation in _TRANSPOSED_ORIENTATIONS else need
        image.draft("RGB", (max(1, request[0]), max(1, request[1])))
    if orientation != 1:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def centre_square(width: int, height: int) -> Box:
    """The largest centred square: resize-shortest-side + centre-crop, never padding."""
    side = min(width, height)
    left = (width - side) // 2
    top = (height - side) // 2
    return (left, top, left + side, top + side)


def random_square(width: int, height: int, target: int, rng: np.random.Generator) -> Box:
    """A random square box whose side is log-uniform between ``target`` (native pixels,
    no upscaling) and the shortest side (the whole image), at a uniform random position.
    Sampling scales as well as positions gives ~25 photos many distinct training crops.
    """
    shortest = min(width, height)
    low = min(target, shortest)
    side = round(math.exp(rng.uniform(math.log(low), math.log(shortest))))
    side = max(low, min(side, shortest))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    return (left, top, left + side, top + side)


def scale_box(box: Box, original: tuple[int, int], decoded: tuple[int, int]) -> Box:
    """Maps a box from the original (displayed) size to a draft-decoded image's size."""
    fx = decoded[0] / original[0]
    fy = decoded[1] / original[1]
    return (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)


def draft_request(original: tuple[int, int], boxes: Sequence[Box], size: int) -> tuple[int, int]:
    """The decoded size that keeps every box at >= ``size`` pixels across."""
    smallest = min(min(b[2] - b[0], b[3] - b[1]) for b in boxes)
    scale = min(1.0, size / smallest)
    return (math.ceil(original[0] * scale), math.ceil(original[1] * scale))


def resize_box(image: Image.Image, box: Box, size: int) -> Image.Image:
    """Crops ``box`` and resizes it to ``size`` x ``size`` with BICUBIC in one pass
    (``reduce()`` first when shrinking by more than :data:`REDUCING_GAP`)."""
    return image.resize((size, size), Image.Resampling.BICUBIC, box=box,
                        reducing_gap=REDUCING_GAP)


def load_centre_crop(path: Path, size: int) -> np.ndarray:
    """The fast single-image pipeline: draft-decode, force RGB, resize the shortest side to
    ``size`` and centre-crop; returns a (size, size, 3) uint8 array."""
    original = displayed_size(path)
    box = centre_square(*original)
    image = decode_rgb(path, need=draft_request(original, [box], size))
    return np.asarray(resize_box(image, scale_box(box, original, image.size), size))
