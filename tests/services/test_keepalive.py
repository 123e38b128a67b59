"""Keepalive both ways (services/common/connection_options.py), on a real server: clients
may ping as often as --min-client-ping-seconds, one pinging faster is disconnected, and the
server's own pings close the connection of a client that stopped answering."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import ServerConfig, add_server_arguments, config_from_args
from services.common.connection_options import server_options
from services.common.server import RunningServer, start_in_thread
from tests.conftest import REPO, server_config


def test_the_defaults_take_pings_every_10_s_and_ping_after_60_s_of_quiet() -> None:
    options = dict(server_options(ServerConfig(service="superres")))
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 20_000


def test_keepalive_off_keeps_grpcs_default_timeouts() -> None:
    """No pings of its own, but the server's other pings and its SETTINGS still time out
    as with gRPC's defaults (an unset timeout would be taken as never)."""
    options = dict(server_options(ServerConfig(service="superres", keepalive_seconds=0)))
    assert options["grpc.keepalive_time_ms"] == 2**31 - 1  # never
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.http2.ping_timeout_ms"] == 60_000


@pytest.mark.parametrize("args, message", [
    (["--keepalive-seconds", "0.5"], "must be 0 (never) or 1 to 2,147,483 seconds, got 0.5"),
    (["--keepalive-seconds", "1e7"], "must be 0 (never) or 1 to 2,147,483 seconds, got 1e7"),
    (["--keepalive-seconds", "inf"], "must be 0 (never) or 1 to 2,147,483 seconds, got inf"),
    (["--min-client-ping-seconds", "0"], "must be 1 to 2,147,483 seconds, got 0"),
    (["--min-client-ping-seconds", "nan"], "must be 1 to 2,147,483 seconds, got nan"),
    (["--min-client-ping-seconds", "-1"], "must be 1 to 2,147,483 seconds, got -1"),
    (["--min-client-ping-seconds", "soon"], "must be 1 to 2,147,483 seconds, got soon"),
])
def test_keepalive_flags_out_of_range_are_refused_in_one_line(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(args)
    assert message in capsys.readouterr().err


def test_keepalive_flags_in_range_are_taken() -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    config = config_from_args("superres", parser.parse_args(
        ["--keepalive-seconds", "0", "--min-client-ping-seconds", "2147483"]))
    assert (config.keepalive_seconds, config.min_client_ping_seconds) == (0, 2147483)


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """Clients may ping every 1.5 s; the server's own pings are off."""
    running = start_in_thread(server_config("superres", warmup=False,
                                            min_client_ping_seconds=1.5, keepalive_seconds=0))
    yield running
    running.stop()


def watch_until_it_ends(target: str, ping_ms: int, seconds: float) -> grpc.RpcError:
    """A health Watch, over a channel that pings every ``ping_ms`` (calls or none), held
    until it ends; how it ended."""
    options = [("grpc.keepalive_time_ms", ping_ms), ("grpc.keepalive_timeout_ms", 5_000),
               ("grpc.keepalive_permit_without_calls", 1),
               ("grpc.http2.max_pings_without_data", 0)]
    with grpc.insecure_channel(target, options=options) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=seconds)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as ended:
            for _ in watch:
                pass
    return ended.value


def test_a_client_pinging_as_often_as_allowed_keeps_its_stream(
        server: RunningServer) -> None:
    """Pings every 1.5 s for 5.5 s: gRPC's defaults (one per 5 minutes while calls run)
    would end the stream at the third, UNAVAILABLE "Too many pings"."""
    ended = watch_until_it_ends(server.target, 1_500, seconds=5.5)
    assert ended.code() == grpc.StatusCode.DEADLINE_EXCEEDED, ended.details()


def test_a_client_pinging_faster_is_disconnected(server: RunningServer) -> None:
    started = time.monotonic()
    ended = watch_until_it_ends(server.target, 1_000, seconds=30)  # gRPC's fastest
    assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended.details()
    assert "Too many pings" in ended.details() and time.monotonic() - started < 10


#: A client in a process of its own: a health Watch, and a line for each thing it hears.
WATCHER = """
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
try:
    for answer in watch:
        print("status", answer.status, flush=True)
except grpc.RpcError as error:
    print("ended", error.code().name, flush=True)
"""


@pytest.mark.parametrize("keepalive, closed", [(1.0, True), (0.0, False)])
def test_the_server_closes_the_connection_of_a_client_that_stopped_answering(
        keepalive: float, closed: bool) -> None:
    """The client process is stopped (SIGSTOP) for 4 s, as a client whose machine
    vanished: its kernel still acknowledges TCP, but nothing answers the server's pings.
    With pings every second (and 1 s to answer), the server has closed the connection by
    the time the client goes on; without them, the Watch goes on."""
    running = start_in_thread(server_config("superres", warmup=False,
                                            keepalive_seconds=keepalive))
    client = subprocess.Popen([sys.executable, "-c", WATCHER, running.target], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "status 1"  # SERVING
        client.send_signal(signal.SIGSTOP)
        time.sleep(4)
        client.send_signal(signal.SIGCONT)
        if closed:
            assert client.stdout.readline().strip() == "ended UNAVAILABLE"
        else:
            with pytest.raises(subprocess.TimeoutExpired):
                client.wait(3)
    finally:
        client.kill()
        client.wait(10)
        running.stop()
