"""The search record knows the embedding space its vectors were made in (the vector of a
fixed probe image): a record from another space of the same dimension is refused at start,
not searched with confident nonsense."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.common.images import decode_image
from services.search.embedder import probe_image
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
                                         r"agrees .* at -?0\.0\d\d, under 0\.99.*another "
                                         r"--data-dir"):
        ImageStore(path, DIMENSION, _unit(2))


def test_a_record_made_before_probes_were_kept_adopts_the_current_space(
        tmp_path: Path) -> None:
    path = tmp_path / "images.sqlite3"
    ImageStore(path, DIMENSION).close()  # as an older version wrote it
    ImageStore(path, DIMENSION, _unit(0)).close()
    with pytest.raises(ValueError, match="another embedding space"):
        ImageStore(path, DIMENSION, _unit(3))


def test_the_probe_image_is_a_fixed_decodable_picture() -> None:
    first, again = probe_image(), probe_image()
    assert first == again
    decoded = decode_image(first, max_pixels=10**6)
    assert decoded.rgb.shape == (96, 96, 3) and decoded.rgb.std() > 50
    assert 0 < MIN_PROBE_AGREEMENT < 1
