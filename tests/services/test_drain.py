"""SIGTERM drains: a real `percept serve` process finishes in-flight work and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from percept.v1 import style_pb2_grpc
from services import client
from tests.conftest import REPO, encode, free_port
from tests.services.test_server_core import gatys_request


def start_server(service: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "services.cli", "serve", service, "--host", "127.0.0.1",
               "--port", str(port), "--metrics-port", "0", "--log-format", "json",
               "--device", "cpu", *extra]
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_serving(target: str, process: subprocess.Popen[bytes], seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    channel = client.connect(target)
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
        try:
            if client.health_status(channel, timeout=1) == "SERVING":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError("server never became SERVING")


def test_sigterm_lets_the_in_flight_request_finish_and_exits_zero(
        small_photo: np.ndarray, style_photo: np.ndarray, tmp_path: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    process = start_server("style", port, "--drain-seconds", "60")
    try:
        wait_serving(target, process)
        channel = client.connect(target)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="percept.v1.StyleTransfer"), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        call = style_pb2_grpc.StyleTransferStub(channel).StylizeWithImage(
            gatys_request(encode(small_photo), encode(style_photo), iterations=15, max_size=48,
                          progress_every=1), timeout=120)
        assert next(call).HasField("progress")  # in flight
        process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        results = []
        consumer = threading.Thread(target=lambda: results.extend(call))
        consumer.start()
        consumer.join(120)
        assert results and results[-1].HasField("result"), "the in-flight request was cut off"
        assert results[-1].result.width == 48
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read().decode()  # type: ignore[union-attr]
    assert '"msg": "draining"' in log and '"msg": "stopped"' in log


def test_bad_start_up_exits_non_zero_with_a_clear_log(tmp_path: Path) -> None:
    env = {**os.environ, "PERCEPT_ASSETS_DIR": str(tmp_path / "no-assets")}
    port = free_port()
    process = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "style", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "0", "--log-format", "text"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1
    assert "VGG19 weights not found" in process.stderr


def test_a_draining_replica_sends_new_calls_to_the_others(
        small_photo: np.ndarray, style_photo: np.ndarray) -> None:
    """Two replicas behind one round-robin channel (as a dns:/// client sees a headless
    Service). While the first drains a long call, every new call is served by the other:
    the GOAWAY moves them. (The readiness gate used to answer them UNAVAILABLE while the
    draining replica kept its connections: half the calls failed.)"""
    from percept.v1 import style_pb2
    from tests.style.committed import FIRST

    ports = [free_port(), free_port()]
    processes = [start_server("style", port, "--drain-seconds", "60") for port in ports]
    channels: list[grpc.Channel] = []
    try:
        for port, process in zip(ports, processes, strict=True):
            wait_serving(f"127.0.0.1:{port}", process)
        balanced = grpc.insecure_channel(f"ipv4:127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}",
                                         options=[("grpc.lb_policy_name", "round_robin")])
        direct = client.connect(f"127.0.0.1:{ports[0]}")
        channels += [balanced, direct]
        stub = style_pb2_grpc.StyleTransferStub(balanced)
        request = style_pb2.StylizeRequest(image=encode(small_photo), style=FIRST)
        for _ in range(4):  # both replicas connected and warm
            stub.Stylize(request, timeout=60)
        long_call = style_pb2_grpc.StyleTransferStub(direct).StylizeWithImage(
            gatys_request(encode(small_photo), encode(style_photo), iterations=2000,
                          max_size=48, progress_every=1), timeout=120)
        assert next(long_call).HasField("progress")  # holds the first replica's drain open
        processes[0].send_signal(signal.SIGTERM)
        time.sleep(0.5)
        codes = []
        for _ in range(20):
            try:
                stub.Stylize(request, timeout=60)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)
        assert processes[0].poll() is None, "the first replica was not draining any more"
        assert codes == ["OK"] * 20, codes
        long_call.cancel()
        assert processes[0].wait(60) == 0
    finally:
        for channel in channels:
            channel.close()
        for process in processes:
            if process.poll() is None:
                process.kill()


def test_open_watch_and_reflection_streams_do_not_hold_the_drain() -> None:
    """A client that keeps a health Watch and a reflection stream open (a dashboard, a
    grpcurl session) must not keep a stopping server for its whole grace period: the
    Watch gets NOT_SERVING and ends, the reflection stream ends at its next request."""
    import queue

    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from services.common.server import start_in_thread
    from tests.conftest import server_config

    running = start_in_thread(server_config("style", max_optimisations=1))
    channel = client.connect(running.target)
    pending: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
    pending.put(reflection_pb2.ServerReflectionRequest(list_services=""))

    def requests() -> object:
        while (request := pending.get()) is not None:
            yield request

    try:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            requests(), timeout=60)
        assert next(reflection).HasField("list_services_response")  # open, waiting
        started = time.monotonic()
        running.stop(grace=30)
        assert time.monotonic() - started < 10, "the streams held the drain"
        seen = list(watch)  # NOT_SERVING, then the stream ends (not cut off by the grace)
        assert [m.status for m in seen] == [health_pb2.HealthCheckResponse.NOT_SERVING]
    finally:
        pending.put(None)
        channel.close()


def test_reflection_clients_that_hang_up_leave_no_task_behind() -> None:
    """A reflection client reads one answer and drops the call (grpcurl and
    ProtoReflectionDescriptorDatabase do): the server's stream wrapper must not leave a
    task waiting for the drain per call."""
    import asyncio

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    from services.common.server import start_in_thread
    from tests.conftest import server_config

    running = start_in_thread(server_config("style", warmup=False))

    async def tasks() -> int:
        return len(asyncio.all_tasks())

    def count() -> int:
        return asyncio.run_coroutine_threadsafe(tasks(), running.loop).result(10)

    try:
        channel = client.connect(running.target)
        ProtoReflectionDescriptorDatabase(channel).get_services()
        time.sleep(0.5)
        before = count()
        for _ in range(30):
            ProtoReflectionDescriptorDatabase(channel).get_services()
        time.sleep(1.0)
        assert count() <= before + 2, (before, count())
        channel.close()
    finally:
        running.stop()


def test_a_call_still_running_when_the_grace_ends_is_told_why_with_its_request_id(
        small_photo: np.ndarray, style_photo: np.ndarray) -> None:
    """SIGTERM with a 2000-iteration optimisation in flight and a 3 s grace: the call is
    answered UNAVAILABLE naming the signal and the grace, with SERVER_DRAINING and its
    request id, instead of gRPC's bare "Cancelling all calls" with no trailers."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    port = free_port()
    process = start_server("style", port, "--drain-seconds", "3")
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        channel = client.connect(f"127.0.0.1:{port}")
        call = style_pb2_grpc.StyleTransferStub(channel).StylizeWithImage(
            gatys_request(encode(small_photo), encode(style_photo), iterations=2000,
                          max_size=48, progress_every=1), timeout=120,
            metadata=(("x-request-id", "long-optimisation"),))
        assert next(call).HasField("progress")  # in flight
        process.send_signal(signal.SIGTERM)
        try:
            for _ in call:
                pass
        except grpc.RpcError as error:
            ended = error
        else:
            raise AssertionError("the optimisation finished within the grace")
        assert ended.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.details() == (
            "the server is shutting down (SIGTERM); the call did not finish within the 3 s "
            "drain grace (--drain-seconds): retry")
        assert dict(ended.trailing_metadata())["x-request-id"] == "long-optimisation"
        status = rpc_status.from_call(ended)
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info) and info.reason == "SERVER_DRAINING"
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read().decode()  # type: ignore[union-attr]
    assert "drain grace ending" in log and '"msg": "stopped"' in log
