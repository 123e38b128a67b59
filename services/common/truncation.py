"""Whether an image file was cut short, from how its format ends.

When a decoder fails, Pillow's message ("broken data stream when reading image file",
"image file is truncated") does not say whether the file was cut short in transfer or is
whole but damaged inside. A file's last bytes do: each accepted format but TIFF ends in a
way a cut file almost never does (PNG's IEND chunk, JPEG's EOI marker, GIF's trailer), or
gives its own length (WebP's RIFF header, BMP's file header); a TIFF shows it only when
cut before its first directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: How far from the end a format's end mark may sit (padding some writers add after it).
_SLACK = 64
#: A PNG's IEND chunk, whole (length 0, type, CRC): a file holding it was not cut before
#: its end, whatever follows it (a writer's padding, or junk).
_PNG_END = b"\0\0\0\0IEND\xaeB`\x82"
#: The head of a PNG's first chunk: a length of 13 and the type IHDR.
_IHDR_HEAD = b"\0\0\0\x0dIHDR"


@dataclass(frozen=True)
class CutShort:
    """How a file shows it was cut short."""

    how: str  # "the PNG ends after 4666 bytes, without its IEND chunk"
    #: Whether a length or offset in the file says so (WebP, BMP, TIFF), which holds even
    #: when its header is damaged; a missing end mark (PNG, JPEG, GIF) says it of a file
    #: whose header decodes, but of bytes with a damaged header only that they end there.
    by_length: bool


def how_cut_short(data: bytes, fmt: str) -> CutShort | None:
    """How ``data``, a file of Pillow format ``fmt``, shows it was cut short; None where
    it ends as the format ends. A TIFF's end is not marked: only one cut before the end
    of its first directory shows."""
    size, tail = len(data), data[-_SLACK:]
    ends = f"ends after {size} bytes"
    if fmt == "PNG" and b"IEND" not in tail and _PNG_END not in data:
        return _png_cut_short(data, ends)
    if fmt in ("JPEG", "MPO") and b"\xff\xd9" not in tail:
        return CutShort(f"the JPEG {ends}, without its end-of-image marker", False)
    if fmt == "GIF" and not data.rstrip(b"\0").endswith(b";"):
        return CutShort(f"the GIF {ends}, without its trailer", False)
    if fmt == "WEBP" and size >= 8:
        expected = int.from_bytes(data[4:8], "little") + 8
        if expected > size:
            return CutShort(f"the WebP {ends}, of the {expected} its header gives", True)
    if fmt == "BMP" and size >= 6:
        expected = int.from_bytes(data[2:6], "little")
        if expected > size:
            return CutShort(f"the BMP {ends}, of the {expected} its header gives", True)
    if fmt == "TIFF" and size >= 8 and data[:2] in (b"II", b"MM"):
        return _tiff_cut_short(data, "little" if data[:2] == b"II" else "big", ends)
    return None


def _png_cut_short(data: bytes, ends: str) -> CutShort:
    """How a PNG without its IEND chunk ends. Where its chunks, from IHDR on, are whole
    up to the cut (or the last one is cut inside its data), their lengths say it was cut
    short, even when Pillow found too little of it to read a header."""
    at, last, size = 8, None, len(data)
    while at + 8 <= size:
        length, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        if not (kind.isascii() and kind.isalpha()) or (last is None and kind != b"IHDR"):
            break  # not a chunk: the bytes are damaged, whatever their length
        if at + 12 + length > size:
            return CutShort(f"the PNG {ends}, inside its {kind.decode()} chunk "
                            f"(of {length} bytes at byte {at})", True)
        at, last = at + 12 + length, kind.decode()
    else:  # the chunks are whole up to the last 8 bytes, too few for another's head
        if last is None and _IHDR_HEAD.startswith(data[8:]):
            return CutShort(f"the PNG {ends}, before its IHDR chunk", True)
        if last is not None:
            where = "" if at == size else " and inside the next one's head"
            return CutShort(f"the PNG {ends}, after its {last} chunk{where}, without its "
                            "IEND chunk", True)
    return CutShort(f"the PNG {ends}, without its IEND chunk", False)


def _tiff_cut_short(data: bytes, order: Literal["little", "big"], ends: str
                    ) -> CutShort | None:
    first = int.from_bytes(data[4:8], order)
    if first + 2 > len(data):  # a directory: a 2-byte count, 12-byte entries, an offset
        return CutShort(f"the TIFF {ends}, before its first directory (at byte {first})",
                        True)
    entries = int.from_bytes(data[first:first + 2], order)
    if first + 2 + 12 * entries + 4 > len(data):
        return CutShort(f"the TIFF {ends}, inside its first directory (at byte {first})",
                        True)
    return None
