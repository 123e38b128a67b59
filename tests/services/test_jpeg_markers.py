"""Counting a JPEG's scans and marker segments from its structure
(services/common/jpeg_markers.py), on real JPEGs written by libjpeg through Pillow."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from services.common.jpeg_markers import (
    MAX_JPEG_PADDING,
    MAX_JPEG_SCANS,
    MAX_JPEG_SEGMENTS,
    JpegMarkers,
    count_jpeg_markers,
)
from tests.fixtures import bad_images, icc


def _jpeg(photo: np.ndarray, mode: str = "RGB", **params: object) -> bytes:
    return bad_images.save(Image.fromarray(photo).convert(mode), "JPEG", quality=90,
                           **params)


@pytest.mark.parametrize("mode, progressive, scans", [
    ("RGB", False, 1),  # baseline: one interleaved scan
    ("RGB", True, 10),  # libjpeg's progressive script for three components
    ("L", True, 6),  # and for one
    ("CMYK", True, 18),  # and for four
])
def test_the_scans_libjpeg_writes_are_counted(photo: np.ndarray, mode: str,
                                              progressive: bool, scans: int) -> None:
    assert count_jpeg_markers(_jpeg(photo, mode, progressive=progressive)).scans == scans


def test_the_segments_of_a_camera_like_jpeg_are_counted(photo: np.ndarray) -> None:
    """APP0 (JFIF), APP1 (EXIF), APP2 (the ICC profile), two quantisation tables, the
    frame header, four Huffman tables: 10, far below the cap."""
    exif = Image.Exif()
    exif[0x0112] = 1
    data = _jpeg(photo, exif=exif.tobytes(), icc_profile=icc.rgb_profile())
    assert count_jpeg_markers(data) == JpegMarkers(scans=1, segments=10)
    assert count_jpeg_markers(data).too_many() is None


def test_restart_markers_and_stuffed_bytes_in_the_data_are_no_scans(photo: np.ndarray) -> None:
    data = _jpeg(photo, progressive=True, restart_marker_blocks=1)
    body = data[data.index(b"\xff\xda"):]
    assert b"\xff\xd0" in body and b"\xff\x00" in body  # both occur in this data
    assert count_jpeg_markers(data).scans == 10


def test_segments_are_skipped_by_their_length(photo: np.ndarray) -> None:
    """SOS bytes inside a segment (a comment here; an EXIF thumbnail or an ICC profile as
    well) are no scans."""
    data = _jpeg(photo, comment=b"\xff\xda" * 300)
    assert data.count(b"\xff\xda") == 301
    assert count_jpeg_markers(data).scans == 1


def test_only_the_first_image_of_a_multi_picture_file_counts(photo: np.ndarray) -> None:
    first = _jpeg(photo, progressive=True)
    both = first + _jpeg(photo[::-1], progressive=True)
    assert count_jpeg_markers(both) == count_jpeg_markers(first)


def test_counting_stops_past_either_cap(photo: np.ndarray) -> None:
    scans = count_jpeg_markers(bad_images.jpeg_with_empty_scans(photo, 5000))
    assert scans.scans == MAX_JPEG_SCANS + 1
    assert scans.too_many() is not None and "scans" in scans.too_many()  # type: ignore[operator]
    segments = count_jpeg_markers(bad_images.jpeg_with_empty_comments(photo, 100_000))
    assert segments.segments == MAX_JPEG_SEGMENTS + 1
    assert "marker segments" in segments.too_many()  # type: ignore[operator]


@pytest.mark.parametrize("cut", [1, 3, 20, 200])
def test_a_cut_stream_counts_the_scans_it_has(photo: np.ndarray, cut: int) -> None:
    data = _jpeg(photo, progressive=True)
    assert count_jpeg_markers(data[:cut]).scans == 0
    second = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    assert count_jpeg_markers(data[:second + 4]).scans == 2


def test_a_short_segment_length_lands_in_padding(photo: np.ndarray) -> None:
    """The walk lands inside the segment, where no marker is, and goes on to the next
    marker as Pillow and libjpeg do: the 9 bytes it skips are padding, and the rest is
    counted as before."""
    whole = _jpeg(photo, progressive=True)
    data = bytearray(whole)
    assert data[2:4] == b"\xff\xe0" and data[4:6] == b"\x00\x10"  # APP0 (JFIF), 16 bytes
    struct.pack_into(">H", data, 4, 7)
    expected = count_jpeg_markers(whole)._replace(padding=16 - 7)
    assert count_jpeg_markers(bytes(data)) == expected
    assert count_jpeg_markers(b"not a jpeg") == JpegMarkers(scans=0, segments=0)


@pytest.mark.parametrize("padding", [b"\x00", b"\xff\x00", b"\xff\xff"])
def test_padding_between_the_header_segments_is_counted(photo: np.ndarray,
                                                        padding: bytes) -> None:
    """Zeros, stuffed 0xFF 0x00 pairs and 0xFF fill bytes before a marker: Pillow steps
    over each in Python (8 MB of fill bytes took 3.8 s), libjpeg in C."""
    whole = bad_images.jpeg_with_padding(photo, padding, 0)
    data = bad_images.jpeg_with_padding(photo, padding, 100)
    expected = count_jpeg_markers(whole)._replace(padding=100 * len(padding))
    assert count_jpeg_markers(data) == expected
    huge = bad_images.jpeg_with_padding(photo, padding, 1_000_000)
    assert count_jpeg_markers(huge, header_only=True).padding == MAX_JPEG_PADDING + 2
    assert count_jpeg_markers(huge).too_many() == (
        f"more than {MAX_JPEG_PADDING} bytes of padding between the segments of its header "
        "(encoders write none, or a few fill bytes)")


def test_junk_between_scans_does_not_hide_them(photo: np.ndarray) -> None:
    """libjpeg skips junk before a marker and goes on decoding scans, so the count goes
    on past it too: a comment and a junk byte between the empty scans must not end it."""
    data = bad_images.jpeg_with_empty_scans(photo, 40)
    first_empty = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    junk = b"\xff\xfe\x00\x02" + b"\x00"  # an empty comment segment, then a stray byte
    assert count_jpeg_markers(data[:first_empty] + junk + data[first_empty:]).scans == 40


def test_the_header_alone_stops_at_the_first_scan(photo: np.ndarray) -> None:
    data = _jpeg(photo, progressive=True)
    header = count_jpeg_markers(data, header_only=True)
    assert header.scans == 0
    assert header.segments == count_jpeg_markers(data[:data.index(b"\xff\xda")]).segments
    assert count_jpeg_markers(data).segments > header.segments  # tables between scans
