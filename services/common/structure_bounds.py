"""What an image's structure would make the decoder do, against what encoders write:
the one place that asks each format's walk (jpeg_markers, png_chunks, gif_blocks,
bmp_rle, tiff_directory), picked by the file's signature, before Pillow reads the file.

Each walk reads only the file's structure (markers, chunks, blocks, a header or a
directory), bounded by its own cap, so asking costs little even for the files it refuses.
"""

from __future__ import annotations

from services.common.bmp_rle import count_bmp_rle_bytes
from services.common.gif_blocks import GIF_SIGNATURES, count_gif_blocks
from services.common.jpeg_markers import count_jpeg_markers
from services.common.png_chunks import PNG_SIGNATURE, count_png_chunks
from services.common.tiff_directory import TIFF_SIGNATURES, count_tiff_directory

#: Formats whose full walk (at decode) reaches past what opening the file reads.
WALKED_AT_DECODE = ("JPEG", "MPO", "PNG")


def structure_excess(data: bytes, *, header_only: bool) -> tuple[str, str] | None:
    """(format, what it has too much of) for a file over one of its format's caps, or
    None. ``header_only`` walks only what opening the file reads (the JPEG's segments
    before its first scan, the PNG's chunks before its pixels); the other formats' walks
    read no further either way."""
    if data.startswith(b"\xff\xd8"):
        fmt, excess = "JPEG", count_jpeg_markers(data, header_only=header_only).too_many()
    elif data.startswith(PNG_SIGNATURE):
        fmt, excess = "PNG", count_png_chunks(data, header_only=header_only).too_many()
    elif data.startswith(GIF_SIGNATURES):  # nothing past the first image is read
        fmt, excess = "GIF", count_gif_blocks(data).too_many()
    elif data.startswith(b"BM"):  # from the header alone
        fmt, excess = "BMP", count_bmp_rle_bytes(data).too_many()
    elif data.startswith(TIFF_SIGNATURES):  # from the first directory
        fmt, excess = "TIFF", count_tiff_directory(data).too_many()
    else:
        return None
    return None if excess is None else (fmt, excess)
