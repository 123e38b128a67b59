"""Real images for the search tests: crops of scikit-image's photos."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from percept.v1 import search_pb2, search_pb2_grpc
from services.common.server import start_in_thread
from tests.conftest import encode, server_config


@pytest.fixture(scope="module")
def embed_target() -> Iterator[str]:
    """One Embedding service for a test module's search servers (`--embed-target`, as the
    Kubernetes deployment runs them): each of them, and each restart, then loads no
    models of its own (2.6 instead of 9 s on 2 cores); the crashes under test are the
    search process's."""
    running = start_in_thread(server_config("embed"), timeout=900)
    yield running.target
    running.stop()


def photo_variants(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct PNGs: random crops and flips of real photos."""
    from skimage import data

    sources = [np.asarray(getattr(data, name)()) for name in
               ("chelsea", "coffee", "astronaut", "rocket")]
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        source = sources[i % len(sources)]
        height, width = source.shape[:2]
        size = int(rng.integers(min(height, width) // 2, min(height, width)))
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        crop = source[top:top + size, left:left + size]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        images.append(encode(np.asarray(Image.fromarray(np.ascontiguousarray(crop))
                                        .resize((96, 96), Image.Resampling.BILINEAR))))
    return images


def add(stub: search_pb2_grpc.ImageSearchStub, requests: list[search_pb2.AddImageRequest]
        ) -> tuple[list[str], list[search_pb2.Rejection]]:
    """Streams ``requests`` to AddImages: (the ids added, the rejections)."""
    added, rejected = [], []
    for ack in stub.AddImages(iter(requests), timeout=300):
        added.extend(ack.added)
        rejected.extend(ack.rejected)
    return added, rejected


def add_requests(images: list[bytes], prefix: str = "img") -> list[search_pb2.AddImageRequest]:
    return [search_pb2.AddImageRequest(id=f"{prefix}-{i}", uri=f"file:///{prefix}/{i}.png",
                                       image=image) for i, image in enumerate(images)]


@pytest.fixture(scope="session")
def variants() -> list[bytes]:
    return photo_variants(48)
