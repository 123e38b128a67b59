"""Search calling the Embedding service over mutual TLS (``--embed-tls-*``), both real
servers on loopback, as the Kubernetes TLS component runs them: one certificate per pod
serves and identifies it as a client."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from percept.v1 import search_pb2, search_pb2_grpc
from services.common.channels import open_channel
from services.common.errors import ServiceError
from services.common.server import RunningServer, start_in_thread
from services.common.tls import ClientTls
from services.search.embedder import RemoteEmbedder
from tests.conftest import server_config
from tests.fixtures.certificates import Authority, SecretFiles, secret
from tests.search.conftest import add, add_requests, photo_variants


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory, authority: Authority
        ) -> dict[str, SecretFiles]:
    """Each pod's Secret: one certificate of the cluster's CA."""
    folder = tmp_path_factory.mktemp("pki")
    return {name: secret(folder / name, authority, name=name) for name in ("embed", "search")}


def tls_flags(files: SecretFiles) -> dict[str, str]:
    return {"tls_cert": str(files.cert), "tls_key": str(files.key),
            "tls_client_ca": str(files.ca)}


@pytest.fixture(scope="module")
def embed_server(pki: dict[str, SecretFiles]) -> Iterator[RunningServer]:
    running = start_in_thread(server_config("embed", warmup=False, **tls_flags(pki["embed"])),
                              timeout=900)
    yield running
    running.stop()


def search_config(data_dir: Path, embed: RunningServer, files: SecretFiles,
                  client_files: SecretFiles | None) -> dict[str, object]:
    client_flags = {} if client_files is None else {
        "embed_tls_cert": str(client_files.cert), "embed_tls_key": str(client_files.key)}
    return {"data_dir": data_dir, "embed_target": f"localhost:{embed.port}",
            "embed_tls_ca": str(files.ca), **client_flags, **tls_flags(files)}


def test_search_embeds_over_mutual_tls(embed_server: RunningServer,
                                       pki: dict[str, SecretFiles], tmp_path: Path) -> None:
    files = pki["search"]
    search = start_in_thread(server_config(
        "search", **search_config(tmp_path / "index", embed_server, files, files)), timeout=900)
    channel = open_channel(f"localhost:{search.port}", [], ClientTls.of(
        ca=str(files.ca), cert=str(files.cert), key=str(files.key)))
    try:
        stub = search_pb2_grpc.ImageSearchStub(channel)
        images = photo_variants(3)
        added, rejected = add(stub, add_requests(images))
        assert (len(added), rejected) == (3, [])
        hits = stub.SearchByImage(search_pb2.SearchByImageRequest(image=images[1], k=1),
                                  timeout=60).hits
        assert [hit.id for hit in hits] == ["img-1"]
        assert stub.SearchByText(search_pb2.SearchByTextRequest(text="a cat", k=3),
                                 timeout=60).hits
    finally:
        channel.close()
        search.stop()


def test_search_without_a_client_certificate_hears_why_before_it_waits(
        embed_server: RunningServer, pki: dict[str, SecretFiles],
        caplog: pytest.LogCaptureFixture) -> None:
    """The wait for the embedding service meets only its deadline (minutes): a refused
    handshake is logged with its likely cause before it, and named in its error."""
    async def start(wait_seconds: float) -> float:
        embedder = RemoteEmbedder(f"127.0.0.1:{embed_server.port}", timeout=wait_seconds,
                                  tls=ClientTls.of(ca=str(pki["search"].ca)))
        began = time.monotonic()
        waiting = asyncio.ensure_future(embedder.start(wait_seconds=wait_seconds))
        try:
            while not [r for r in caplog.records if "refuses the TLS" in r.getMessage()]:
                assert not waiting.done(), waiting.exception()
                await asyncio.sleep(0.05)
            return time.monotonic() - began
        finally:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            await embedder.close()

    with caplog.at_level(logging.WARNING, logger="percept.search"):
        assert asyncio.run(start(wait_seconds=120.0)) < 30.0
    advice = [r for r in caplog.records if "refuses the TLS connection" in r.getMessage()]
    assert len(advice) == 1
    assert "pass --embed-tls-cert and --embed-tls-key" in advice[0].hint  # type: ignore[attr-defined]

    async def give_up() -> None:
        embedder = RemoteEmbedder(f"127.0.0.1:{embed_server.port}", timeout=2.0,
                                  tls=ClientTls.of(ca=str(pki["search"].ca)))
        try:
            await embedder.start(wait_seconds=2.0)
        finally:
            await embedder.close()

    with pytest.raises(ServiceError, match=r"waited 2 s for it; the server ended the TLS "
                                           r"handshake: it may require a client certificate"):
        asyncio.run(give_up())
