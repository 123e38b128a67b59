"""A decoder for run-length-coded BMPs (RLE8 and RLE4) whose cost follows the size of
the file, not of the image, in place of Pillow's.

Pillow decodes them in Python, and parts of that pixel by pixel: an RLE4 run (one
2-byte code for up to 255 pixels) and the padding to the end of a row (the 2-byte code
end-of-line) each take a Python step for every pixel. A 13 kB RLE8 BMP of 3000 x 3000
px, each row one pixel and an end of line, took Pillow about 1 s to decode here (17.5 ms
with this decoder; benchmarks/bench_decode_bounds.py), and at the 64-megapixel cap a 36 kB
one would take some 7 s; nothing interrupts a decoder. Here
every code is one step (runs and padding are slice copies), and the codes are bounded by
the bytes of the file: ``MAX_BMP_RLE_BYTES`` of them, refused before decoding (see
images.py), cost at most about a second.

It also reads two codes as the BMP format defines them where Pillow 12.1 does not: a
delta (move right and up) is 2 bytes of offsets after the escape, not 4, and an RLE4
absolute run of an odd number of pixels reads its last, half-used byte.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, NamedTuple

from PIL import BmpImagePlugin, Image, ImageFile

#: The most run-length-coded bytes a request's BMP may have (two per code: 4 M codes).
MAX_BMP_RLE_BYTES = 8 * 2**20
#: The BMP header's compression values for run-length coding.
RLE_COMPRESSIONS = (1, 2)  # BI_RLE8, BI_RLE4

_END_OF_LINE, _END_OF_BITMAP, _DELTA = 0, 1, 2
_INFO_HEADER_SIZE = 40  # BITMAPINFOHEADER, the first with a compression field; later ones extend it


class BmpRle(NamedTuple):
    coded_bytes: int  # the bytes from the pixel data's offset to the end; 0 if not RLE

    def too_many(self) -> str | None:
        """What there is too much of, to refuse the BMP for; None when within bounds."""
        if self.coded_bytes > MAX_BMP_RLE_BYTES:
            return (f"more than {MAX_BMP_RLE_BYTES // 2**20} MB of run-length-coded pixels "
                    "(decoded a 2-byte code at a time)")
        return None


def count_bmp_rle_bytes(data: bytes) -> BmpRle:
    """The run-length-coded bytes of ``data``, a BMP, from its header: those after the
    pixel data's offset, for RLE8 and RLE4 BMPs; 0 for others, and for bytes that are
    no BMP or whose header is cut short (the decoder reports those)."""
    if not data.startswith(b"BM") or len(data) < 34:
        return BmpRle(0)
    offset = int.from_bytes(data[10:14], "little")
    header_size = int.from_bytes(data[14:18], "little")
    compression = int.from_bytes(data[30:34], "little")
    if header_size < _INFO_HEADER_SIZE or compression not in RLE_COMPRESSIONS:
        return BmpRle(0)
    return BmpRle(max(0, len(data) - offset))


#: A run of up to 255 pixels of each code value: RLE8 repeats the byte, RLE4 alternates
#: its high and low 4 bits. Sliced, not built, for each run.
_RUNS = {False: [bytes((value,)) * 255 for value in range(256)],
         True: [bytes((value >> 4, value & 0x0F)) * 128 for value in range(256)]}


def _nibbles(data: bytes) -> bytes:
    """Each byte as its two 4-bit pixels, high one first."""
    out = bytearray(2 * len(data))
    out[0::2] = bytes(byte >> 4 for byte in data)
    out[1::2] = bytes(byte & 0x0F for byte in data)
    return bytes(out)


def decode_rle(data: bytes, width: int, height: int, rle4: bool) -> bytes:
    """The width x height pixel indices (rows in the file's order) that ``data``, RLE8 or
    RLE4 codes, describe. Pixels no code reaches are 0. Raises ValueError where the codes
    end before the image is complete and without an end-of-bitmap code (a cut file)."""
    total = width * height
    pixels = bytearray(total)
    runs = _RUNS[rle4]
    at = x = 0
    finished = False  # by an end-of-bitmap code
    stream = iter(data)
    for count, value in zip(stream, stream, strict=False):  # one code: 2 bytes
        if count:  # a run of one value (RLE4: two alternating), no further than the row
            if x + count > width:  # (nor past the image: rows end at or before ``total``)
                count = width - x
            pixels[at:at + count] = runs[value][:count]
            at += count
            x += count
            continue
        if value == _END_OF_LINE:
            if x:
                at += width - x
                x = 0
        elif value == _END_OF_BITMAP:
            finished = True
            break
        elif value == _DELTA:
            offsets = bytes(islice(stream, 2))
            if len(offsets) < 2:
                break
            at += offsets[0] + offsets[1] * width
            x = at % width
        else:  # an absolute run: ``value`` pixels as they are, padded to a 2-byte word
            stored = (value + 1) // 2 if rle4 else value
            literal = bytes(islice(stream, stored + (stored & 1)))[:stored]
            if len(literal) < stored:
                break
            literal = (_nibbles(literal) if rle4 else literal)[:min(value, total - at)]
            pixels[at:at + len(literal)] = literal
            at += value
            x = at % width
        if at >= total:
            break
    if at < total and not finished:  # the codes ran out: a cut file
        raise ValueError("not enough image data")
    return bytes(pixels)


class BmpRleDecoder(ImageFile.PyDecoder):
    """Pillow's "bmp_rle" decoder, replaced (the same arguments: raw mode, whether RLE4,
    row order)."""

    _pulls_fd = True

    def decode(self, buffer: Any) -> tuple[int, int]:
        assert self.fd is not None
        rle4 = bool(self.args[1])
        pixels = decode_rle(self.fd.read(), self.state.xsize, self.state.ysize, rle4)
        rawmode = "L" if self.mode == "L" else "P"
        self.set_as_raw(pixels, rawmode, (0, self.args[-1]))
        return -1, 0


#: Pillow's own decoder, registered when its BMP plugin was imported (above: imported
#: later, the plugin would register it again over ours).
PILLOWS_OWN = BmpImagePlugin.BmpRleDecoder


def use_for_bmp() -> None:
    """Registers the decoder in place of Pillow's, for every BMP this process opens."""
    Image.register_decoder("bmp_rle", BmpRleDecoder)
