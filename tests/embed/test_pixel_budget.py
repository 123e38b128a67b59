"""Image decodes in the Embedding service count against the process's pixel budget
(``--max-inflight-mpixels``), as the style and super-resolution services' do: a burst of
large images over it is refused as busy, not decoded all at once."""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from PIL import Image

from percept.v1 import embed_pb2, embed_pb2_grpc
from services import client
from services.common.errors import RETRY_PUSHBACK_KEY
from services.common.image_model import pixel_budget
from services.common.server import RunningServer, start_in_thread
from tests.conftest import (
    check_a_hung_up_header_read_holds_its_slot,
    encode,
    pixel_budget_full,
    rejections,
    server_config,
)

BUDGET_MPIXELS = 25


@pytest.fixture(scope="module")
def tight_server() -> Iterator[RunningServer]:
    running = start_in_thread(server_config("embed", max_inflight_mpixels=BUDGET_MPIXELS),
                              timeout=900)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def large_png() -> bytes:
    """A 5000 x 4000 (20 MP) PNG: 0.3 MiB on the wire, 60 MB once decoded, about 0.2 s to
    decode. Two of them at once are over the 25 MP budget."""
    pixels = np.zeros((4000, 5000, 3), np.uint8)
    pixels[..., 0] = np.arange(5000) % 256
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _outcome(call: object) -> tuple[str, str, str | None]:
    try:
        call()  # type: ignore[operator]
        return "OK", "", None
    except grpc.RpcError as error:
        trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
        return error.code().name, error.details() or "", trailers.get(RETRY_PUSHBACK_KEY)


@pytest.mark.parametrize("rpc", ["LabelImage", "EmbedImages"])
def test_a_large_image_over_what_is_left_of_the_pixel_budget_is_refused_as_busy(
        tight_server: RunningServer, large_png: bytes, photo: np.ndarray, rpc: str) -> None:
    """While other requests hold all but 10 MP of the 25 MP budget, a 20 MP image is
    refused busy (with the retry trailer) before it is decoded, and a small one is served;
    once they are done, the large one is served too."""
    stub = embed_pb2_grpc.EmbeddingStub(client.connect(tight_server.target))

    def call() -> object:
        if rpc == "LabelImage":
            return stub.LabelImage(embed_pb2.LabelImageRequest(image=large_png, k=1),
                                   timeout=120)
        return stub.EmbedImages(embed_pb2.EmbedImagesRequest(images=[large_png]), timeout=120)

    refused_before = rejections()
    with pixel_budget_full(tight_server, leave=10_000_000):
        code, details, pushback = _outcome(call)
        assert code == "RESOURCE_EXHAUSTED", details
        assert "--max-inflight-mpixels" in details and "retry" in details, details
        assert pushback is not None and pushback.isdigit()
        small = stub.LabelImage(embed_pb2.LabelImageRequest(image=encode(photo), k=1),
                                timeout=60)
        assert len(small.labels) == 1
    assert rejections() == refused_before + 1
    assert _outcome(call)[0] == "OK"
    # every request gave back what it took, and the service still answers
    assert pixel_budget(tight_server.server.config).in_use == 0
    assert client.health_status(client.connect(tight_server.target),
                                "percept.v1.Embedding") == "SERVING"


def test_one_image_over_the_whole_budget_is_still_served(tight_server: RunningServer) -> None:
    """One request is always admitted, whatever its size (as PixelBudget promises)."""
    pixels = np.full((6000, 5000, 3), 200, np.uint8)  # 30 MP, over the 25 MP budget alone
    stub = embed_pb2_grpc.EmbeddingStub(client.connect(tight_server.target))
    response = stub.LabelImage(embed_pb2.LabelImageRequest(
        image=encode(pixels, compress_level=1), k=1), timeout=120)
    assert len(response.labels) == 1
    assert pixel_budget(tight_server.server.config).in_use == 0


def test_a_hung_up_header_read_keeps_its_request_slot(small_photo: np.ndarray) -> None:
    running = start_in_thread(server_config("embed", max_queue=1), timeout=900)
    channel = client.connect(running.target)
    stub = embed_pb2_grpc.EmbeddingStub(channel)
    try:
        check_a_hung_up_header_read_holds_its_slot(
            lambda image, timeout: stub.LabelImage(
                embed_pb2.LabelImageRequest(image=image, k=1), timeout=timeout),
            encode(small_photo[::-1]), encode(small_photo))
    finally:
        channel.close()
        running.stop()


def test_a_batch_of_more_images_than_max_queue_is_computed_once_each(photo: np.ndarray
                                                                     ) -> None:
    """--max-queue counts image requests, and every image of an admitted request has its
    place in the batcher's queue: EmbedImages of more images than --max-queue is served
    (it used to be refused busy part way, for ever, with a retry hint), each image
    computed once."""
    from prometheus_client import REGISTRY

    running = start_in_thread(server_config("embed", max_queue=4, max_batch=1,
                                            max_wait_ms=50.0), timeout=900)
    stub = embed_pb2_grpc.EmbeddingStub(client.connect(running.target))

    def computed() -> float:
        return REGISTRY.get_sample_value("percept_batch_size_sum",
                                         {"queue": "embed-images"}) or 0.0

    try:
        before = computed()
        reply = stub.EmbedImages(embed_pb2.EmbedImagesRequest(images=[encode(photo)] * 5),
                                 timeout=60)
        assert len(reply.embeddings) == 5
        assert computed() - before == 5
    finally:
        running.stop()
