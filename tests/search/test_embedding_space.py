"""The search record knows the embedding space its vectors were made in (the vectors of
fixed probe images): a record from another space of the same dimension is refused at start,
not searched with confident nonsense."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from services.common.images import decode_image
from services.search.probes import SIDE, probe_image, probe_images, probe_pixels
from services.search.store import MIN_PROBE_AGREEMENT, ImageStore

DIMENSION = 384


def _unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIMENSION).astype(np.float32)
    return vector / np.linalg.norm(vector)


def test_a_new_record_keeps_the_probe_and_the_same_space_reopens_it(tmp_path: Path) -> None:
    path = tmp_path / "images.sqlite3"
    probe = _unit(0)
    ImageStore(path, DIMENSION, probe).close()
    # the same model on another machine: float rounding, far above the threshold
    rounded = probe + np.float32(1e-4) * _unit(1)
    ImageStore(path, DIMENSION, rounded).close()


def test_another_space_of_the_same_dimension_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "images.sqlite3"
    ImageStore(path, DIMENSION, _unit(0)).close()
    with pytest.raises(ValueError, match=r"holds vectors from another embedding space .*"
                                         r"agree .* at -?0\.0\d\d at least, under 0\.99.*"
                                         r"another --data-dir"):
        ImageStore(path, DIMENSION, _unit(2))


def test_a_record_made_before_probes_were_kept_adopts_the_current_space(
        tmp_path: Path) -> None:
    path = tmp_path / "images.sqlite3"
    ImageStore(path, DIMENSION).close()  # as an older version wrote it
    ImageStore(path, DIMENSION, _unit(0)).close()
    with pytest.raises(ValueError, match="another embedding space"):
        ImageStore(path, DIMENSION, _unit(3))


def _units(seed: int, count: int = 8) -> np.ndarray:
    return np.stack([_unit(seed * 100 + i) for i in range(count)])


def test_a_set_that_agrees_on_one_probe_but_not_another_is_refused(tmp_path: Path) -> None:
    """A retrained DeViSE map can agree with the old one on one picture while its other
    vectors moved: every probe must agree."""
    path = tmp_path / "images.sqlite3"
    made_with = _units(0)
    ImageStore(path, DIMENSION, made_with).close()
    ImageStore(path, DIMENSION, made_with + np.float32(1e-4) * _units(1)).close()
    moved = made_with.copy()
    moved[5] = 0.75 * moved[5] + 0.25 * _unit(7)  # cosine 0.95 on one probe of eight
    with pytest.raises(ValueError, match=r"at 0\.9\d\d at least, under 0\.99"):
        ImageStore(path, DIMENSION, moved)


def _meta(path: Path) -> dict[str, str]:
    db = sqlite3.connect(str(path))
    try:
        return dict(db.execute("SELECT key, value FROM meta").fetchall())
    finally:
        db.close()


def test_a_record_that_kept_one_probe_is_checked_on_it_then_keeps_them_all(
        tmp_path: Path) -> None:
    """A record made when there was one probe image is compared on that one (the first of
    the set, the same picture), then keeps every probe and is checked on them all. A new
    record keeps the first alone as well, as such a version reads it."""
    path = tmp_path / "images.sqlite3"
    made_with = _units(0)
    ImageStore(path, DIMENSION, made_with[0]).close()  # as the one-probe version wrote it
    assert "probes" in _meta(path)  # (this version writes both; take the set back out)
    db = sqlite3.connect(str(path))
    db.execute("DELETE FROM meta WHERE key='probes'")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="another embedding space"):
        ImageStore(path, DIMENSION, _units(2))  # the first probe disagrees
    ImageStore(path, DIMENSION, made_with).close()
    assert np.frombuffer(base64.b64decode(_meta(path)["probes"]),
                         np.float32).size == 8 * DIMENSION
    moved = made_with.copy()
    moved[3] = _unit(9)
    with pytest.raises(ValueError, match="another embedding space"):
        ImageStore(path, DIMENSION, moved)  # now checked on the others too


def test_an_old_record_sqlite_may_only_read_is_checked_on_the_probe_it_kept(
        tmp_path: Path) -> None:
    """Keeping the set is a write: an older record that cannot be written to (SQLite's
    real SQLITE_READONLY, by query_only) is still checked, on the probe it has."""
    path = tmp_path / "images.sqlite3"
    made_with = _units(0)
    ImageStore(path, DIMENSION, made_with[0]).close()
    db = sqlite3.connect(str(path))  # as the one-probe version left it
    db.execute("DELETE FROM meta WHERE key='probes'")
    db.commit()
    db.close()
    store = ImageStore(path, DIMENSION)
    try:
        store._db.execute("PRAGMA query_only=ON")
        store.check_space(DIMENSION, made_with)
        with pytest.raises(ValueError, match="another embedding space"):
            store.check_space(DIMENSION, _units(2))
        assert "probes" not in _meta(path)
    finally:
        store.close()
    new = tmp_path / "new.sqlite3"  # a new record must keep its space: it is refused
    store = ImageStore(new, DIMENSION)
    try:
        store._db.execute("PRAGMA query_only=ON")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.check_space(DIMENSION, made_with)
    finally:
        store.close()


#: sha256 of the probe pictures' pixels, all of them and the first. They must never change:
#: records keep their vectors, and a record made with other pictures would be refused.
PROBE_PIXELS_SHA256 = "26bfb737a17af655da75da7a9a1679a460b623710b322c2b93130c8151350d6b"
#: the one probe picture of the version before there were several (its pixels' digest)
FIRST_PROBE_SHA256 = "f61155fa66a033930de3bb7707bf50e119d9ffdf32b75a6d7041fef78b0f70b9"


def test_the_probe_images_are_fixed_unlike_decodable_pictures() -> None:
    pixels = probe_pixels()
    assert hashlib.sha256(b"".join(p.tobytes() for p in pixels)).hexdigest() \
        == PROBE_PIXELS_SHA256
    assert hashlib.sha256(pixels[0].tobytes()).hexdigest() == FIRST_PROBE_SHA256
    assert probe_images() == probe_images() and probe_images()[0] == probe_image()
    for data, expected in zip(probe_images(), pixels, strict=True):
        decoded = decode_image(data, max_pixels=10**6)
        assert decoded.rgb.shape == (SIDE, SIDE, 3) and decoded.rgb.std() > 40
        np.testing.assert_array_equal(decoded.rgb, expected)
    flat = np.stack([p.reshape(-1).astype(np.float32) for p in pixels])
    flat -= flat.mean(axis=1, keepdims=True)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    similar = flat @ flat.T - np.eye(len(pixels))
    assert similar.max() < 0.5  # unlike pictures, not one picture eight times
    assert 0 < MIN_PROBE_AGREEMENT < 1
