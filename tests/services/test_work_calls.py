"""The model-service calls a server runs (services/common/server.py, WorkCalls), through a
real server core on loopback hosting a test service whose calls wait until the test lets
them finish: at most --max-concurrent-rpcs at once, one more answered busy before its
request is read (health checks unaffected); the calls still running when the drain's grace
ends answered UNAVAILABLE with the reason and their request ids; and the memory freed
after a large request given back."""

from __future__ import annotations

import asyncio
import queue
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from services import client
from services.common.errors import RETRY_PUSHBACK_KEY
from services.common.request_ids import REQUEST_ID_KEY
from services.common.rpc import stream_errors, unary_errors
from services.common.server import (
    LARGE_REQUEST_BYTES,
    RunningServer,
    ServiceModule,
    WorkCalls,
    start_in_thread,
)
from services.retries import retrying
from tests.conftest import REPO, is_pushback, server_config

SERVICE = "test.Slow"


class SlowModule(ServiceModule):
    """``test.Slow``: ``Wait`` (unary) and ``Ticks`` (a response stream) run until the test
    sets :attr:`release`; counts the request messages it parsed and the calls it saw end
    in a cancellation."""

    name = "slow"
    full_name = SERVICE

    def __init__(self) -> None:
        super().__init__(server_config("all"))
        self.release = threading.Event()
        self.started: queue.Queue[bytes] = queue.Queue()
        self.parsed = 0
        self.cancelled = 0

    def _parse(self, data: bytes) -> bytes:
        self.parsed += 1
        return data

    async def _hold(self, request: bytes) -> None:
        self.started.put(request)
        try:
            while not self.release.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    @unary_errors
    async def wait(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._hold(request)
        return b"done:" + request

    @stream_errors
    async def ticks(self, request: bytes, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[bytes]:
        yield b"tick"
        await self._hold(request)
        yield b"done:" + request

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Wait": grpc.unary_unary_rpc_method_handler(self.wait,
                                                        request_deserializer=self._parse),
            "Ticks": grpc.unary_stream_rpc_method_handler(self.ticks,
                                                          request_deserializer=self._parse),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture()
def slow() -> SlowModule:
    return SlowModule()


def _start(module: SlowModule, **config: object) -> RunningServer:
    return start_in_thread(server_config("all", **config), modules=[module])


def _reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin trailer"
    assert status.message == error.details()
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    return str(info.reason)


def _trailer(error: grpc.RpcError, key: str) -> Any:
    return dict(error.trailing_metadata() or ()).get(key)  # type: ignore[attr-defined]


def _wait_started(module: SlowModule, count: int) -> list[bytes]:
    return [module.started.get(timeout=30) for _ in range(count)]


def test_a_call_past_the_limit_is_busy_before_its_request_is_read(slow: SlowModule) -> None:
    running = _start(slow, max_concurrent_rpcs=2)
    channel = client.connect(running.target)
    wait = channel.unary_unary(f"/{SERVICE}/Wait")
    try:
        held = [wait.future(f"held-{i}".encode(), timeout=60) for i in range(2)]
        _wait_started(slow, 2)
        with pytest.raises(grpc.RpcError) as refused:
            wait(b"third", timeout=30, metadata=((REQUEST_ID_KEY, "third-call"),))
        error = refused.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 concurrent calls (--max-concurrent-rpcs)" in error.details()
        assert _reason(error) == "QUEUE_FULL"
        assert is_pushback(_trailer(error, RETRY_PUSHBACK_KEY))  # the CLI retries it
        assert _trailer(error, REQUEST_ID_KEY) == "third-call"
        assert slow.parsed == 2, "the refused call's request was read"
        # health checks, reflection and ServerInfo are not work: answered all the same
        assert client.health_status(channel, "") == "SERVING"
        assert client.health_status(channel, SERVICE) == "SERVING"
        assert client.server_info(channel).ready
        slow.release.set()
        assert [call.result(30) for call in held] == [b"done:held-0", b"done:held-1"]
        assert wait(b"after", timeout=30) == b"done:after"  # the slots came back
    finally:
        slow.release.set()
        channel.close()
        running.stop()


def _unavailable_count(method: str) -> float:
    return REGISTRY.get_sample_value("percept_requests_total", {
        "grpc_service": SERVICE, "grpc_method": method, "grpc_code": "UNAVAILABLE"}) or 0.0


def test_calls_the_drain_grace_runs_out_on_are_unavailable_with_reason_and_request_id(
        slow: SlowModule) -> None:
    """Before: gRPC's stop cancelled them at the grace's end, "UNAVAILABLE: Cancelling
    all calls", with no trailers at all."""
    running = _start(slow, drain_seconds=20.0)
    channel = client.connect(running.target)
    counted = {method: _unavailable_count(method) for method in ("Wait", "Ticks")}
    try:
        unary = channel.unary_unary(f"/{SERVICE}/Wait").future(
            b"u", timeout=60, metadata=((REQUEST_ID_KEY, "unary-call"),))
        stream = channel.unary_stream(f"/{SERVICE}/Ticks")(
            b"s", timeout=60, metadata=((REQUEST_ID_KEY, "stream-call"),))
        assert next(stream) == b"tick"
        _wait_started(slow, 2)
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(1.5, "SIGTERM"),
                                                    running.loop)
        errors = []
        with pytest.raises(grpc.RpcError) as ended:
            unary.result(30)
        errors.append((ended.value, "unary-call"))
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        errors.append((ended.value, "stream-call"))
        for error, request_id in errors:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details() == (
                "the server is shutting down (SIGTERM); the call did not finish within the "
                "1.5 s drain grace (--drain-seconds): retry")
            assert _reason(error) == "SERVER_DRAINING"
            assert _trailer(error, REQUEST_ID_KEY) == request_id
        stopping.result(30)
        assert slow.cancelled == 2  # their work was stopped, not left running
        for method, before in counted.items():
            assert _unavailable_count(method) == before + 1
        # a client that retries an unavailable server (folder runs) takes it as such
        tries = iter([errors[0][0]])

        def call() -> str:
            for error in tries:
                raise error
            return "served by another replica"

        assert retrying(call, patience=5, retry_unavailable=True,
                        wait=lambda seconds: None) == "served by another replica"
    finally:
        slow.release.set()
        channel.close()
        running.loop.call_soon_threadsafe(running.loop.stop)
        running.thread.join(30)


def test_a_call_that_ends_within_the_grace_is_served(slow: SlowModule) -> None:
    running = _start(slow)
    channel = client.connect(running.target)
    try:
        call = channel.unary_unary(f"/{SERVICE}/Wait").future(b"x", timeout=60)
        _wait_started(slow, 1)
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(10.0), running.loop)
        time.sleep(0.3)
        slow.release.set()
        assert call.result(30) == b"done:x"
        stopping.result(30)
    finally:
        slow.release.set()
        channel.close()
        running.loop.call_soon_threadsafe(running.loop.stop)
        running.thread.join(30)


class _Echo:
    @unary_errors
    async def echo(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return str(len(request)).encode()


@pytest.fixture()
def echo_server() -> Iterator[tuple[grpc.Channel, list[str]]]:
    """A grpc.aio server with WorkCalls alone, whose release_memory records its runs."""
    released: list[str] = []
    ready: queue.Queue[tuple[int, asyncio.AbstractEventLoop, asyncio.Event]] = queue.Queue()

    def serve() -> None:
        async def main() -> None:
            work = WorkCalls(4, release_memory=lambda: released.append("released"))
            server = grpc.aio.server(interceptors=[work], options=[
                ("grpc.max_receive_message_length", 64 << 20)])
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_Echo().echo)}),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            done = asyncio.Event()
            ready.put((port, asyncio.get_running_loop(), done))
            await done.wait()
            await server.stop(None)

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port, loop, done = ready.get(timeout=30)
    channel = client.connect(f"127.0.0.1:{port}")
    yield channel, released
    channel.close()
    loop.call_soon_threadsafe(done.set)
    thread.join(30)


def test_memory_is_given_back_after_a_large_request_only(
        echo_server: tuple[grpc.Channel, list[str]]) -> None:
    channel, released = echo_server
    echo = channel.unary_unary("/test.Echo/Echo")
    assert echo(b"x" * 1000, timeout=30) == b"1000"
    time.sleep(0.2)
    assert released == []
    assert echo(b"x" * LARGE_REQUEST_BYTES, timeout=30) == str(LARGE_REQUEST_BYTES).encode()
    for _ in range(100):
        if released:
            break
        time.sleep(0.05)
    assert released == ["released"]


def test_release_free_memory_returns_what_retained_memory_freed() -> None:
    """glibc's malloc_trim through allocator.release_free_memory, in a process of its own
    with --retain-memory's settings: blocks freed below the top of the heap are
    released (True)."""
    script = """
import ctypes, sys
from services.common.allocator import release_free_memory, retain_freed_memory, retaining
assert retain_freed_memory() and retaining()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(8 << 20) for _ in range(16)]
for block in blocks[:-1]:  # the last keeps the others below the top of the heap
    ctypes.memset(block, 1, 8 << 20)
    libc.free(block)
print(release_free_memory())
"""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


class _FailsOnce(ServiceModule):
    """A model service whose first batch raises (as a CUDA out-of-memory would)."""

    name = "fails-once"
    full_name = "test.FailsOnce"

    def __init__(self) -> None:
        from services.common.batching import MicroBatcher
        from tests.conftest import server_config

        super().__init__(server_config("all"))
        self.failed = False
        self.batcher: MicroBatcher[bytes, bytes] = MicroBatcher(
            "fails-once", self._process, max_batch=1, max_wait_ms=0, max_queue=8)

    def _process(self, items: Sequence[bytes]) -> list[bytes]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("CUDA out of memory (simulated)")
        return [b"ok:" + item for item in items]

    @unary_errors
    async def run(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return bytes(await self.batcher.submit(request))

    def batchers(self) -> list[Any]:
        return [self.batcher]

    async def close(self) -> None:
        await self.batcher.stop()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            self.full_name, {"Run": grpc.unary_unary_rpc_method_handler(self.run)}),))


def test_a_failed_batch_leaves_the_model_answering() -> None:
    """The error of a failed batch reaches its caller through a future, with the batcher's
    suspended loop in its traceback: letting go of an answered call's frames must not
    clear that one (it would close the loop, and every later call would wait out its
    deadline). The failed batch's time is counted like any other's."""
    from prometheus_client import REGISTRY

    from tests.conftest import server_config

    module = _FailsOnce()
    running = start_in_thread(server_config("all"), modules=[module])

    def timed() -> float:
        value = REGISTRY.get_sample_value("percept_batch_seconds_count",
                                          {"queue": "fails-once"})
        assert value is not None  # the series is there before the first batch
        return value - before

    before = 0.0
    try:
        before = timed()
        channel = client.connect(running.target)
        run = channel.unary_unary("/test.FailsOnce/Run")
        with pytest.raises(grpc.RpcError) as failed:
            run(b"x", timeout=10)
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert timed() == 1
        assert [run(b"y", timeout=10), run(b"z", timeout=10)] == [b"ok:y", b"ok:z"]
        assert timed() == 3
        channel.close()
    finally:
        running.stop()
