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


def check_folder_to_make(folder: Path, flag: str, named: Path | None = None) -> None:
    """ValueError naming ``flag`` (and ``named``, the path it gave, when that is a file to
    go in ``folder``) when ``folder`` could not be made and written later: a link to
    nothing, a file in the way, no write access. Makes nothing new."""
    given = folder if named is None else named
    if folder.is_symlink() and not folder.exists():
        raise ValueError(f"{flag} {given}: {folder} is a symbolic link to nothing")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {given}: {existing} is a file, not a folder")
    reason = unwritable_reason(existing)
    if reason:
        raise ValueError(f"{flag} {given} cannot be written: {reason}")


def check_writable(path: Path, flag: str, folder: bool = False) -> None:
    """ValueError naming ``flag`` when the file ``path`` (the folder, with ``folder``)
    cannot be written: a folder where the file goes, a file where the folder goes, or a
    folder for it that could not be made and written (:func:`check_folder_to_make`).
    Creates no folder."""
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {path} is a folder, not a file")
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    check_folder_to_make(path if folder else path.parent, flag, path)
