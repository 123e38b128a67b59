"""Small file helpers shared by the trainers, the evaluations and the data commands."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
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


def other_files(folder: Path, belongs: Callable[[str], bool]) -> list[str]:
    """The sorted names in ``folder`` that ``belongs`` does not claim, hidden files left
    out; none when ``folder`` is no folder (what a command refuses to write among)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if not p.name.startswith(".") and not belongs(p.name))


def listed(names: Sequence[str], most: int = 3) -> str:
    """``"a, b, c, ..."``: the first ``most`` names, and an ellipsis when there are more."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
