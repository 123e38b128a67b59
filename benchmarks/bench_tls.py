"""What TLS costs a client of percept: the super-resolution service on loopback, in
plaintext (the baseline), with TLS (--tls-cert) and with mutual TLS (--tls-client-ca),
three servers in one process, timed in the same run and interleaved.

- connect: a new channel's first call (a health Check): TCP, HTTP/2 and the TLS
  handshake (ECDSA P-256 certificates from a throwaway CA);
- health check: one call over an open channel (the per-call cost of the encryption on a
  tiny message);
- 64 px upscale: one Upscale (a 64 x 64 PNG in, 256 x 256 out) over an open channel.

python -m benchmarks.bench_tls [--quick]
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.common import interleaved_medians, machine, markdown_table, run_as_script
from benchmarks.image_models import photo
from percept.v1 import superres_pb2, superres_pb2_grpc
from services.common.channels import open_channel
from services.common.images import encode_image
from services.common.server import RunningServer, start_in_thread
from services.common.tls import ClientTls
from tests.conftest import server_config
from tests.fixtures.certificates import Authority, secret

MODES = ("plaintext", "TLS", "mutual TLS")
MEASURES = ("connect", "health check", "64 px upscale")


def _servers(folder: Path) -> dict[str, tuple[RunningServer, ClientTls]]:
    authority = Authority()
    server = secret(folder / "server", authority)
    client = secret(folder / "client", authority, name="client")
    files = {"tls_cert": str(server.cert), "tls_key": str(server.key)}
    settings = {
        "plaintext": ({}, ClientTls()),
        "TLS": (files, ClientTls.of(ca=str(server.ca))),
        "mutual TLS": ({**files, "tls_client_ca": str(server.ca)},
                       ClientTls.of(ca=str(server.ca), cert=str(client.cert),
                                    key=str(client.key)))}
    running = {}
    try:
        for mode, (flags, tls) in settings.items():
            running[mode] = (start_in_thread(server_config(
                "superres", warmup=False, log_level="warning", **flags)), tls)
    except BaseException:
        for server_, _ in running.values():
            server_.stop()
        raise
    return running


def run(quick: bool = False) -> dict[str, Any]:
    image = encode_image(photo(64))
    request = superres_pb2.UpscaleRequest(image=image)
    check = health_pb2.HealthCheckRequest()
    with tempfile.TemporaryDirectory() as folder:
        servers = _servers(Path(folder))
        channels: dict[str, grpc.Channel] = {}
        try:
            actions: dict[tuple[str, str], Callable[[], object]] = {}
            for mode, (running, tls) in servers.items():
                target = f"localhost:{running.port}"
                channel = channels[mode] = open_channel(target, [], tls)
                health = health_pb2_grpc.HealthStub(channel).Check
                upscale = superres_pb2_grpc.SuperResolutionStub(channel).Upscale

                def connect(target: str = target, tls: ClientTls = tls) -> None:
                    fresh = open_channel(target, [], tls)
                    try:
                        health_pb2_grpc.HealthStub(fresh).Check(check, timeout=30)
                    finally:
                        fresh.close()

                actions[mode, "connect"] = connect
                actions[mode, "health check"] = functools.partial(health, check, timeout=30)
                actions[mode, "64 px upscale"] = functools.partial(upscale, request,
                                                                   timeout=60)
            medians = interleaved_medians(
                {f"{mode}|{measure}": action for (mode, measure), action in actions.items()},
                repeats=15 if quick else 101, warmup=3)
        finally:
            for channel in channels.values():
                channel.close()
            for running, _ in servers.values():
                running.stop()
    rows = []
    for measure in MEASURES:
        baseline = medians[f"plaintext|{measure}"]
        for mode in MODES:
            seconds = medians[f"{mode}|{measure}"]
            rows.append({"measure": measure, "mode": mode, "ms": seconds * 1000,
                         "extra_ms": (seconds - baseline) * 1000,
                         "x_plaintext": seconds / baseline})
    return {"machine": machine(), "repeats": 15 if quick else 101,
            "image": f"64 x 64 PNG, {len(image)} bytes", "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    table = markdown_table(
        ["measure", "mode", "median ms", "ms over plaintext", "x plaintext"],
        [(r["measure"], r["mode"], r["ms"], r["extra_ms"], r["x_plaintext"])
         for r in result["rows"]])
    return (f"### TLS against plaintext (one client, loopback)\n\nMachine: "
            f"{result['machine']}; medians of {result['repeats']} interleaved rounds; "
            f"upscale input: {result['image']}\n\n{table}")


if __name__ == "__main__":
    raise SystemExit(run_as_script("tls", __doc__, run, markdown))
