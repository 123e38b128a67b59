"""Run-length-coded BMPs (services/common/bmp_rle.py): decoded as the format defines,
as Pillow's own decoder does where it agrees, at a cost bounded by the file's size."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.bmp_rle import (
    MAX_BMP_RLE_BYTES,
    BmpRle,
    BmpRleDecoder,
    count_bmp_rle_bytes,
    decode_rle,
)
from services.common.errors import InvalidArgument
from services.common.images import decode_image, probe_size
from tests.fixtures import bad_images
from tests.fixtures.pillow_decoders import pillows_own_decoders

CAP = 64_000_000
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EOL, EOB = b"\x00\x00", b"\x00\x01"


def _indices(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "P"
        return np.asarray(image)


def test_the_services_decode_rle_bmps_with_this_decoder() -> None:
    Image.init()  # every plugin imported: none registers its own again
    assert Image.DECODERS["bmp_rle"] is BmpRleDecoder


def test_an_imagemagick_rle8_bmp_decodes_to_its_source() -> None:
    """Written by ImageMagick 6.9.11 (``convert rle8_imagemagick_source.png -type Palette
    -compress RLE bmp3:rle8_imagemagick.bmp``): 4,459 runs, an end of line for each of
    its 53 rows and an end of bitmap."""
    data = (FIXTURES / "rle8_imagemagick.bmp").read_bytes()
    assert count_bmp_rle_bytes(data) == BmpRle(len(data) - 1078)
    with Image.open(FIXTURES / "rle8_imagemagick_source.png") as source:
        expected = np.asarray(source.convert("RGB"))
    np.testing.assert_array_equal(decode_image(data, max_pixels=CAP).rgb, expected)


def _random_codes(rng: random.Random, width: int, height: int, rle4: bool) -> bytes:
    """Codes that fill width x height: runs, absolute runs (of an even length for RLE4,
    where Pillow 12.1 mis-reads odd ones), ends of lines (after one code at least: one at
    the start of a row is no row of its own), and an end of bitmap."""
    codes = bytearray()
    for _ in range(height):
        x = 0
        while x < width and (x == 0 or rng.random() > 0.02):  # some rows end early
            count = rng.randint(1, min(255, width - x))
            if count >= 4 and rng.random() < 0.4:
                count -= count % 2 if rle4 else 0
                values = [rng.randrange(16 if rle4 else 256) for _ in range(count)]
                stored = (bytes(a << 4 | b for a, b in zip(values[::2], values[1::2],
                                                          strict=True))
                          if rle4 else bytes(values))
                codes += bytes((0, count)) + stored + b"\x00" * (len(stored) % 2)
            else:
                codes += bytes((count, rng.randrange(256)))
            x += count
        codes += EOL
    return bytes(codes + EOB)


@pytest.mark.parametrize("rle4", [False, True])
def test_random_codes_decode_as_pillows_own_decoder_reads_them(rle4: bool) -> None:
    rng = random.Random(4 if rle4 else 8)
    for _ in range(20):
        width, height = rng.randint(1, 300), rng.randint(1, 40)
        data = bad_images.bmp_rle(width, height, _random_codes(rng, width, height, rle4),
                                  rle4=rle4)
        ours = _indices(data)
        with pillows_own_decoders():
            np.testing.assert_array_equal(ours, _indices(data))


def test_a_delta_moves_right_and_up_by_its_two_offsets() -> None:
    """Rows are stored bottom up, so "up" is on to the next rows of the stream. Pillow
    12.1 reads 4 bytes after the escape instead of 2."""
    codes = b"\x02\x07" + b"\x00\x02\x03\x01" + b"\x01\x09" + EOB  # 2 px, skip 3 right 1 up
    assert decode_rle(codes, 8, 2, rle4=False) == bytes(
        [7, 7, 0, 0, 0, 0, 0, 0,
         0, 0, 0, 0, 0, 9, 0, 0])
    indices = _indices(bad_images.bmp_rle(8, 2, codes))
    np.testing.assert_array_equal(indices, [[0, 0, 0, 0, 0, 9, 0, 0],  # top row: last stored
                                            [7, 7, 0, 0, 0, 0, 0, 0]])


def test_rle4_runs_alternate_their_two_values_and_odd_absolute_runs_read_half_a_byte() -> None:
    codes = b"\x05\x12" + b"\x00\x03\xab\xc0" + EOL + EOB  # run of 5, then 3 as they are
    assert decode_rle(codes, 8, 1, rle4=True) == bytes([1, 2, 1, 2, 1, 0xA, 0xB, 0xC])


def test_pixels_no_code_reaches_are_the_first_colour() -> None:
    """An end of bitmap before the image is full leaves the rest at index 0 (Pillow
    12.1 refuses the file); an end of line pads the row the same way."""
    assert decode_rle(b"\x02\x05" + EOL + b"\x01\x06" + EOB, 3, 3, rle4=False) == bytes(
        [5, 5, 0, 6, 0, 0, 0, 0, 0])


def test_runs_stop_at_the_end_of_their_row() -> None:
    assert decode_rle(b"\xff\x04\x02\x05" + EOL + b"\x01\x06" + EOB, 3, 2,
                      rle4=False) == bytes([4, 4, 4, 6, 0, 0])


def test_codes_that_run_out_are_a_cut_file() -> None:
    """The codes end before the image is complete, with no end of bitmap: the decoder
    reports it, and the service says the data is damaged."""
    with pytest.raises(ValueError, match="not enough image data"):
        decode_rle(b"\x02\x05" + EOL, 3, 3, rle4=False)
    with pytest.raises(ValueError, match="not enough image data"):
        decode_rle(b"\x00\x05\x01\x02", 3, 3, rle4=False)  # an absolute run, cut
    data = bad_images.bmp_rle(3, 3, b"\x02\x05" + EOL)
    with pytest.raises(InvalidArgument, match=r"^corrupt image data: .*not enough image data"):
        decode_image(data, max_pixels=CAP)


def test_a_row_of_padding_costs_one_code() -> None:
    """A pixel and an end of line per row: Pillow's decoder pads each row a Python step
    per pixel (3000 x 3000 px: about 1 s here); this one decodes it the same."""
    side = 3000
    data = bad_images.bmp_rle(side, side, (b"\x01\x05" + EOL) * side + EOB)
    indices = np.frombuffer(decode_rle(data[1078:], side, side, rle4=False), np.uint8)
    rows = indices.reshape(side, side)
    assert (rows[:, 0] == 5).all() and not rows[:, 1:].any()


def test_the_coded_bytes_are_read_from_the_header(small_photo: np.ndarray) -> None:
    rle = bad_images.bmp_rle(4, 4, b"\x04\x01" * 4 + EOB)
    assert count_bmp_rle_bytes(rle) == BmpRle(10)
    raw = bad_images.save(Image.fromarray(small_photo), "BMP")
    assert count_bmp_rle_bytes(raw) == BmpRle(0)
    assert count_bmp_rle_bytes(rle[:20]) == BmpRle(0)
    assert count_bmp_rle_bytes(b"PNG" + rle) == BmpRle(0)


def test_more_coded_bytes_than_the_cap_are_refused_at_the_header() -> None:
    side = 4096  # 1-pixel runs, each its own 2-byte code, past the cap
    rows = -(-MAX_BMP_RLE_BYTES // (2 * side + 2)) + 1
    codes = (b"\x01\x07" * side + EOL) * rows + EOB
    data = bad_images.bmp_rle(side, rows, codes)
    assert count_bmp_rle_bytes(data).coded_bytes > MAX_BMP_RLE_BYTES
    expected = ("^image is a BMP of more than 8 MB of run-length-coded pixels "
                r"\(decoded a 2-byte code at a time\): it would take long to decode; "
                "re-encode it$")
    with pytest.raises(InvalidArgument, match=expected):
        probe_size(data)
    within = bad_images.bmp_rle(side, 8, (b"\x01\x07" * side + EOL) * 8 + EOB)
    assert decode_image(within, max_pixels=CAP).rgb.shape == (8, side, 3)
