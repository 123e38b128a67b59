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


def test_each_bar_is_a_speed_up_over_the_baseline_of_its_own_run() -> None:
    """The served compiled form was measured in a later run than the others: its bars are
    against that run's fp32 eager time (they once were its time beside another run's
    baseline, which read as 6.8x where its own run measured 3.8x)."""
    from benchmarks.bench_style_gpu import companions
    from benchmarks.plot_gpu import BASELINE, NETWORK_VARIANTS

    result = json.loads(SAVED.read_text())
    labels, bars = network_bars(result)
    assert labels and all(len(values) == len(labels) for values in bars.values())
    variant_of = dict(NETWORK_VARIANTS)
    for run in [result, *(companion for _, companion in companions(result))]:
        times = {(r["net"], r["size"], r["variant"]): r["ms"] for r in run["rows"]
                 if "ms" in r}
        for (net, size, variant), ms in times.items():
            label = next((lab for lab, v in variant_of.items() if v == variant), None)
            if label is None or (net, size, BASELINE) not in times:
                continue
            group = f"{net.split(' (')[0]}\n{size} px"
            # the run's own rows win over a companion's for the same variant
            if run is result or not any(r["variant"] == variant for r in result["rows"]):
                assert bars[label][labels.index(group)] == pytest.approx(
                    times[(net, size, BASELINE)] / ms)
    sizes, served, first = served_bars(result)
    assert sizes == sorted(sizes, key=lambda s: math.prod(int(v) for v in s.split("x")))
    assert set(first) == set(served)
    for row in result["served_form"]:
        assert served[row["config"]][sizes.index(row["size"])] == row["ms"]


def test_the_picture_is_written(tmp_path: Path) -> None:
    out = plot(json.loads(SAVED.read_text()), tmp_path / "gpu.png")
    with Image.open(out) as image:
        assert image.size == (1280, 520)
