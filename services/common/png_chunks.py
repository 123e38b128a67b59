"""How many chunks a PNG has, read from its chunk structure without decoding it: what
bounds the work a small PNG can ask for.

Pillow reads a PNG's chunks in Python, one at a time: those before the pixels when it
opens the file (for every request's admission, and again to decode), the pixel data
(IDAT) chunks and those after them when it loads it. About 2.5 us a chunk here, so a
12 MB PNG of a million empty chunks took 2.5 s just to open, and a request at the
message cap 13 s, past any deadline (nothing interrupts a decoder). Encoders write a
handful of metadata chunks and cut the pixel data into chunks of 8 KB (libpng's default)
or more: a 64 MB PNG from libpng has about 8,000. 65,536 chunks cost Pillow about 0.16 s.
libpng itself keeps at most 1,000 ancillary chunks by default (PNG_USER_CHUNK_CACHE_MAX)
for the same reason.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

#: The most chunks a request's PNG may have (of the first frame, for an animated PNG).
MAX_PNG_CHUNKS = 65_536

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHUNK_HEAD = struct.Struct(">I4s")  # length, type; the data and a 4-byte CRC follow
_LARGEST_LENGTH = 2**31 - 1  # the PNG specification's bound; past it the file is damaged


class PngChunks(NamedTuple):
    chunks: int

    def too_many(self) -> str | None:
        """What there is too much of, to refuse the PNG for; None when within bounds."""
        if self.chunks > MAX_PNG_CHUNKS:
            return (f"more than {MAX_PNG_CHUNKS} chunks (encoders write a few, plus one "
                    "for every 8 KB or more of pixel data)")
        return None


def count_png_chunks(data: bytes, *, header_only: bool = False) -> PngChunks:
    """The chunks of ``data``, a PNG, that Pillow reads for its first frame, counted
    until they pass the cap: walks the chunks by their lengths, to IEND (for an animated
    PNG, to the next frame's fcTL, where Pillow stops). A damaged structure ends the
    count (the decoder reports the damage); bytes that are no PNG count nothing. With
    ``header_only``, the walk stops at the first pixel data chunk: the chunks Pillow
    reads when it opens the file."""
    chunks = 0
    if not data.startswith(PNG_SIGNATURE):
        return PngChunks(chunks)
    position, size = len(PNG_SIGNATURE), len(data)
    animated = pixels_seen = False
    while position + _CHUNK_HEAD.size <= size and chunks <= MAX_PNG_CHUNKS:
        length, kind = _CHUNK_HEAD.unpack_from(data, position)
        if length > _LARGEST_LENGTH:
            break
        pixels = kind in (b"IDAT", b"fdAT")
        if kind == b"IEND" or (kind == b"fcTL" and animated and pixels_seen):
            break
        chunks += 1
        if pixels and header_only:
            break
        animated = animated or kind == b"acTL"
        pixels_seen = pixels_seen or pixels
        position += _CHUNK_HEAD.size + length + 4
    return PngChunks(chunks)
