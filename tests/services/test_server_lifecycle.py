"""A server core's life, on a real server on loopback hosting the slow test service of
test_work_calls.py: warm-up as --warmup says; the drain's log line counting the calls in
flight; a call that arrives once the drain began refused as draining; the calls still
running answered a second before the grace ends, not sooner; the in-flight gauge back to
where it was after each call; a call whose request never came left out of the request
counts; and a reply over --max-message-mb refused by gRPC's own send limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services import client
from services.common.server import PerceptServer, RunningServer
from tests.services.test_work_calls import SERVICE, SlowModule, _reason, _start, _wait_started


class CountingModule(SlowModule):
    """The slow test service, counting its warm-ups."""

    def __init__(self) -> None:
        super().__init__()
        self.warmups = 0

    async def warmup(self) -> None:
        self.warmups += 1


def _end(running: RunningServer, module: SlowModule, channel: grpc.Channel,
         stopping: concurrent.futures.Future[None] | None = None) -> None:
    """Ends the test's server and its loop: the stop the test began (``stopping``),
    waited for even where the test failed before it ended, or else a stop of its own."""
    module.release.set()
    channel.close()
    if stopping is None:
        running.stop()
        return
    with contextlib.suppress(Exception):
        stopping.result(60)
    running.loop.call_soon_threadsafe(running.loop.stop)
    running.thread.join(30)


@pytest.mark.parametrize("warmup, expected", [(True, 1), (False, 0)])
def test_each_module_is_warmed_up_once_unless_warmup_is_off(warmup: bool,
                                                             expected: int) -> None:
    module = CountingModule()
    running = _start(module, warmup=warmup)
    try:
        assert module.warmups == expected
    finally:
        running.stop()


def test_the_drain_logs_the_calls_in_flight(caplog: pytest.LogCaptureFixture) -> None:
    """Two work calls; health calls are no work, neither counted nor taken off."""
    slow = SlowModule()
    running = _start(slow)
    channel = client.connect(running.target)
    stopping: concurrent.futures.Future[None] | None = None
    try:
        calls = [channel.unary_unary(f"/{SERVICE}/Wait").future(b"x", timeout=60)
                 for _ in range(2)]
        _wait_started(slow, 2)
        assert client.health_status(channel) == "SERVING"  # one that ended, and one open:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with caplog.at_level(logging.INFO, logger="percept.server"):
            stopping = asyncio.run_coroutine_threadsafe(running.server.stop(10.0),
                                                        running.loop)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(
                    record.getMessage() == "draining" for record in list(caplog.records)):
                time.sleep(0.01)
            slow.release.set()
            assert [call.result(30) for call in calls] == [b"done:x"] * 2
            stopping.result(30)
        [draining] = [record for record in caplog.records if record.getMessage() == "draining"]
        assert draining.in_flight == 2 and draining.grace_seconds == 10.0  # type: ignore[attr-defined]
    finally:
        _end(running, slow, channel, stopping)


def test_a_call_that_arrives_once_the_drain_began_is_refused_as_draining(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The drain says NOT_SERVING, then stops gRPC's server, whose GOAWAY sends new
    calls elsewhere; a call that comes in between meets the closed gate: UNAVAILABLE,
    SERVER_DRAINING, never served by a server on its way out."""
    slow = SlowModule()
    slow.release.set()  # a call that got through would be served at once
    running = _start(slow)
    channel = client.connect(running.target)
    late: list[grpc.RpcError | bytes] = []
    stop_server = PerceptServer._stop_server

    def call_late() -> None:
        try:
            late.append(channel.unary_unary(f"/{SERVICE}/Wait")(b"late", timeout=30))
        except grpc.RpcError as error:
            late.append(error)

    async def stop_after_a_late_call(self: PerceptServer, server: grpc.aio.Server,
                                     grace: float, cause: str | None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, call_late)
        await stop_server(self, server, grace, cause)

    stopping: concurrent.futures.Future[None] | None = None
    try:
        assert channel.unary_unary(f"/{SERVICE}/Wait")(b"early", timeout=30) == b"done:early"
        monkeypatch.setattr(PerceptServer, "_stop_server", stop_after_a_late_call)
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(5.0), running.loop)
        stopping.result(60)
        [error] = late
        assert isinstance(error, grpc.RpcError), error
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert error.details() == "the server is shutting down; retry on another replica"
        assert _reason(error) == "SERVER_DRAINING"
    finally:
        _end(running, slow, channel, stopping)


def test_calls_still_running_are_answered_a_second_before_the_grace_ends() -> None:
    """A 3 s grace: the answer goes out at 2 s (DRAIN_ANSWER_SECONDS before the end), in
    time for its trailers to beat gRPC's own cancellation, and not sooner: the call had
    those 2 s to finish."""
    slow = SlowModule()
    running = _start(slow)
    channel = client.connect(running.target)
    stopping: concurrent.futures.Future[None] | None = None
    try:
        call = channel.unary_unary(f"/{SERVICE}/Wait").future(b"x", timeout=60)
        _wait_started(slow, 1)
        started = time.monotonic()
        stopping = asyncio.run_coroutine_threadsafe(running.server.stop(3.0), running.loop)
        with pytest.raises(grpc.RpcError) as ended:
            call.result(30)
        answered_after = time.monotonic() - started
        assert _reason(ended.value) == "SERVER_DRAINING"
        assert 1.95 <= answered_after < 3.0, answered_after
        stopping.result(30)
    finally:
        _end(running, slow, channel, stopping)


def _inflight() -> float:
    return REGISTRY.get_sample_value("percept_inflight_requests",
                                     {"grpc_service": SERVICE}) or 0.0


def _counted(code: str) -> float:
    return REGISTRY.get_sample_value("percept_requests_total", {
        "grpc_service": SERVICE, "grpc_method": "Wait", "grpc_code": code}) or 0.0


CODES = ("OK", "CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNKNOWN")


def test_the_inflight_gauge_counts_a_call_while_it_runs_and_goes_back_after() -> None:
    slow = SlowModule()
    running = _start(slow)
    channel = client.connect(running.target)
    try:
        before = _inflight()
        call = channel.unary_unary(f"/{SERVICE}/Wait").future(b"x", timeout=60)
        _wait_started(slow, 1)
        assert _inflight() == before + 1
        slow.release.set()
        assert call.result(30) == b"done:x"
        deadline = time.monotonic() + 10  # the handler's finally runs after the answer
        while _inflight() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _inflight() == before
    finally:
        _end(running, slow, channel)


def test_a_call_whose_request_never_came_is_not_counted() -> None:
    """A request over --max-message-mb: gRPC refuses it (RESOURCE_EXHAUSTED) and the
    handler, which reads the request itself, finds none. No handler ever ran for such a
    call before the server read requests itself, so none is counted, under any code."""
    slow = SlowModule()
    running = _start(slow, max_message_mb=1)
    channel = client.connect(running.target)
    try:
        before = {code: _counted(code) for code in CODES}
        inflight = _inflight()
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(f"/{SERVICE}/Wait")(b"\x00" * (2 << 20), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        slow.release.set()
        assert channel.unary_unary(f"/{SERVICE}/Wait")(b"y", timeout=30) == b"done:y"
        deadline = time.monotonic() + 10  # the handlers' finally blocks run after the answers
        while _inflight() != inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # and a count that was coming would have come
        assert {code: _counted(code) - before[code] for code in CODES} == {
            "OK": 1, "CANCELLED": 0, "DEADLINE_EXCEEDED": 0, "RESOURCE_EXHAUSTED": 0,
            "UNKNOWN": 0}
        assert _inflight() == inflight and slow.parsed == 1
    finally:
        _end(running, slow, channel)


class LargeReplyModule(SlowModule):
    """``Wait`` answers ``request`` repeated a million times."""

    async def wait(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request * 1_000_000


def test_a_reply_over_the_message_limit_is_refused_by_grpc_and_the_server_goes_on() -> None:
    """The services check their replies' size themselves (RESULT_TOO_LARGE); gRPC's send
    limit is the backstop for a reply that got past them."""
    module = LargeReplyModule()
    running = _start(module, max_message_mb=1)
    channel = client.connect(running.target)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(f"/{SERVICE}/Wait")(b"ab", timeout=30)  # 2 MB
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (refused.value.details() or "")
        assert len(channel.unary_unary(f"/{SERVICE}/Wait")(b"a", timeout=30)) == 1_000_000
    finally:
        _end(running, module, channel)
