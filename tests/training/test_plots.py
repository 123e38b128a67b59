"""The training loss plot draws what there is, even a run of one step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.plots import save_loss_plot

#: matplotlib's first line colour (C0, #1f77b4)
FIRST_LINE = np.array([0x1F, 0x77, 0xB4])


def _line_pixels(path: Path) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(pixels - FIRST_LINE).sum(axis=2) < 40).sum())


@pytest.mark.parametrize("values", [[0.5], [0.5, 0.4, 0.3], [-0.5]])
def test_every_history_draws_its_curve(tmp_path: Path, values: list[float]) -> None:
    """One value once drew an empty frame with a legend: a line needs two points."""
    path = save_loss_plot({"total": values}, tmp_path / "loss.png")
    # the legend's sample line alone is about 30 pixels of the colour
    assert _line_pixels(path) > 60, _line_pixels(path)


def test_column_labels_never_run_into_the_next_column() -> None:
    from training.plots import image_grid

    cells = [[np.zeros((32, 32, 3), np.uint8)] * 3]
    grid = np.asarray(image_grid(cells, ["bicubic upsampling", "model output", "target"],
                                 gap=4)).astype(int)
    label_band = grid[:16]
    for column in range(3):  # the 4-pixel gaps between the columns stay white
        start = 32 + column * 36
        if column < 2:
            assert (label_band[:, start:start + 4] == 255).all(), column
