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


#: Adam7's passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))


def _png_rows(pixels: np.ndarray, depth: int) -> list[bytes]:
    """The rows of one (sub)image as stored, each behind PNG's Sub filter (type 1), which
    stores each byte minus the one a pixel before it: undoing it needs the right pixel
    size."""
    pixel_bytes = max(1, depth * (pixels.shape[2] if pixels.ndim == 3 else 1) // 8)
    rows = []
    for row in pixels:
        if depth == 16:
            raw = np.frombuffer(row.astype(">u2").tobytes(), np.uint8)
        elif depth == 8:
            raw = row.astype(np.uint8).reshape(-1)
        else:  # 1, 2 or 4 bits a sample, packed from the high bits
            bits = (row.astype(np.uint8)[:, None] >> np.arange(depth - 1, -1, -1)) & 1
            raw = np.packbits(bits.reshape(-1))
        filtered = raw.copy()
        filtered[pixel_bytes:] = raw[pixel_bytes:] - raw[:-pixel_bytes]  # modulo 256
        rows.append(b"\x01" + filtered.tobytes())
    return rows


def _png(pixels: np.ndarray, depth: int, colour_type: int, trns: bytes, *,
         interlaced: bool = False, exif: bytes | None = None) -> bytes:
    """A PNG written chunk by chunk (Pillow writes no colour key for 16-bit images, nor
    2- or 4-bit grey, nor interlaced PNGs)."""
    height, width = pixels.shape[:2]
    if interlaced:
        passes = (pixels[y0::dy, x0::dx] for x0, y0, dx, dy in _ADAM7)
        rows = [row for sub in passes if sub.size for row in _png_rows(sub, depth)]
    else:
        rows = _png_rows(pixels, depth)
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, int(interlaced))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"tRNS", trns)
            + (b"" if exif is None else _png_chunk(b"eXIf", exif))
            + _png_chunk(b"IDAT", zlib.compress(b"".join(rows))) + _png_chunk(b"IEND", b""))


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


@pytest.mark.parametrize("depth, scale", [(2, 85), (4, 17)])
def test_a_2_and_4_bit_grey_colour_key_becomes_alpha(depth: int, scale: int) -> None:
    """Pillow rescales 2- and 4-bit samples to 0..255 and leaves the key as stored: the
    key is matched at the PNG's depth, not against the rescaled pixels."""
    levels = 2 ** depth
    grey = (np.arange(3 * 11) % levels).reshape(3, 11).astype(np.uint8)  # rows end mid-byte
    key = levels - 2
    decoded = decode_image(_png(grey, depth, 0, struct.pack(">H", key)), max_pixels=CAP)
    assert decoded.alpha is not None
    np.testing.assert_array_equal(decoded.alpha, np.where(grey == key, 0, 255))
    np.testing.assert_array_equal(decoded.rgb[..., 0], grey * scale)


def _rgb16_with_near_misses(key: tuple[int, int, int]) -> np.ndarray:
    """A 16-bit RGB image with the key and colours that share its high bytes, over a
    gradient (so the Sub filter stores no plain copies)."""
    rows, cols = np.mgrid[0:9, 0:13]
    rgb16 = np.stack([rows * 7000, cols * 5000, (rows + cols) * 3001], axis=-1).astype(np.uint16)
    rgb16[1, 2] = rgb16[4, 4] = rgb16[8, 12] = key
    rgb16[0, 0] = (key[0], key[1], key[2] ^ 1)  # one step off in the low byte: opaque
    rgb16[5, 7] = (key[0] ^ 0x80, key[1], key[2])  # off in a low byte only
    return rgb16


@pytest.mark.parametrize("interlaced", [False, True], ids=["plain", "adam7"])
def test_a_16_bit_rgb_colour_key_is_matched_at_16_bits(interlaced: bool) -> None:
    """Pillow keeps only the high byte of 16-bit RGB, where (0, 0, 200) and a key of
    (0, 0, 0) both read as black: matching there would punch holes. The key is matched
    against all 16 bits (the low bytes come from a second reading of the same stream)."""
    key = (0x1234, 0xABCD, 0x00FF)
    rgb16 = _rgb16_with_near_misses(key)
    data = _png(rgb16, 16, 2, struct.pack(">HHH", *key), interlaced=interlaced)
    decoded = decode_image(data, max_pixels=CAP)
    assert decoded.alpha is not None
    np.testing.assert_array_equal(decoded.alpha, np.where((rgb16 == key).all(-1), 0, 255))
    np.testing.assert_array_equal(decoded.rgb, rgb16 >> 8)


def test_a_16_bit_rgb_key_of_no_pixel_leaves_the_image_opaque() -> None:
    rgb16 = np.full((2, 2, 3), 255, np.uint16)  # every pixel black at 8 bits, as the key
    rgb16[0, 0] = (0, 0, 200)
    rgb16[1, 1] = (0, 1, 0)
    decoded = decode_image(_png(rgb16, 16, 2, struct.pack(">HHH", 0, 0, 0)), max_pixels=CAP)
    assert decoded.alpha is None
    np.testing.assert_array_equal(decoded.rgb, rgb16 >> 8)


def test_a_colour_key_turns_with_the_exif_orientation() -> None:
    """The key is matched on the image as stored; its alpha then turns with the pixels."""
    key = (0x1234, 0xABCD, 0x00FF)
    rgb16 = _rgb16_with_near_misses(key)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: shown rotated 90 degrees clockwise
    data = _png(rgb16, 16, 2, struct.pack(">HHH", *key), exif=exif.tobytes())
    decoded = decode_image(data, max_pixels=CAP)
    assert decoded.alpha is not None
    np.testing.assert_array_equal(decoded.rgb, np.rot90(rgb16 >> 8, -1))
    np.testing.assert_array_equal(decoded.alpha,
                                  np.rot90(np.where((rgb16 == key).all(-1), 0, 255), -1))


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
