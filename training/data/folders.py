"""Output folders of the data commands: made, and checked writable before long work."""

from __future__ import annotations

from pathlib import Path


def unwritable_reason(folder: Path) -> str | None:
    """Creates ``folder`` (and its parents) and writes a probe file there; ``None`` when
    that works, else why not, so a command can fail at once rather than after its work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        return str(error.strerror or error)
    return None
