"""The number of scans in a JPEG, read from its marker structure without decoding it.

libjpeg decodes every scan a progressive JPEG lists, and an empty one (a 10-byte SOS
header with no data after it, which libjpeg only warns about) still costs a pass over
every block of the image: about 0.3 ms a scan at 2048 x 2048 px here. A request of a few
kilobytes could so keep a decoding thread busy for minutes, past any deadline, since
nothing interrupts a decoder. Encoders write at most a few dozen scans (libjpeg's
progressive default has 10 for a colour image); the services refuse more than
:data:`MAX_JPEG_SCANS` before decoding. NVIDIA's nvImageCodec caps progressive JPEG scans
at 256 by default for the same reason (its NVIMGCODEC_MAX_JPEG_SCANS).
"""

from __future__ import annotations

import re

#: The most scans a request's JPEG may have.
MAX_JPEG_SCANS = 256

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
#: Markers that stand alone, without a length: TEM and the restart markers RST0-RST7.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
#: The next marker after entropy-coded data: 0xFF followed by neither a stuffed 0x00, a
#: restart marker (which belongs to the data), nor a fill byte 0xFF.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def count_jpeg_scans(data: bytes, stop_after: int = MAX_JPEG_SCANS) -> int:
    """The scans (SOS markers) of the first image in ``data``, a JPEG stream, counted up to
    ``stop_after`` + 1: walks the marker segments by their lengths and skips each scan's
    entropy-coded data, so that no byte inside a segment or the data is taken for a
    marker. A damaged structure ends the count (the decoder reports the damage)."""
    if data[:2] != b"\xff\xd8":
        return 0
    scans, position, size = 0, 2, len(data)
    while position + 1 < size:
        if data[position] != 0xFF:
            return scans  # not a marker where one must be
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before the marker
            position += 1
            continue
        if marker == _EOI:
            return scans
        if marker in _STANDALONE or marker == _SOI:
            position += 2
            continue
        if position + 4 > size:
            return scans
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if marker == _SOS:
            scans += 1
            if scans > stop_after:
                return scans
            following = _NEXT_MARKER.search(data, position)
            if following is None:
                return scans
            position = following.start()
    return scans
