"""The /metrics HTTP server (services/common/metrics.py) over real sockets: GET and HEAD
/metrics only, with prometheus_client's gzip and OpenMetrics negotiation; an idle or a
trickling connection closed; and no more than MAX_METRICS_CONNECTIONS threads however many
connections come (prometheus_client's own server kept a thread per idle connection
forever: 4,000 of them took 4,021 threads)."""

from __future__ import annotations

import gzip
import http.client
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from services.common import metrics
from tests.conftest import free_port


@pytest.fixture()
def port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A /metrics server on loopback with a 1 s read timeout and connections closed after
    3 s (5 s and 30 s by default), so that the tests do not wait long."""
    monkeypatch.setattr(metrics._MetricsRequests, "timeout", 1.0)
    monkeypatch.setattr(metrics, "METRICS_CONNECTION_SECONDS", 3.0)
    chosen = free_port()
    servers = metrics.start_metrics_server(chosen, "127.0.0.1")
    yield chosen
    servers.shutdown()


def _request(port: int, method: str, path: str, headers: dict[str, str] | None = None
             ) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


def test_metrics_are_served_with_gzip_and_openmetrics_as_asked(port: int) -> None:
    status, headers, body = _request(port, "GET", "/metrics")
    assert status == 200 and b"# HELP percept_inflight_requests" in body
    assert headers["content-type"].startswith("text/plain")
    status, headers, body = _request(port, "GET", "/metrics",
                                     {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert b"# HELP percept_inflight_requests" in gzip.decompress(body)
    status, headers, body = _request(
        port, "GET", "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    status, _, body = _request(port, "GET", "/metrics?name[]=percept_inflight_pixels")
    assert status == 200 and b"percept_inflight_pixels " in body  # a query picks families
    assert b"percept_inflight_requests" not in body
    status, headers, body = _request(port, "HEAD", "/metrics")
    assert status == 200 and body == b"" and headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("path", ["/", "/favicon.ico", "/metricsx", "/metrics/", "/x/metrics"])
def test_any_other_path_is_not_found(port: int, path: str) -> None:
    status, _, body = _request(port, "GET", path)
    assert status == 404 and b"only /metrics is served here" in body
    assert _request(port, "HEAD", path)[0] == 404


def test_other_methods_are_not_served(port: int) -> None:
    assert _request(port, "POST", "/metrics")[0] == 501


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (it reads EOF)."""
    readable, _, _ = select.select([sock], [], [], seconds)
    if not readable:
        return False
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True


def test_an_idle_connection_is_closed_after_the_read_timeout(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as idle:
        assert _closed_within(idle, 10)
    with socket.create_connection(("127.0.0.1", port)) as half:  # a request never finished
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert _closed_within(half, 10)


def test_a_connection_that_trickles_its_request_is_closed_all_the_same(port: int) -> None:
    """A byte every 0.3 s keeps each read under the timeout; the connection is closed
    once it has been open METRICS_CONNECTION_SECONDS all the same."""
    with socket.create_connection(("127.0.0.1", port)) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        while time.monotonic() - started < 20:
            if _closed_within(slow, 0.3):
                return
            try:
                slow.sendall(b"a")
            except OSError:  # closed while writing
                return
        raise AssertionError("the trickling connection was kept open")


def test_connections_past_the_cap_get_503_and_no_thread(port: int) -> None:
    before = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", port))
            for _ in range(metrics.MAX_METRICS_CONNECTIONS)]
    extra: list[socket.socket] = []
    try:
        time.sleep(0.3)  # accepted, a thread each
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", port))
            extra.append(sock)
            sock.settimeout(10)
            assert sock.recv(100).startswith(b"HTTP/1.0 503")
        assert threading.active_count() <= before + metrics.MAX_METRICS_CONNECTIONS
    finally:
        for sock in held + extra:
            sock.close()
    for _ in range(100):  # the held connections' threads end as they read EOF
        status = _request(port, "GET", "/metrics")[0]
        if status == 200:
            break
        time.sleep(0.05)
    assert status == 200
