"""services.common.image_model.TiledImageModel: uint8 outputs, and eager serving when
torch.compile fails."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from services.common.artifacts import list_artifacts, load_artifact
from services.common.config import ServerConfig
from services.common.image_model import TiledImageModel, should_compile
from training.assets import REPO_ROOT

MODELS = REPO_ROOT / "models"
STYLES = list_artifacts(MODELS, "style")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not STYLES, reason="no committed style model")]


def _model() -> TiledImageModel:
    artifact = load_artifact(MODELS, STYLES[0], torch.device("cpu"))
    return TiledImageModel(artifact, torch.device("cpu"),
                           ServerConfig(service="style", compile="off"), scale=1, tile=256,
                           overlap=32)


def test_outputs_are_rounded_uint8_of_the_network() -> None:
    model = _model()
    tile = np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8)
    (output,) = model.run_batch([tile])
    assert output.dtype == np.uint8 and output.shape == tile.shape
    x = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        expected = model.eager_module(x.contiguous(memory_format=torch.channels_last))
    expected_uint8 = (expected[0].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    assert np.abs(output.astype(int) - expected_uint8.numpy().astype(int)).max() <= 1


def test_a_failing_compile_falls_back_to_eager_for_good(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    model = _model()
    tile = np.random.default_rng(1).integers(0, 256, (32, 32, 3), np.uint8)
    (eager,) = model.run_batch([tile])
    calls = []

    def broken_compiled(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape))
        raise torch._dynamo.exc.TorchDynamoException("inductor could not generate code")

    model.module, model.compiled = broken_compiled, True
    with caplog.at_level(logging.ERROR, logger="percept.models"):
        (fallback,) = model.run_batch([tile])
    assert np.array_equal(fallback, eager)
    assert "serving it eager from now on" in caplog.text
    assert model.compiled is False and model.module is model.eager_module
    model.run_batch([tile])
    assert len(calls) == 1, "the broken compiled module was tried again"


def test_other_errors_are_not_swallowed() -> None:
    model = _model()

    def failing(batch: torch.Tensor) -> torch.Tensor:
        raise torch._dynamo.exc.TorchDynamoException("not compiled: must propagate")

    model.module = failing  # compiled stays False: nothing to fall back from
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        model.run_batch([np.zeros((16, 16, 3), np.uint8)])


@pytest.mark.parametrize(("mode", "device", "graphs", "expected"), [
    ("auto", "cpu", False, False), ("auto", "cuda", True, False),
    ("auto", "cuda", False, True), ("on", "cpu", False, True), ("on", "cuda", True, True),
    ("off", "cuda", False, False)])
def test_compile_auto_compiles_only_on_cuda_without_graphs(mode: str, device: str,
                                                           graphs: bool, expected: bool) -> None:
    assert should_compile(mode, torch.device(device), graphs) is expected


def test_an_unknown_compile_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, on or off"):
        should_compile("sometimes", torch.device("cpu"), False)


def test_no_cuda_graphs_on_the_cpu() -> None:
    model = _model()
    assert model.graphs is None and not model.compiled
