"""The fixed pictures whose vectors identify an embedding space.

The vectors of an index can only be compared with vectors of the space they were made in:
another --word-vectors file, DeViSE map or method makes other ones of the same dimension,
and searching them would return nonsense with confident scores. The search record keeps
the vectors of these pictures, and any embedder met later must give the same ones.

Pictures, not texts: every space embeds images, while a word-vector space may lack any
given word. Several unlike pictures, not one: a retrained map can agree with the old one
on one picture (the audit met 0.998) while its vectors of photos have moved; the least
agreement over several pictures of unlike colour, scale and layout follows the photos'.

The pixels of the seven added pictures are made with integer arithmetic only, so they are
the same on every machine and with every numpy; the first, the older records' probe, is as
it always was (a float ramp, rounded). They must never change: a record made with other
pictures would be judged against vectors of these and refused. A test pins their digest.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

#: Side of every probe picture, in pixels.
SIDE = 96


def _hash(values: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random byte per integer (an integer hash, exact on every machine)."""
    mixed = (values.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B1)) \
        * np.uint64(0x85EBCA77)
    mixed ^= mixed >> np.uint64(13)
    mixed *= np.uint64(0xC2B2AE3D)
    mixed ^= mixed >> np.uint64(16)
    return (mixed & np.uint64(0xFF)).astype(np.int64)


def _value_noise(cells: int, seed: int) -> np.ndarray:
    """Smooth colour noise: random colours on a (cells + 1)-square grid of points, blended
    bilinearly between them with integer weights."""
    step = SIDE // cells
    points = _hash(np.arange((cells + 1) ** 2 * 3), seed).reshape(cells + 1, cells + 1, 3)
    at = np.arange(SIDE)
    cell, into = at // step, at % step  # the grid cell of each row or column, and where in it
    y0, x0 = cell[:, None], cell[None, :]
    wy, wx = into[:, None, None], into[None, :, None]
    blended = (points[y0, x0] * (step - wy) * (step - wx) + points[y0, x0 + 1] * (step - wy) * wx
               + points[y0 + 1, x0] * wy * (step - wx) + points[y0 + 1, x0 + 1] * wy * wx)
    return blended // (step * step)


def _stripes(fx: int, fy: int, period: int, colour: tuple[int, int, int]) -> np.ndarray:
    """Triangle-wave stripes along (fx, fy), tinted by ``colour``."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    phase = (fx * x + fy * y) % period
    wave = np.minimum(phase, period - phase) * 510 // period  # 0..255
    return wave[..., None] * np.array(colour) // 255


def _disc() -> np.ndarray:
    """A red disc on a blue ground."""
    y, x = np.mgrid[0:SIDE, 0:SIDE] - SIDE // 2
    inside = (x * x + y * y < (SIDE * 3 // 10) ** 2)[..., None]
    return np.where(inside, np.array([200, 30, 40]), np.array([20, 90, 200]))


def _sky_and_grass() -> np.ndarray:
    """Blue above, textured green below: the layout of a landscape."""
    y = np.arange(SIDE)[:, None, None]
    texture = _hash(np.arange(SIDE * SIDE * 3), 7).reshape(SIDE, SIDE, 3) // 4
    return np.where(y < SIDE * 55 // 100, np.array([110, 160, 230]),
                    np.array([50, 120, 40]) + texture)


def _ramps_and_checkerboard() -> np.ndarray:
    """Colour ramps and a checkerboard: the one probe picture of records made before
    there were several (its vector is compared with theirs)."""
    ramp = np.linspace(0, 255, SIDE, dtype=np.float32)
    checker = ((np.arange(SIDE)[:, None] // 12 + np.arange(SIDE)[None, :] // 12) % 2) * 255.0
    return np.dstack([np.broadcast_to(ramp[None, :], (SIDE, SIDE)),
                      np.broadcast_to(ramp[:, None], (SIDE, SIDE)), checker])


def probe_pixels() -> list[np.ndarray]:
    """The probe pictures' pixels (SIDE x SIDE x 3, uint8), the first the one older
    records kept the vector of."""
    pictures = [_ramps_and_checkerboard(), _value_noise(3, 1), _value_noise(6, 2),
                _value_noise(12, 3), _stripes(3, 1, 32, (255, 200, 80)),
                _stripes(1, 4, 12, (90, 220, 255)), _disc(), _sky_and_grass()]
    return [np.clip(p, 0, 255).astype(np.uint8) for p in pictures]


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@functools.cache
def probe_images() -> tuple[bytes, ...]:
    """The probe pictures as PNG files, in a fixed order."""
    return tuple(_png(pixels) for pixels in probe_pixels())


def probe_image() -> bytes:
    """The first probe picture: the one older records kept the vector of."""
    return probe_images()[0]
