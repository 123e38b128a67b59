"""benchmarks.plot_gpu draws the committed GPU benchmark result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.common import RESULTS
from benchmarks.plot_gpu import network_bars, plot, served_bars

SAVED = RESULTS / "style_gpu.json"
pytestmark = pytest.mark.skipif(not SAVED.is_file(), reason="no saved GPU result")


def test_the_bars_are_the_measured_times() -> None:
    result = json.loads(SAVED.read_text())
    labels, bars = network_bars(result)
    assert labels and all(len(values) == len(labels) for values in bars.values())
    baseline = next(r["ms"] for r in result["rows"]
                    if r["variant"] == "fp32 eager (plain PyTorch defaults)")
    assert baseline in bars["fp32 eager (baseline)"]
    sizes, served, first = served_bars(result)
    assert sizes == sorted(sizes, key=lambda s: math.prod(int(v) for v in s.split("x")))
    assert set(first) == set(served)
    for row in result["served_form"]:
        assert served[row["config"]][sizes.index(row["size"])] == row["ms"]


def test_the_picture_is_written(tmp_path: Path) -> None:
    out = plot(json.loads(SAVED.read_text()), tmp_path / "gpu.png")
    with Image.open(out) as image:
        assert image.size == (1280, 520)
