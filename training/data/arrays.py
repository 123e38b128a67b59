"""Reading prepared arrays back (numpy only, so trainers run on a bare GPU box).

A prepared folder (:mod:`training.data.prepare`) holds ``images_<size>.npy`` memmaps of
shape (N, S, S, 3) uint8 and ``manifest.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"


class PreparedDataError(RuntimeError):
    """A prepared folder is missing, incomplete or holds held-out photos."""


@dataclass(frozen=True)
class PreparedArrays:
    """The arrays of one prepared folder, memory-mapped read-only, keyed by size."""

    path: Path
    manifest: dict[str, Any]
    arrays: dict[int, np.ndarray]

    @property
    def sizes(self) -> list[int]:
        return sorted(self.arrays, reverse=True)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def files(self) -> list[Path]:
        return [self.path / self.manifest["arrays"][str(s)]["file"] for s in self.sizes]


def load_prepared(path: Path, allow_heldout: bool = False) -> PreparedArrays:
    """Memory-maps every array listed in ``path/manifest.json``; checks shapes and that no
    source came from a ``heldout`` folder (unless ``allow_heldout``)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise PreparedDataError(f"{manifest_path} not found; run `percept data prepare` first")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise PreparedDataError(f"{manifest_path} cannot be read ({error}); run "
                                "`percept data prepare` again") from error
    if not (isinstance(manifest, dict) and isinstance(manifest.get("arrays"), dict)
            and manifest["arrays"] and isinstance(manifest.get("count"), int)):
        raise PreparedDataError(f"{manifest_path} is not a prepared-arrays manifest (no "
                                "'arrays' and 'count'); run `percept data prepare` again")
    if not allow_heldout:
        heldout = [s["path"] for s in manifest.get("sources", [])
                   if "heldout" in Path(s["path"]).parts]
        if heldout:
            raise PreparedDataError(f"{path} was prepared from held-out photos ({heldout[0]} ...)")
    arrays: dict[int, np.ndarray] = {}
    for size_text, entry in manifest["arrays"].items():
        try:
            file, shape, size = path / entry["file"], list(entry["shape"]), int(size_text)
        except (KeyError, TypeError, ValueError) as error:
            raise PreparedDataError(f"{manifest_path}: a malformed entry for size "
                                    f"{size_text!r}; run `percept data prepare` again"
                                    ) from error
        if not file.is_file():
            raise PreparedDataError(f"{file} listed in the manifest is missing")
        try:
            array = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise PreparedDataError(f"{file} cannot be read as an array ({error}); run "
                                    "`percept data prepare` again") from error
        if list(array.shape) != shape or array.dtype != np.uint8:
            raise PreparedDataError(f"{file}: shape {array.shape} {array.dtype} does not match "
                                    f"the manifest's {shape} uint8")
        arrays[size] = array
    return PreparedArrays(path=path, manifest=manifest, arrays=arrays)
