"""``--host`` takes IPv4 and IPv6 addresses: gRPC and /metrics both bind them."""

from __future__ import annotations

import argparse
import socket
import urllib.request

import grpc
import pytest

from services import client
from services.common import metrics
from services.common.config import add_server_arguments, config_from_args, listen_address
from services.common.server import ServiceModule, start_in_thread
from tests.conftest import free_port, server_config


def parse_host(*argv: str) -> str:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    return config_from_args("all", parser.parse_args(list(argv))).host


@pytest.mark.parametrize("given, stored", [
    ("0.0.0.0", "0.0.0.0"), ("::", "::"), ("[::]", "::"), ("::1", "::1"),
    ("[fd00::12]", "fd00::12"), ("localhost", "localhost"), ("127.0.0.1", "127.0.0.1"),
    ("::ffff:127.0.0.1", "::ffff:127.0.0.1"), ("superres.percept.svc.cluster.local.",
                                               "superres.percept.svc.cluster.local."),
])
def test_host_takes_ipv4_ipv6_and_names(given: str, stored: str) -> None:
    assert parse_host("--host", given) == stored


@pytest.mark.parametrize("given", ["0.0.0.0:50050", "", "[::", "fd00::12::zz", "a b",
                                   "fe80::1%eth0", "*", "-", "a_b", "1.2.3", "256.1.1.1"])
def test_a_host_that_is_not_one_exits_2_naming_it(
        given: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_host("--host", given)
    assert stopped.value.code == 2
    assert f"not a host: {given!r}" in capsys.readouterr().err


def test_listen_address_brackets_ipv6_literals() -> None:
    assert listen_address("::", 50050) == "[::]:50050"
    assert listen_address("[::1]", 9) == "[::1]:9"
    assert listen_address("0.0.0.0", 50050) == "0.0.0.0:50050"
    assert listen_address("localhost", 1) == "localhost:1"


class NothingToLoad(ServiceModule):
    name = "nothing"
    full_name = "test.Nothing"

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pass

    async def load(self) -> None:
        pass


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_a_server_on_ipv6_loopback_serves_grpc_and_metrics() -> None:
    metrics_port = free_port()
    config = server_config("all", host="::1", metrics_port=metrics_port)
    running = start_in_thread(config, [NothingToLoad(config)])
    try:
        assert running.target == f"[::1]:{running.port}"
        channel = client.connect(running.target)
        try:
            assert client.health_status(channel, "test.Nothing") == "SERVING"
        finally:
            channel.close()
        with urllib.request.urlopen(f"http://[::1]:{metrics_port}/metrics", timeout=10) as reply:
            assert b"percept_" in reply.read()
    finally:
        running.stop()


def _resolves_to(monkeypatch: pytest.MonkeyPatch, *addresses: str) -> None:
    """Makes every name resolve to ``addresses`` (this machine's localhost may have no
    ::1 entry)."""
    def getaddrinfo(host: str, port: int, *args: object, **kwargs: object) -> list:
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port)) for a in addresses]
    monkeypatch.setattr(metrics, "_resolve", getaddrinfo)


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_metrics_of_a_name_listen_on_every_address_it_resolves_to(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As gRPC does: ``localhost`` with 127.0.0.1 and ::1 serves /metrics on both (it
    served IPv4 alone). An address that cannot be bound is skipped."""
    _resolves_to(monkeypatch, "127.0.0.1", "::1", "127.0.0.1", "fd00::1234")
    port = free_port()
    servers = metrics.start_metrics_server(port, "localhost")
    try:
        assert len(servers.servers) == 2  # duplicates once; fd00::1234 is no local address
        for url in (f"http://127.0.0.1:{port}/metrics", f"http://[::1]:{port}/metrics"):
            with urllib.request.urlopen(url, timeout=10) as reply:
                assert b"percept_" in reply.read()
    finally:
        servers.shutdown()


def test_metrics_that_bind_nowhere_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    _resolves_to(monkeypatch, "fd00::1234", "192.0.2.1")  # neither is this machine's
    with pytest.raises(OSError):
        metrics.start_metrics_server(free_port(), "somewhere")


@pytest.mark.parametrize("taken", ["grpc", "metrics"])
def test_a_port_in_use_fails_the_start_saying_which_and_what_to_do(taken: str) -> None:
    """Another process holds the gRPC or the /metrics port (a second `percept serve all`
    on another --port still defaults /metrics to 9100): the start fails naming the port
    and the flag, and a failed /metrics bind leaves no gRPC listener behind."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    held = holder.getsockname()[1]
    grpc_port = held if taken == "grpc" else free_port()
    config = server_config("all", port=grpc_port,
                           metrics_port=held if taken == "metrics" else 0)
    try:
        with pytest.raises(RuntimeError) as failed:
            start_in_thread(config, [NothingToLoad(config)])
    finally:
        holder.close()
    if taken == "grpc":
        assert f"could not listen on 127.0.0.1:{held}" in str(failed.value)
        assert "--port" in str(failed.value)
    else:
        assert f"could not serve /metrics on port {held}: Address already in use" in str(
            failed.value)
        assert "--metrics-port 0" in str(failed.value)
        with socket.socket() as probe:  # the gRPC port was let go
            probe.bind(("127.0.0.1", grpc_port))


def test_percept_serve_on_a_port_in_use_says_so_without_a_traceback() -> None:
    import subprocess
    import sys

    from tests.conftest import REPO

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "serve", "superres", "--host", "127.0.0.1",
             "--port", str(held), "--metrics-port", "0", "--log-format", "text"],
            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"could not listen on 127.0.0.1:{held}: the port is in use" in result.stderr
    assert "Traceback" not in result.stderr
