"""Every failed call is one log line that its request id finds (README, "Request ids" and
"Logs"): over real gRPC on loopback, with the server's own log configuration
(services.common.logs) writing into a buffer. A client's report ("request 3f2a...
failed") finds the line, with the status code, the ErrorInfo reason and the field; busy
refusals and hang-ups are DEBUG, a successful call writes nothing at INFO; the lines a
call's worker threads write carry its id too; and an id a client chose cannot forge
fields in the text format."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import threading
import time
import types
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import empty_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from percept.v1 import style_pb2, style_pb2_grpc, superres_pb2, superres_pb2_grpc
from services.common.logs import TextFormatter, configure_logging
from services.common.rpc import MAX_LOGGED_DETAIL_BYTES, log_failed_call, unary_errors
from services.common.server import RunningServer, ServiceModule, start_in_thread
from services.common.stall_watch import StallWatch
from tests.conftest import encode, pixel_budget_full, server_config

#: A request id that, written bare into a text line, would read as four fields more.
FORGED_ID = "r1 level=error logger=percept.auth msg=login_failed"


# -- the server's log, as `percept serve` configures it, into a buffer ---------------------


@contextlib.contextmanager
def server_log(log_format: str = "json", level: str = "debug") -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, root_level, showwarning = root.handlers[:], root.level, warnings.showwarning
    stream = io.StringIO()
    configure_logging(log_format, level, stream)
    try:
        yield stream
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        logging.captureWarnings(False)
        warnings.showwarning = showwarning


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _of(stream: io.StringIO, request_id: str) -> list[dict[str, Any]]:
    """The lines that carry ``request_id``."""
    return [line for line in _lines(stream) if line.get("request_id") == request_id]


def _failed(stream: io.StringIO, request_id: str) -> list[dict[str, Any]]:
    """The failed-call lines that carry ``request_id`` (at DEBUG, the libraries' own lines
    of the call carry it too: Pillow's as it reads the image, say)."""
    return [line for line in _of(stream, request_id)
            if line["msg"] in ("call failed", "unhandled error")]


def _wait(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _calls_ended(running: RunningServer) -> None:
    """Waits until no work call is in progress: a call's handler (and what it logs as it
    ends) may finish just after its client has the answer."""
    assert _wait(lambda: running.server._interceptor.active_work == 0)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _error_info(error: grpc.RpcError) -> tuple[str, str | None]:
    """The ErrorInfo reason and the BadRequest field of a failed call, as a client reads
    them."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    reason, field = "", None
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            field = bad.field_violations[0].field
    return reason, field


def _fail(call: Callable[..., Any], request: Any, request_id: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=60, metadata=[("x-request-id", request_id)])
    return error.value


# -- the committed models' services ---------------------------------------------------------


def _upscale(channel: grpc.Channel) -> Callable[..., Any]:
    return superres_pb2_grpc.SuperResolutionStub(channel).Upscale  # type: ignore[no-any-return]


def _stylize(channel: grpc.Channel) -> Callable[..., Any]:
    return style_pb2_grpc.StyleTransferStub(channel).Stylize  # type: ignore[no-any-return]


@pytest.mark.parametrize("rpc", ["Upscale", "Stylize"])
def test_a_failed_call_is_one_line_with_its_id_code_and_reason(
        all_server: RunningServer, small_photo: np.ndarray, rpc: str) -> None:
    request_id = _new_id(f"client-{rpc}")
    # a plain channel: no retry policy that would send the call again
    with server_log(level="info") as log, grpc.insecure_channel(all_server.target) as channel:
        if rpc == "Upscale":
            error = _fail(_upscale(channel), superres_pb2.UpscaleRequest(
                image=b"these bytes are no image"), request_id)
        else:
            error = _fail(_stylize(channel), style_pb2.StylizeRequest(
                image=encode(small_photo), style="x" * 5000), request_id)
        _calls_ended(all_server)
    assert dict(error.trailing_metadata())["x-request-id"] == request_id  # type: ignore[attr-defined]
    reason, field = _error_info(error)
    [line] = _of(log, request_id)
    assert line["msg"] == "call failed" and line["logger"] == "percept.rpc"
    assert line["level"] == "info"
    assert line["method"] == rpc and line["code"] == error.code().name
    assert line["code"] == ("INVALID_ARGUMENT" if rpc == "Upscale" else "NOT_FOUND")
    assert line["reason"] == reason and reason not in ("", line["code"])
    assert line["field"] == field == ("image" if rpc == "Upscale" else "style")
    details = error.details()
    assert line["detail"] == details or line["detail"].startswith(details[:100])
    assert len(line["detail"]) <= MAX_LOGGED_DETAIL_BYTES


def test_a_busy_refusal_is_a_debug_line(all_server: RunningServer,
                                        small_photo: np.ndarray) -> None:
    """Under overload busy answers come by the thousand a second, each counted in the
    metrics: their lines are DEBUG, below the default --log-level info."""
    request = superres_pb2.UpscaleRequest(image=encode(small_photo))
    found = {}
    for level in ("debug", "info"):
        request_id = _new_id(f"busy-{level}")
        with server_log(level=level) as log, pixel_budget_full(all_server), \
                grpc.insecure_channel(all_server.target) as channel:
            error = _fail(_upscale(channel), request, request_id)
            _calls_ended(all_server)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        found[level] = _failed(log, request_id)
    [line] = found["debug"]
    assert (line["level"], line["code"], line["reason"]) == (
        "debug", "RESOURCE_EXHAUSTED", "PIXEL_BUDGET_FULL")
    assert found["info"] == []


def test_successful_calls_write_no_info_line(all_server: RunningServer,
                                             small_photo: np.ndarray) -> None:
    from tests.style.committed import FIRST

    ids = [_new_id("fine-upscale"), _new_id("fine-stylize")]
    with server_log(level="info") as log, grpc.insecure_channel(all_server.target) as channel:
        _upscale(channel)(superres_pb2.UpscaleRequest(image=encode(small_photo)), timeout=120,
                          metadata=[("x-request-id", ids[0])])
        _stylize(channel)(style_pb2.StylizeRequest(image=encode(small_photo), style=FIRST),
                          timeout=120, metadata=[("x-request-id", ids[1])])
        _calls_ended(all_server)
    assert [line for line in _lines(log) if line.get("request_id") in ids] == []


def test_a_malformed_request_is_logged_with_its_id(all_server: RunningServer) -> None:
    request_id = _new_id("malformed")
    with server_log(level="info") as log, grpc.insecure_channel(all_server.target) as channel:
        call = channel.unary_unary("/percept.v1.SuperResolution/Upscale",
                                   request_serializer=lambda data: data,
                                   response_deserializer=lambda data: data)
        error = _fail(call, b"\xff\xff\xff\xff", request_id)
        _calls_ended(all_server)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    [line] = _of(log, request_id)
    assert (line["level"], line["method"], line["code"], line["reason"]) == (
        "info", "Upscale", "INVALID_ARGUMENT", "MALFORMED_REQUEST")
    assert line["detail"].startswith("the request is not a valid percept.v1.UpscaleRequest")


def test_a_decode_line_from_a_worker_thread_carries_the_request_id(
        all_server: RunningServer, small_photo: np.ndarray,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes run on worker threads (RequestSlot.to_thread): what they log belongs to the
    call, as asyncio.to_thread's lines do."""
    import services.superres.service as superres

    real = superres.decode_image
    threads: list[str] = []

    def decode_image(data: bytes, **options: Any) -> Any:
        threads.append(threading.current_thread().name)
        logging.getLogger("percept.test.decode").warning("a decoder complained")
        return real(data, **options)

    monkeypatch.setattr(superres, "decode_image", decode_image)
    request_id = _new_id("decode")
    with server_log(level="info") as log, grpc.insecure_channel(all_server.target) as channel:
        _upscale(channel)(superres_pb2.UpscaleRequest(image=encode(small_photo)), timeout=120,
                          metadata=[("x-request-id", request_id)])
        _calls_ended(all_server)
    assert threads and all_server.thread.name not in threads
    decoded = [line for line in _lines(log) if line["logger"] == "percept.test.decode"]
    assert [line.get("request_id") for line in decoded] == [request_id]


# -- the text format ------------------------------------------------------------------------

_TEXT_LINE = re.compile(r"(\d\d:\d\d:\d\d) (\w+) +(\S+): (.*)")
_FIELD = re.compile(r' ([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^ "]+)')
_UNESCAPE = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def _unquoted(value: str) -> str:
    if not value.startswith('"'):
        return value
    return re.sub(r"\\(u[0-9a-f]{4}|U[0-9a-f]{8}|.)",
                  lambda m: _UNESCAPE.get(m[1]) or chr(int(m[1][1:], 16)), value[1:-1])


def _parse_text(line: str, message: str) -> dict[str, str]:
    """A text line's head and fields, parsed as logfmt reads them: the fields must make
    up all of what follows the message."""
    head = _TEXT_LINE.fullmatch(line)
    assert head is not None, line
    assert head[4].startswith(message), line
    rest = head[4][len(message):]
    fields = list(_FIELD.finditer(rest))
    assert "".join(f[0] for f in fields) == rest, f"not logfmt: {rest!r}"
    parsed = {f[1]: _unquoted(f[2]) for f in fields}
    assert len(parsed) == len(fields), f"a field twice: {rest!r}"
    return {"time": head[1], "level": head[2], "logger": head[3], **parsed}


def test_a_forged_request_id_adds_no_field_to_the_text_format(
        all_server: RunningServer) -> None:
    with server_log("text", "info") as log, \
            grpc.insecure_channel(all_server.target) as channel:
        error = _fail(_upscale(channel), superres_pb2.UpscaleRequest(image=b"no image"),
                      FORGED_ID)
        _calls_ended(all_server)
    assert dict(error.trailing_metadata())["x-request-id"] == FORGED_ID  # type: ignore[attr-defined]
    [line] = [text for text in log.getvalue().splitlines() if "login_failed" in text]
    fields = _parse_text(line, "call failed")
    assert fields["request_id"] == FORGED_ID
    assert (fields["level"], fields["logger"]) == ("info", "percept.rpc")
    assert set(fields) == {"time", "level", "logger", "method", "request_id", "code",
                           "reason", "field", "detail"}
    assert fields["detail"] == error.details()


@pytest.mark.parametrize("value", [
    "", "plain", "two words", "a=b", 'say "hi"', "back\\slash", "line\nbreak",
    "\u2028\x85\x00", "caf\u00e9 \U0001f600", 'end\\"', FORGED_ID])
def test_every_text_field_reads_back_as_it_was(value: str) -> None:
    record = logging.makeLogRecord({"name": "percept.test", "levelname": "INFO",
                                    "levelno": logging.INFO, "msg": "said",
                                    "request_id": value, "other": value, "count": 3})
    line = TextFormatter().format(record)
    assert "\n" not in line and len(line.splitlines()) == 1
    fields = _parse_text(line, "said")
    assert (fields["request_id"], fields["other"], fields["count"]) == (value, value, "3")


def test_the_text_format_stamps_the_time_of_the_record() -> None:
    created = time.time() - 3 * 3600 - 17 * 60 - 23  # a record from hours ago
    record = logging.makeLogRecord({"name": "percept.test", "levelname": "WARNING",
                                    "msg": "late", "created": created, "msecs": 0})
    line = TextFormatter().format(record)
    assert line.startswith(time.strftime("%H:%M:%S ", time.localtime(created))), line


# -- a server whose one method waits: hang-ups, deadlines, the limit, the drain --------------

SERVICE = "test.Slow"


class SlowServicer:
    @unary_errors
    async def Wait(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
                   ) -> empty_pb2.Empty:
        await asyncio.sleep(60)
        return empty_pb2.Empty()

    @unary_errors
    async def Fail(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
                   ) -> empty_pb2.Empty:
        raise RuntimeError("a bug")


class SlowModule(ServiceModule):
    name = "slow"
    full_name = SERVICE

    def add_to_server(self, server: grpc.aio.Server) -> None:
        servicer = SlowServicer()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(servicer, name), request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString)
            for name in ("Wait", "Fail")}),))


@contextlib.contextmanager
def slow_server(**overrides: Any) -> Iterator[tuple[RunningServer, grpc.Channel]]:
    config = server_config("all", log_format="json", **overrides)
    running = start_in_thread(config, [SlowModule(config)])
    channel = grpc.insecure_channel(running.target)
    try:
        yield running, channel
    finally:
        channel.close()
        if running.thread.is_alive():  # not stopped by the test
            running.stop()


def _method(channel: grpc.Channel, name: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/{SERVICE}/{name}",
                               request_serializer=empty_pb2.Empty.SerializeToString,
                               response_deserializer=empty_pb2.Empty.FromString)


def _in_progress(running: RunningServer, count: int) -> None:
    assert _wait(lambda: running.server._work.in_progress == count)


def test_hang_ups_deadlines_the_call_limit_and_bugs_get_their_lines() -> None:
    ids = {what: _new_id(what) for what in ("hang-up", "deadline", "held", "over", "bug")}
    with server_log(level="debug") as log, slow_server(max_concurrent_rpcs=1) as (
            running, channel):
        wait = _method(channel, "Wait")
        hung_up = wait.future(empty_pb2.Empty(), timeout=30,
                              metadata=[("x-request-id", ids["hang-up"])])
        _in_progress(running, 1)
        hung_up.cancel()
        _in_progress(running, 0)
        with pytest.raises(grpc.RpcError) as late:
            wait(empty_pb2.Empty(), timeout=0.5, metadata=[("x-request-id", ids["deadline"])])
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        _in_progress(running, 0)
        held = wait.future(empty_pb2.Empty(), timeout=30,
                           metadata=[("x-request-id", ids["held"])])
        _in_progress(running, 1)
        busy = _fail(wait, empty_pb2.Empty(), ids["over"])  # past --max-concurrent-rpcs 1
        assert busy.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        held.cancel()
        _in_progress(running, 0)
        bug = _fail(_method(channel, "Fail"), empty_pb2.Empty(), ids["bug"])
        assert bug.code() == grpc.StatusCode.INTERNAL
        _calls_ended(running)
    lines = {what: _failed(log, request_id) for what, request_id in ids.items()}
    for what, level, code, reason in [("hang-up", "debug", "CANCELLED", None),
                                      ("deadline", "info", "DEADLINE_EXCEEDED", None),
                                      ("held", "debug", "CANCELLED", None),
                                      ("over", "debug", "RESOURCE_EXHAUSTED", "QUEUE_FULL"),
                                      ("bug", "error", "INTERNAL", "INTERNAL")]:
        [line] = lines[what]
        assert (line["level"], line["method"], line["code"], line.get("reason")) == (
            level, "Wait" if what != "bug" else "Fail", code, reason), line
    assert "RuntimeError: a bug" in lines["bug"][0]["exc"]


def test_the_drain_names_the_calls_it_cut_off() -> None:
    """The calls the drain's grace runs out on: one WARNING line each, and one line naming
    them, at most 20 by id."""
    ids = [_new_id(f"cut{n:02d}") for n in range(23)]
    with server_log(level="debug") as log, slow_server() as (running, channel):
        wait = _method(channel, "Wait")
        calls = [wait.future(empty_pb2.Empty(), timeout=60,
                             metadata=[("x-request-id", request_id)]) for request_id in ids]
        _in_progress(running, len(ids))
        running.stop(grace=1.0)
        for call in calls:
            assert call.exception(30).code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]
    for request_id in ids:
        [line] = _failed(log, request_id)  # the cut-off, not a cancellation besides
        assert (line["level"], line["method"], line["code"], line["reason"]) == (
            "warning", "Wait", "UNAVAILABLE", "SERVER_DRAINING")
        assert "drain grace" in line["detail"]
    [summary] = [line for line in _lines(log) if line["msg"].startswith("drain grace ending")]
    assert summary["level"] == "warning" and summary["calls"] == len(ids)
    named, more = summary["request_ids"].rsplit(" and ", 1)
    assert more == "3 more"
    assert len(set(named.split(", ")) & set(ids)) == 20


# -- the rest ---------------------------------------------------------------------------------


def test_a_long_message_is_cut_in_its_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="percept.rpc"):
        log_failed_call("/percept.v1.StyleTransfer/Stylize", grpc.StatusCode.NOT_FOUND,
                        "unknown style " + "x" * 5000, reason="STYLE_NOT_FOUND",
                        request_id="r-long")
    [record] = caplog.records
    assert record.method == "Stylize" and record.request_id == "r-long"  # type: ignore[attr-defined]
    assert len(record.detail) <= MAX_LOGGED_DETAIL_BYTES  # type: ignore[attr-defined]
    assert record.detail.endswith("characters cut)")  # type: ignore[attr-defined]
    assert not hasattr(record, "field")


@pytest.mark.parametrize("seconds, shown", [(0.4, "0.4 s"), (3.25, "3.2 s"), (42.4, "42 s")])
def test_a_stall_under_ten_seconds_shows_its_tenths(seconds: float, shown: str) -> None:
    batcher = types.SimpleNamespace(name="test-stall-batcher", stalled_for=lambda: seconds)
    module = types.SimpleNamespace(full_name="test.Stalled", batchers=lambda: [batcher])

    async def set_health(name: str, status: int) -> None:
        pass

    watch = StallWatch([module], 1.0, set_health)  # type: ignore[list-item]
    assert watch.find_stalls() == {"test.Stalled": f"test-stall-batcher's batch has run {shown}"}
