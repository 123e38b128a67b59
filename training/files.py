"""Small file helpers shared by the trainers, the evaluations and the data commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_text_atomically(path: Path, text: str) -> None:
    """Writes ``path`` whole or not at all: a sibling ``.partial`` file, renamed over it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable, not JSON, or JSON
    but not an object."""
    try:
        held = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return held if isinstance(held, dict) else None
