"""Tiled inference for fully-convolutional image nets at any size, in bounded memory.

The image is cut into overlapping tiles of one fixed size (so tiles of many requests batch
together), each tile goes through the model, and the outputs are blended with linear
feathering across the overlaps, so no seam shows even for nets whose statistics depend on
the tile (instance normalisation). Tiles are processed one row at a time and only one band
of float accumulators is alive, so memory grows with the image width, not its area.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# process(tiles) -> outputs: uint8 (t, t, 3) in; (t*s, t*s, 3) out, either float32 in
# [0, 1] or uint8 (already rounded: a single-tile image is then returned as it is), as numpy
# arrays or torch tensors (on a GPU: the overlaps are then blended there, and only finished
# rows of uint8 come back to the host)
TileOutput = np.ndarray | torch.Tensor
TileProcessor = Callable[[Sequence[np.ndarray]], Awaitable[Sequence[TileOutput]]]


@dataclass(frozen=True)
class TilePlan:
    """Tile geometry for one image: ``tile`` px squares overlapping by ``overlap`` px."""

    height: int
    width: int
    tile: int
    overlap: int

    def starts(self, length: int) -> list[int]:
        """The fewest tiles that cover ``length`` with at least ``overlap`` px shared by
        neighbours, spread evenly (so no tile is spent on a sliver at the end)."""
        if length <= self.tile:
            return [0]
        count = -(-(length - self.overlap) // (self.tile - self.overlap))
        span = length - self.tile
        # floor(i * span / (count - 1)): steps differ by at most 1 and never exceed
        # tile - overlap, because span / (count - 1) <= tile - overlap.
        return [i * span // (count - 1) for i in range(count)]

    @property
    def rows(self) -> list[int]:
        return self.starts(self.height)

    @property
    def cols(self) -> list[int]:
        return self.starts(self.width)

    @property
    def tile_height(self) -> int:
        return min(self.tile, self.height)

    @property
    def tile_width(self) -> int:
        return min(self.tile, self.width)

    @property
    def count(self) -> int:
        return len(self.rows) * len(self.cols)


def _ramp(length: int, start: int, total: int, overlap: int, scale: int) -> np.ndarray:
    """1-D feathering weights for a tile covering [start, start+length) of ``total``:
    a linear ramp over the overlap on each side that has a neighbour, 1 elsewhere."""
    ramp_len = overlap * scale
    weights = np.ones(length * scale, np.float32)
    if ramp_len == 0:
        return weights
    ramp = (np.arange(ramp_len, dtype=np.float32) + 0.5) / ramp_len
    if start > 0:
        weights[:ramp_len] = np.minimum(weights[:ramp_len], ramp)
    if start + length < total:
        weights[-ramp_len:] = np.minimum(weights[-ramp_len:], ramp[::-1])
    return weights


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] -> rounded uint8."""
    return values.mul(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8)


def _as_array(result: TileOutput) -> np.ndarray:
    """One whole-image output as uint8 numpy."""
    tensor = torch.as_tensor(result)
    if tensor.dtype != torch.uint8:
        tensor = _to_uint8(tensor.float())
    return np.ascontiguousarray(tensor.cpu().numpy())


async def tiled_apply(image: np.ndarray, process: TileProcessor, *, scale: int, tile: int,
                      overlap: int) -> np.ndarray:
    """Applies ``process`` to ``image`` (H, W, 3) uint8 tile by tile; returns uint8
    (H*scale, W*scale, 3). Images no larger than one tile go through in one piece.

    Overlaps are blended with torch on the device the outputs are on (several threads on
    a CPU, where numpy would use one; on a GPU the tiles never leave it)."""
    height, width = image.shape[:2]
    if overlap * 2 >= tile:
        raise ValueError(f"overlap {overlap} must be under half the tile {tile}")
    plan = TilePlan(height, width, tile, overlap)
    if plan.count == 1:  # nothing to blend
        (result,) = await process([image])
        if isinstance(result, np.ndarray) and result.dtype == np.uint8:
            return result
        return await asyncio.to_thread(_as_array, result)
    out = np.empty((height * scale, width * scale, 3), np.uint8)
    cols = plan.cols
    th, tw = plan.tile_height, plan.tile_width
    carry: torch.Tensor | None = None  # accumulated (value, weight) rows shared with next band
    carry_start = 0
    rows = plan.rows
    for row_index, y0 in enumerate(rows):
        tiles = [image[y0:y0 + th, x0:x0 + tw] for x0 in cols]
        outputs = await process(tiles)

        @torch.inference_mode()
        def blend(outputs: Sequence[TileOutput] = outputs, y0: int = y0,
                  row_index: int = row_index) -> np.ndarray:
            nonlocal carry, carry_start
            results = [torch.as_tensor(result) for result in outputs]
            device = results[0].device
            band = torch.zeros((th * scale, width * scale, 4), dtype=torch.float32,
                               device=device)
            wy = torch.from_numpy(_ramp(th, y0, height, overlap, scale)).to(device)
            for x0, result in zip(cols, results, strict=True):
                wx = torch.from_numpy(_ramp(tw, x0, width, overlap, scale)).to(device)
                weights = torch.outer(wy, wx)[..., None]
                region = band[:, x0 * scale:(x0 + tw) * scale]
                unit = 1 / 255 if result.dtype == torch.uint8 else 1.0
                region[..., :3].addcmul_(result.float(), weights * unit)
                region[..., 3:] += weights
            if carry is not None:
                offset = (carry_start - y0) * scale
                band[offset:offset + carry.shape[0]] += carry
            next_y0 = rows[row_index + 1] if row_index + 1 < len(rows) else height
            final_rows = (next_y0 - y0) * scale
            done = band[:final_rows]
            finished = _to_uint8(done[..., :3] / done[..., 3:].clamp_min(1e-8))
            out[y0 * scale:next_y0 * scale] = finished.cpu().numpy()
            carry = band[final_rows:].clone() if next_y0 < height else None
            carry_start = next_y0
            return out

        await asyncio.to_thread(blend)
    return out
