"""/metrics says what really happened: drops by their real reason, once per request, and
search's metrics only where search runs."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from percept.v1 import embed_pb2, embed_pb2_grpc
from services import client
from services.common.batching import MicroBatcher
from services.common.errors import DeadlineExceeded
from services.common.metrics import DEADLINE_SLACK_SECONDS, Call, current_call
from services.common.server import RunningServer, start_in_thread
from tests.conftest import REPO, encode, free_port, server_config, slow_header_reads


def dropped(queue: str, reason: str) -> float:
    return REGISTRY.get_sample_value("percept_dropped_total",
                                     {"queue": queue, "reason": reason}) or 0.0


def drops(queue: str) -> tuple[float, float]:
    """(deadline, cancelled) drops of ``queue`` so far."""
    return dropped(queue, "deadline"), dropped(queue, "cancelled")


class Gate:
    """A batch function that waits until it is opened, then doubles its items."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.computed: list[int] = []

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.open.wait(10)
        self.computed.extend(items)
        return [item * 2 for item in items]


# -- the batcher alone -----------------------------------------------------------------


def test_a_caller_gone_just_before_its_deadline_counts_as_a_deadline_drop() -> None:
    """The client's cancel at its deadline reaches the server a moment before the
    server's own deadline passes: within DEADLINE_SLACK_SECONDS it is a deadline drop."""
    gate = Gate()
    queue = "t-acc-slack"

    async def main() -> None:
        batcher = MicroBatcher(queue, gate, max_batch=1, max_wait_ms=0, max_queue=8)
        blocker = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        timed = asyncio.ensure_future(batcher.submit(2, timeout=1.0))
        await asyncio.sleep(1.0 - DEADLINE_SLACK_SECONDS / 2)  # before the deadline
        timed.cancel()
        await asyncio.gather(timed, return_exceptions=True)
        gate.open.set()
        assert await blocker == 2
        await batcher.stop()

    before = drops(queue)
    asyncio.run(main())
    assert drops(queue) == (before[0] + 1, before[1])
    assert gate.computed == [1]


def test_a_request_of_many_items_is_one_drop() -> None:
    """percept_dropped_total counts requests: the items one call submitted (its images or
    tiles) count once however many are dropped, by the first one's reason."""
    gate = Gate()
    queue = "t-acc-unit"

    async def main() -> None:
        batcher = MicroBatcher(queue, gate, max_batch=1, max_wait_ms=0, max_queue=64)
        blocker = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)

        async def request(items: int, timeout: float) -> list[int]:
            current_call.set(Call())  # as MetricsInterceptor does for each RPC
            jobs = [asyncio.ensure_future(batcher.submit(i, timeout=timeout))
                    for i in range(items)]
            try:
                return list(await asyncio.gather(*jobs))
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise

        expiring = [asyncio.ensure_future(request(8, 0.2)) for _ in range(2)]
        hung_up = asyncio.ensure_future(request(8, 60))
        await asyncio.sleep(0.05)
        hung_up.cancel()
        await asyncio.sleep(0.3)  # past the expiring ones' deadline, still queued
        gate.open.set()
        assert await blocker == 2
        for outcome in await asyncio.gather(*expiring, return_exceptions=True):
            assert isinstance(outcome, DeadlineExceeded)
        await asyncio.gather(hung_up, return_exceptions=True)
        await batcher.stop()

    before = drops(queue)
    asyncio.run(main())
    assert drops(queue) == (before[0] + 2, before[1] + 1)
    assert gate.computed == [1]


# -- through a real server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def embed_server() -> Iterator[RunningServer]:
    """An embedding server that computes one image at a time (--max-batch 1: a request
    takes at most 8 images)."""
    running = start_in_thread(server_config("embed", max_batch=1, max_wait_ms=0,
                                            metrics_port=free_port()), timeout=900)
    yield running
    running.stop()


@pytest.fixture()
def blocked_embedder(embed_server: RunningServer) -> Iterator[Callable[[], None]]:
    """The embed-images batch function waits until the returned function is called, so
    that what is submitted after the first image stays queued."""
    batcher = embed_server.server.modules[0].batcher
    compute = batcher._process
    gate = threading.Event()

    def held(jobs: Sequence[Any]) -> Any:
        gate.wait(60)
        return compute(jobs)

    batcher._process = held
    try:
        yield gate.set
    finally:
        gate.set()
        batcher._process = compute


def _wait_for(condition: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _scrape(running: RunningServer) -> str:
    port = running.server.config.metrics_port
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                  timeout=5).read().decode()


def _sample(text: str, name: str, labels: str) -> float:
    """A sample's value in the /metrics text (0 when it is not there)."""
    prefix = f"{name}{{{labels}}} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def _embed_drops(running: RunningServer) -> tuple[float, float]:
    text = _scrape(running)
    return tuple(_sample(text, "percept_dropped_total", f'queue="embed-images",reason="{r}"')
                 for r in ("deadline", "cancelled"))  # type: ignore[return-value]


def test_embed_requests_expiring_in_the_queue_are_deadline_drops_once_each(
        embed_server: RunningServer, blocked_embedder: Callable[[], None],
        small_photo: np.ndarray) -> None:
    """Two EmbedImages requests of 8 images whose deadline passes while they are queued
    are 2 drops with reason "deadline" on /metrics (the audit saw 16 "cancelled"); one
    whose client hangs up is 1 "cancelled". Reading their images takes a second first:
    the queue's deadline must still be the call's (it was the time left before the read,
    counted from after it, so every embed deadline drop was "cancelled")."""
    batcher = embed_server.server.modules[0].batcher
    stub = embed_pb2_grpc.EmbeddingStub(client.connect(embed_server.target))
    image = encode(small_photo)
    before = _embed_drops(embed_server)
    depth = batcher.depth
    blocker = stub.EmbedImages.future(embed_pb2.EmbedImagesRequest(images=[image]),
                                      timeout=120)
    _wait_for(lambda: batcher.depth == depth + 1, "the first image never reached the model")

    eight = embed_pb2.EmbedImagesRequest(images=[image] * 8)
    slow = encode(small_photo[::-1])
    slowly_read = embed_pb2.EmbedImagesRequest(images=[slow] + [image] * 7)
    with slow_header_reads(slow, seconds=0.5):
        expiring = [stub.EmbedImages.future(slowly_read, timeout=3.0) for _ in range(2)]
        for call in expiring:
            with pytest.raises(grpc.RpcError) as error:
                call.result(60)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_for(lambda: batcher.depth == depth + 1, "the expired images kept their places")
    _wait_for(lambda: _embed_drops(embed_server) != before, "no drop was counted")
    time.sleep(0.2)  # any late count shows too
    assert _embed_drops(embed_server) == (before[0] + 2, before[1])

    hung_up = stub.EmbedImages.future(eight, timeout=120)
    _wait_for(lambda: batcher.depth == depth + 9, "the hung-up request never queued")
    hung_up.cancel()
    _wait_for(lambda: batcher.depth == depth + 1, "the hung-up request kept its places")
    time.sleep(0.2)
    assert _embed_drops(embed_server) == (before[0] + 2, before[1] + 1)

    blocked_embedder()
    assert len(blocker.result(60).embeddings) == 1
    assert batcher.depth == depth


# -- which process exports what ----------------------------------------------------------


def test_a_superres_process_exports_its_models_and_no_search_metric() -> None:
    """A superres-only server's /metrics has no percept_search_* series (an alert on
    percept_search_embedding_served == 0 fired on every non-search pod); it has its
    version and one percept_model_info series per model it serves, as ServerInfo lists
    them, which its stop takes out again."""
    port = free_port()
    script = textwrap.dedent(f"""
        import urllib.request
        from pathlib import Path
        from services.common.config import ServerConfig
        from services.common.server import start_in_thread

        config = ServerConfig(service="superres", host="127.0.0.1", port=0,
                              metrics_port={port}, log_format="text", device="cpu",
                              models_dir=Path({str(REPO / "models")!r}), warmup=False)
        running = start_in_thread(config, timeout=300)
        try:
            print(urllib.request.urlopen("http://127.0.0.1:{port}/metrics",
                                         timeout=10).read().decode())
        finally:
            running.stop()
        from prometheus_client import REGISTRY, generate_latest
        print("--- stopped ---")
        print(generate_latest(REGISTRY).decode())
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRPC_VERBOSITY": "ERROR",
           "PERCEPT_GIT_SHA": "0123abc"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    serving, _, stopped = done.stdout.partition("--- stopped ---")
    assert "# TYPE percept_inflight_requests gauge" in serving  # the metrics page
    assert "percept_search" not in done.stdout
    version = importlib.metadata.version("percept")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(serving) for s in family.samples}
    assert samples[("percept_build_info", (("revision", "0123abc"),
                                           ("version", version)))] == 1.0
    # the series alerts read exist from the start, at 0: rate() then counts the first one
    for code in ("INTERNAL", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"):
        key = ("percept_requests_total", (("grpc_code", code), ("grpc_method", "Upscale"),
                                          ("grpc_service", "percept.v1.SuperResolution")))
        assert samples.get(key) == 0.0, code
    for queue in ("server-calls", "client-share", "model-superres-perceptual"):
        assert samples.get(("percept_rejected_total", (("queue", queue),))) == 0.0, queue
    assert samples.get(("percept_dropped_total", (("queue", "model-superres-perceptual"),
                                                  ("reason", "deadline")))) == 0.0
    service = "percept.v1.SuperResolution"
    models = sorted(p.name for p in (REPO / "models").iterdir()
                    if p.name.startswith("superres-"))
    served = sorted(
        (m["model"], m["default"]) for m in _info_series(serving, "percept_model_info"))
    assert [name for name, _ in served] == models
    assert [name for name, default in served if default == "true"] == ["superres-perceptual"]
    for labels in _info_series(serving, "percept_model_info"):
        assert labels["grpc_service"] == service and labels["version"].isdigit()
    assert _info_series(stopped, "percept_model_info") == []


def _info_series(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of an info metric's series that have the value 1."""
    return [sample.labels for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name and sample.value == 1]
