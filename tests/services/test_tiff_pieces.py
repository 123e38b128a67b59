"""Counting an uncompressed TIFF's strips or tiles from its first directory
(services/common/tiff_pieces.py), and what decoding refuses for it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.images import decode_image, probe_size
from services.common.tiff_pieces import MAX_TIFF_RAW_PIECES, TiffPieces, count_tiff_pieces
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
    assert count_tiff_pieces(data) == TiffPieces(strips) == TiffPieces(_pillows_pieces(data))
    np.testing.assert_array_equal(decode_image(data, max_pixels=CAP).rgb[..., 0], grey)


def test_pillows_own_uncompressed_tiffs_are_counted(small_photo: np.ndarray) -> None:
    data = bad_images.save(Image.fromarray(small_photo), "TIFF")
    assert count_tiff_pieces(data).pieces == _pillows_pieces(data) >= 1


@pytest.mark.parametrize("compression", ["tiff_deflate", "tiff_lzw", "packbits"])
def test_a_compressed_tiff_counts_nothing(small_photo: np.ndarray, compression: str) -> None:
    """libtiff reads those, all strips in one call."""
    data = bad_images.save(Image.fromarray(small_photo), "TIFF", compression=compression)
    assert count_tiff_pieces(data) == TiffPieces(0)
    assert _pillows_pieces(data) == 1


def test_a_bigtiff_is_counted(small_photo: np.ndarray) -> None:
    data = bad_images.save(Image.fromarray(small_photo), "TIFF", big_tiff=True)
    assert data[:4] == b"II+\x00"
    assert count_tiff_pieces(data).pieces == _pillows_pieces(data) >= 1


def test_damage_counts_nothing(small_photo: np.ndarray) -> None:
    data = bad_images.uncompressed_tiff(small_photo[..., 0])
    assert count_tiff_pieces(b"PNG" + data) == TiffPieces(0)
    assert count_tiff_pieces(data[:9]) == TiffPieces(0)  # the directory is cut
    assert count_tiff_pieces(data[:40]) == TiffPieces(0)
    assert count_tiff_pieces(data[:4] + b"\xff\xff\xff\x7f" + data[8:]) == TiffPieces(0)


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
