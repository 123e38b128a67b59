"""Counting the extension blocks before a GIF's first image from its structure
(services/common/gif_blocks.py), on real GIFs written by Pillow, and what decoding
refuses for it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.gif_blocks import (
    MAX_GIF_COMMENT_SUB_BLOCKS,
    MAX_GIF_STEPS,
    GifBlocks,
    count_gif_blocks,
)
from services.common.images import decode_image, probe_size
from tests.fixtures import bad_images

CAP = 64_000_000
EMPTY_COMMENT = b"\x21\xfe\x00"
TINY_APPLICATION = b"\x21\xff\x01x\x00"  # an application extension of one byte
STRAY = b"\x00"  # a byte between blocks, which Pillow skips


def _first_frame(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def test_an_animation_with_a_comment_counts_what_precedes_its_first_image(
        small_photo: np.ndarray) -> None:
    """Pillow writes the NETSCAPE loop extension (its name, the loop count and the empty
    sub-block that ends them: 3 steps), the comment (600 bytes in 3 sub-blocks, then the
    empty one: 4 steps; 4 comment blocks with the extension itself) and a graphic control
    extension (2 steps) before the first image; the other frames are never walked."""
    frames = [Image.fromarray(np.roll(small_photo, i, axis=0)).convert("P") for i in range(5)]
    data = bad_images.save(frames[0], "GIF", save_all=True, append_images=frames[1:],
                           loop=0, duration=40, comment=b"c" * 600)
    assert count_gif_blocks(data) == GifBlocks(steps=9, comment_sub_blocks=4)
    assert count_gif_blocks(data).too_many() is None


def test_xmp_with_its_magic_trailer_is_walked_to_its_end(small_photo: np.ndarray) -> None:
    """XMP in a GIF is written raw, its bytes read as sub-block lengths, and ends in a
    257-byte trailer that leads any such walk to the terminator: the image after it is
    still found (Pillow decodes it), and the count stays small."""
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/">' + b"<rdf:RDF/>" * 300 + b"</x:xmpmeta>"
    trailer = b"\x01" + bytes(range(0xFF, -1, -1)) + b"\x00"
    extension = b"\x21\xff\x0bXMP DataXMP" + xmp + trailer
    data = bad_images.gif_with_extensions(small_photo, extension, 1)
    counted = count_gif_blocks(data)
    assert 0 < counted.steps < 200 and counted.comment_sub_blocks == 0
    plain = _first_frame(bad_images.gif_with_extensions(small_photo, b"", 0))
    np.testing.assert_array_equal(decode_image(data, max_pixels=CAP).rgb, plain)


def test_an_empty_comment_is_one_step_and_stray_bytes_are_counted(
        small_photo: np.ndarray) -> None:
    data = bad_images.gif_with_extensions(
        small_photo, EMPTY_COMMENT + TINY_APPLICATION + STRAY * 3, 10)
    assert count_gif_blocks(data) == GifBlocks(steps=60, comment_sub_blocks=10)
    plain = _first_frame(bad_images.gif_with_extensions(small_photo, b"", 0))
    np.testing.assert_array_equal(decode_image(data, max_pixels=CAP).rgb, plain)


def test_pillow_reads_on_past_an_extension_without_data(small_photo: np.ndarray) -> None:
    """Pillow reads sub-blocks after any extension but a comment until an empty one,
    even when the first was already empty: the walk follows it there, into what a walk by
    the format would take for stray bytes or another block."""
    run = b"\x01x" * 1000 + b"\x00"  # read by Pillow as 1,000 sub-blocks and their end
    data = bad_images.gif_with_extensions(small_photo, b"\x21\x01\x00" + run, 1)
    assert count_gif_blocks(data) == GifBlocks(steps=1 + 1001, comment_sub_blocks=0)
    plain = _first_frame(bad_images.gif_with_extensions(small_photo, b"", 0))
    np.testing.assert_array_equal(_first_frame(data), plain)  # Pillow reads it so


def test_the_count_stops_past_the_caps(small_photo: np.ndarray) -> None:
    one_byte_blocks = bad_images.gif_comment(b"x" * 4_000_000, sub_block=1)
    comment = bad_images.gif_with_extensions(small_photo, one_byte_blocks, 1)
    assert count_gif_blocks(comment).comment_sub_blocks == MAX_GIF_COMMENT_SUB_BLOCKS + 1
    stray = bad_images.gif_with_extensions(small_photo, STRAY, 1_000_000)
    assert count_gif_blocks(stray) == GifBlocks(MAX_GIF_STEPS + 1, 0)


def test_damage_and_other_formats_end_the_count(small_photo: np.ndarray) -> None:
    data = bad_images.gif_with_extensions(small_photo, EMPTY_COMMENT, 5)
    assert count_gif_blocks(b"PNG" + data) == GifBlocks(0, 0)
    assert count_gif_blocks(data[:8]) == GifBlocks(0, 0)
    cut = data[:data.index(EMPTY_COMMENT) + 8]  # two comments and the start of a third
    assert count_gif_blocks(cut) == GifBlocks(3, 3)


@pytest.mark.parametrize("extension, copies, most, message", [
    # Pillow joins a frame's comments by copying: a million empty ones took 11 s
    (EMPTY_COMMENT, 1_000_000, MAX_GIF_COMMENT_SUB_BLOCKS,
     rf"more than {MAX_GIF_COMMENT_SUB_BLOCKS} comment blocks before its first image "
     r"\(encoders write a line or two\)"),
    # and a comment's sub-blocks too: 4 million 1-byte ones took 179 s
    (bad_images.gif_comment(b"x" * 4_000_000, sub_block=1), 1,
     bad_images.gif_comment(b"x" * (MAX_GIF_COMMENT_SUB_BLOCKS - 1), sub_block=1),
     rf"more than {MAX_GIF_COMMENT_SUB_BLOCKS} comment blocks "),
    # other extensions' sub-blocks and stray bytes are walked one at a time (1 MB: 81 ms)
    (TINY_APPLICATION, 1_000_000, MAX_GIF_STEPS // 2,
     rf"more than {MAX_GIF_STEPS} extension blocks or stray bytes before its first "
     r"image \(encoders write a few blocks, up to 255 bytes each\)"),
    (STRAY, 1_000_000, MAX_GIF_STEPS, rf"more than {MAX_GIF_STEPS} extension "),
])
def test_too_many_blocks_are_refused_at_the_header(
        small_photo: np.ndarray, extension: bytes, copies: int, most: int | bytes,
        message: str) -> None:
    within = (bad_images.gif_with_extensions(small_photo, extension, most)
              if isinstance(most, int) else
              bad_images.gif_with_extensions(small_photo, most, 1))
    plain = _first_frame(bad_images.gif_with_extensions(small_photo, b"", 0))
    np.testing.assert_array_equal(decode_image(within, max_pixels=CAP).rgb, plain)
    bomb = bad_images.gif_with_extensions(small_photo, extension, copies)
    expected = f"^image is a GIF of {message}.*: it would take long to decode; re-encode it$"
    with pytest.raises(InvalidArgument, match=expected):
        probe_size(bomb)
    with pytest.raises(InvalidArgument, match=expected):
        decode_image(bomb, max_pixels=CAP)
