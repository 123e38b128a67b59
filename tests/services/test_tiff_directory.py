"""Counting a TIFF's directory entries, and an uncompressed one's strips or tiles, from
its first directory (services/common/tiff_directory.py), and what decoding refuses for
it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.images import decode_image, probe_size
from services.common.tiff_directory import (
    MAX_TIFF_ENTRIES,
    MAX_TIFF_RAW_PIECES,
    TiffDirectory,
    count_tiff_directory,
)
from tests.fixtures import bad_images

CAP = 64_000_000


def _pillows_pieces(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        return len(image.tile)


@pytest.mark.parametrize("rows_per_strip", [1, 7, 64])
@pytest.mark.parametrize("big_endian", [False, True])
def test_the_strips_pillow_reads_one_at_a_time_are_counted(
        small_photo: np.ndarray, rows_per_strip: int, big_endian: bool) -> None:
    grey = small_photo[..., 1]
    data = bad_images.uncompressed_tiff(grey, rows_per_strip, big_endian=big_endian)
    strips = -(-grey.shape[0] // rows_per_strip)
    assert count_tiff_directory(data) == TiffDirectory(9, strips)
    assert strips == _pillows_pieces(data)
    np.testing.assert_array_equal(decode_image(data, max_pixels=CAP).rgb[..., 0], grey)


def test_pillows_own_uncompressed_tiffs_are_counted(small_photo: np.ndarray) -> None:
    data = bad_images.save(Image.fromarray(small_photo), "TIFF")
    assert count_tiff_directory(data).pieces == _pillows_pieces(data) >= 1
    with Image.open(io.BytesIO(data)) as image:
        assert count_tiff_directory(data).entries == len(image.tag_v2)


@pytest.mark.parametrize("compression", ["tiff_deflate", "tiff_lzw", "packbits"])
def test_a_compressed_tiff_counts_nothing(small_photo: np.ndarray, compression: str) -> None:
    """libtiff reads those, all strips in one call."""
    data = bad_images.save(Image.fromarray(small_photo), "TIFF", compression=compression)
    assert count_tiff_directory(data).pieces == 0
    assert _pillows_pieces(data) == 1


def test_a_bigtiff_is_counted(small_photo: np.ndarray) -> None:
    data = bad_images.save(Image.fromarray(small_photo), "TIFF", big_tiff=True)
    assert data[:4] == b"II+\x00"
    assert count_tiff_directory(data).pieces == _pillows_pieces(data) >= 1


def test_damage_counts_no_pieces(small_photo: np.ndarray) -> None:
    data = bad_images.uncompressed_tiff(small_photo[..., 0])
    assert count_tiff_directory(b"PNG" + data) == TiffDirectory(0, 0)
    assert count_tiff_directory(data[:9]) == TiffDirectory(0, 0)  # no entry count
    assert count_tiff_directory(data[:40]) == TiffDirectory(9, 0)  # its entries cut
    assert count_tiff_directory(data[:4] + b"\xff\xff\xff\x7f" + data[8:]) == TiffDirectory(0, 0)


def test_too_many_strips_are_refused_before_pillow_lists_them() -> None:
    """A 16 MB TIFF of 8 x 1,000,000 px, a row per strip, took Pillow 1.95 s to open and
    4.2 s to decode."""
    most = bad_images.uncompressed_tiff(np.zeros((MAX_TIFF_RAW_PIECES, 2), np.uint8))
    assert decode_image(most, max_pixels=CAP).rgb.shape == (MAX_TIFF_RAW_PIECES, 2, 3)
    data = bad_images.uncompressed_tiff(np.zeros((MAX_TIFF_RAW_PIECES + 1, 2), np.uint8))
    expected = (rf"^image is a TIFF of more than {MAX_TIFF_RAW_PIECES} uncompressed strips "
                r"or tiles \(read one at a time; writers store a row or more per strip\): "
                "it would take long to decode; re-encode it$")
    with pytest.raises(InvalidArgument, match=expected):
        probe_size(data)
    with pytest.raises(InvalidArgument, match=expected):
        decode_image(data, max_pixels=CAP)


def test_too_many_tags_are_refused_before_pillow_reads_them(small_photo: np.ndarray) -> None:
    """Pillow reads each entry in Python: 65,000 took 0.35 s to decode."""
    grey = small_photo[..., 0]
    most = bad_images.uncompressed_tiff(grey, 8, extra_tags=MAX_TIFF_ENTRIES - 9)
    assert count_tiff_directory(most).entries == MAX_TIFF_ENTRIES
    np.testing.assert_array_equal(decode_image(most, max_pixels=CAP).rgb[..., 0], grey)
    data = bad_images.uncompressed_tiff(grey, 8, extra_tags=65_000)
    expected = (rf"^image is a TIFF of more than {MAX_TIFF_ENTRIES} tags in its first "
                r"directory \(read one at a time; writers write a few dozen\): it would "
                "take long to decode; re-encode it$")
    with pytest.raises(InvalidArgument, match=expected):
        probe_size(data)
