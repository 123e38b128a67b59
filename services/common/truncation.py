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

from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.common.tiff_directory import TIFF_SIGNATURES, first_directory

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
        return _tiff_cut_short(data, ends)
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


#: Bytes per value of each TIFF field type (1 BYTE, 2 ASCII, 3 SHORT, 4 LONG, 5 RATIONAL,
#: 6 SBYTE, 7 UNDEFINED, 8 SSHORT, 9 SLONG, 10 SRATIONAL, 11 FLOAT, 12 DOUBLE, 13 IFD;
#: BigTIFF's 16 LONG8, 17 SLONG8, 18 IFD8); a type not listed is skipped.
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4,
                    12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
#: The tags that give where a page's pieces start, with those giving their lengths:
#: StripOffsets and StripByteCounts, TileOffsets and TileByteCounts.
_PIECE_TAGS = {273: 279, 324: 325}
#: The tags whose values decoding the first page reads: BitsPerSample, the pieces'
#: offsets and lengths, ColorMap, ExtraSamples, SampleFormat, JPEGTables and
#: YCbCrSubSampling. Others (a private tag, XMP, a damaged count) Pillow skips when
#: their values are out of the file, so such a value says nothing of a cut.
_DECODING_TAGS = frozenset({258, *_PIECE_TAGS, *_PIECE_TAGS.values(), 320, 338, 339, 347,
                            530})
#: The most strips or tiles whose ends are compared with the file's (a page lists one
#: per row at most; a count beyond this is damage, not a picture).
_MAX_PIECES_CHECKED = 1 << 20
_UNSIGNED = {3: "u2", 4: "u4", 16: "u8"}  # SHORT, LONG, LONG8: a piece's offset or length


def _tiff_cut_short(data: bytes, ends: str) -> CutShort | None:
    """A TIFF (classic or BigTIFF) is cut short where it ends before the end of its first
    directory, of the values of that directory's that decoding reads and it keeps outside
    itself, or of the first page's strips or tiles (the directory gives where each starts
    and how long it is)."""
    found = first_directory(data)
    big = data[2:4] in (b"+\0", b"\0+")
    if found is None:
        if not data.startswith(TIFF_SIGNATURES):
            return None  # not a TIFF header at all: the bytes are damaged, not cut
        start, size = (8, 8) if big else (4, 4)
        first = int.from_bytes(data[start:start + size], "little" if data[:2] == b"II"
                               else "big")
        return CutShort(f"the TIFF {ends}, before its first directory (at byte {first})",
                        True)
    order, offset_size, entry_size, entries_at, entries = found
    first = entries_at - (8 if big else 2)
    if entries_at + entry_size * entries + offset_size > len(data):
        return CutShort(f"the TIFF {ends}, inside its first directory (at byte {first})",
                        True)
    fields = np.frombuffer(data, np.dtype([
        ("tag", f"{order}u2"), ("type", f"{order}u2"), ("count", f"{order}u{offset_size}"),
        ("value", f"V{offset_size}")]), count=entries, offset=entries_at)
    byteorder: Literal["little", "big"] = "little" if order == "<" else "big"
    needed: dict[int, np.void] = {}
    for field in fields[np.isin(fields["tag"], list(_DECODING_TAGS))]:
        needed.setdefault(int(field["tag"]), field)  # the first of a repeated tag counts
    for tag, field in sorted(needed.items()):
        size = _TIFF_TYPE_SIZES.get(int(field["type"]), 0) * int(field["count"])
        at = int.from_bytes(field["value"].tobytes(), byteorder)
        if size > offset_size and at + size > len(data):  # kept outside, past the end
            return CutShort(f"the TIFF {ends}, inside the values of its first directory's "
                            f"tag {tag} (bytes {at} to {at + size})", True)
    for offsets_tag, lengths_tag in _PIECE_TAGS.items():
        starts = _piece_values(data, order, offset_size, needed.get(offsets_tag))
        lengths = _piece_values(data, order, offset_size, needed.get(lengths_tag))
        if starts is not None and lengths is not None and len(starts) == len(lengths) > 0:
            end = int((starts.astype(np.uint64) + lengths.astype(np.uint64)).max())
            if end > len(data):
                pieces = "strips" if offsets_tag == 273 else "tiles"
                return CutShort(f"the TIFF {ends}, inside its image data (its {pieces} run "
                                f"to byte {end})", True)
    return None


def _piece_values(data: bytes, order: str, offset_size: int, field: np.void | None
                  ) -> np.ndarray | None:
    """The unsigned values of ``field``, a piece's offsets or lengths (inline where they
    fit its value, left-justified; else where it points, inside ``data``: checked
    before); None for another type, or more than :data:`_MAX_PIECES_CHECKED`."""
    if field is None or int(field["type"]) not in _UNSIGNED:
        return None
    count = int(field["count"])
    if count > _MAX_PIECES_CHECKED:
        return None
    dtype = np.dtype(f"{order}{_UNSIGNED[int(field['type'])]}")
    if dtype.itemsize * count <= offset_size:
        return np.frombuffer(field["value"].tobytes(), dtype, count=count)
    at = int.from_bytes(field["value"].tobytes(), "little" if order == "<" else "big")
    return np.frombuffer(data, dtype, count=count, offset=at)
