"""How many blocks Pillow walks before a GIF's first image, read from its block
structure without decoding it: what bounds the work a small GIF can ask for.

Pillow reads what precedes a GIF's first image in Python, when it opens the file (for
every request's admission, and again to decode): each extension's data sub-blocks (of 0
to 255 bytes) one at a time, and any stray byte between blocks one at a time too. That
is about 0.1 us a step here (1 MB of stray bytes: 81 ms), so a 64 MB request of them
would take some 5 s. A comment is far worse: Pillow joins its sub-blocks, and the
comments of one frame, by copying all that came before, so its cost grows with the
square of their number. Measured here: a 3 MB GIF of a million empty comments took 11 s
to open, and an 8 MB one whose comment came in 4 million 1-byte sub-blocks 176 s; nothing
interrupts a decoder. Encoders write a few extensions (graphic control, the NETSCAPE
loop, XMP or an ICC profile in sub-blocks of up to 255 bytes, a comment of a line or
two). The image data's own sub-blocks are read by Pillow's C decoder, and no frame after
the first is read."""

from __future__ import annotations

from typing import NamedTuple

#: The most steps of Pillow's walk before the first image: sub-blocks read (the empty ones
#: that end each extension's run included) and stray bytes (skipped one at a time). Some
#: 4 MB of metadata in full 255-byte sub-blocks.
MAX_GIF_STEPS = 16_384
#: The most comment sub-blocks before the first image (256 KB of comment, full ones).
MAX_GIF_COMMENT_SUB_BLOCKS = 1024

GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
_EXTENSION, _IMAGE, _TRAILER = 0x21, 0x2C, 0x3B
_COMMENT, _APPLICATION = 0xFE, 0xFF
_LOOP_EXTENSION = b"NETSCAPE2.0"  # Pillow reads one more sub-block after its name
_SCREEN_DESCRIPTOR_END = 13  # signature and logical screen descriptor
_GLOBAL_COLOUR_TABLE = 0x80  # a flag of the screen descriptor's packed byte


class GifBlocks(NamedTuple):
    steps: int  # of Pillow's walk before the first image (see MAX_GIF_STEPS)
    comment_sub_blocks: int  # a comment extension counting one, and each of its sub-blocks

    def too_many(self) -> str | None:
        """What there is too much of, to refuse the GIF for; None when within bounds."""
        if self.comment_sub_blocks > MAX_GIF_COMMENT_SUB_BLOCKS:
            return (f"more than {MAX_GIF_COMMENT_SUB_BLOCKS} comment blocks before its "
                    "first image (encoders write a line or two)")
        if self.steps > MAX_GIF_STEPS:
            return (f"more than {MAX_GIF_STEPS} extension blocks or stray bytes "
                    "before its first image (encoders write a few blocks, up to 255 "
                    "bytes each)")
        return None


class _Walk:
    """Pillow's reading of a GIF's blocks (GifImageFile._seek), step for step, with its
    cost counted instead of its content kept."""

    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, _SCREEN_DESCRIPTOR_END
        packed = data[10]
        if packed & _GLOBAL_COLOUR_TABLE:
            self.position += 3 << ((packed & 7) + 1)
        self.steps = self.comments = 0

    def over(self) -> bool:
        return self.steps > MAX_GIF_STEPS or self.comments > MAX_GIF_COMMENT_SUB_BLOCKS

    def sub_block(self) -> bytes | None:
        """The next data sub-block; None for the empty one that ends a run (or the end of
        the data). Like Pillow's GifImageFile.data."""
        self.steps += 1
        if self.position >= len(self.data) or self.data[self.position] == 0:
            self.position += 1
            return None
        start = self.position + 1
        self.position = start + self.data[self.position]
        return self.data[start:self.position]

    def rest_of_run(self) -> None:
        while not self.over() and self.sub_block() is not None:
            pass

    def extension(self) -> None:
        label = self.data[self.position] if self.position < len(self.data) else None
        self.position += 1
        block = self.sub_block()
        if label == _COMMENT:  # Pillow joins its sub-blocks, and a frame's comments
            self.comments += 1
            while block is not None and not self.over():
                self.comments += 1
                block = self.sub_block()
            return
        if label == _APPLICATION and block is not None and block.startswith(_LOOP_EXTENSION):
            self.sub_block()
        # Pillow reads sub-blocks to an empty one whether or not the first was empty:
        # after an extension without data it goes on into what follows
        self.rest_of_run()


def count_gif_blocks(data: bytes) -> GifBlocks:
    """The steps of Pillow's walk from a GIF's screen descriptor to its first image (the
    extensions' data sub-blocks, and stray bytes, which it skips one at a time), and the
    comment sub-blocks among them, counted until either passes its cap: follows the
    blocks by their lengths as Pillow does. The end of the data ends the count (the
    decoder reports it); bytes that are no GIF count nothing."""
    if not data.startswith(GIF_SIGNATURES) or len(data) < _SCREEN_DESCRIPTOR_END:
        return GifBlocks(0, 0)
    walk = _Walk(data)
    while walk.position < len(data) and not walk.over():
        introducer = data[walk.position]
        if introducer in (_IMAGE, _TRAILER):
            break
        walk.position += 1
        if introducer == _EXTENSION:
            walk.extension()
        else:
            walk.steps += 1  # a stray byte
    return GifBlocks(walk.steps, walk.comments)
