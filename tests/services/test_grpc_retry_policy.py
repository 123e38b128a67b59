"""What gRPC's own retry policy does with a busy server's pushback, as deploy/README.md
tells users who write their own clients: it honours the ``grpc-retry-pushback-ms`` trailer,
makes at most 5 attempts (so it rides out only a short busy spell), and does not retry a
request larger than its retry buffer (256 KiB by default) unless the buffer is raised."""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest

from percept.v1 import embed_pb2, embed_pb2_grpc
from services.common.server import RunningServer
from tests.conftest import encode, pixel_budget_full, rejections

RETRY_POLICY = {"methodConfig": [{
    "name": [{"service": "percept.v1.Embedding"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["RESOURCE_EXHAUSTED"]},
}]}
LARGE_RETRY_BUFFER: list[tuple[str, object]] = [("grpc.per_rpc_retry_buffer_size", 64 << 20),
                      ("grpc.retry_buffer_size", 256 << 20)]


def label_while_busy(server: RunningServer, image: bytes, options: list[tuple[str, object]],
                     *, busy_until_refused: bool) -> tuple[str, float]:
    """LabelImage through a channel with RETRY_POLICY while the server's pixel budget is
    full: until the server has refused it once (``busy_until_refused``), or until the call
    ends. Returns the call's status and how many attempts the server refused."""
    channel = grpc.insecure_channel(server.target, options=[
        ("grpc.service_config", json.dumps(RETRY_POLICY)),
        ("grpc.max_send_message_length", 64 << 20), *options])
    before = rejections()
    result: list[str] = []

    def call() -> None:
        try:
            embed_pb2_grpc.EmbeddingStub(channel).LabelImage(
                embed_pb2.LabelImageRequest(image=image, k=1), timeout=30)
            result.append("OK")
        except grpc.RpcError as error:
            result.append(error.code().name)

    caller = threading.Thread(target=call)
    try:
        with pixel_budget_full(server):
            caller.start()
            deadline = time.monotonic() + 30
            while caller.is_alive() and time.monotonic() < deadline:
                if busy_until_refused and rejections() > before:
                    break
                time.sleep(0.005)
        caller.join(30)
        return result[0], rejections() - before
    finally:
        channel.close()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {"small": encode(rng.integers(0, 256, (64, 64, 3), np.uint8)),  # 12 KB
            "large": encode(rng.integers(0, 256, (600, 600, 3), np.uint8))}  # 1 MB


def test_a_short_busy_spell_is_retried_through(all_server: RunningServer,
                                                images: dict[str, bytes]) -> None:
    status, refused = label_while_busy(all_server, images["small"], [], busy_until_refused=True)
    assert status == "OK" and refused >= 1


def test_at_most_five_attempts_then_the_busy_answer(all_server: RunningServer,
                                                    images: dict[str, bytes]) -> None:
    status, refused = label_while_busy(all_server, images["small"], [], busy_until_refused=False)
    assert (status, refused) == ("RESOURCE_EXHAUSTED", 5)


def test_a_request_over_the_retry_buffer_is_retried_only_with_a_larger_buffer(
        all_server: RunningServer, images: dict[str, bytes]) -> None:
    assert len(images["large"]) > 256 * 1024
    once = label_while_busy(all_server, images["large"], [], busy_until_refused=True)
    assert once == ("RESOURCE_EXHAUSTED", 1)
    status, refused = label_while_busy(all_server, images["large"], LARGE_RETRY_BUFFER,
                                       busy_until_refused=True)
    assert status == "OK" and refused >= 1
