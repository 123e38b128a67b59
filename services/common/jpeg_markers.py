"""How many scans and marker segments a JPEG has, read from its marker structure
without decoding it: what bounds the work a small JPEG can ask for.

- Scans: libjpeg decodes every scan a progressive JPEG lists, and an empty one (a 10-byte
  SOS header with no data after it, which libjpeg only warns about) still costs a pass
  over every block of the image: about 0.3 ms a scan at 2048 x 2048 px here. A request of
  a few kilobytes could so keep a decoding thread busy for minutes, past any deadline,
  since nothing interrupts a decoder. Encoders write at most a few dozen scans (libjpeg's
  progressive default has 10 for a colour image). NVIDIA's nvImageCodec caps progressive
  JPEG scans at 256 by default for the same reason (its NVIMGCODEC_MAX_JPEG_SCANS).
- Segments: Pillow reads the segments before the first scan in Python, about 1.5 us each
  here: 64 MB of empty 4-byte comment segments would hold the interpreter for 25 s.
  Encoders write a dozen or two (tables, JFIF, EXIF, XMP, an ICC profile in 64 KB parts).
- Padding: Pillow also steps over whatever lies between those segments in Python, a byte
  (or an 0xFF 0x00 pair) at a time: 8 MB of 0xFF fill bytes took 3.8 s to decode here,
  8 MB of zeros 0.44 s. Encoders write none, or a few fill bytes.
"""

from __future__ import annotations

import re
from typing import NamedTuple

#: The most scans a request's JPEG may have.
MAX_JPEG_SCANS = 256
#: The most marker segments (tables, APPn, comments...) it may have, scans apart.
MAX_JPEG_SEGMENTS = 1024
#: The most bytes of fill, padding or junk between the segments before the first scan.
MAX_JPEG_PADDING = 65_536

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
#: Markers that stand alone, without a length: TEM and the restart markers RST0-RST7.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
#: The next marker after entropy-coded data: 0xFF followed by neither a stuffed 0x00, a
#: restart marker (which belongs to the data), nor a fill byte 0xFF.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
#: The next marker after padding or junk between segments, where decoders look for one.
_ANY_MARKER = re.compile(rb"\xff[^\x00\xff]")


class JpegMarkers(NamedTuple):
    scans: int
    segments: int  # marker segments other than scans
    padding: int = 0  # bytes between the segments before the first scan

    def too_many(self) -> str | None:
        """What there is too much of, to refuse the JPEG for; None when within bounds."""
        if self.scans > MAX_JPEG_SCANS:
            return (f"more than {MAX_JPEG_SCANS} scans (encoders write a few dozen at "
                    "most), each of which costs a pass over the whole image")
        if self.segments > MAX_JPEG_SEGMENTS:
            return (f"more than {MAX_JPEG_SEGMENTS} marker segments (encoders write a "
                    "dozen or two)")
        if self.padding > MAX_JPEG_PADDING:
            return (f"more than {MAX_JPEG_PADDING} bytes of padding between the segments "
                    "of its header (encoders write none, or a few fill bytes)")
        return None


def count_jpeg_markers(data: bytes, *, header_only: bool = False) -> JpegMarkers:
    """The scans (SOS markers) and other marker segments of the first image in ``data``,
    a JPEG stream, and the padding between the segments before the first scan, counted
    until one passes its cap: walks the segments by their lengths and skips each scan's
    entropy-coded data, so that no byte inside a segment or the data is taken for a
    marker; padding or junk between segments is skipped to the next marker, as decoders
    do. A damaged structure ends the count (the decoder
    reports the damage); bytes that are no JPEG count nothing. With ``header_only``, the
    walk stops at the first scan: the segments Pillow reads when it opens the file, at
    the cost of the header alone (the full walk reads through all the entropy-coded
    data, a few milliseconds for a 16 MB JPEG)."""
    scans = segments = padding = 0
    if data[:2] != b"\xff\xd8":
        return JpegMarkers(scans, segments)
    position, size = 2, len(data)
    while (position + 1 < size and scans <= MAX_JPEG_SCANS
           and segments <= MAX_JPEG_SEGMENTS and padding <= MAX_JPEG_PADDING):
        marker = data[position + 1]
        if data[position] != 0xFF or marker in (0x00, 0xFF):  # fill bytes, or junk
            # (before the first scan, no further than the cap: Pillow steps over it in
            # Python; after it, libjpeg does, in C)
            end = position + MAX_JPEG_PADDING + 2 if scans == 0 else size
            following = _ANY_MARKER.search(data, position, end)
            if following is None:
                padding += (end - position) if scans == 0 and end < size else 0
                break
            if scans == 0:
                padding += following.start() - position
            position = following.start()
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE or marker == _SOI:
            position += 2
            continue
        if position + 4 > size:
            break
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if marker != _SOS:
            segments += 1
            continue
        if header_only:
            break
        scans += 1
        following = _NEXT_MARKER.search(data, position)
        if following is None:
            break
        position = following.start()
    return JpegMarkers(scans, segments, padding)
