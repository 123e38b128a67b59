"""Fidelity of decode_image/encode_image on real files: orientation, damaged metadata, PNG
colour-key transparency, and output sizes each encoder can hold."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.images import decode_image, encode_image

CAP = 64_000_000
_T = Image.Transpose
#: The transposition that turns an upright image into what a camera stores with each EXIF
#: orientation (the inverse of what a viewer applies to show it upright).
_STORED_AS = {1: None, 2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM,
              5: _T.TRANSPOSE, 6: _T.ROTATE_90, 7: _T.TRANSVERSE, 8: _T.ROTATE_270}


def _upright() -> np.ndarray:
    """48x80, four flat quadrants of different colours: any flip or turn shows."""
    image = np.zeros((48, 80, 3), np.uint8)
    image[:24, :40] = (255, 0, 0)
    image[:24, 40:] = (0, 255, 0)
    image[24:, :40] = (0, 0, 255)
    image[24:, 40:] = (255, 255, 0)
    return image


def _save(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def _png(pixels: np.ndarray, depth: int, colour_type: int, trns: bytes) -> bytes:
    """A PNG written chunk by chunk (Pillow writes no colour key for 16-bit images)."""
    height, width = pixels.shape[:2]
    if depth == 16:
        rows = [pixels[i].astype(">u2").tobytes() for i in range(height)]
    elif depth == 8:
        rows = [pixels[i].astype(np.uint8).tobytes() for i in range(height)]
    else:
        rows = [np.packbits(pixels[i].astype(bool)).tobytes() for i in range(height)]
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"tRNS", trns)
            + _png_chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + row for row in rows)))
            + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_every_exif_orientation_comes_out_upright(fmt: str, orientation: int) -> None:
    upright = _upright()
    method = _STORED_AS[orientation]
    stored = Image.fromarray(upright)
    stored = stored if method is None else stored.transpose(method)
    if fmt == "TIFF":  # the orientation is a tag of the TIFF's own directory
        data = _save(stored, fmt, tiffinfo={274: orientation})
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = _save(stored, fmt, exif=exif.tobytes())
    decoded = decode_image(data, max_pixels=CAP)
    assert decoded.rgb.shape == upright.shape
    assert np.abs(decoded.rgb.astype(int) - upright).mean() < 8  # JPEG/WebP: lossy


# Two directories in little-endian TIFF form: Orientation (0x0112, SHORT) = 6, then
# RowsPerStrip (0x0116), which is a number, written as the ASCII text "sw".
_MISTYPED_TAG = (b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", 2)
                 + struct.pack("<HHI", 0x0112, 3, 1) + struct.pack("<HH", 6, 0)
                 + struct.pack("<HHI", 0x0116, 2, 3) + b"sw\x00\x00" + b"\x00\x00\x00\x00")


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
@pytest.mark.parametrize("exif, turned", [
    (b"MM\x00*", False),  # cut short in the TIFF header
    (b"\xde\xad\xbe\xef" * 10, False),  # not a TIFF structure at all
    (_MISTYPED_TAG, True),  # readable orientation, a tag that cannot be written back
], ids=["cut-short", "not-tiff", "mistyped-tag"])
def test_a_damaged_exif_block_does_not_refuse_a_good_image(
        fmt: str, exif: bytes, turned: bool) -> None:
    """The pixels are intact: a damaged EXIF block costs at most its orientation, never
    the request (it was 'corrupt image data' for PNG and WebP)."""
    pixels = _upright()
    data = _save(Image.fromarray(pixels), fmt,
                 exif=b"Exif\x00\x00" + exif if fmt == "JPEG" else exif)
    decoded = decode_image(data, max_pixels=CAP)
    expected = np.rot90(pixels, -1) if turned else pixels  # 6: turned 90 degrees clockwise
    assert decoded.rgb.shape == expected.shape
    assert np.abs(decoded.rgb.astype(int) - expected).mean() < 8


def test_an_8_bit_png_colour_key_becomes_alpha() -> None:
    """PNG's tRNS chunk on a grey or RGB image names one value as fully transparent; the
    README promises alpha is kept, and it was dropped (the key colour came out opaque)."""
    grey = np.array([[0, 7, 7], [200, 7, 255]], np.uint8)
    transparent = grey == 7
    decoded = decode_image(_png(grey, 8, 0, struct.pack(">H", 7)), max_pixels=CAP)
    assert decoded.alpha is not None
    np.testing.assert_array_equal(decoded.alpha, np.where(transparent, 0, 255))
    np.testing.assert_array_equal(decoded.rgb, np.dstack([grey] * 3))

    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[transparent] = (10, 20, 30)
    rgb[0, 0] = (10, 20, 31)  # one step off the key: stays opaque
    decoded = decode_image(_png(rgb, 8, 2, struct.pack(">HHH", 10, 20, 30)), max_pixels=CAP)
    assert decoded.alpha is not None
    np.testing.assert_array_equal(decoded.alpha, np.where(transparent, 0, 255))
    np.testing.assert_array_equal(decoded.rgb, rgb)


def test_a_1_bit_and_a_16_bit_grey_colour_key_become_alpha() -> None:
    bits = np.array([[1, 0, 0, 1, 1, 0, 1, 0, 1]], np.uint8)
    decoded = decode_image(_png(bits, 1, 0, struct.pack(">H", 1)), max_pixels=CAP)
    assert decoded.alpha is not None  # white (1) is the transparent one
    np.testing.assert_array_equal(decoded.alpha, np.where(bits == 1, 0, 255))
    np.testing.assert_array_equal(decoded.rgb[..., 0], bits * 255)

    grey16 = np.array([[1000, 1000, 1001], [65535, 0, 1000]], np.uint16)
    decoded = decode_image(_png(grey16, 16, 0, struct.pack(">H", 1000)), max_pixels=CAP)
    assert decoded.alpha is not None  # the key is matched at 16 bits: 1001 stays opaque
    np.testing.assert_array_equal(decoded.alpha, np.where(grey16 == 1000, 0, 255))
    np.testing.assert_array_equal(decoded.rgb[..., 0], np.round(grey16 / 257.0))


def test_a_16_bit_rgb_colour_key_is_not_guessed_from_8_bit_pixels() -> None:
    """Pillow keeps only the high byte of 16-bit RGB: (0, 0, 200) and the key (0, 0, 0)
    both read as black, so matching there would punch holes; the image stays opaque."""
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[0, 0] = (0, 0, 200)
    rgb16[1, 1] = (60000, 30000, 100)
    decoded = decode_image(_png(rgb16, 16, 2, struct.pack(">HHH", 0, 0, 0)), max_pixels=CAP)
    assert decoded.alpha is None
    np.testing.assert_array_equal(decoded.rgb, rgb16 >> 8)


@pytest.mark.parametrize("fmt, name, limit", [(2, "JPEG", 65_500), (3, "WEBP", 16_383)])
def test_a_result_too_wide_for_the_format_is_a_precise_invalid_argument(
        fmt: int, name: str, limit: int) -> None:
    """libjpeg holds 65,500 px a side and libwebp 16,383: over that (a 4x upscale of a
    4,100 px photo as WebP) Pillow's OSError/ValueError became an INTERNAL error."""
    assert Image.open(io.BytesIO(encode_image(np.zeros((1, limit, 3), np.uint8), fmt=fmt))
                      ).size == (limit, 1)
    for shape in ((1, limit + 1, 3), (limit + 1, 1, 3)):
        with pytest.raises(InvalidArgument, match=rf"^the {shape[1]}x{shape[0]} result is "
                                                  rf"over {name}'s limit of {limit} px a side"
                                                  r"; ask for PNG output"):
            encode_image(np.zeros(shape, np.uint8), fmt=fmt)
    wide = encode_image(np.zeros((1, limit + 1, 3), np.uint8), fmt=1)  # PNG holds it
    assert Image.open(io.BytesIO(wide)).size == (limit + 1, 1)
