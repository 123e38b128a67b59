"""services.common.cuda_graphs.CudaGraphRunner and TiledImageModel with CUDA graphs, on the
committed style nets. Needs a CUDA device (skipped elsewhere; run on a lent GPU with
`pytest tests/services/test_cuda_graphs.py`)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from services.common.artifacts import list_artifacts, load_artifact
from services.common.config import ServerConfig
from services.common.image_model import TiledImageModel
from training.assets import REPO_ROOT

MODELS = REPO_ROOT / "models"
STYLES = list_artifacts(MODELS, "style")
CUDA = torch.device("cuda")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(not STYLES, reason="no committed style model")]


def _photo(height: int, width: int) -> np.ndarray:
    photos = sorted(Path(REPO_ROOT / "data" / "photos").rglob("*.jpg"))
    if photos:
        image = Image.open(photos[0]).convert("RGB")
    else:  # a smooth synthetic picture when the photos are not fetched
        ramp = np.linspace(0, 255, 256, dtype=np.uint8)
        grey = np.full((256, 256), 128, np.uint8)
        image = Image.fromarray(np.stack([*np.meshgrid(ramp, ramp[::-1]), grey], axis=-1))
    return np.asarray(image.resize((width, height), Image.Resampling.BICUBIC))


def _model(graphs: bool, tile: int = 576) -> TiledImageModel:
    artifact = load_artifact(MODELS, STYLES[0], CUDA)
    config = ServerConfig(service="style", compile="off", cuda_graphs=graphs)
    return TiledImageModel(artifact, CUDA, config, scale=1, tile=tile, overlap=64,
                           max_batch_pixels=2 * tile * tile)


def _batch(model: TiledImageModel, image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(image)).to(CUDA).permute(2, 0, 1)[None]
    return x.to(model.input_dtype).div(255).contiguous(memory_format=torch.channels_last)


def test_a_shape_is_replayed_from_a_graph_once_it_recurs() -> None:
    model = _model(graphs=True)
    runner = model.graphs
    assert runner is not None
    x = _batch(model, _photo(200, 300))
    with torch.inference_mode():
        expected = model.forward(x).float()
        first = runner(x)
        assert runner.captures == 0, "a shape seen once must not be captured"
        second = runner(x)
        third = runner(x)
    assert runner.captures == 1 and runner.replays == 2
    for output in (first, second, third):
        assert output.shape == expected.shape
        assert (output.float() - expected).abs().max().item() * 255 < 0.5


def test_replayed_outputs_are_not_overwritten_by_the_next_replay() -> None:
    model = _model(graphs=True)
    runner = model.graphs
    assert runner is not None
    photo = _photo(128, 192)
    a, b = _batch(model, photo), _batch(model, np.ascontiguousarray(photo[::-1]))
    with torch.inference_mode():
        runner(a)
        out_a = runner(a)  # captured
        kept = out_a.clone()
        out_b = runner(b)  # replays the same graph on other pixels
        assert runner.replays == 2
        assert torch.equal(out_a, kept)
        assert not torch.equal(out_b, out_a)


def test_graphs_kept_are_bounded_least_recently_used_first() -> None:
    model = _model(graphs=True)
    runner = model.graphs
    assert runner is not None
    runner.max_graphs = 2
    shapes = [(64, 96), (96, 64), (128, 128)]
    with torch.inference_mode():
        for height, width in shapes:
            x = _batch(model, _photo(height, width))
            runner(x)
            runner(x)
    assert runner.captures == 3
    assert list(runner.graphs) == [(1, 3, 96, 64), (1, 3, 128, 128)]


def test_a_failed_capture_serves_without_graphs_from_then_on(
        caplog: pytest.LogCaptureFixture) -> None:
    model = _model(graphs=True)
    runner = model.graphs
    assert runner is not None

    def synchronising(batch: torch.Tensor) -> torch.Tensor:
        # .item() waits for the GPU, which a stream under capture must not do
        if torch.cuda.is_current_stream_capturing():
            float(batch.sum().item())
        return model.forward(batch)

    runner.forward = synchronising
    x = _batch(model, _photo(96, 96))
    with torch.inference_mode(), caplog.at_level(logging.ERROR, logger="percept.models"):
        expected = model.forward(x)
        runner(x)
        output = runner(x)
    assert not runner.enabled and not runner.graphs
    assert "capture failed" in caplog.text
    assert torch.equal(output, expected)


@pytest.mark.parametrize("size", [(700, 500), (1300, 900)], ids=["one tile", "tiled"])
def test_the_served_model_gives_the_same_image_with_and_without_graphs(
        size: tuple[int, int]) -> None:
    image = _photo(*size)

    async def serve(model: TiledImageModel) -> list[np.ndarray]:
        model.start()
        try:
            await model.warmup()
            # concurrent requests: tiles of equal shape batch together
            return list(await asyncio.gather(*(model.apply(image) for _ in range(3))))
        finally:
            await model.stop()

    plain = asyncio.run(serve(_model(graphs=False)))
    graphed_model = _model(graphs=True)
    graphed = asyncio.run(serve(graphed_model))
    assert graphed_model.graphs is not None and graphed_model.graphs.captures >= 1
    for output in (*plain, *graphed):
        assert output.shape == image.shape
    difference = np.abs(np.stack(graphed).astype(int) - np.stack(plain).astype(int))
    assert difference.max() <= 1


def test_cuda_graphs_off_launches_the_module_directly() -> None:
    assert _model(graphs=False).graphs is None
