"""What is never trained on, told by content rather than by folder name: the held-out
photos (``data/photos/manifest.json``'s held-out entries, and scikit-image's own copies of
its held-out samples) and the evaluation photos (``training/evalsets/photos``). A copy of
one under another name or folder is refused as training data all the same."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from training.assets import REPO_ROOT, sha256_of
from training.data.images import is_image_file
from training.data.photos import HELDOUT, PHOTOS, SKIMAGE, PhotosError, skimage_root

PHOTOS_MANIFEST = REPO_ROOT / "data" / "photos" / "manifest.json"
EVALSETS = REPO_ROOT / "training" / "evalsets" / "photos"


def held_out_digests(photos_manifest: Path = PHOTOS_MANIFEST,
                     evalsets: Path = EVALSETS) -> dict[str, str]:
    """sha256 -> the name of a photo that is never trained on."""
    digests: dict[str, str] = {}
    try:
        manifest = json.loads(photos_manifest.read_text())
        for entry in manifest.get("photos", []):
            if entry.get("split") == "heldout" and entry.get("sha256"):
                digests[str(entry["sha256"])] = f"data/photos/{entry.get('file')}"
    except (OSError, ValueError, AttributeError):
        pass  # no photos assembled yet (or not this kind of manifest): the rest still count
    try:
        root = skimage_root()
        for photo in PHOTOS:
            source = root / photo.original_path
            if photo.package == SKIMAGE and photo.name in HELDOUT and source.is_file():
                digests[sha256_of(source)] = f"scikit-image's {source.name} ({photo.name})"
    except PhotosError:
        pass
    if evalsets.is_dir():
        for path in sorted(evalsets.iterdir()):
            if is_image_file(path):
                digests[sha256_of(path)] = f"training/evalsets/photos/{path.name}"
    return digests


def check_not_held_out(paths: Sequence[Path]) -> None:
    """ValueError naming the first of ``paths`` whose bytes are a held-out or evaluation
    photo's."""
    held_out = held_out_digests()
    for path in paths:
        name = held_out.get(sha256_of(path))
        if name is not None:
            raise ValueError(f"{path} is the held-out/evaluation photo {name} (the same "
                             "bytes): it is never trained on")
