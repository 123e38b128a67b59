"""A client in another gRPC implementation: grpc-js (pure JavaScript, its own HTTP/2 and
protobuf code), with the API loaded from protos/ at run time, against real servers
(tests/interop/node/client.mjs; make test installs its packages with npm ci:
scripts/setup_tests.sh). What README ("Clients in other languages") promises a client in
any language: the .proto files load as they are, replies over 4 MiB arrive with the
receive limit raised, gzip-compressed requests are accepted, every error carries
google.rpc details that decode outside Python, busy answers carry the pushback trailer,
and streams work both ways; mutual TLS agrees with another TLS stack."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from services.common.server import RunningServer
from tests.conftest import REPO, encode, pixel_budget_full
from tests.fixtures.certificates import Authority, SecretFiles, secret
from tests.fixtures.tcp_proxy import TcpProxy

CLIENT = REPO / "tests" / "interop" / "node" / "client.mjs"


def _google_protos() -> Path:
    """Where google/rpc/*.proto lie: googleapis-common-protos' site-packages."""
    return Path(str(metadata.distribution("googleapis-common-protos").locate_file("")))


def node_client(scenario: str, target: str, *args: str, timeout: float = 180
                ) -> dict[str, Any]:
    """What client.mjs printed for ``scenario``; AssertionError where it failed."""
    node = shutil.which("node")
    assert node, "node is not installed (make test installs it: scripts/setup_tests.sh)"
    assert (CLIENT.parent / "node_modules").is_dir(), \
        "tests/interop/node has no node_modules (make test runs scripts/setup_tests.sh)"
    done = subprocess.run([node, str(CLIENT), scenario, target, "--protos",
                           str(REPO / "protos"), "--google-protos", str(_google_protos()),
                           *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


class _Counted:
    """A socket's sendall, counted."""

    def __init__(self, sink: socket.socket, counts: list[int]) -> None:
        self.sink, self.counts = sink, counts

    def sendall(self, data: bytes) -> None:
        self.counts.append(len(data))
        self.sink.sendall(data)

    def close(self) -> None:
        self.sink.close()


class CountingProxy(TcpProxy):
    """Counts the bytes clients send to the server."""

    def __init__(self, upstream_port: int) -> None:
        self.sent: list[int] = []
        super().__init__(upstream_port)

    def to_server(self, client: socket.socket, upstream: socket.socket, number: int,
                  frozen: threading.Event) -> None:
        self.pump(client, _Counted(upstream, self.sent), frozen)  # type: ignore[arg-type]


def test_a_reply_over_4_mib_arrives_and_a_gzip_request_is_accepted(
        all_server: RunningServer, tmp_path: Path) -> None:
    """A flat BMP's 720 kB go over the wire as a few kB when grpc-js compresses them."""
    flat = np.full((400, 600, 3), (40, 120, 200), dtype=np.uint8)
    bmp = tmp_path / "flat.bmp"
    bmp.write_bytes(encode(flat, "BMP"))
    proxy = CountingProxy(all_server.port)
    try:
        sent_before = 0
        for compression, most in (("gzip", 0.05), ("none", 1.5)):
            out = tmp_path / f"{compression}.png"
            result = node_client("upscale", proxy.target, str(bmp), str(out), compression)
            assert (result["width"], result["height"]) == (2400, 1600)
            with Image.open(out) as image:
                assert image.size == (2400, 1600)
                assert image.getpixel((1200, 800)) == pytest.approx((40, 120, 200), abs=3)
            sent = sum(proxy.sent) - sent_before
            sent_before = sum(proxy.sent)
            assert sent < most * bmp.stat().st_size, (compression, sent)
            if compression == "none":
                assert sent > bmp.stat().st_size
    finally:
        proxy.close()
    photo = tmp_path / "photo.png"
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    photo.write_bytes(encode(noise))
    big = node_client("upscale", all_server.target, str(photo), str(tmp_path / "big.png"))
    assert big["bytes"] > 4 * 1024 * 1024, big  # gRPC's default receive limit


def test_an_error_decodes_to_its_google_rpc_details(all_server: RunningServer) -> None:
    result = node_client("error", all_server.target)
    message = "not a decodable image (PNG, JPEG, WebP, GIF, BMP or TIFF)"
    assert result["code"] == "INVALID_ARGUMENT" and result["message"] == message
    assert result["pushback_ms"] is None and len(result["request_id"]) == 16
    status = result["status"]
    assert (status["code"], status["message"]) == (3, message)
    info = status["details"]["google.rpc.ErrorInfo"]
    assert (info["domain"], info["reason"]) == ("percept.v1", "IMAGE_UNDECODABLE")
    (violation,) = status["details"]["google.rpc.BadRequest"]["fieldViolations"]
    assert violation["field"] == "image"


def test_a_busy_answer_carries_the_pushback_and_retry_info(
        all_server: RunningServer, small_photo: np.ndarray, tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(encode(small_photo))
    with pixel_budget_full(all_server):
        result = node_client("busy", all_server.target, str(image))
    assert result["code"] == "RESOURCE_EXHAUSTED", result
    pushback = int(result["pushback_ms"])
    assert 50 <= pushback <= 10_000
    details = result["status"]["details"]
    assert details["google.rpc.ErrorInfo"]["reason"] == "PIXEL_BUDGET_FULL"
    delay = details["google.rpc.RetryInfo"]["retryDelay"]
    assert delay["seconds"] * 1000 + delay["nanos"] // 1_000_000 == pushback


def test_a_stylize_and_an_unknown_style(all_server: RunningServer, small_photo: np.ndarray,
                                        tmp_path: Path) -> None:
    image = tmp_path / "cat.png"
    image.write_bytes(encode(small_photo))
    result = node_client("stylize", all_server.target, str(image), "starry-night")
    height, width = small_photo.shape[:2]
    assert (result["width"], result["height"]) == (width, height)
    assert result["model"].startswith("style-starry-night@")
    unknown = result["unknown"]
    assert unknown["code"] == "NOT_FOUND"
    info = unknown["status"]["details"]["google.rpc.ErrorInfo"]
    assert info["reason"] == "STYLE_NOT_FOUND"
    assert "starry-night" in info["metadata"]["available"].split(",")


def test_a_bidirectional_stream_adds_and_rejects_then_search_finds(
        all_server: RunningServer, tmp_path: Path) -> None:
    from services import client

    image = tmp_path / "pattern.png"  # an image no other test indexes
    pattern = np.random.default_rng(20261129).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image.write_bytes(encode(np.kron(pattern, np.ones((24, 24, 1), dtype=np.uint8))))
    image_id = f"node-interop/{tmp_path.name}"
    try:
        result = node_client("search", all_server.target, str(image), image_id)
    finally:
        with client.connect(all_server.target) as channel:
            client.delete_images(channel, [image_id])
    # one acknowledgement per item: the second was sent only after the first had come
    first, second = result["acks"]
    assert first == {"added": [image_id], "rejected": []}
    assert second["added"] == []
    assert [(r["id"], r["code"]) for r in second["rejected"]] == [(f"{image_id}-broken",
                                                                   "INVALID_ARGUMENT")]
    (hit,) = result["hits"]
    assert hit["uri"] == f"file:///{image_id}" and hit["score"] == pytest.approx(1, abs=1e-3)


def test_mutual_tls_with_node_s_openssl(
        mtls_superres: tuple[RunningServer, SecretFiles, SecretFiles],
        small_photo: np.ndarray, tmp_path: Path) -> None:
    """Another TLS stack (Node's OpenSSL, against gRPC core's) agrees on the handshake:
    with the client's certificate the call is served; without it, or trusting another CA,
    the connection fails (UNAVAILABLE) and the server keeps serving."""
    running, server, mine = mtls_superres
    image = tmp_path / "cat.png"
    image.write_bytes(encode(small_photo))
    target = f"127.0.0.1:{running.port}"
    served = node_client("tls", target, str(image), str(server.ca), str(mine.cert),
                         str(mine.key))
    height, width = small_photo.shape[:2]
    assert (served["code"], served["width"], served["height"]) == ("OK", 4 * width,
                                                                  4 * height)
    assert node_client("tls", target, str(image), str(server.ca))["code"] == "UNAVAILABLE"
    stranger = secret(tmp_path / "other", Authority("another CA"))
    assert node_client("tls", target, str(image), str(stranger.ca), str(mine.cert),
                       str(mine.key))["code"] == "UNAVAILABLE"
    again = node_client("tls", target, str(image), str(server.ca), str(mine.cert),
                        str(mine.key))
    assert again["code"] == "OK"
