"""What a TIFF's first directory makes Pillow do, read from the directory without
opening the file: what bounds the work a small TIFF can ask for.

- Entries: Pillow reads each of the directory's entries (tags) in Python when it opens
  the file, for every request's admission and again to decode, about 5 us each here: a
  directory of 65,000 (the format allows 65,535) took 0.35 s to decode, 0.8 MB. Writers
  write a few dozen.
- Strips or tiles: Pillow hands a compressed TIFF to libtiff, which walks its strips in
  C, but reads an uncompressed one itself, a strip or tile at a time, in Python: about
  2 us a piece to open the file (it lists them all) and as much again to decode it. A
  16 MB TIFF of 8 x 1,000,000 px stored a row per strip took 1.95 s just to open here and
  4.2 s to decode, and a request at the message cap could hold a thread for half a
  minute; nothing interrupts a decoder. Writers store a row or more per strip (a
  64-megapixel image of 8,000 rows, a row per strip, has 8,000) or tiles of 256 px or
  more.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

#: The most entries (tags) a TIFF's first directory may have.
MAX_TIFF_ENTRIES = 4096
#: The most strips or tiles an uncompressed TIFF's first page may have.
MAX_TIFF_RAW_PIECES = 65_536

TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic, BigTIFF
_COMPRESSION, _STRIP_OFFSETS, _TILE_OFFSETS = 259, 273, 324
_UNCOMPRESSED = 1  # the TIFF default, where the tag is absent
_SHORT = 3


class TiffDirectory(NamedTuple):
    entries: int  # of the first directory
    pieces: int  # strips or tiles of the first page, if it is uncompressed; else 0

    def too_many(self) -> str | None:
        """What there is too much of, to refuse the TIFF for; None when within bounds."""
        if self.entries > MAX_TIFF_ENTRIES:
            return (f"more than {MAX_TIFF_ENTRIES} tags in its first directory (read one "
                    "at a time; writers write a few dozen)")
        if self.pieces > MAX_TIFF_RAW_PIECES:
            return (f"more than {MAX_TIFF_RAW_PIECES} uncompressed strips or tiles (read "
                    "one at a time; writers store a row or more per strip)")
        return None


def count_tiff_directory(data: bytes) -> TiffDirectory:
    """The entries of ``data``'s first directory, a TIFF (classic or BigTIFF), and the
    strips or tiles of its first page where it is uncompressed (the number of offsets the
    directory lists for them; 0 for a compressed page). Nothing for bytes that are no
    TIFF; where the directory is cut short or out of the file, its entries as it claims
    them and no pieces (the decoder reports the damage)."""
    found = first_directory(data)
    if found is None:
        return TiffDirectory(0, 0)
    order, offset_size, entry_size, entries_at, entries = found
    if entries > MAX_TIFF_ENTRIES:  # refused: the table need not be read
        return TiffDirectory(entries, 0)
    table = data[entries_at:entries_at + entries * entry_size]
    if len(table) < entries * entry_size:
        return TiffDirectory(entries, 0)
    value = f"{order}u{offset_size}"
    fields = np.frombuffer(table, np.dtype([("tag", f"{order}u2"), ("type", f"{order}u2"),
                                            ("count", value), ("value", value)]))
    compression = _UNCOMPRESSED
    for field in fields[fields["tag"] == _COMPRESSION][:1]:
        raw = int(field["value"])
        if field["type"] == _SHORT and order == ">":  # the value is left-justified
            raw >>= 8 * (offset_size - 2)
        compression = raw & 0xFFFF
    if compression != _UNCOMPRESSED:
        return TiffDirectory(entries, 0)
    listed = fields["count"][np.isin(fields["tag"], (_STRIP_OFFSETS, _TILE_OFFSETS))]
    return TiffDirectory(entries, int(listed.max()) if listed.size else 0)


def count_tiff_entries(data: bytes) -> int:
    """The entries of ``data``'s first directory as it claims them, from the header and
    the directory's count alone; 0 for bytes that are no TIFF or a directory out of them.
    (For an EXIF block, a TIFF directory too, where only the count is wanted.)"""
    found = first_directory(data)
    return 0 if found is None else found[-1]


def first_directory(data: bytes) -> tuple[str, int, int, int, int] | None:
    """(byte order, "<" or ">"; offset size; entry size; where the entries start; how
    many) of the first directory of ``data``, a classic TIFF or a BigTIFF; None where
    there is none (no TIFF, or a directory whose count is out of the data)."""
    if not data.startswith(TIFF_SIGNATURES):
        return None
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    offset_size, count_size, entry_size = (8, 8, 20) if big else (4, 2, 12)
    start = 8 if big else 4
    directory = int.from_bytes(data[start:start + offset_size], _byteorder(order))
    entries_at = directory + count_size
    if entries_at > len(data):
        return None
    entries = int.from_bytes(data[directory:entries_at], _byteorder(order))
    return order, offset_size, entry_size, entries_at, entries


def _byteorder(order: str) -> Literal["little", "big"]:
    return "little" if order == "<" else "big"
