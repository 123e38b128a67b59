"""Large request messages are parsed in a thread of their own, never on the server's event
loop (services/common/malformed.py, PARSE_IN_THREAD_BYTES): the loop serves every call of
the process, health checks included, and parsing a 50 MB message held it for 35-50 ms. Small
ones are parsed on the loop (a thread hop costs more than they do). A large message that
does not parse is still INVALID_ARGUMENT, MALFORMED_REQUEST, with its request id.

Through a real server core on loopback, hosting a test service whose deserializer is
UpscaleRequest's, recording the thread it ran on."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from percept.v1 import superres_pb2
from services.common.malformed import PARSE_IN_THREAD_BYTES
from services.common.request_ids import REQUEST_ID_KEY, current_request_id
from services.common.rpc import unary_errors
from services.common.server import RunningServer, ServiceModule, start_in_thread
from tests.conftest import server_config

SERVICE = "test.Parse"
SMALL = 1000
LARGE = PARSE_IN_THREAD_BYTES + 4096


class RecordingParser:
    """UpscaleRequest.FromString that records the thread it ran on and the request id it
    saw. ``DESCRIPTOR`` names the message type in a malformed request's answer, as the
    generated class's does for its FromString."""

    DESCRIPTOR = superres_pb2.UpscaleRequest.DESCRIPTOR

    def __init__(self) -> None:
        self.seen: list[tuple[threading.Thread, str | None, int]] = []

    def parse(self, data: bytes) -> superres_pb2.UpscaleRequest:
        self.seen.append((threading.current_thread(), current_request_id.get(), len(data)))
        return superres_pb2.UpscaleRequest.FromString(data)


class ParseModule(ServiceModule):
    """``test.Parse``: ``Size`` (unary) answers the size of the request's image;
    ``Sizes`` (a request stream) the sizes of all of them, comma-separated."""

    name = "parse"
    full_name = SERVICE

    def __init__(self) -> None:
        super().__init__(server_config("all"))
        self.parser = RecordingParser()

    @unary_errors
    async def size(self, request: superres_pb2.UpscaleRequest,
                   context: grpc.aio.ServicerContext) -> bytes:
        return str(len(request.image)).encode()

    async def sizes(self, requests: AsyncIterator[superres_pb2.UpscaleRequest],
                    context: grpc.aio.ServicerContext) -> bytes:
        return ",".join([str(len(r.image)) async for r in requests]).encode()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Size": grpc.unary_unary_rpc_method_handler(
                self.size, request_deserializer=self.parser.parse),
            "Sizes": grpc.stream_unary_rpc_method_handler(
                self.sizes, request_deserializer=self.parser.parse),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture(scope="module")
def parse_server() -> Iterator[tuple[RunningServer, ParseModule, grpc.Channel]]:
    module = ParseModule()
    running = start_in_thread(server_config("all"), modules=[module])
    channel = grpc.insecure_channel(running.target, options=[
        ("grpc.max_send_message_length", 8 << 20)])
    yield running, module, channel
    channel.close()
    running.stop()


def _message(size: int) -> bytes:
    """An UpscaleRequest of about ``size`` bytes (its image field)."""
    return superres_pb2.UpscaleRequest(image=b"x" * (size - 8)).SerializeToString()


def _reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin trailer"
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    return str(info.reason)


def test_a_small_message_is_parsed_on_the_loop_a_large_one_in_a_thread(
        parse_server: tuple[RunningServer, ParseModule, grpc.Channel]) -> None:
    running, module, channel = parse_server
    size = channel.unary_unary(f"/{SERVICE}/Size")
    for length, request_id in ((SMALL, "small-one"), (LARGE, "large-one")):
        data = _message(length)
        module.parser.seen.clear()
        answer = size(data, timeout=30, metadata=[(REQUEST_ID_KEY, request_id)])
        assert answer == str(len(superres_pb2.UpscaleRequest.FromString(data).image)).encode()
        [(thread, seen_id, parsed)] = module.parser.seen
        assert parsed == len(data)
        assert seen_id == request_id  # the call's context went along to the thread
        if length < PARSE_IN_THREAD_BYTES:
            assert thread is running.thread, "a small message is parsed inline"
        else:
            assert thread is not running.thread, "a large message was parsed on the loop"
            assert thread.name.startswith("percept-parse")  # the one parsing thread


def test_streamed_large_messages_are_parsed_in_a_thread(
        parse_server: tuple[RunningServer, ParseModule, grpc.Channel]) -> None:
    running, module, channel = parse_server
    sizes = channel.stream_unary(f"/{SERVICE}/Sizes")
    messages = [_message(SMALL), _message(LARGE), _message(SMALL)]
    module.parser.seen.clear()
    answer = sizes(iter(messages), timeout=30)
    assert answer.decode().split(",") == [
        str(len(superres_pb2.UpscaleRequest.FromString(m).image)) for m in messages]
    assert [(thread is running.thread, length) for thread, _, length in module.parser.seen] \
        == [(True, len(messages[0])), (False, len(messages[1])), (True, len(messages[2]))]


def test_a_large_message_that_does_not_parse_is_invalid_argument(
        parse_server: tuple[RunningServer, ParseModule, grpc.Channel]) -> None:
    """A bytes field (the image, tag 1) that claims more bytes than the message has."""
    running, module, channel = parse_server
    truncated = b"\x0a" + _varint(LARGE + 1000) + b"x" * LARGE
    module.parser.seen.clear()
    size = channel.unary_unary(f"/{SERVICE}/Size")
    with pytest.raises(grpc.RpcError) as error:
        size(truncated, timeout=30, metadata=[(REQUEST_ID_KEY, "large-malformed")])
    _assert_malformed(error.value, truncated, "large-malformed")
    [(thread, _, _)] = module.parser.seen
    assert thread is not running.thread
    # and the server goes on serving
    assert size(_message(SMALL), timeout=30) == str(SMALL - 8).encode()


def _assert_malformed(error: grpc.RpcError, message: bytes, request_id: str) -> None:
    """``error`` is the MALFORMED_REQUEST answer to the UpscaleRequest bytes ``message``,
    with the call's request id."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert error.details().startswith(  # type: ignore[attr-defined]
        f"the request is not a valid percept.v1.UpscaleRequest message ({len(message)} "
        "bytes): ")
    assert _reason(error) == "MALFORMED_REQUEST"
    assert (REQUEST_ID_KEY, request_id) in error.trailing_metadata()  # type: ignore[attr-defined]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def test_a_large_upscale_request_that_does_not_parse_is_invalid_argument(
        all_server: RunningServer) -> None:
    """The same through the real services of `percept serve all`."""
    truncated = b"\x0a" + _varint(LARGE + 1000) + b"x" * LARGE
    with grpc.insecure_channel(all_server.target) as channel:
        upscale = channel.unary_unary("/percept.v1.SuperResolution/Upscale")
        with pytest.raises(grpc.RpcError) as error:
            upscale(truncated, timeout=60, metadata=[(REQUEST_ID_KEY, "large-upscale")])
    _assert_malformed(error.value, truncated, "large-upscale")
