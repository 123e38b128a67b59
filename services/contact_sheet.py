"""Captioned pictures in rows, as one image: the demo's overview (``out/demo.png``) and
``percept search --sheet``'s page of hits."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

CAPTION_HEIGHT = 18
GAP = 4


def render_sheet(pictures: Sequence[tuple[str, Path]], height: int = 192,
                 per_row: int = 4, unreadable: list[Path] | None = None
                 ) -> Image.Image | None:
    """``pictures`` (caption, image file), ``per_row`` to a row, each ``height`` px high
    under its caption; None when there are none. A picture under half the row height is
    enlarged by whole pixels (nearest), so that a small input shows as small as it is.
    With an ``unreadable`` list, a file Pillow cannot read is left out and named there;
    without one, its error is raised."""
    tiles = []
    for caption, picture in pictures:
        try:
            with Image.open(picture) as opened:
                rgb = opened.convert("RGB")
        except Exception:  # whatever Pillow raises on what is not (or no longer) an image
            if unreadable is None:
                raise
            unreadable.append(picture)
            continue
        width = max(1, round(rgb.width * height / rgb.height))
        resample = (Image.Resampling.NEAREST if rgb.height * 2 <= height
                    else Image.Resampling.LANCZOS)
        tile = Image.new("RGB", (width, height + CAPTION_HEIGHT), "white")
        tile.paste(rgb.resize((width, height), resample), (0, CAPTION_HEIGHT))
        ImageDraw.Draw(tile).text((4, 3), caption, fill="black")
        tiles.append(tile)
    if not tiles:
        return None
    rows = [tiles[i:i + per_row] for i in range(0, len(tiles), per_row)]
    sheet = Image.new("RGB", (max(sum(t.width for t in row) + GAP * (len(row) - 1)
                                  for row in rows),
                              sum(row[0].height for row in rows) + GAP * (len(rows) - 1)),
                      "white")
    y = 0
    for row in rows:
        x = 0
        for tile in row:
            sheet.paste(tile, (x, y))
            x += tile.width + GAP
        y += row[0].height + GAP
    return sheet


def contact_sheet(pictures: Sequence[tuple[str, Path]], path: Path, height: int = 192,
                  per_row: int = 4) -> None:
    """Saves :func:`render_sheet` to ``path`` (nothing when there are no pictures)."""
    sheet = render_sheet(pictures, height, per_row)
    if sheet is not None:
        sheet.save(path)


def encoded_sheet(pictures: Sequence[tuple[str, Path]], fmt: str, height: int = 192,
                  per_row: int = 4, unreadable: list[Path] | None = None) -> bytes | None:
    """:func:`render_sheet` encoded as ``fmt`` (PNG, JPEG or WEBP); None without pictures."""
    sheet = render_sheet(pictures, height, per_row, unreadable)
    if sheet is None:
        return None
    buffer = io.BytesIO()
    sheet.save(buffer, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()
