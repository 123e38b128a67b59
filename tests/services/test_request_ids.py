"""Request ids end to end, through the real server core (services.common.server) on
loopback with JSON logs: every log line the server writes while a call runs carries the
call's request id, and an INTERNAL error's message names it (README, "Request ids")."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

from services.common.logs import configure_logging
from services.common.rpc import stream_errors, unary_errors
from services.common.server import ServiceModule, start_in_thread
from tests.conftest import server_config

SERVICE = "test.Broken"
log = logging.getLogger("percept.test.broken")


class BrokenServicer:
    """Methods with a bug: each logs on the event loop and from a worker thread, then
    raises an exception that is no ServiceError."""

    @unary_errors
    async def Fail(self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext
                   ) -> empty_pb2.Empty:
        log.info("working on it")
        await asyncio.to_thread(log.info, "working on it in a thread")
        raise RuntimeError("a bug with a secret inside")

    @stream_errors
    async def FailStreaming(self, request: empty_pb2.Empty,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[empty_pb2.Empty]:
        log.info("working on it")
        await asyncio.to_thread(log.info, "working on it in a thread")
        yield empty_pb2.Empty()
        raise RuntimeError("a bug with a secret inside")


class BrokenModule(ServiceModule):
    name = "broken"
    full_name = SERVICE

    def add_to_server(self, server: grpc.aio.Server) -> None:
        servicer = BrokenServicer()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
            "Fail": grpc.unary_unary_rpc_method_handler(
                servicer.Fail, request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString),
            "FailStreaming": grpc.unary_stream_rpc_method_handler(
                servicer.FailStreaming, request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString),
        }),))


@pytest.fixture(scope="module")
def json_logs() -> Iterator[io.StringIO]:
    """The root logger writes JSON lines into the yielded buffer while the module runs."""
    root = logging.getLogger()
    handlers, level, showwarning = root.handlers[:], root.level, warnings.showwarning
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    try:
        yield stream
    finally:
        root.handlers[:], root.level = handlers, level
        logging.captureWarnings(False)
        warnings.showwarning = showwarning


@pytest.fixture(scope="module")
def target(json_logs: io.StringIO) -> Iterator[str]:
    config = server_config("all", log_format="json")
    running = start_in_thread(config, [BrokenModule(config)])
    try:
        yield running.target
    finally:
        running.stop()


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _call(target: str, method: str, metadata: list[tuple[str, str]]) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        path = f"/{SERVICE}/{method}"
        with pytest.raises(grpc.RpcError) as error:
            if method == "Fail":
                channel.unary_unary(
                    path, request_serializer=empty_pb2.Empty.SerializeToString,
                    response_deserializer=empty_pb2.Empty.FromString,
                )(empty_pb2.Empty(), timeout=30, metadata=metadata)
            else:
                list(channel.unary_stream(
                    path, request_serializer=empty_pb2.Empty.SerializeToString,
                    response_deserializer=empty_pb2.Empty.FromString,
                )(empty_pb2.Empty(), timeout=30, metadata=metadata))
    return error.value


@pytest.mark.parametrize("method", ["Fail", "FailStreaming"])
@pytest.mark.parametrize("sent", ["t-1", None], ids=["callers-id", "made-here"])
def test_an_internal_error_names_the_request_id_its_log_lines_carry(
        target: str, json_logs: io.StringIO, method: str, sent: str | None) -> None:
    written = len(_lines(json_logs))
    error = _call(target, method, [("x-request-id", sent)] if sent else [])
    assert error.code() == grpc.StatusCode.INTERNAL
    request_id = dict(error.trailing_metadata())["x-request-id"]
    if sent is None:  # made here: 16 hex digits
        assert len(request_id) == 16 and int(request_id, 16) >= 0
    else:
        assert request_id == sent
    assert error.details() == (
        f"internal error; see the server log (request id {request_id})")  # no internals
    # the server logs the error as its handler ends, which may be just after the client
    # has its answer
    for _ in range(500):
        lines = _lines(json_logs)[written:]
        if any(line["msg"] == "unhandled error" for line in lines):
            break
        time.sleep(0.01)
    during = [line for line in lines if line["logger"] in ("percept.rpc", log.name)]
    assert [line["msg"] for line in during] == [
        "working on it", "working on it in a thread", "unhandled error"]
    assert all(line["request_id"] == request_id for line in during), during
    unhandled = during[-1]
    assert unhandled["level"] == "error" and unhandled["method"] == method
    assert "RuntimeError: a bug with a secret inside" in unhandled["exc"]


def test_lines_written_outside_a_call_carry_no_request_id(target: str,
                                                          json_logs: io.StringIO) -> None:
    started = [line for line in _lines(json_logs) if line["logger"] == "percept.server"]
    assert [line["msg"] for line in started][:2] == ["listening; loading models", "serving"]
    assert not [line for line in started if "request_id" in line]
