"""services.common.image_model.TiledImageModel: uint8 outputs in float32 and bfloat16, how
far bfloat16 serving is from float32, and eager serving when torch.compile fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
import pytest
import torch

from services.common.artifacts import list_artifacts, load_artifact
from services.common.config import ServerConfig
from services.common.image_model import TiledImageModel, compiled_for, should_compile
from tests.conftest import is_pushback
from training import nets
from training.assets import REPO_ROOT
from training.image_quality import psnr
from training.nets.folding import fold_for_inference

MODELS = REPO_ROOT / "models"
STYLES = list_artifacts(MODELS, "style")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not STYLES, reason="no committed style model")]


def _model(cpu_dtype: str = "float32", model: str | None = None, tile: int = 256
           ) -> TiledImageModel:
    artifact = load_artifact(MODELS, model or STYLES[0], torch.device("cpu"))
    config = ServerConfig(service="style", compile="off", cpu_dtype=cpu_dtype)
    return TiledImageModel(artifact, torch.device("cpu"), config, scale=1, tile=tile,
                           overlap=32)


@pytest.mark.parametrize(("cpu_dtype", "dtype"), [("float32", torch.float32),
                                                  ("bfloat16", torch.bfloat16)])
def test_outputs_are_rounded_uint8_of_the_network(cpu_dtype: str, dtype: torch.dtype) -> None:
    model = _model(cpu_dtype)
    assert model.dtype == dtype
    # bf16 keeps the layer that reads the image, and so the input, in fp32
    assert model.input_dtype == torch.float32
    assert {p.dtype for p in model.eager_module.parameters()} == {torch.float32, dtype}
    tile = np.random.default_rng(0).integers(0, 256, (40, 48, 3), np.uint8)
    (output,) = model.run_batch([tile])
    assert output.dtype == np.uint8 and output.shape == tile.shape
    x = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        expected = model.eager_module(x.contiguous(memory_format=torch.channels_last))
    expected_uint8 = (expected[0].float().permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to(
        torch.uint8)
    assert np.abs(output.astype(int) - expected_uint8.numpy().astype(int)).max() <= 1


def _real_photo() -> np.ndarray:
    """scikit-image's chelsea, or where it is not installed (a bare GPU machine runs this
    module) a held-out photo carried with the tree."""
    try:
        from skimage import data

        return np.asarray(data.chelsea())
    except ImportError:
        photos = sorted((REPO_ROOT / "data" / "photos" / "heldout").glob("*.jpg"))
        if not photos:
            pytest.skip("neither scikit-image nor data/photos/heldout (`make data`)")
        from PIL import Image

        return np.asarray(Image.open(photos[0]).convert("RGB"))


@pytest.mark.parametrize("style", STYLES)
def test_bfloat16_serving_stays_close_to_float32(style: str) -> None:
    """Every committed style net served in bfloat16 against the same net in float32, on a
    real photo: measured 53.1-54.5 dB PSNR and at most 2-3 levels off at one pixel on this
    crop (52.6-55.1 dB, at most 5 levels, on the held-out photos at 256 px). The margins
    leave room for other photos, not for a broken cast (a wrong scale or a channel mix-up
    lands far below 30 dB)."""
    image = np.ascontiguousarray(_real_photo()[:192, :256])
    f32 = np.asarray(_model("float32", style).run_batch([image])[0])  # numpy on a CPU
    bf16 = np.asarray(_model("bfloat16", style).run_batch([image])[0])
    assert psnr(f32, bf16) > 45
    assert np.abs(bf16.astype(int) - f32).max() <= 24


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


def test_the_cuda_compile_takes_the_gpu_forms_at_static_shapes() -> None:
    """compiled_for on CUDA: for_compile_on_cuda's forms (space-to-depth first layer,
    traced output layer), compiled per input size. Run here on the CPU's inductor, at two
    sizes, one odd (which the space-to-depth layer computes as the plain convolution),
    each the eager net's output; with dynamic shapes the second size failed in inductor."""
    from training.nets.folding import SpaceToDepthConv

    torch.manual_seed(0)
    eager = fold_for_inference(nets.build({"type": "johnson-transformer", "width": 8,
                                           "blocks": 1, "edge_margin": 4}).eval())
    images = [torch.rand(1, 3, 40, 56), torch.rand(1, 3, 37, 29)]
    with torch.inference_mode():
        expected = [eager(x) for x in images]
    torch._dynamo.reset()
    try:
        compiled = compiled_for(eager, torch.device("cuda"))
        assert any(isinstance(m, SpaceToDepthConv) for m in eager.modules())
        with torch.inference_mode():
            for x, want in zip(images, expected, strict=True):
                torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()


def test_an_unknown_compile_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, on or off"):
        should_compile("sometimes", torch.device("cpu"), False)


def test_no_cuda_graphs_on_the_cpu() -> None:
    model = _model()
    assert model.graphs is None and not model.compiled


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header states width x height (its pixel data is a stub: admission reads
    the header alone)."""
    from tests.fixtures.bad_images import png_bomb

    return png_bomb(width, height)


def test_admission_refuses_images_that_take_too_many_tiles() -> None:
    """The limit is 4x the tiles of the largest square under the pixel cap (at least 16):
    cost follows tiles, not pixels."""
    from services.common.errors import InvalidArgument
    from services.common.tiling import TilePlan

    def model_for(max_pixels: int) -> TiledImageModel:
        artifact = load_artifact(MODELS, STYLES[0], torch.device("cpu"))  # each its own copy
        config = ServerConfig(service="style", compile="off", max_pixels=max_pixels)
        return TiledImageModel(artifact, torch.device("cpu"), config, scale=1, tile=256,
                               overlap=32)

    small_cap, default_cap = model_for(1_000_000), model_for(64_000_000)
    caps = {id(small_cap): 1_000_000, id(default_cap): 64_000_000}
    assert small_cap.max_tiles == 4 * TilePlan(1000, 1000, 256, 32).count == 100
    assert default_cap.max_tiles == 4 * TilePlan(8000, 8000, 256, 32).count
    cases = [(small_cap, 1000, 1000, True), (small_cap, 8000, 100, True),  # 25, 36 tiles
             (small_cap, 1, 1_000_000, False), (small_cap, 1_000_000, 1, False),  # 4465
             (small_cap, 40, 25_000, False),  # 112
             (default_cap, 8000, 8000, True),  # 1296
             (default_cap, 30_000, 100, True),  # 134 in one row: queued in two parts
             (default_cap, 1_200_000, 10, False)]  # 5357
    for model, width, height, accepted in cases:
        plan = TilePlan(height, width, 256, 32)
        if accepted:
            model.check_tiles(width, height)
            continue
        with pytest.raises(InvalidArgument,
                           match=rf"a {width}x{height} image takes {plan.count} tiles of 256 "
                                 rf"px \({len(plan.rows)} x {len(plan.cols)}\); one "
                                 rf"request may take {model.max_tiles}: send a less "
                                 "elongated image"):
            model.check_tiles(width, height)
        header = _png_header_only(width, height)  # the same from the header, before decoding
        with pytest.raises(InvalidArgument), model.admitted(header, caps[id(model)]):
            pytest.fail("admitted")
        assert model.active_requests == 0


def test_a_slot_is_held_from_before_decoding_and_a_busy_model_refuses_at_once() -> None:
    """The slot is taken before the image is decoded, so of concurrent requests that arrive
    together only --max-queue are decoded; the others are refused from their headers."""
    from services.common.errors import ResourceExhausted

    model = _model()
    assert model.max_requests >= 1
    header = _png_header_only(64, 64)
    with contextlib.ExitStack() as held:
        for _ in range(model.max_requests):
            held.enter_context(model.admitted(header, 10**6))
        assert model.active_requests == model.max_requests
        with pytest.raises(ResourceExhausted, match="is busy"), model.admitted(header, 10**6):
            pytest.fail("admitted")
        with pytest.raises(ResourceExhausted, match="is busy"):  # apply outside a slot too
            asyncio.run(model.apply(np.zeros((8, 8, 3), np.uint8)))
    assert model.active_requests == 0
    # what decoding refuses precisely is left to it (holding a slot meanwhile)
    for data in (_png_header_only(100_000, 100_000), b"not an image"):
        with model.admitted(data, 10**6):
            assert model.active_requests == 1


def test_the_pixels_in_flight_are_bounded_across_the_models_of_a_server() -> None:
    """--max-inflight-mpixels bounds the memory of the images a server holds: a request
    that would take it over is busy (with the retry trailer), one request is always
    admitted, and the pixels come back when a request ends. Two models of one server share
    the budget; another server has its own."""
    from services.common.errors import Busy

    config = ServerConfig(service="style", compile="off", max_inflight_mpixels=1)
    first, second = (TiledImageModel(load_artifact(MODELS, STYLES[0], torch.device("cpu")),
                                     torch.device("cpu"), config, scale=1, tile=256,
                                     overlap=32) for _ in range(2))
    half = _png_header_only(500, 500)  # 0.25 MP in, 0.25 out: half the budget
    with contextlib.ExitStack() as held:
        held.enter_context(first.admitted(half, 10**8))
        held.enter_context(second.admitted(half, 10**8))  # the other model: same budget
        with pytest.raises(Busy, match=r"the images in progress take 1.0 of the 1 megapixels "
                                       r"this server holds at once \(--max-inflight-mpixels\)"
                           ) as refused, first.admitted(_png_header_only(10, 10), 10**8):
            pytest.fail("admitted")
        key, pushback = refused.value.trailing_metadata[0]
        assert key == "grpc-retry-pushback-ms" and is_pushback(pushback)
        assert refused.value.reason == "PIXEL_BUDGET_FULL"
        other = _model()  # another server's config: its own budget
        with other.admitted(half, 10**8):
            pass
    assert first.pixels.in_use == 0 and first.pixels.holders == 0
    with (first.admitted(_png_header_only(3000, 3000), 10**8),  # 18 MP alone: admitted
          pytest.raises(Busy), second.admitted(_png_header_only(10, 10), 10**8)):
        pytest.fail("admitted")
    assert first.pixels.in_use == 0


def test_the_slots_and_pixels_held_are_metrics() -> None:
    """percept_request_slots_in_use{queue} and percept_inflight_pixels show what requests
    hold (a leak of either would otherwise show only as busy answers), and fall back when
    the requests end."""
    from prometheus_client import REGISTRY

    model = _model()

    def slots() -> float:
        return REGISTRY.get_sample_value("percept_request_slots_in_use",
                                         {"queue": model.queue_name}) or 0.0

    def pixels() -> float:
        return REGISTRY.get_sample_value("percept_inflight_pixels") or 0.0

    slots_before, pixels_before = slots(), pixels()
    with model.admitted(_png_header_only(100, 50), 10**6):
        assert slots() == slots_before + 1
        assert pixels() == pixels_before + 100 * 50 * 2  # input plus output (scale 1)
    assert (slots(), pixels()) == (slots_before, pixels_before)
    asyncio.run(model.apply(np.zeros((8, 8, 3), np.uint8)))  # takes and gives its own
    assert (slots(), pixels()) == (slots_before, pixels_before)


def test_a_row_longer_than_the_per_request_queue_is_queued_in_parts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A row of more tiles than one request may queue at once goes through in parts, with
    the same result, and never holds more of the tile queue than its share."""
    from services.common import image_model

    model = _model(tile=128)  # 32 px overlap: a tile every 96 px
    rgb = np.random.default_rng(1).integers(0, 256, (16, 40 * 96 + 32, 3), np.uint8)
    depths: list[int] = []
    submit = model.batcher.submit

    async def watching(*args: object, **kwargs: object) -> object:
        depths.append(model.batcher.depth)
        return await submit(*args, **kwargs)  # type: ignore[arg-type]

    async def both() -> tuple[np.ndarray, np.ndarray]:
        whole = await model.apply(rgb)
        monkeypatch.setattr(model.batcher, "submit", watching)
        monkeypatch.setattr(image_model, "_TILE_QUEUE_PER_REQUEST", 5)
        parts = await model.apply(rgb)
        await model.stop()
        return whole, parts

    whole, parts = asyncio.run(both())
    assert len(depths) == 40 and max(depths) < 5
    assert np.abs(parts.astype(int) - whole.astype(int)).max() <= 1


def test_a_cancelled_request_keeps_its_slot_until_its_thread_ends() -> None:
    """A decode cannot be stopped: a request cancelled while its thread runs frees the slot
    only when the thread returns, so clients that hang up cannot pile decodes up."""
    import threading

    from services.common.errors import ResourceExhausted

    model = _model()
    model.max_requests = 1
    header = _png_header_only(64, 64)
    release = threading.Event()

    async def request() -> None:
        with model.admitted(header, 10**6) as slot:
            await slot.to_thread(release.wait, 10)  # a decode that takes a while

    async def main() -> None:
        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.05)
        task.cancel()  # the caller hangs up while its thread runs
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert model.active_requests == 1
        with pytest.raises(ResourceExhausted), model.admitted(header, 10**6):
            pytest.fail("admitted while the cancelled request's thread still runs")
        release.set()
        for _ in range(100):
            if model.active_requests == 0:
                break
            await asyncio.sleep(0.01)
        with model.admitted(header, 10**6) as slot:  # free again
            assert await slot.to_thread(sum, [1, 2]) == 3
        assert model.active_requests == 0

    asyncio.run(main())


def test_a_busy_answer_waits_for_a_request_to_end_not_one_tile_batch() -> None:
    """A large image holds its slot for many tile batches: the pushback follows how long a
    slot is held (shared by the requests holding one), not one batch."""
    model = _model()
    model.batcher.batch_seconds = 0.3  # one batch of tiles
    assert model.retry_after_ms == 300  # no request has ended yet
    model.slot_seconds, model.active_requests = 3.2, 1
    assert model.retry_after_ms == 3200
    model.active_requests = 4  # four requests share the wait: one ends about every 0.8 s
    assert model.retry_after_ms == 800
    model.slot_seconds = 0.01  # short requests: a batch is the better guess
    assert model.retry_after_ms == 300
    model.active_requests = 0


def test_a_forward_pass_takes_no_more_tiles_than_its_pixel_cap() -> None:
    """A cap of two full tiles' pixels: eight 128 px tiles queued at once go through in
    batches of two, though --max-batch is 8; an image smaller than a tile batches up to
    --max-batch as before."""
    artifact = load_artifact(MODELS, STYLES[0], torch.device("cpu"))
    config = ServerConfig(service="style", compile="off", cpu_dtype="float32", max_batch=8,
                          max_wait_ms=200)
    model = TiledImageModel(artifact, torch.device("cpu"), config, scale=1, tile=128,
                            overlap=32, max_batch_pixels=2 * 128 * 128)
    batches: list[tuple[int, ...]] = []
    forward = model.forward

    def counting(batch: torch.Tensor) -> torch.Tensor:
        batches.append(tuple(batch.shape))
        return forward(batch)

    model.forward = counting  # type: ignore[method-assign]
    wide = np.random.default_rng(2).integers(0, 256, (128, 8 * 96 + 32, 3), np.uint8)
    small = np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8)

    async def run() -> None:
        await model.apply(wide)
        await asyncio.gather(*(model.apply(small) for _ in range(8)))
        await model.stop()

    asyncio.run(run())
    full = [shape[0] for shape in batches if shape[2:] == (128, 128)]
    assert sum(full) == 8 and max(full) == 2, batches
    assert [shape[0] for shape in batches if shape[2:] == (32, 32)] == [8], batches
