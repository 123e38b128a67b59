"""services.common.tiling: float and uint8 tile outputs blend to the same image."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from services.common.tiling import TilePlan, _ramp, tiled_apply


def _tile_dependent(tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A stand-in net whose output depends on the tile (like instance normalisation):
    each tile is shifted by its own mean, so overlaps disagree and must be blended."""
    outputs = []
    for tile in tiles:
        values = tile.astype(np.float32) / 255.0
        outputs.append(np.clip(values * 0.8 + 0.3 * (values.mean() - 0.5) + 0.1, 0.0, 1.0))
    return outputs


def _rounded(tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.clip(o * 255.0 + 0.5, 0, 255).astype(np.uint8) for o in _tile_dependent(tiles)]


def _apply(image: np.ndarray, outputs_in_uint8: bool, tile: int) -> np.ndarray:
    async def process(tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
        return _rounded(tiles) if outputs_in_uint8 else _tile_dependent(tiles)
    return asyncio.run(tiled_apply(image, process, scale=1, tile=tile, overlap=16))


def test_uint8_tile_outputs_blend_within_one_level_of_float_ones() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 230, 3), np.uint8)
    image[:, 115:] //= 3  # tiles with different means disagree in their overlaps
    assert TilePlan(150, 230, 64, 16).count > 1
    from_floats = _apply(image, outputs_in_uint8=False, tile=64)
    from_uint8 = _apply(image, outputs_in_uint8=True, tile=64)
    assert from_uint8.dtype == np.uint8 and from_uint8.shape == image.shape
    difference = np.abs(from_uint8.astype(int) - from_floats.astype(int))
    assert difference.max() <= 1
    assert difference.mean() < 0.1


def test_a_single_uint8_tile_is_the_output() -> None:
    image = np.random.default_rng(1).integers(0, 256, (40, 50, 3), np.uint8)
    assert np.array_equal(_apply(image, outputs_in_uint8=True, tile=64), _rounded([image])[0])
    assert np.array_equal(_apply(image, outputs_in_uint8=False, tile=64), _rounded([image])[0])


def _whole_image_blend(image: np.ndarray, tile: int, overlap: int) -> np.ndarray:
    """The blend done the plain way, for reference: every tile's feathered output added
    into one float image of the whole size, divided by the summed weights."""
    height, width = image.shape[:2]
    plan = TilePlan(height, width, tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    total = np.zeros((height, width, 3), np.float64)
    weight = np.zeros((height, width, 1), np.float64)
    for y0 in plan.rows:
        for x0 in plan.cols:
            (output,) = _tile_dependent([image[y0:y0 + th, x0:x0 + tw]])
            wy = _ramp(th, y0, height, overlap, 1)
            wx = _ramp(tw, x0, width, overlap, 1)
            w = np.outer(wy, wx)[..., None]
            total[y0:y0 + th, x0:x0 + tw] += output * w
            weight[y0:y0 + th, x0:x0 + tw] += w
    return np.clip(total / weight * 255 + 0.5, 0, 255).astype(np.uint8)


def test_the_banded_blend_equals_blending_the_whole_image_at_once() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (203, 171, 3), np.uint8)
    image[100:] //= 4
    assert len(TilePlan(203, 171, 64, 16).rows) > 2
    banded = _apply(image, outputs_in_uint8=False, tile=64)
    reference = _whole_image_blend(image, tile=64, overlap=16)
    assert np.abs(banded.astype(int) - reference.astype(int)).max() <= 1


@pytest.mark.parametrize(("shape", "tiles"), [((64, 150), 3), ((150, 64), 3), ((40, 203), 4),
                                             ((203, 40), 4), ((64, 64), 1)])
def test_sides_of_exactly_one_tile_or_under_one_are_tiled_along_the_other(
        shape: tuple[int, int], tiles: int) -> None:
    """A side exactly one tile long is one tile along it (no step between tiles to
    divide by); a side under a tile makes tiles as short as the image along it. The
    other side takes the fewest 64 px tiles that overlap by 16: 3 for 150 px, 4 for 203."""
    image = np.random.default_rng(4).integers(0, 256, (*shape, 3), np.uint8)
    image[shape[0] // 2:, shape[1] // 2:] //= 4  # tiles with different means disagree
    seen: list[tuple[int, ...]] = []

    async def process(tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
        seen.extend(tile.shape for tile in tiles)
        return _tile_dependent(tiles)

    tiled = asyncio.run(tiled_apply(image, process, scale=1, tile=64, overlap=16))
    assert tiled.shape == image.shape
    assert set(seen) == {(min(64, shape[0]), min(64, shape[1]), 3)}
    assert len(seen) == tiles
    reference = _whole_image_blend(image, tile=64, overlap=16)
    assert np.abs(tiled.astype(int) - reference.astype(int)).max() <= 1


def test_torch_tile_outputs_blend_like_numpy_ones() -> None:
    image = np.random.default_rng(3).integers(0, 256, (150, 230, 3), np.uint8)

    async def process(tiles: Sequence[np.ndarray]) -> list[torch.Tensor]:
        return [torch.from_numpy(o) for o in _rounded(tiles)]

    from_tensors = asyncio.run(tiled_apply(image, process, scale=1, tile=64, overlap=16))
    assert np.array_equal(from_tensors, _apply(image, outputs_in_uint8=True, tile=64))
    single = asyncio.run(tiled_apply(image[:40, :50], process, scale=1, tile=64, overlap=16))
    assert isinstance(single, np.ndarray) and single.dtype == np.uint8
    assert np.array_equal(single, _rounded([image[:40, :50]])[0])
