"""Shared fixtures: real servers on loopback, real images, a corpus of broken ones."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from services.common.config import ServerConfig
from services.common.server import RunningServer, start_in_thread
from tests.fixtures.certificates import Authority, SecretFiles, secret

# the client's TLS settings (services/common/tls.py ClientTls.from_environment) of the
# shell that runs the tests would turn every test client's channel to TLS
for _name in [name for name in os.environ if name.startswith("PERCEPT_TLS")]:
    del os.environ[_name]

REPO = Path(__file__).resolve().parent.parent
# The style_server's tile side (the service's default, --style-tile, is 1088).
STYLE_TEST_TILE = 576


@pytest.fixture(autouse=True)
def fresh_failed_call_lines() -> None:
    """Each test's failed calls log from a fresh budget (services.common.rpc: one per
    process, 20 lines of a kind every 10 s): an earlier test's flood of one kind holds
    back no line a later test looks for."""
    from services.common.rpc import DEFAULT_FAILED_CALL_LINES, FAILED_CALL_LINES

    FAILED_CALL_LINES.configure(DEFAULT_FAILED_CALL_LINES)
    FAILED_CALL_LINES.reset()


def is_pushback(value: object) -> bool:
    """Whether ``value`` is a busy answer's grpc-retry-pushback-ms: about one batch's time,
    50 ms to 10 s (services/common/batching.py)."""
    return isinstance(value, str) and value.isdigit() and 50 <= int(value) <= 10_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_config(service: str = "all", **overrides: object) -> ServerConfig:
    values: dict[str, object] = dict(service=service, host="127.0.0.1", port=0, metrics_port=0,
                                     log_format="text", drain_seconds=5.0, device="cpu",
                                     models_dir=REPO / "models")
    values.update(overrides)
    return ServerConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def all_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Every service in one process, as `percept serve all` runs them."""
    running = start_in_thread(server_config("all", metrics_port=free_port(),
                                            data_dir=tmp_path_factory.mktemp("search")),
                              timeout=900)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def style_server() -> Iterator[RunningServer]:
    """The StyleTransfer service alone, on the committed models under models/, with tiles
    of STYLE_TEST_TILE px (the tiling tests stay small)."""
    running = start_in_thread(server_config("style", style_tile=STYLE_TEST_TILE), timeout=600)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_superres(tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[RunningServer, SecretFiles, SecretFiles]]:
    """A super-resolution server that requires client certificates, with its files and a
    client's of the same CA (tests/fixtures/certificates.py)."""
    authority = Authority()
    root = tmp_path_factory.mktemp("mtls")
    files = secret(root / "server", authority)
    running = start_in_thread(server_config(
        "superres", warmup=False, tls_cert=str(files.cert), tls_key=str(files.key),
        tls_client_ca=str(files.ca)))
    yield running, files, secret(root / "client", authority)
    running.stop()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: fastest for small tensors on the shared 2-core machine, and it
    keeps a torch-heavy test module from starving everything else running beside it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **params: object) -> bytes:
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photo (scikit-image's 'chelsea', a cat), 300x451 RGB."""
    from skimage import data

    return np.asarray(data.chelsea())


@pytest.fixture(scope="session")
def small_photo(photo: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize((96, 64), Image.Resampling.BICUBIC))


@pytest.fixture(scope="session")
def style_photo() -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.coffee()).resize((64, 48)))


def rejections() -> float:
    """Every request refused busy so far, by any queue or budget of this process."""
    from services.common.metrics import REJECTED

    return sum(sample.value for metric in REJECTED.collect() for sample in metric.samples
               if sample.name == "percept_rejected_total")


@contextlib.contextmanager
def pixel_budget_full(server: RunningServer, leave: int = 0) -> Iterator[None]:
    """The server's pixel budget (--max-inflight-mpixels) taken but for ``leave`` pixels,
    as by a large request in progress: every image request needing more is refused busy,
    with the retry trailer."""
    from services.common.image_model import pixel_budget

    budget = pixel_budget(server.server.config)
    held = budget.limit - leave

    async def hold() -> None:  # on the server's loop, as requests take it
        assert budget.take(held)

    async def release() -> None:
        budget.give(held)

    asyncio.run_coroutine_threadsafe(hold(), server.loop).result(10)
    try:
        yield
    finally:
        asyncio.run_coroutine_threadsafe(release(), server.loop).result(10)


@contextlib.contextmanager
def slow_header_reads(slow: bytes, seconds: float = 3.0) -> Iterator[None]:
    """Every header read of the image ``slow`` by this process's servers takes
    ``seconds`` longer: a stand-in for an image whose header is slow to read. Every
    format's structure is bounded before Pillow reads it (structure_bounds), so none takes
    seconds any more: a PNG of a million empty chunks took 2.5 s to open before they were
    counted, and the slowest found within the caps, a PNG of 65,534 empty chunks, about
    0.2 s here."""
    import time
    from unittest import mock

    from services.common import images

    read_header = images._open

    def slowly(data: bytes, what: str) -> Image.Image:
        if data == slow:
            time.sleep(seconds)
        return read_header(data, what)

    with mock.patch.object(images, "_open", slowly):
        yield


def check_a_hung_up_header_read_holds_its_slot(
        call: Callable[[bytes, float], object], slow: bytes, good: bytes) -> None:
    """Against a server with one request slot (--max-queue 1): a client that gives up on
    an image whose header takes seconds to read (``slow``, see slow_header_reads) leaves
    the read running, and it keeps the slot: the next request (``good``) is busy
    (RESOURCE_EXHAUSTED) until the read ends, then served. Reads of hung-up requests must
    not pile up."""
    with slow_header_reads(slow):
        _check_the_slot_is_held(call, slow, good)


def _check_the_slot_is_held(call: Callable[[bytes, float], object], slow: bytes,
                            good: bytes) -> None:
    import time

    import grpc

    with pytest.raises(grpc.RpcError) as gave_up:
        call(slow, 0.3)
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as busy:
        call(good, 30)
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, busy.value.details()
    deadline = time.monotonic() + 120
    while True:
        try:
            call(good, 30)
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
