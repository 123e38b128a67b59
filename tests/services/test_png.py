"""The services' PNG encoder (services/common/png.py): files any decoder reads, pixels
back exactly, parallel bands that form one valid zlib stream."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from services.common import png
from services.common.png import deflate_parallel, encode_png, up_filtered_rows


def _photo(size: tuple[int, int]) -> np.ndarray:
    from skimage import data

    image = Image.fromarray(np.asarray(data.chelsea())).resize(size, Image.Resampling.BICUBIC)
    return np.asarray(image)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == png.PNG_SIGNATURE
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind, body = data[offset + 4:offset + 8], data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        offset += 12 + length
    return chunks


@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 3), (300, 200, 3), (64, 48, 4),
                                   (33, 17, 1), (20, 30, 2), (9, 11)])
def test_pillow_reads_back_the_exact_pixels(shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(len(shape) + shape[0]).integers(0, 256, shape, np.uint8)
    decoded = Image.open(io.BytesIO(encode_png(pixels)))
    decoded.load()  # Pillow checks every CRC and the zlib stream's Adler-32 here
    assert decoded.size == (shape[1], shape[0])
    assert decoded.mode == {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[shape[2] if len(shape) == 3
                                                                 else 1]
    assert np.array_equal(np.asarray(decoded).reshape(shape), pixels)


def test_large_images_are_deflated_in_parallel_bands_that_form_one_stream(
        monkeypatch: pytest.MonkeyPatch) -> None:
    photo = _photo((900, 700))
    monkeypatch.setattr(png, "_MIN_BAND_BYTES", 64 * 1024)
    data = encode_png(photo, threads=4)
    kinds = [kind for kind, _ in _chunks(data)]
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    idat = _chunks(data)[1][1]
    # one zlib stream: Python's own inflater checks the header and the Adler-32
    assert zlib.decompress(idat) == up_filtered_rows(photo).tobytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), photo)
    # four bands: three end with a sync flush (an empty stored block, 00 00 FF FF)
    assert idat.count(b"\x00\x00\xff\xff") >= 3


def test_the_zlib_stream_is_valid_at_every_level_and_band_count() -> None:
    data = np.random.default_rng(0).integers(0, 8, 700_000, np.uint8).tobytes()
    for level in (0, 1, 6, 9):
        for threads in (1, 2, 3):
            assert zlib.decompress(deflate_parallel(data, level, threads)) == data
    assert zlib.decompress(deflate_parallel(b"", 1, 2)) == b""


def test_the_photo_compresses_about_as_well_as_pillow() -> None:
    photo = _photo((512, 512))
    ours = encode_png(photo)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "PNG", compress_level=1)
    assert len(ours) < 1.1 * len(buffer.getvalue())


@pytest.mark.parametrize(("pixels", "message"), [
    (np.zeros((4, 4, 3), np.float32), "uint8"),
    (np.zeros((4, 4, 5), np.uint8), "shape"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
])
def test_bad_pixels_are_refused(pixels: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_png(pixels)
    with pytest.raises(ValueError, match="level"):
        encode_png(np.zeros((2, 2, 3), np.uint8), level=10)


def test_isal_deflates_when_installed_and_zlib_is_the_fallback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """requirements.txt installs isal (ISA-L), so it is the one in use here; without it (a bare
    GPU machine) zlib writes the same pixels, also in parallel bands."""
    assert png.deflate_backend() == "isal"
    photo = _photo((400, 300))
    fast = encode_png(photo, threads=2)
    monkeypatch.setattr(png, "_isal", None)
    assert png.deflate_backend() == "zlib"
    fallback = encode_png(photo, threads=2)
    assert fast != fallback  # two different deflaters
    for data in (fast, fallback):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), photo)
        assert zlib.decompress(_chunks(data)[1][1]) == up_filtered_rows(photo).tobytes()
