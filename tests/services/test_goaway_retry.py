"""A call whose connection breaks after the server's GOAWAY is retried over a new one.

gRPC's server closes a connection it sent a GOAWAY on (a drain, a connection older than its
maximum age) as soon as the last call on it has written its answer; under load that close
can reset the connection before the answer arrives. Here a TCP proxy between a real gRPC
client and server resets the connection at that point on purpose, so that the client meets
the same failure every time."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from services.retries import LOST_AFTER_GOAWAY, retrying, unavailable_reason
from tests.fixtures.tcp_proxy import TcpProxy

FRAME_HEADER = 9  # HTTP/2: length (3 bytes), type, flags, stream id (4)
GOAWAY, PING, ACK = 0x7, 0x6, 0x1
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what a client sends before its frames


def frames(sock: socket.socket, start: bytes = b"") -> Iterator[tuple[int, int, bytes]]:
    """(type, flags, the frame's bytes) of each HTTP/2 frame read from ``sock``, until it
    closes; ``start``: bytes the stream begins with that are not a frame (the preface)."""
    buffer, skip = b"", len(start)
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            return
        if not data:
            return
        buffer += data
        if skip:
            taken = min(skip, len(buffer))
            yield -1, 0, buffer[:taken]
            buffer, skip = buffer[taken:], skip - taken
        while len(buffer) >= FRAME_HEADER:
            end = FRAME_HEADER + int.from_bytes(buffer[:3], "big")
            if len(buffer) < end:
                break
            yield buffer[3], buffer[4], buffer[:end]
            buffer = buffer[end:]


class ResettingProxy(TcpProxy):
    """In front of a plaintext gRPC server: on the first connection only, once the server
    has sent a GOAWAY and the client has acknowledged the PING that follows it (so the
    client has read the GOAWAY), it resets the client's side (TCP RST)."""

    def __init__(self, upstream_port: int) -> None:
        self.reset_done = threading.Event()
        self._goaway_seen = threading.Event()
        super().__init__(upstream_port)

    def to_client(self, upstream: socket.socket, client: socket.socket, number: int,
                  frozen: threading.Event) -> None:
        if number:
            return self.pump(upstream, client, frozen)
        for kind, _, frame in frames(upstream):
            if kind == GOAWAY:
                self._goaway_seen.set()
            try:
                client.sendall(frame)
            except OSError:
                break
        upstream.close()

    def to_server(self, client: socket.socket, upstream: socket.socket, number: int,
                  frozen: threading.Event) -> None:
        if number:
            return self.pump(client, upstream, frozen)
        for kind, flags, frame in frames(client, start=PREFACE):
            if self._goaway_seen.is_set() and kind == PING and flags & ACK:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # an abortive close: the client reads a reset
                upstream.close()
                self.reset_done.set()
                return
            try:
                upstream.sendall(frame)
            except OSError:
                break
        client.close()


@pytest.fixture
def proxy() -> Iterator[ResettingProxy]:
    """A gRPC server whose connections age out after 0.3 s (it then sends its GOAWAY); its
    method's first call answers only once the proxy has reset that call's connection."""
    loop = asyncio.new_event_loop()
    calls = [0]
    resetting: list[ResettingProxy] = []

    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        calls[0] += 1
        if calls[0] == 1:
            deadline = time.monotonic() + 20
            while not resetting[0].reset_done.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        return b"answer %d" % calls[0]

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(options=[("grpc.max_connection_age_ms", 300),
                                          ("grpc.max_connection_age_grace_ms", 60_000)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {
            "Answer": grpc.unary_unary_rpc_method_handler(answer)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    resetting.append(ResettingProxy(port))
    yield resetting[0]
    resetting[0].close()
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_a_call_cut_off_after_the_goaway_is_retried_over_a_new_connection(
        proxy: ResettingProxy) -> None:
    failures: list[grpc.RpcError] = []
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
        stub = channel.unary_unary("/t.T/Answer")

        def call() -> bytes:
            try:
                return bytes(stub(b"", timeout=30))
            except grpc.RpcError as error:
                failures.append(error)
                raise

        assert retrying(call, patience=30) == b"answer 2"
    assert proxy.reset_done.is_set() and len(failures) == 1
    assert failures[0].code() == grpc.StatusCode.UNAVAILABLE
    assert "GOAWAY received" in failures[0].details(), failures[0].details()
    assert unavailable_reason(failures[0]) == LOST_AFTER_GOAWAY


def test_a_call_that_must_not_run_twice_is_not_retried(proxy: ResettingProxy) -> None:
    """A caller that retries SERVER_LOADING only (a delete) sees the failure."""
    with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
        stub = channel.unary_unary("/t.T/Answer")
        with pytest.raises(grpc.RpcError) as raised:
            retrying(lambda: stub(b"", timeout=30), patience=30,
                     not_ready={"SERVER_LOADING"})
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert unavailable_reason(raised.value) == LOST_AFTER_GOAWAY
