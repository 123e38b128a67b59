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
#: The chunks that say whether Pillow takes the PNG for an animation (see _Animation).
_ANIMATION_KINDS = frozenset((b"acTL", b"fcTL", b"IDAT", b"fdAT"))


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
    animation = _Animation()
    while position + _CHUNK_HEAD.size <= size and chunks <= MAX_PNG_CHUNKS:
        length, kind = _CHUNK_HEAD.unpack_from(data, position)
        if length > _LARGEST_LENGTH:
            break
        if kind == b"IEND" or (kind == b"fcTL" and animation.animated()):
            break
        chunks += 1
        if kind in (b"IDAT", b"fdAT") and header_only:
            break
        body = position + _CHUNK_HEAD.size
        if kind in _ANIMATION_KINDS and not animation.pixels_seen:
            animation.read(kind, data[body:body + min(length, 4)])
        position = body + length + 4
    return PngChunks(chunks)


class _Animation:
    """Whether Pillow takes the PNG for an animation (PngImageFile.is_animated), from
    the chunks before its pixels as Pillow reads them: then loading the first frame stops
    at the next frame's control chunk (fcTL); otherwise it goes on to IEND."""

    def __init__(self) -> None:
        self.frames: int | None = None  # acTL's count, once Pillow accepts one
        self.pixels_seen = self.control_first = False

    def read(self, kind: bytes, start: bytes) -> None:
        """Takes in a chunk before the pixels: its type and its first 4 bytes."""
        if kind == b"acTL":  # a second one voids the first (Pillow: invalid APNG)
            frames = int.from_bytes(start, "big") if len(start) == 4 else 0
            self.frames = None if self.frames is not None else (
                frames if 0 < frames <= 0x80000000 else None)
        elif kind == b"fcTL":  # the default image is then the first frame
            self.control_first = True
        elif kind in (b"IDAT", b"fdAT"):
            self.pixels_seen = True

    def animated(self) -> bool:
        if not self.pixels_seen or self.frames is None:
            return False
        return self.frames + (0 if self.control_first else 1) > 1
