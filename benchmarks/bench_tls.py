"""What TLS costs a client of percept: the super-resolution service on loopback, in
plaintext (the baseline), with TLS (--tls-cert) and with mutual TLS (--tls-client-ca),
with ECDSA P-256 keys and with RSA 2048 ones (deploy/README's recipes), five servers in
one process, timed in the same run and interleaved.

- connect: a new connection's first call (a health Check): TCP, HTTP/2 and, but for
  plaintext, the TLS handshake. Every mode gets a connection of its own each time (a
  channel with its own subchannel pool: gRPC would otherwise hand a new plaintext
  channel the open connection of another), and the credentials are read from their
  files once, before the timing;
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

MODES = ("plaintext", "TLS, P-256", "mutual TLS, P-256", "TLS, RSA 2048",
         "mutual TLS, RSA 2048")
MEASURES = ("connect", "health check", "64 px upscale")
#: Each new channel its own connection (gRPC shares subchannels across channels with the
#: same target and credentials, which would time plaintext without its TCP handshake).
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def _servers(folder: Path) -> dict[str, tuple[RunningServer, ClientTls]]:
    settings: dict[str, tuple[dict[str, str], ClientTls]] = {"plaintext": ({}, ClientTls())}
    for key, label in (("ec", "P-256"), ("rsa", "RSA 2048")):
        authority = Authority(key=key)
        server = secret(folder / f"server-{key}", authority)
        client = secret(folder / f"client-{key}", authority, name="client")
        files = {"tls_cert": str(server.cert), "tls_key": str(server.key)}
        settings[f"TLS, {label}"] = (files, ClientTls.of(ca=str(server.ca)))
        settings[f"mutual TLS, {label}"] = (
            {**files, "tls_client_ca": str(server.ca)},
            ClientTls.of(ca=str(server.ca), cert=str(client.cert), key=str(client.key)))
    running: dict[str, tuple[RunningServer, ClientTls]] = {}
    try:
        for mode in MODES:
            flags, tls = settings[mode]
            running[mode] = (start_in_thread(server_config(
                "superres", warmup=False, log_level="warning", **flags)), tls)
    except BaseException:
        for server_, _ in running.values():
            server_.stop()
        raise
    return running


def _connect(target: str, credentials: grpc.ChannelCredentials | None,
             check: health_pb2.HealthCheckRequest) -> None:
    """A new channel, with a connection of its own, and its first call."""
    fresh = (grpc.secure_channel(target, credentials, options=OWN_CONNECTION)
             if credentials is not None
             else grpc.insecure_channel(target, options=OWN_CONNECTION))
    try:
        health_pb2_grpc.HealthStub(fresh).Check(check, timeout=30)
    finally:
        fresh.close()


def run(quick: bool = False) -> dict[str, Any]:
    image = encode_image(photo(64))
    request = superres_pb2.UpscaleRequest(image=image)
    check = health_pb2.HealthCheckRequest()
    repeats = 15 if quick else 101
    with tempfile.TemporaryDirectory() as folder:
        servers = _servers(Path(folder))
        channels: dict[str, grpc.Channel] = {}
        try:
            actions: dict[str, Callable[[], object]] = {}
            for mode, (running, tls) in servers.items():
                # 127.0.0.1, where the servers listen: "localhost" would try ::1 first
                target = f"127.0.0.1:{running.port}"
                credentials = tls.channel_credentials() if tls.enabled else None
                channel = channels[mode] = open_channel(target, [], tls)
                actions[f"{mode}|connect"] = functools.partial(_connect, target,
                                                               credentials, check)
                actions[f"{mode}|health check"] = functools.partial(
                    health_pb2_grpc.HealthStub(channel).Check, check, timeout=30)
                actions[f"{mode}|64 px upscale"] = functools.partial(
                    superres_pb2_grpc.SuperResolutionStub(channel).Upscale, request,
                    timeout=60)
            medians = interleaved_medians(actions, repeats=repeats, warmup=3)
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
    return {"machine": machine(), "repeats": repeats,
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
