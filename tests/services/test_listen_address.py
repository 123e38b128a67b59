"""``--host`` takes IPv4 and IPv6 addresses: gRPC and /metrics both bind them."""

from __future__ import annotations

import argparse
import socket
import urllib.request

import grpc
import pytest

from services import client
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
