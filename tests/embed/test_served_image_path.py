"""What the Embedding service runs an image through, over real gRPC: a large JPEG is
decoded at a reduced size (libjpeg's scaled DCT, at least DECODE_MIN_SIDE pixels a side)
and embedded within cosine 0.98 of its full decode; the backbone is served with its
BatchNorms folded into the convolutions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from percept.v1 import embed_pb2, embed_pb2_grpc
from services import client
from services.common.images import decode_image
from services.common.server import RunningServer, start_in_thread
from services.embed.preprocess import DECODE_MIN_SIDE, INPUT_SIZE
from tests.conftest import encode, server_config

CAP = 64_000_000


@pytest.fixture(scope="module")
def embed_server() -> Iterator[RunningServer]:
    running = start_in_thread(server_config("embed"), timeout=900)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(embed_server: RunningServer) -> embed_pb2_grpc.EmbeddingStub:
    return embed_pb2_grpc.EmbeddingStub(client.connect(embed_server.target))


def _embedding(stub: embed_pb2_grpc.EmbeddingStub, image: bytes) -> np.ndarray:
    reply = stub.EmbedImages(embed_pb2.EmbedImagesRequest(images=[image]), timeout=120)
    return np.array(reply.embeddings[0].values, dtype=np.float64)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _retina() -> bytes:
    """scikit-image's retina.jpg: a real 1411 x 1411 photo."""
    import skimage

    return (Path(skimage.__file__).parent / "data" / "retina.jpg").read_bytes()


def _large_jpeg(name: str) -> bytes:
    """A scikit-image photo enlarged 4x (bicubic) and saved as a JPEG: 1800 px and more."""
    from skimage import data

    photo = Image.fromarray(np.asarray(getattr(data, name)()))
    large = photo.resize((photo.width * 4, photo.height * 4), Image.Resampling.BICUBIC)
    return encode(np.asarray(large), "JPEG", quality=90)


@pytest.mark.parametrize("jpeg", [_retina, lambda: _large_jpeg("chelsea"),
                                  lambda: _large_jpeg("coffee")],
                         ids=["retina", "chelsea-x4", "coffee-x4"])
def test_a_large_jpeg_is_embedded_from_its_reduced_decode(
        stub: embed_pb2_grpc.EmbeddingStub, jpeg: Callable[[], bytes]) -> None:
    """The served vector is that of the reduced decode (the same pixels sent losslessly
    give the same vector), and it is within cosine 0.98 of the full decode's."""
    data = jpeg()
    full = decode_image(data, max_pixels=CAP, srgb=True).rgb
    reduced = decode_image(data, max_pixels=CAP, srgb=True,
                           draft_min_side=DECODE_MIN_SIDE).rgb
    assert DECODE_MIN_SIDE == 2 * INPUT_SIZE
    assert min(reduced.shape[:2]) >= DECODE_MIN_SIDE
    assert min(reduced.shape[:2]) < min(full.shape[:2]) // 1.5  # it was reduced
    served = _embedding(stub, data)
    from_reduced = _embedding(stub, encode(reduced))  # PNG: decoded as it is
    from_full = _embedding(stub, encode(full))
    np.testing.assert_allclose(served, from_reduced, atol=1e-6)
    assert _cosine(served, from_full) >= 0.98


def test_a_small_jpeg_is_embedded_from_its_full_decode(
        stub: embed_pb2_grpc.EmbeddingStub, photo: np.ndarray) -> None:
    data = encode(photo, "JPEG", quality=90)  # 451 x 300: nothing to reduce
    full = decode_image(data, max_pixels=CAP, srgb=True).rgb
    np.testing.assert_allclose(_embedding(stub, data), _embedding(stub, encode(full)),
                               atol=1e-6)


def test_the_backbone_is_served_with_its_batch_norms_folded(
        embed_server: RunningServer) -> None:
    service = next(m for m in embed_server.server.modules if m.name == "embed")
    backbone = service.backbone  # type: ignore[attr-defined]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    from training.nets.efficientnet_lite import load_efficientnet_lite0

    shared = load_efficientnet_lite0(service.device)  # type: ignore[attr-defined]
    assert backbone is not shared  # the module training code shares keeps its BatchNorms
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in shared.modules()) == 49
