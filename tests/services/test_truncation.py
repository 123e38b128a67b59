"""A failed decode says "truncated" when the file was cut short and "corrupt" when it is
whole but damaged inside (services/common/truncation.py), on real files of every
accepted format."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.images import decode_image
from services.common.truncation import how_cut_short
from tests.fixtures import bad_images

CAP = 64_000_000
FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]


def _file(photo: np.ndarray, fmt: str) -> bytes:
    return bad_images.save(Image.fromarray(photo), fmt, **(
        {"compression": "tiff_deflate"} if fmt == "TIFF" else {}))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_whole_file_is_not_cut_short(small_photo: np.ndarray, fmt: str) -> None:
    assert how_cut_short(_file(small_photo, fmt), fmt) is None


@pytest.mark.parametrize("fmt, shown", [
    ("PNG", "the PNG ends after {n} bytes, inside its IDAT chunk (of "),
    ("JPEG", "the JPEG ends after {n} bytes, without its end-of-image marker"),
    ("GIF", "the GIF ends after {n} bytes, without its trailer"),
    ("WEBP", "the WebP ends after {n} bytes, of the {whole} its header gives"),
    ("BMP", "the BMP ends after {n} bytes, of the {whole} its header gives"),
    # deflate TIFFs from Pillow keep their directory at the end
    ("TIFF", "the TIFF ends after {n} bytes, before its first directory"),
])
@pytest.mark.parametrize("kept", [0.5, 0.9])
def test_a_cut_file_is_truncated_and_says_how(small_photo: np.ndarray, fmt: str, shown: str,
                                              kept: float) -> None:
    whole = _file(small_photo, fmt)
    cut = whole[:int(len(whole) * kept)]
    with pytest.raises(InvalidArgument) as error:
        decode_image(cut, max_pixels=CAP)
    expected = shown.format(n=len(cut), whole=len(whole))
    assert str(error.value).startswith(f"truncated image: {expected}")


def test_a_tiff_cut_inside_its_first_directory(small_photo: np.ndarray) -> None:
    """Uncompressed TIFFs from Pillow put the directory first, at byte 8."""
    whole = bad_images.save(Image.fromarray(small_photo), "TIFF")
    with pytest.raises(InvalidArgument, match=r"^truncated image: the TIFF ends after 40 "
                                              r"bytes, inside its first directory \(at byte 8\)"):
        decode_image(whole[:40], max_pixels=CAP)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_a_whole_file_damaged_inside_is_corrupt_not_truncated(small_photo: np.ndarray,
                                                              fmt: str) -> None:
    """Zeros over the middle of the pixel data: Pillow says "broken data stream" or even
    "image file is truncated", but the file ends as its format ends."""
    data = bytearray(_file(small_photo, fmt))
    middle = len(data) // 2
    data[middle:middle + 40] = bytes(40)
    with pytest.raises(InvalidArgument, match=r"^corrupt image data: "):
        decode_image(bytes(data), max_pixels=CAP)


def test_a_png_cut_anywhere_in_its_header_is_truncated(small_photo: np.ndarray) -> None:
    """Too little of it for Pillow to read a header (IHDR alone, or less): its chunk
    lengths still show that it was cut, where it was cut."""
    whole = _file(small_photo, "PNG")
    for size in range(8, 8 + 25 + 8):  # the signature, IHDR, the next chunk's head
        with pytest.raises(InvalidArgument) as error:
            decode_image(whole[:size], max_pixels=CAP)
        assert error.value.reason == "IMAGE_TRUNCATED", (size, str(error.value))
        where = ("before its IHDR chunk" if size < 8 + 8 else
                 "inside its IHDR chunk (of 13 bytes at byte 8)" if size < 8 + 25 else
                 "after its IHDR chunk")
        assert str(error.value).startswith(f"truncated image: the PNG ends after {size} "
                                           f"bytes, {where}"), str(error.value)


def test_a_png_whose_chunks_are_damaged_is_not_called_truncated(small_photo: np.ndarray
                                                                 ) -> None:
    """A chunk whose type is no name: the bytes are damaged, wherever they end."""
    whole = bytearray(_file(small_photo, "PNG"))
    whole[8 + 25 + 4:8 + 25 + 8] = b"\x01\x02\x03\x04"  # the type of the chunk after IHDR
    with pytest.raises(InvalidArgument) as error:
        decode_image(bytes(whole[:len(whole) // 2]), max_pixels=CAP)
    assert error.value.reason == "IMAGE_UNDECODABLE", str(error.value)
    assert str(error.value).endswith(f"the PNG ends after {len(whole) // 2} bytes, without its "
                                     "IEND chunk")


def test_a_bad_header_without_an_end_mark_is_not_called_truncated() -> None:
    """Bytes that only begin as a GIF may be a cut GIF or no GIF at all: both are said."""
    with pytest.raises(InvalidArgument) as error:
        decode_image(b"GIF89a, or so it says", max_pixels=CAP)
    assert str(error.value) == ("not a decodable image: damaged GIF header: SyntaxError: image "
                                "not found in GIF frame; the GIF ends after 21 bytes, without "
                                "its trailer")


@pytest.mark.parametrize("after_end", [bytes(100), b"A" * 100])
def test_a_whole_png_with_bytes_after_its_end_is_never_called_truncated(
        small_photo: np.ndarray, after_end: bytes) -> None:
    """100 bytes after IEND (padding, or junk) put it out of the tail looked at: a PNG
    damaged inside is still corrupt or undecodable, not cut short."""
    whole = bytearray(_file(small_photo, "PNG"))
    middle = len(whole) // 2
    whole[middle:middle + 40] = bytes(40)  # damaged pixel data
    with pytest.raises(InvalidArgument) as error:
        decode_image(bytes(whole) + after_end, max_pixels=CAP)
    assert error.value.reason == "IMAGE_CORRUPT", str(error.value)
    header = bytearray(_file(small_photo, "PNG"))
    header[8:12] = b"\xff\xff\xff\xff"  # IHDR's length
    with pytest.raises(InvalidArgument) as error:
        decode_image(bytes(header) + after_end, max_pixels=CAP)
    assert error.value.reason == "IMAGE_UNDECODABLE", str(error.value)


@pytest.mark.parametrize("fmt", ["JPEG", "GIF"])
def test_padding_after_the_end_mark_is_not_called_cut_short(small_photo: np.ndarray,
                                                             fmt: str) -> None:
    """Zeros after a JPEG's end-of-image marker or a GIF's trailer (a file padded to a
    block size): the file ends as its format ends; damaged inside, it is corrupt."""
    whole = _file(small_photo, fmt) + bytes(16)
    assert how_cut_short(whole, fmt) is None
    damaged = bytearray(whole)
    middle = len(damaged) // 2
    damaged[middle:middle + 40] = bytes(40)
    assert how_cut_short(bytes(damaged), fmt) is None
