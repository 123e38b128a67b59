"""Whether an image file was cut short, from how its format ends.

When a decoder fails, Pillow's message ("broken data stream when reading image file",
"image file is truncated") does not say whether the file was cut short in transfer or is
whole but damaged inside. A file's last bytes do: each accepted format but TIFF ends in a
way a cut file almost never does (PNG's IEND chunk, JPEG's EOI marker, GIF's trailer), or
gives its own length (WebP's RIFF header, BMP's file header). A TIFF's end is not marked,
but its first directory gives where it, the values it keeps outside itself and the first
page's strips or tiles end: a cut before any of those ends shows.
"""

from __future__ import annotations

import struct
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
    it ends as the format ends. A TIFF's end is not marked: a cut shows only before the
    end of its first directory, of that directory's values or of its first page's data."""
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


#: Bytes per value of each classic TIFF field type (1 BYTE, 2 ASCII, 3 SHORT, 4 LONG,
#: 5 RATIONAL, 6 SBYTE, 7 UNDEFINED, 8 SSHORT, 9 SLONG, 10 SRATIONAL, 11 FLOAT, 12 DOUBLE,
#: 13 IFD); a type not listed is skipped.
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4,
                    12: 8, 13: 4}
#: The tags that give where a page's pieces start, with those giving their lengths:
#: StripOffsets and StripByteCounts, TileOffsets and TileByteCounts.
_PIECE_TAGS = {273: 279, 324: 325}


def _tiff_cut_short(data: bytes, order: Literal["little", "big"], ends: str
                    ) -> CutShort | None:
    """A classic TIFF is cut short where it ends before the end of its first directory,
    of the values that directory keeps outside it, or of the first page's strips or
    tiles (the directory gives where each starts and how long it is). A BigTIFF only
    where it ends before its first directory's count."""
    first = int.from_bytes(data[4:8], order)
    if first + 2 > len(data):  # a directory: a 2-byte count, 12-byte entries, an offset
        return CutShort(f"the TIFF {ends}, before its first directory (at byte {first})",
                        True)
    if data[2:4] in (b"+\0", b"\0+"):  # BigTIFF: its offsets are 8 bytes, not read here
        return None
    entries = int.from_bytes(data[first:first + 2], order)
    if first + 2 + 12 * entries + 4 > len(data):
        return CutShort(f"the TIFF {ends}, inside its first directory (at byte {first})",
                        True)
    fmt = "<HHI4s" if order == "little" else ">HHI4s"
    values: dict[int, list[int]] = {}
    for tag, kind, count, field in struct.iter_unpack(
            fmt, data[first + 2:first + 2 + 12 * entries]):
        size = _TIFF_TYPE_SIZES.get(kind, 0) * count
        stored = field
        if size > 4:  # the field holds where the values are
            at = int.from_bytes(field, order)
            if at + size > len(data):
                return CutShort(f"the TIFF {ends}, inside the values of its first "
                                f"directory's tag {tag} (bytes {at} to {at + size})", True)
            stored = data[at:at + size]
        if kind in (3, 4) and (tag in _PIECE_TAGS or tag in _PIECE_TAGS.values()):
            code = ("H" if kind == 3 else "I") * count
            values[tag] = list(struct.unpack((("<" if order == "little" else ">") + code),
                                             stored[:size]))
    for offsets_tag, lengths_tag in _PIECE_TAGS.items():
        offsets, lengths = values.get(offsets_tag), values.get(lengths_tag)
        if offsets and lengths and len(offsets) == len(lengths):
            end = max(at + length for at, length in zip(offsets, lengths, strict=True))
            if end > len(data):
                pieces = "strips" if offsets_tag == 273 else "tiles"
                return CutShort(f"the TIFF {ends}, inside its image data (its {pieces} run "
                                f"to byte {end})", True)
    return None
