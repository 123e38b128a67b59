"""The GPU style benchmark's choice of the served model: its fp32 eager baseline must be
among the nets the run measures (a session measuring only starry-night once timed the
served form of stained-tissue, and every served ratio came out empty)."""

from __future__ import annotations

import pytest

from benchmarks.bench_style_gpu import served_model, served_models, style_nets
from tests.style.committed import needs_styles
from training.assets import REPO_ROOT

MODELS = REPO_ROOT / "models"


@needs_styles
@pytest.mark.parametrize("only", [["starry-night", "paper"], ["stained-tissue"], ["paper"],
                                  None])
def test_the_served_model_is_one_whose_baseline_is_measured(only: list[str] | None) -> None:
    labels = [label for label, _ in style_nets(MODELS, paper_width=True)
              if not only or any(word in label for word in only)]
    name = served_model(MODELS, labels)
    assert name in served_models(MODELS)
    measured = [label for label in labels if label.startswith(f"{name} ")]
    if only == ["paper"]:  # no committed net measured: the first one, without a baseline
        assert not measured and name == served_models(MODELS)[0]
    else:
        assert measured, (name, labels)
