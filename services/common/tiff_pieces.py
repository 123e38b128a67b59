"""How many strips or tiles an uncompressed TIFF's first page has, read from its first
directory without opening it: what bounds the work a small TIFF can ask for.

Pillow hands a compressed TIFF to libtiff, which walks its strips in C, but reads an
uncompressed one itself, a strip or tile at a time, in Python: about 2 us a piece to open
the file (it lists them all) and as much again to decode it. A 16 MB TIFF of 8 x 1,000,000
px stored a row per strip took 1.95 s just to open here and 4.2 s to decode, and a
request at the message cap could hold a thread for half a minute; nothing interrupts a
decoder. Writers store a row or more per strip (a 64-megapixel image of 8,000 rows, a row
per strip, has 8,000) or tiles of 256 px or more.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

#: The most strips or tiles an uncompressed TIFF's first page may have.
MAX_TIFF_RAW_PIECES = 65_536

TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic, BigTIFF
_COMPRESSION, _STRIP_OFFSETS, _TILE_OFFSETS = 259, 273, 324
_UNCOMPRESSED = 1  # the TIFF default, where the tag is absent
_SHORT = 3


class TiffPieces(NamedTuple):
    pieces: int  # strips or tiles of the first page, if it is uncompressed; else 0

    def too_many(self) -> str | None:
        """What there is too much of, to refuse the TIFF for; None when within bounds."""
        if self.pieces > MAX_TIFF_RAW_PIECES:
            return (f"more than {MAX_TIFF_RAW_PIECES} uncompressed strips or tiles (read "
                    "one at a time; writers store a row or more per strip)")
        return None


def count_tiff_pieces(data: bytes) -> TiffPieces:
    """The strips or tiles of ``data``'s first page, a TIFF (classic or BigTIFF), where it
    is uncompressed: the number of offsets its directory lists for them. 0 for a
    compressed page, for bytes that are no TIFF, and where the directory is cut short or
    out of the file (the decoder reports those)."""
    if not data.startswith(TIFF_SIGNATURES):
        return TiffPieces(0)
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    offset_size, count_size, entry_size = (8, 8, 20) if big else (4, 2, 12)
    start = 8 if big else 4
    directory = int.from_bytes(data[start:start + offset_size], _byteorder(order))
    entries_at = directory + count_size
    if entries_at > len(data):
        return TiffPieces(0)
    entries = int.from_bytes(data[directory:entries_at], _byteorder(order))
    table = data[entries_at:entries_at + entries * entry_size]
    if len(table) < entries * entry_size:
        return TiffPieces(0)
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
        return TiffPieces(0)
    listed = fields["count"][np.isin(fields["tag"], (_STRIP_OFFSETS, _TILE_OFFSETS))]
    return TiffPieces(int(listed.max()) if listed.size else 0)


def _byteorder(order: str) -> Literal["little", "big"]:
    return "little" if order == "<" else "big"
