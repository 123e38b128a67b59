"""An image-to-image model artifact served tile by tile through a micro-batcher.

Used by the super-resolution and fast-style services: tiles of every concurrent request
share one batcher (tiles of equal shape batch together), requests are admitted up to
``--max-queue`` per model (one more gets RESOURCE_EXHAUSTED), and the per-request deadline
applies to every tile. A request is admitted (:meth:`TiledImageModel.admitted`) before its
image is decoded, from the size in its header: a busy model refuses it at once, and an
image too elongated for its pixel count (a 1 x 1,000,000 strip takes a tile per 1,024
pixels) is refused rather than computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn

from services.common.artifacts import Artifact
from services.common.batching import MAX_PUSHBACK_MS, MicroBatcher, running_mean
from services.common.config import ServerConfig
from services.common.cuda_graphs import CudaGraphRunner
from services.common.device import serving_dtype
from services.common.errors import Busy, DeadlineExceeded, InvalidArgument
from services.common.images import probe_size
from services.common.metrics import (
    INFLIGHT_PIXELS,
    REJECTED,
    REQUEST_SLOTS,
    count_dropped,
    current_call,
)
from services.common.precision import to_serving_precision
from services.common.tiling import TileOutput, TilePlan, tiled_apply
from training.nets.folding import fold_for_inference, for_compile_on_cuda

log = logging.getLogger("percept.models")
T = TypeVar("T")

# Per-request tiles queued at most at once (a longer row of tiles is queued in parts), so
# --max-queue requests never overflow the tile queue of --max-queue times this.
_TILE_QUEUE_PER_REQUEST = 96
# Tiles one request may take: this many times what the largest square image under the
# pixel cap takes, and never fewer than _MIN_TILE_LIMIT. The cost of a request is its
# tiles, not its pixels; without a limit a strip one pixel high and under the cap would
# cost a forward pass per 1,024 pixels (measured: 977 tiles and 24 CPU seconds for
# 1 x 1,000,000 on the 2-core CPU, against 0.7 for 1000 x 1000).
_TILE_LIMIT_FACTOR = 4
_MIN_TILE_LIMIT = 16
_EAGER_WARMUP_SIDE = 256
# Compiled graphs kept per model class (each model: its tile shape, then one dynamic graph).
_RECOMPILE_LIMIT = 64


def compiled_for(module: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile of a folded image model, for ``device``. On CUDA in the forms
    inductor runs faster there (training.nets.folding.for_compile_on_cuda: 1.94 against
    2.87 ms for the paper-width style net at 1024 px on an H200), at static shapes: each
    new input size compiles afresh, as each gets its own CUDA graph. With dynamic shapes
    inductor failed on the space-to-depth layer (a sympy error) and compiled the traced
    output layer for minutes (CPU, torch 2.13, 27 Nov 2026). Elsewhere torch.compile's
    defaults."""
    if device.type == "cuda":
        # channels_last again for the layers the rewrite made (as the benchmark timed them)
        gpu_forms = for_compile_on_cuda(module).to(
            memory_format=torch.channels_last)  # type: ignore[call-overload]
        return torch.compile(gpu_forms, dynamic=False)  # type: ignore[return-value]
    return torch.compile(module)  # type: ignore[return-value]


def should_compile(mode: str, device: torch.device, cuda_graphs: bool) -> bool:
    """``--compile``: on, off, or auto = on CUDA without CUDA graphs. Graphs remove the
    kernel launch cost without compiling, and torch.compile recompiles for each new image
    size (27-35 s on an H200, inside that request), which graphs of the eager net never do."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--compile must be auto, on or off, got {mode!r}")
    return mode == "on" or (mode == "auto" and device.type == "cuda" and not cuda_graphs)


class PixelBudget:
    """The pixels (input plus output) of the image requests a server process holds at
    once, up to ``--max-inflight-mpixels``: the request queues bound how many requests
    wait, this bounds how much memory their images take (a few 64 MP images at once would
    outgrow a container's memory limit long before the queues fill). One request is
    always admitted, whatever its size."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.holders = 0

    def take(self, pixels: int) -> bool:
        if self.holders and self.in_use + pixels > self.limit:
            return False
        self.in_use += pixels
        self.holders += 1
        INFLIGHT_PIXELS.inc(pixels)
        return True

    def give(self, pixels: int) -> None:
        self.in_use -= pixels
        self.holders -= 1
        INFLIGHT_PIXELS.dec(pixels)

    def busy(self, pixels: int, retry_after_ms: int) -> Busy:
        """The answer to a request of ``pixels`` that :meth:`take` refused (a retry may
        succeed once a request in progress ends: ``retry_after_ms``)."""
        return Busy(f"the images in progress take {self.in_use / 1e6:.1f} of the "
                    f"{self.limit / 1e6:.0f} megapixels this server holds at once "
                    f"(--max-inflight-mpixels), and this one needs {pixels / 1e6:.1f} "
                    "more; retry with backoff", retry_after_ms=retry_after_ms,
                    reason="PIXEL_BUDGET_FULL")


#: One budget per server configuration object (a process runs one server; tests run
#: several), shared by every image model of that server; dropped with the config.
_BUDGETS: dict[int, PixelBudget] = {}


def pixel_budget(config: ServerConfig) -> PixelBudget:
    """The budget of the server that ``config`` configures."""
    key = id(config)
    if key not in _BUDGETS:
        _BUDGETS[key] = PixelBudget(config.max_inflight_mpixels * 1_000_000)
        weakref.finalize(config, _BUDGETS.pop, key, None)  # before the id can be reused
    return _BUDGETS[key]


class RequestSlot:
    """One of a model's ``--max-queue`` request slots (:meth:`TiledImageModel.admitted`).

    Work started through :meth:`to_thread` keeps the slot until it ends, even when the
    request is cancelled first: a thread decoding an image cannot be stopped, and without
    this a client that hangs up at once would free its slot for the next one while its
    decode still ran, so decodes would pile up past the slots."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release
        self._threads = 0
        self._closed = False
        #: what the image's header states, (0, 0) if it could not be read; and the pixels
        #: the request holds of the server's budget (TiledImageModel.admission)
        self.stated_size = (0, 0)
        self.pixels = 0

    async def to_thread(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``asyncio.to_thread``, holding the slot until ``function`` returns; like it,
        ``function`` runs in a copy of the caller's context variables, so that its log
        lines carry the call's request id. A call
        cancelled while it still waits for a thread (every thread of the executor busy)
        never runs ``function``, and its hold ends at once: cancelling the executor's future
        drops the work unrun, so no thread would ever say that it ended."""
        loop = asyncio.get_running_loop()
        lock = threading.Lock()  # who comes first: the thread starting, or the cancel
        started = given_up = False

        def run() -> T:
            nonlocal started
            with lock:
                if given_up:  # the caller left before a thread took it: do nothing
                    raise asyncio.CancelledError
                started = True
            try:
                return function(*args, **kwargs)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to free
                    loop.call_soon_threadsafe(self._thread_done)

        # in a copy of the call's context (its request id), as asyncio.to_thread runs it;
        # raises if the executor is shut down
        submitted = loop.run_in_executor(None, contextvars.copy_context().run, run)
        self._threads += 1
        try:
            return await submitted
        except asyncio.CancelledError:
            with lock:
                given_up = not started
            if given_up:  # no thread will run it, or call _thread_done
                self._thread_done()
            raise

    def _thread_done(self) -> None:
        self._threads -= 1
        self._release_if_done()

    def close(self) -> None:
        """The request is over; the slot is free once its threads are done too."""
        self._closed = True
        self._release_if_done()

    def _release_if_done(self) -> None:
        if self._closed and self._threads == 0 and self._release is not None:
            release, self._release = self._release, None
            release()


def _stated_size(data: bytes) -> tuple[int, int]:
    try:
        return probe_size(data)
    except InvalidArgument:
        return 0, 0


class TiledImageModel:
    """Runs ``artifact.module`` over images of any size in overlapping tiles."""

    def __init__(self, artifact: Artifact, device: torch.device, config: ServerConfig, *,
                 scale: int, tile: int, overlap: int, max_batch_pixels: int | None = None,
                 max_output_pixels: int | None = None, max_output_source: str = "",
                 min_side: int = 1) -> None:
        """``max_output_pixels``: the largest output a request may ask for, if any;
        ``max_output_source`` says where that cap comes from, for its error message.
        ``min_side``: the smallest input side the model takes."""
        self.artifact = artifact
        self.device = device
        self.scale = scale
        self.tile = tile
        self.overlap = overlap
        # fp16 on CUDA; on a CPU --cpu-dtype (bf16 where the CPU computes it natively,
        # services/common/device.py); channels_last everywhere (oneDNN and cuDNN both prefer
        # NHWC convs: 1.4x on a 2-core CPU for the SR net, benchmarks/README.md).
        self.dtype = serving_dtype(device, config.cpu_dtype)
        # Exact rewrites first (resize-convolution computed at the low resolution; 2.25x
        # fewer multiply-adds in the upsampling layers: training/nets/folding.py).
        module = fold_for_inference(artifact.module.eval())
        # In bf16 the layer reading the image stays fp32, and so does the input batch
        # (services/common/precision.py).
        module, self.input_dtype = to_serving_precision(module, self.dtype)
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        use_graphs = device.type == "cuda" and config.cuda_graphs
        use_compile = should_compile(config.compile, device, use_graphs)
        if use_compile:
            # dynamo keeps one cache per code object: every model of one class (all the
            # style nets share TransformerNet.forward) adds its shapes to it, and past
            # recompile_limit (8) dynamo runs eager without a word. A GPU benchmark hit
            # that with 8 nets and shapes (benchmarks/bench_style_gpu.py).
            torch._dynamo.config.recompile_limit = max(
                torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
        self.module = compiled_for(module, device) if use_compile else module
        # The fallback if compiling fails; on CUDA with for_compile_on_cuda's forms, which
        # compute the same function eagerly too.
        self.eager_module = module
        self.compiled = use_compile
        self._shapes_run: set[tuple[int, ...]] = set()  # a compiled model compiles each anew
        # CUDA graphs for recurring shapes: no per-kernel launch cost (services/common/
        # cuda_graphs.py).
        self.graphs: CudaGraphRunner | None = None
        if use_graphs:
            self.graphs = CudaGraphRunner(self.forward, artifact.name)
        self.queue_name = f"model-{artifact.name}"
        self.max_requests = config.max_queue
        self.active_requests = 0
        self.slot_seconds: float | None = None  # running mean of how long a slot is held
        self.pixels = pixel_budget(config)
        self.max_output_pixels = max_output_pixels
        self.max_output_source = max_output_source
        self.min_side = min_side
        side = math.isqrt(config.max_pixels)
        self.max_tiles = max(_MIN_TILE_LIMIT,
                             _TILE_LIMIT_FACTOR * TilePlan(side, side, tile, overlap).count)
        # Tiles per forward pass: --max-batch, and no more than max_batch_pixels of input
        # (bounds the activation memory of one pass; a batch of one always runs). Tiles
        # batch by shape, so small images batch up to --max-batch and full tiles fewer.
        self.max_batch = config.max_batch
        self.max_batch_pixels = max_batch_pixels
        self.batcher: MicroBatcher[np.ndarray, TileOutput] = MicroBatcher(
            self.queue_name, self.run_batch, max_batch=self.max_batch,
            max_wait_ms=config.max_wait_ms, max_queue=config.max_queue * _TILE_QUEUE_PER_REQUEST,
            batch_limit=None if max_batch_pixels is None else self.batch_limit,
            stall_seconds=config.stall_seconds or None)

    def batch_limit(self, shape: Hashable) -> int:
        """Tiles of ``shape`` (H, W, 3) within ``max_batch_pixels`` (the batcher keeps it
        between 1 and --max-batch)."""
        assert self.max_batch_pixels is not None
        height, width = cast(tuple[int, int, int], shape)[:2]
        return self.max_batch_pixels // (height * width)

    def run_batch(self, tiles: Sequence[np.ndarray]) -> list[TileOutput]:
        """uint8 (t, t, 3) tiles -> uint8 (t*s, t*s, 3) outputs, rounded on the device. On
        a CPU they are numpy arrays; on a GPU they stay there as tensors (the tiler blends
        overlaps there and copies back only finished rows of uint8)."""
        batch = torch.from_numpy(np.stack(tiles)).to(self.device).permute(0, 3, 1, 2)
        batch = batch.to(self.input_dtype).div_(255.0).contiguous(
            memory_format=torch.channels_last)
        with torch.inference_mode():
            output = self.graphs(batch) if self.graphs is not None else self.forward(batch)
            output = output.float().clamp_(0.0, 1.0).mul_(255.0).add_(0.5)
            output = output.to(torch.uint8).permute(0, 2, 3, 1)
        if self.device.type == "cpu":
            return list(output.numpy())
        # HWC-contiguous on the device: the copy back is then one plain block, with no
        # transposition left for the host
        return list(output.contiguous())

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The module on one batch. If torch.compile fails on a new shape (a compiler bug
        is no reason to fail the request), the model is served eager from then on."""
        shape = tuple(batch.shape)
        compiling = self.compiled and shape not in self._shapes_run
        self._shapes_run.add(shape)
        try:
            with self.batcher.running_long() if compiling else contextlib.nullcontext():
                return cast(torch.Tensor, self.module(batch))
        except torch._dynamo.exc.TorchDynamoException:
            if not self.compiled:
                raise
            log.exception("torch.compile failed for %s on a %s batch; serving it eager from "
                          "now on", self.artifact.name, tuple(batch.shape))
            self.module, self.compiled = self.eager_module, False
            return cast(torch.Tensor, self.module(batch))

    def _check_not_busy(self) -> None:
        if self.active_requests >= self.max_requests:
            REJECTED.labels(self.queue_name).inc()
            raise Busy(f"{self.artifact.name} is busy ({self.max_requests} "
                       "requests in progress); retry with backoff",
                       retry_after_ms=self.retry_after_ms)

    def check_tiles(self, width: int, height: int) -> None:
        """INVALID_ARGUMENT for an image that would take more tiles than one request may."""
        plan = TilePlan(height, width, self.tile, self.overlap)
        if plan.count > self.max_tiles:
            raise InvalidArgument(
                f"a {width}x{height} image takes {plan.count} tiles of {self.tile} px "
                f"({len(plan.rows)} x {len(plan.cols)}); one request may take "
                f"{self.max_tiles}: send a less elongated image, or cut it into parts",
                reason="IMAGE_TOO_MANY_TILES", field="image")

    @contextlib.asynccontextmanager
    async def admission(self, data: bytes, max_pixels: int) -> AsyncIterator[RequestSlot]:
        """Holds one of the model's ``--max-queue`` request slots from before the encoded
        image ``data``'s header is read until the block ends, and until the work the block
        started on threads through the slot has ended (run :meth:`apply` inside it with
        ``slot_held=True``). Refuses: RESOURCE_EXHAUSTED at once when no slot is free, or
        when the pixels the header states would take the server over its pixel budget;
        INVALID_ARGUMENT when they take too many tiles or make too large an output. An
        image that cannot be read, or is over ``max_pixels``, is left to decoding's precise
        errors. The header is read off the event loop (it walks every chunk before the
        pixels, which a crafted PNG or JPEG makes take seconds), and the slot is held while
        it is read, even for a client that hangs up; ``slot.stated_size`` is what it says."""
        slot = self._open_slot()
        try:
            size = await slot.to_thread(_stated_size, data)
            self._admit(slot, size, max_pixels)
            yield slot
        finally:
            slot.close()

    @contextlib.contextmanager
    def admitted(self, data: bytes, max_pixels: int) -> Iterator[RequestSlot]:
        """:meth:`admission` with the header read on the calling thread (callers without
        an event loop to keep free)."""
        slot = self._open_slot()
        try:
            self._admit(slot, _stated_size(data), max_pixels)
            yield slot
        finally:
            slot.close()

    def _open_slot(self) -> RequestSlot:
        self._check_not_busy()
        self.active_requests += 1
        REQUEST_SLOTS.labels(self.queue_name).inc()
        opened = time.monotonic()
        slot = RequestSlot(lambda: self._release_slot(slot.pixels, opened))
        return slot

    @property
    def retry_after_ms(self) -> int:
        """A busy answer's pushback: when a request in progress is likely to end and free
        its slot and pixels, from the running means of how long a slot is held (shared by
        the requests in progress) and of a batch of tiles (a large image holds its slot
        for many batches)."""
        batch = self.batcher.retry_after_ms
        if self.slot_seconds is None:
            return batch
        per_request = self.slot_seconds / max(1, self.active_requests) * 1e3
        return int(min(MAX_PUSHBACK_MS, max(batch, round(per_request))))

    def _admit(self, slot: RequestSlot, size: tuple[int, int], max_pixels: int) -> None:
        """The checks the stated ``size`` allows, and its pixels taken from the budget."""
        width, height = slot.stated_size = size
        self.check_min_side(width, height)
        if 0 < width * height <= max_pixels:
            self.check_tiles(width, height)
            self.check_output(width, height)  # a refusal no retry would change: not busy
            slot.pixels = self._take_pixels(width, height)

    def check_min_side(self, width: int, height: int) -> None:
        """INVALID_ARGUMENT for an image under the model's smallest side (0 x 0: unknown,
        left to decoding)."""
        if 0 < min(width, height) < self.min_side:
            raise InvalidArgument(f"image is {width}x{height}; the minimum is "
                                  f"{self.min_side}x{self.min_side}", reason="IMAGE_TOO_SMALL",
                                  field="image")

    def check_output(self, width: int, height: int) -> None:
        """INVALID_ARGUMENT when a ``width`` x ``height`` input's output would be over the
        model's output cap (``max_output_pixels``)."""
        output = width * height * self.scale ** 2
        if self.max_output_pixels is not None and output > self.max_output_pixels:
            source = f" ({self.max_output_source})" if self.max_output_source else ""
            raise InvalidArgument(f"the output would have {output} pixels, over the cap of "
                                  f"{self.max_output_pixels}{source}; send a smaller image",
                                  reason="RESULT_OVER_PIXEL_CAP", field="image")

    def _take_pixels(self, width: int, height: int) -> int:
        """Takes a ``width`` x ``height`` request's pixels (input plus output) from the
        process's budget, or refuses it as busy; returns what it took."""
        pixels = width * height * (1 + self.scale ** 2)
        if not self.pixels.take(pixels):
            REJECTED.labels(self.queue_name).inc()
            raise self.pixels.busy(pixels, self.retry_after_ms)
        return pixels

    def _release_slot(self, pixels: int, opened: float) -> None:
        self.slot_seconds = running_mean(self.slot_seconds, time.monotonic() - opened)
        self.active_requests -= 1
        REQUEST_SLOTS.labels(self.queue_name).dec()
        if pixels:
            self.pixels.give(pixels)

    async def apply(self, rgb: np.ndarray, deadline: float | None = None, *,
                    slot_held: bool = False) -> np.ndarray:
        """(H, W, 3) uint8 -> (H*s, W*s, 3) uint8. ``deadline`` is time.monotonic().
        ``slot_held``: the caller runs it inside :meth:`admitted`; otherwise it takes a
        request slot itself (or RESOURCE_EXHAUSTED)."""
        if not slot_held:
            self._check_not_busy()
        self.check_tiles(rgb.shape[1], rgb.shape[0])
        # an image of one tile goes ahead of the tiles of larger ones (batching.py): a
        # 64 px upscale waited 14 s behind 16 512 px ones (4 tiles of 272 px each)
        small = TilePlan(rgb.shape[0], rgb.shape[1], self.tile, self.overlap).count == 1
        pixels = 0 if slot_held else self._take_pixels(rgb.shape[1], rgb.shape[0])
        opened = time.monotonic()
        if not slot_held:
            self.active_requests += 1
            REQUEST_SLOTS.labels(self.queue_name).inc()
        try:
            async def process(tiles: Sequence[np.ndarray]) -> list[TileOutput]:
                outputs: list[TileOutput] = []
                for first in range(0, len(tiles), _TILE_QUEUE_PER_REQUEST):
                    timeout = None
                    if deadline is not None:
                        timeout = deadline - time.monotonic()
                        if timeout <= 0:  # dropped before compute, as in the queue
                            count_dropped(self.batcher.name, "deadline", current_call.get())
                            raise DeadlineExceeded(
                                "deadline exceeded; the remaining tiles were not computed")
                    submitted = [asyncio.ensure_future(
                        self.batcher.submit(t, key=t.shape, timeout=timeout, small=small))
                        for t in tiles[first:first + _TILE_QUEUE_PER_REQUEST]]
                    try:
                        outputs.extend(await asyncio.gather(*submitted))
                    except BaseException:  # one tile failed: the others are not wanted
                        for pending in submitted:
                            pending.cancel()
                        raise
                return outputs

            return await tiled_apply(rgb, process, scale=self.scale, tile=self.tile,
                                     overlap=self.overlap)
        finally:
            if not slot_held:
                self._release_slot(pixels, opened)

    async def warmup(self) -> None:
        """One forward pass before SERVING: of a full tile when compiled (compiling a shape
        takes tens of seconds, better before the first request than in it) or replayed from
        CUDA graphs (a second pass captures the full tile's graph: a shape is captured
        when it recurs), otherwise of a small one (loads the kernels; a full 1088 px style
        tile would add seconds on a CPU)."""
        side = (self.tile if self.compiled or self.graphs is not None
                else min(self.tile, _EAGER_WARMUP_SIDE))
        tile = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
        for _ in range(1 if self.graphs is None else 2):
            await asyncio.to_thread(self.run_batch, [tile])

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
