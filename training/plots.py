"""Training pictures: loss curves (matplotlib, Agg backend) and labelled image grids (PIL)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    data = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(data) < window:
        return data
    kernel = np.ones(window) / window
    head = np.cumsum(data[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(data, kernel, mode="valid")])


def save_loss_plot(history: Mapping[str, Sequence[float]], path: Path,
                   steps: Sequence[int] | None = None, title: str = "training loss",
                   smoothing: int = 25) -> Path:
    """One log-scale curve per loss term (moving average over ``smoothing`` steps)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        for label, values in history.items():
            if not len(values):
                continue
            xs = np.asarray(steps if steps is not None else range(1, len(values) + 1))
            ys = _smooth(values, smoothing)
            # a line through one point draws nothing: a run of one step shows as a dot
            marker = "o" if len(ys) < 2 else None
            draw = axis.semilogy if np.all(ys > 0) else axis.plot
            draw(xs[: len(ys)], ys, label=label, linewidth=1.2, marker=marker)
        axis.set_xlabel("step")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_lines():
            axis.legend(loc="upper right", fontsize=8)
        else:  # e.g. --steps 0: say so rather than draw an empty frame
            axis.text(0.5, 0.5, "no steps were run", ha="center", va="center",
                      transform=axis.transAxes)
    except BaseException:
        plt.close(figure)
        raise
    return save_figure(figure, path)


def save_figure(figure: Any, path: Path) -> Path:
    """Lays out ``figure`` (a matplotlib Figure), writes it to ``path`` (folders made as
    needed) and closes it."""
    from matplotlib import pyplot as plt

    try:
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] or uint8 -> uint8."""
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def image_grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str] | None = None,
               gap: int = 4, label_height: int = 16) -> Image.Image:
    """Tiles (H, W, 3) images row by row (each cell the size of the largest image) with
    optional column labels on top."""
    cell_h = max(img.shape[0] for row in rows for img in row)
    cell_w = max(img.shape[1] for row in rows for img in row)
    columns = max(len(row) for row in rows)
    top = label_height if labels else 0
    canvas = Image.new("RGB", (columns * cell_w + (columns - 1) * gap,
                               top + len(rows) * cell_h + (len(rows) - 1) * gap), "white")
    draw = ImageDraw.Draw(canvas)
    if labels:
        for column, label in enumerate(labels):
            draw.text((column * (cell_w + gap) + 3, 2), _fitted(draw, label, cell_w - 3),
                      fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            canvas.paste(Image.fromarray(to_uint8(img)), (c * (cell_w + gap),
                                                          top + r * (cell_h + gap)))
    return canvas


def _fitted(draw: ImageDraw.ImageDraw, label: str, width: int) -> str:
    """``label``, cut short with ".." where it is wider than ``width`` pixels (small
    crops' columns: the labels ran into each other)."""
    if draw.textlength(label) <= width:
        return label
    while label and draw.textlength(label + "..") > width:
        label = label[:-1]
    return label + ".." if label else ""


def save_image_grid(rows: Sequence[Sequence[np.ndarray]], path: Path,
                    labels: Sequence[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, labels).save(path, optimize=True)
    return path
