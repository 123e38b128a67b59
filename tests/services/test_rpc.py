"""services/common/rpc.py's error mapping, through a real grpc.aio server on loopback: a
ServiceError becomes its own status and message, anything else INTERNAL with no internals
in the answer and the traceback in the log, and the server keeps serving."""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.common.errors import InvalidArgument, NotFound
from services.common.rpc import stream_errors, unary_errors

SECRET = "/srv/private/path.db"


class Servicer:
    @unary_errors
    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"bad":
            raise InvalidArgument("the request is bad")
        if request == b"bug":
            raise RuntimeError(f"could not open {SECRET}")
        if request.startswith(b"long:"):  # a message echoing what the client sent, whole
            raise InvalidArgument(f"no such name: {request[5:].decode()}")
        if request.startswith(b"field:"):  # the same, naming the field (BadRequest too)
            raise InvalidArgument(f"no such name: {request[6:].decode()}", field="name")
        if request == b"abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "aborted by the method")
        return b"echo:" + request

    @stream_errors
    async def stream(self, request: bytes, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[bytes]:
        yield b"first"
        if request == b"missing":
            raise NotFound("no such thing")
        if request == b"bug":
            raise KeyError(SECRET)
        yield b"second"


def _serve(ready: Any, stop: asyncio.Event | None = None) -> None:
    async def main() -> None:
        servicer = Servicer()
        server = grpc.aio.server()
        handlers = {"Unary": grpc.unary_unary_rpc_method_handler(servicer.unary),
                    "Stream": grpc.unary_stream_rpc_method_handler(servicer.stream)}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Errors", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        done = asyncio.Event()
        ready.put((port, asyncio.get_running_loop(), done))
        await done.wait()
        await server.stop(None)

    asyncio.run(main())


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    import queue
    import threading

    ready: queue.Queue[tuple[int, asyncio.AbstractEventLoop, asyncio.Event]] = queue.Queue()
    thread = threading.Thread(target=_serve, args=(ready,), daemon=True)
    thread.start()
    port, loop, done = ready.get(timeout=30)
    # trailers over 8 KiB refused every time (by default, between 8 and 16 KiB at random)
    options = [("grpc.max_metadata_size", 8192), ("grpc.absolute_max_metadata_size", 8192)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as open_channel:
        yield open_channel
    loop.call_soon_threadsafe(done.set)
    thread.join(timeout=30)


def _unary(channel: grpc.Channel, request: bytes) -> bytes:
    return bytes(channel.unary_unary("/test.Errors/Unary")(request, timeout=10))


def _stream(channel: grpc.Channel, request: bytes) -> tuple[list[bytes], grpc.RpcError | None]:
    received: list[bytes] = []
    try:
        for message in channel.unary_stream("/test.Errors/Stream")(request, timeout=10):
            received.append(bytes(message))
    except grpc.RpcError as error:
        return received, error
    return received, None


def test_a_service_error_is_answered_with_its_status_and_message(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as error:
        _unary(channel, b"bad")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() == "the request is bad"
    assert _unary(channel, b"ok") == b"echo:ok"


#: What gRPC sends a status message's bytes as: printable ASCII but % as it is, the rest
#: percent-encoded (%XX for each UTF-8 byte).
_AS_SENT = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)


@pytest.mark.parametrize("prefix", [b"long:", b"field:"])
@pytest.mark.parametrize("name", ["x" * 20_000, "é" * 20_000, "%" * 20_000])
def test_a_message_too_long_for_a_trailer_is_cut_not_turned_into_another_status(
        channel: grpc.Channel, name: str, prefix: bytes) -> None:
    """gRPC percent-encodes the message into a trailer, which a client refuses over 8 KiB
    (RESOURCE_EXHAUSTED: "received metadata size exceeds"): the status must survive, its
    message cut to 2,048 bytes as sent, the field's description (BadRequest) to 200
    characters."""
    with pytest.raises(grpc.RpcError) as error:
        _unary(channel, prefix + name.encode())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details()
    assert details.startswith("no such name: " + name[:100])
    assert details.endswith(" characters cut)")
    assert 1900 < len(urllib.parse.quote(details, safe=_AS_SENT)) <= 2048
    # the whole trailer block, the details carrying the message again, stays under 8 KiB
    trailers = dict(error.value.trailing_metadata())  # type: ignore[attr-defined]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    assert status.message == details
    violations = [violation for detail in status.details
                  if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR)
                  for violation in _unpacked(detail, error_details_pb2.BadRequest)
                  .field_violations]
    if prefix == b"field:":
        assert [v.field for v in violations] == ["name"]
        assert violations[0].description == details[:200]
    else:
        assert violations == []
    assert _unary(channel, b"ok") == b"echo:ok"


def _unpacked(detail: Any, kind: Any) -> Any:
    message = kind()
    detail.Unpack(message)
    return message


def test_an_abort_from_the_method_goes_through_unchanged(
        channel: grpc.Channel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="percept.rpc"), \
            pytest.raises(grpc.RpcError) as error:
        _unary(channel, b"abort")
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.value.details() == "aborted by the method"
    assert [r.getMessage() for r in caplog.records if r.name == "percept.rpc"] == []


def test_a_bug_is_internal_logged_and_not_leaked(channel: grpc.Channel,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="percept.rpc"):
        with pytest.raises(grpc.RpcError) as error:
            _unary(channel, b"bug")
        received, stream_error = _stream(channel, b"bug")
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert error.value.details() == "internal error; see the server log"
    assert SECRET not in str(error.value.details())
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status, info = rpc_status.from_call(error.value), error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info) and info.reason == "INTERNAL"
    assert received == [b"first"] and stream_error is not None
    assert stream_error.code() == grpc.StatusCode.INTERNAL
    assert SECRET not in str(stream_error.details())
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert [r.method for r in logged] == ["unary", "stream"]  # type: ignore[attr-defined]
    assert all(r.exc_info and SECRET in str(r.exc_info[1]) for r in logged)
    assert _unary(channel, b"still serving") == b"echo:still serving"


def test_a_stream_ends_with_the_service_error_after_what_it_sent(channel: grpc.Channel) -> None:
    received, error = _stream(channel, b"missing")
    assert received == [b"first"] and error is not None
    assert error.code() == grpc.StatusCode.NOT_FOUND and error.details() == "no such thing"
    assert _stream(channel, b"fine") == ([b"first", b"second"], None)
