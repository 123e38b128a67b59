"""Counting a PNG's chunks from its structure (services/common/png_chunks.py), on real
PNGs written by Pillow, and what decoding refuses for it."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.images import decode_image, probe_size
from services.common.png_chunks import (
    MAX_PNG_CHUNKS,
    PNG_SIGNATURE,
    PngChunks,
    count_png_chunks,
)
from tests.fixtures import bad_images

CAP = 64_000_000


def _png(photo: np.ndarray, **params: object) -> bytes:
    return bad_images.save(Image.fromarray(photo), "PNG", **params)


def _kinds(data: bytes) -> list[bytes]:
    """Every chunk's type, in order, read independently of the code under test."""
    kinds, position = [], 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        kinds.append(kind)
        position += 12 + length
    return kinds


def test_a_plain_png_counts_its_header_and_pixel_data(small_photo: np.ndarray) -> None:
    data = _png(small_photo)
    assert _kinds(data) == [b"IHDR", b"IDAT", b"IEND"]
    assert count_png_chunks(data) == PngChunks(2)  # the walk ends at IEND
    assert count_png_chunks(data, header_only=True) == PngChunks(2)


def test_metadata_and_every_pixel_data_chunk_are_counted(small_photo: np.ndarray) -> None:
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    for key in ("Title", "Author", "Software"):
        text.add_text(key, "percept")
    data = _png(small_photo, pnginfo=text, dpi=(300, 300))
    assert _kinds(data)[:5] == [b"IHDR", b"tEXt", b"tEXt", b"tEXt", b"pHYs"]
    split = bad_images.png_with_pixel_data_in_chunks(small_photo, 1000)
    assert count_png_chunks(data) == PngChunks(6)
    assert count_png_chunks(split) == PngChunks(1 + 1000)
    assert count_png_chunks(split, header_only=True) == PngChunks(2)  # what opening reads


def test_an_animated_png_counts_its_first_frame_only(small_photo: np.ndarray) -> None:
    """Pillow stops loading at the next frame's control chunk (fcTL): the frames after
    it, however many, cost nothing."""
    def apng(frames: int) -> bytes:
        images = [Image.fromarray(np.roll(small_photo, i, axis=1)) for i in range(frames)]
        return bad_images.save(images[0], "PNG", save_all=True, append_images=images[1:])

    three, thirty = apng(3), apng(30)
    assert _kinds(three)[:6] == [b"IHDR", b"acTL", b"fcTL", b"IDAT", b"fcTL", b"fdAT"]
    assert count_png_chunks(three) == count_png_chunks(thirty) == PngChunks(4)


def test_the_count_stops_past_the_cap(small_photo: np.ndarray) -> None:
    data = bad_images.png_with_empty_chunks(small_photo, 1_000_000)
    assert count_png_chunks(data) == PngChunks(MAX_PNG_CHUNKS + 1)
    assert count_png_chunks(data).too_many() is not None
    assert PngChunks(MAX_PNG_CHUNKS).too_many() is None


def test_damage_ends_the_count(small_photo: np.ndarray) -> None:
    data = _png(small_photo)
    assert count_png_chunks(b"not a png" + data) == PngChunks(0)
    assert count_png_chunks(data[:20]) == PngChunks(1)  # IHDR's head, then cut
    huge = data[:8 + 25] + struct.pack(">I", 2**31) + data[8 + 29:]  # IDAT's length
    assert count_png_chunks(huge) == PngChunks(1)


def test_small_pixel_data_chunks_within_the_cap_decode(small_photo: np.ndarray) -> None:
    """An encoder that writes many small chunks (here 20,000, most of them empty) is
    still read, and exactly."""
    data = bad_images.png_with_pixel_data_in_chunks(small_photo, 20_000)
    np.testing.assert_array_equal(decode_image(data, max_pixels=CAP).rgb, small_photo)


def test_too_many_chunks_before_the_pixels_are_refused_at_the_header(
        small_photo: np.ndarray) -> None:
    most = bad_images.png_with_empty_chunks(small_photo, MAX_PNG_CHUNKS - 2)
    np.testing.assert_array_equal(decode_image(most, max_pixels=CAP).rgb, small_photo)
    bomb = bad_images.png_with_empty_chunks(small_photo, 1_000_000)  # 12 MB; Pillow: 2.5 s
    expected = (rf"^image is a PNG of more than {MAX_PNG_CHUNKS} chunks \(encoders write "
                r"a few, plus one for every 8 KB or more of pixel data\): it would take "
                "long to decode; re-encode it$")
    with pytest.raises(InvalidArgument, match=expected):
        probe_size(bomb)
    with pytest.raises(InvalidArgument, match=expected):
        decode_image(bomb, max_pixels=CAP)


def test_too_many_pixel_data_chunks_are_refused_before_decoding(
        small_photo: np.ndarray) -> None:
    """The header is fine (opening reads to the first pixel data chunk); the decode is
    refused before Pillow walks the rest."""
    data = bad_images.png_with_pixel_data_in_chunks(small_photo, MAX_PNG_CHUNKS + 1)
    assert probe_size(data) == (small_photo.shape[1], small_photo.shape[0])
    with pytest.raises(InvalidArgument, match=rf"^image is a PNG of more than "
                                              rf"{MAX_PNG_CHUNKS} chunks "):
        decode_image(data, max_pixels=CAP)


def test_pillow_reads_what_the_walk_counts(small_photo: np.ndarray) -> None:
    """The fixtures are valid PNGs: Pillow decodes them whole (so the refusals above
    are for their cost, not for damage)."""
    for data in (bad_images.png_with_empty_chunks(small_photo, 100),
                 bad_images.png_with_pixel_data_in_chunks(small_photo, 100)):
        with Image.open(io.BytesIO(data)) as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), small_photo)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk."""
    chunks, position = [], 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        chunks.append((kind, data[position + 8:position + 8 + length]))
        position += 12 + length
    return chunks


def _png_of(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(bad_images.png_chunk(k, d) for k, d in chunks)


def _variants(photo: np.ndarray) -> dict[str, bytes]:
    """A 3-frame APNG, and what Pillow takes for no animation (then it reads to IEND):
    one frame claimed, a second acTL (Pillow voids both), a count of 0; and one frame
    claimed beside a default image that is no frame (two frames: an animation)."""
    images = [Image.fromarray(np.roll(photo, i, axis=1)) for i in range(3)]
    chunks = _chunks(bad_images.save(images[0], "PNG", save_all=True,
                                     append_images=images[1:]))
    assert [k for k, _ in chunks[:4]] == [b"IHDR", b"acTL", b"fcTL", b"IDAT"]
    actl = chunks[1][1]

    def frames(count: int) -> tuple[bytes, bytes]:
        return b"acTL", struct.pack(">I", count) + actl[4:]

    return {
        "three frames": _png_of(chunks),
        "one frame claimed": _png_of([chunks[0], frames(1), *chunks[2:]]),
        "two acTL": _png_of([chunks[0], chunks[1], chunks[1], *chunks[2:]]),
        "no frames claimed": _png_of([chunks[0], frames(0), *chunks[2:]]),
        "one frame and a default image": _png_of([chunks[0], frames(1), *chunks[3:]]),
    }


@pytest.mark.filterwarnings("ignore:Invalid APNG")  # Pillow's, for the variants it voids
@pytest.mark.parametrize("variant", ["three frames", "one frame claimed", "two acTL",
                                     "no frames claimed", "one frame and a default image"])
def test_the_walk_stops_where_pillow_stops_loading(small_photo: np.ndarray,
                                                   variant: str) -> None:
    """At the next frame's fcTL where Pillow takes the file for an animation, at IEND
    where it does not: a claim of one frame must not stop the count early."""
    data = _variants(small_photo)[variant]
    kinds = _kinds(data)
    first_pixels = kinds.index(b"IDAT")
    with Image.open(io.BytesIO(data)) as image:
        animated = image.is_animated
    assert animated == (variant in ("three frames", "one frame and a default image"))
    end = (kinds.index(b"fcTL", first_pixels) if animated else kinds.index(b"IEND"))
    assert count_png_chunks(data) == PngChunks(end)
