"""A model batch that hangs (a hung GPU) turns health NOT_SERVING, the service's for
readiness and the server's for liveness, and SERVING again once it ends; over real gRPC on
the committed super-resolution model, with its forward pass held on an event."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from percept.v1 import superres_pb2, superres_pb2_grpc
from services import client
from services.common.batching import MicroBatcher
from services.common.server import RunningServer, start_in_thread
from tests.conftest import encode, server_config

SERVICE = "percept.v1.SuperResolution"
STALL_SECONDS = 0.5


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = start_in_thread(server_config("superres", stall_seconds=STALL_SECONDS),
                              timeout=600)
    yield running
    running.stop()


def _wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_hung_batch_turns_health_not_serving_until_it_ends(server: RunningServer) -> None:
    module = server.server.modules[0]
    model = module.models[module.default]  # type: ignore[attr-defined]  # what Upscale runs
    release = threading.Event()
    real_module = model.module

    def hung(batch: torch.Tensor) -> torch.Tensor:
        release.wait(60)
        return real_module(batch)  # type: ignore[no-any-return]

    channel = client.connect(server.target)
    stub = superres_pb2_grpc.SuperResolutionStub(channel)
    image = encode(np.full((16, 16, 3), 90, np.uint8))
    model.module = hung
    try:
        call = stub.Upscale.future(superres_pb2.UpscaleRequest(image=image), timeout=60)
        assert _wait_for(lambda: client.health_status(channel, SERVICE) == "NOT_SERVING")
        assert client.health_status(channel, "") == "NOT_SERVING"  # the liveness probe's
        assert REGISTRY.get_sample_value("percept_queue_stalled",
                                         {"queue": model.queue_name}) == 1
    finally:
        release.set()
        model.module = real_module
    assert call.result(timeout=60).width == 64  # the stalled call itself completes
    assert _wait_for(lambda: client.health_status(channel, SERVICE) == "SERVING")
    assert client.health_status(channel, "") == "SERVING"
    assert REGISTRY.get_sample_value("percept_queue_stalled", {"queue": model.queue_name}) == 0
    assert stub.Upscale(superres_pb2.UpscaleRequest(image=image), timeout=60).width == 64


def _blocking_batcher(stall_seconds: float | None, release: threading.Event,
                      long: bool = False) -> MicroBatcher[int, int]:
    batcher: MicroBatcher[int, int]

    def process(items: Sequence[int]) -> list[int]:
        if long:
            with batcher.running_long():
                release.wait(30)
        else:
            release.wait(30)
        return list(items)

    batcher = MicroBatcher("test", process, max_batch=1, max_wait_ms=0, max_queue=4,
                           stall_seconds=stall_seconds)
    return batcher


@pytest.mark.parametrize("stall_seconds, long, stalls", [
    (0.2, False, True),
    (None, False, False),  # a Gatys optimisation: minutes by design
    (0.2, True, False),  # torch.compile of a new shape: minutes, once
])
def test_which_batches_count_as_stalled(stall_seconds: float | None, long: bool,
                                        stalls: bool) -> None:
    import asyncio

    async def run() -> tuple[float | None, float | None]:
        release = threading.Event()
        batcher = _blocking_batcher(stall_seconds, release, long)
        batcher.start()
        job = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.5)
        during = batcher.stalled_for()
        release.set()
        assert await job == 1
        after = batcher.stalled_for()
        await batcher.stop()
        return during, after

    during, after = asyncio.run(run())
    assert (during is not None) == stalls and after is None
    if stalls:
        assert during is not None and during > 0.2


def test_the_rest_of_a_batch_after_a_long_compile_counts_from_its_end() -> None:
    """A batch that compiled a new shape for longer than --stall-seconds is not stalled
    the moment the compile ends: its remaining work gets the full limit."""
    import asyncio

    async def run() -> float | None:
        compiled, release = threading.Event(), threading.Event()
        batcher: MicroBatcher[int, int]

        def process(items: Sequence[int]) -> list[int]:
            with batcher.running_long():
                time.sleep(0.6)  # compiling, twice the limit
            compiled.set()
            release.wait(30)  # running, well within the limit
            return list(items)

        batcher = MicroBatcher("test", process, max_batch=1, max_wait_ms=0, max_queue=4,
                               stall_seconds=0.3)
        batcher.start()
        job = asyncio.ensure_future(batcher.submit(1))
        await asyncio.to_thread(compiled.wait, 30)
        just_after = batcher.stalled_for()
        release.set()
        await job
        await batcher.stop()
        return just_after

    assert asyncio.run(run()) is None


class _FixedStall:
    """A batcher stand-in whose batch is stalled or not, as the test says."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stalled: float | None = None

    def stalled_for(self) -> float | None:
        return self.stalled


class _Module:
    def __init__(self, full_name: str, batcher: _FixedStall) -> None:
        self.full_name = full_name
        self._batcher = batcher

    def batchers(self) -> list[_FixedStall]:
        return [self._batcher]


def test_two_servers_of_one_queue_name_show_the_stall_of_either() -> None:
    """Two servers in one process (tests run several) each watch a queue of the same name:
    the gauge is 1 while either sees it stalled, not whichever looked last; a stopped
    watch leaves nothing stalled behind."""
    import asyncio

    from services.common.stall_watch import StallWatch

    queue = "t-two-watches"
    stuck, fine = _FixedStall(queue), _FixedStall(queue)

    async def noop(name: str, status: int) -> None:
        return None

    watches = [StallWatch([_Module("a", stuck)], 1.0, noop),  # type: ignore[list-item]
               StallWatch([_Module("b", fine)], 1.0, noop)]  # type: ignore[list-item]

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("percept_queue_stalled", {"queue": queue})

    async def run() -> None:
        stuck.stalled = 5.0
        await watches[0].update()
        await watches[1].update()  # sees its own batch fine: the stall stays shown
        assert gauge() == 1
        await watches[0].update()
        assert gauge() == 1
        stuck.stalled = None
        await watches[0].update()
        assert gauge() == 0
        stuck.stalled = 5.0
        await watches[0].update()
        task = asyncio.ensure_future(watches[0].run())
        await asyncio.sleep(0)
        task.cancel()  # the server stops while its queue is stalled
        await asyncio.gather(task, return_exceptions=True)
        assert gauge() == 0

    asyncio.run(run())


class _FailsOnce(_FixedStall):
    """Its first look fails (a batcher in a state the watch did not expect)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.looks = 0

    def stalled_for(self) -> float | None:
        self.looks += 1
        if self.looks == 1:
            raise RuntimeError("a look that failed")
        return self.stalled


def test_the_watch_looks_every_second_at_most_and_a_failed_look_does_not_stop_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """With the default --stall-seconds of 120 the batches are looked at every second
    (a hang is reported within a second of passing it), and a look that raises is logged
    and followed by the next, which still turns health NOT_SERVING."""
    import asyncio

    from services.common.config import ServerConfig
    from services.common.stall_watch import NOT_SERVING, StallWatch

    batcher = _FailsOnce("t-fails-once")
    health: list[tuple[str, int]] = []

    async def set_health(name: str, status: int) -> None:
        health.append((name, status))

    assert StallWatch([], ServerConfig.stall_seconds, set_health).period == 1.0
    watch = StallWatch([_Module("test.FailsOnce", batcher)],  # type: ignore[list-item]
                       0.1, set_health)
    assert watch.period == pytest.approx(0.05)  # not a loop that spins

    async def run() -> None:
        batcher.stalled = 5.0
        task = asyncio.ensure_future(watch.run())
        for _ in range(200):
            if health:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.ERROR):
        asyncio.run(run())
    assert batcher.looks >= 2
    assert ("test.FailsOnce", NOT_SERVING) in health and ("", NOT_SERVING) in health
    assert any(r.getMessage() == "checking the batches for stalls failed"
               for r in caplog.records)
