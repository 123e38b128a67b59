"""The curated photo list and `percept data photos` (no apt download in tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from training.data import cli
from training.data.photos import (
    DEBIAN_PACKAGES,
    HELDOUT,
    PHOTOS,
    SKIMAGE,
    skimage_root,
    split_of,
)


def test_allow_list_is_consistent() -> None:
    names = [p.name for p in PHOTOS]
    assert len(names) == len(set(names))
    assert set(names) >= HELDOUT
    assert 0.15 <= len(HELDOUT) / len(PHOTOS) <= 0.25
    assert {p.package for p in PHOTOS} == {*DEBIAN_PACKAGES, SKIMAGE}
    assert {split_of(p) for p in PHOTOS} == {"train", "heldout"}
    for photo in PHOTOS:  # only real photos: no thumbnails, renders or abstract folders
        assert "screenshot" not in photo.original_path
        assert "/abstract/" not in photo.original_path and "/desktop/" not in photo.original_path


def test_held_out_split_covers_every_source() -> None:
    assert {p.package for p in PHOTOS if p.name in HELDOUT} == {*DEBIAN_PACKAGES, SKIMAGE}


def test_skimage_photos_are_installed_and_real_size() -> None:
    root = skimage_root()
    for photo in (p for p in PHOTOS if p.package == SKIMAGE):
        with Image.open(root / photo.original_path) as image:
            assert min(image.size) >= 300


def test_unwritable_destination_is_a_clear_error(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["photos", "--out", str(blocker / "photos"), "--cache",
                     str(tmp_path / "cache"), "--quiet"]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_files_it_did_not_write_are_refused_before_anything_is_fetched(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A re-run removes what an earlier allow-list wrote; it silently deleted a user's own
    photo in --out/train too."""
    out = tmp_path / "photos"
    (out / "train").mkdir(parents=True)
    mine = out / "train" / "my-holiday.jpg"
    mine.write_bytes(b"mine")
    (out / "manifest.json").write_text(json.dumps(
        {"photos": [{"file": "train/old-allow-list.jpg"}]}))
    (out / "train" / "old-allow-list.jpg").write_bytes(b"ours")  # ours: removable
    assert cli.main(["photos", "--out", str(out), "--cache", str(tmp_path / "no-cache"),
                     "--quiet"]) == 2
    assert ("holds files this command did not write (1: train/my-holiday.jpg)"
            in capsys.readouterr().err)
    assert mine.read_bytes() == b"mine" and not (tmp_path / "no-cache").exists()
    (out / "manifest.json").write_text('{"format": "percept-prepared/1"}')  # not ours
    mine.unlink()
    assert cli.main(["photos", "--out", str(out), "--cache", str(tmp_path / "no-cache"),
                     "--quiet"]) == 2
    assert "holds a manifest.json that is not a photos manifest" in capsys.readouterr().err
