"""Crash safety of the search service: kill -9 mid-stream, lost and corrupt snapshots."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from percept.v1 import search_pb2, search_pb2_grpc
from services import client
from services.search.vector_index import IndexSettings
from tests.conftest import REPO, free_port
from tests.search.conftest import add_requests, photo_variants


class SearchProcess:
    """`percept serve search` in a subprocess over a data directory."""

    def __init__(self, data_dir: Path, embed_target: str,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"search-{self.port}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "serve", "search", "--host", "127.0.0.1",
                 "--port", str(self.port), "--metrics-port", "0", "--data-dir", str(data_dir),
                 "--log-format", "json", "--device", "cpu", "--embed-target", embed_target],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.stub = search_pb2_grpc.ImageSearchStub(client.connect(self.target))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if client.health_status(client.connect(self.target), timeout=1) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise AssertionError("search never became SERVING")

    def count(self) -> int:
        return self.stub.Stats(search_pb2.StatsRequest(), timeout=30).count

    def index_type(self) -> str:
        return self.stub.Stats(search_pb2.StatsRequest(), timeout=30).index_type

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    path.mkdir()
    yield path


def test_every_acknowledged_id_survives_kill_9(data_dir: Path, embed_target: str) -> None:
    server = SearchProcess(data_dir, embed_target)
    images = photo_variants(96, seed=7)
    acknowledged: list[str] = []
    killed = threading.Event()

    def slow_requests() -> Iterator[search_pb2.AddImageRequest]:
        for request in add_requests(images, prefix="k9"):
            if killed.is_set():
                return
            yield request

    try:
        for ack in server.stub.AddImages(slow_requests(), timeout=600):
            acknowledged.extend(ack.added)
            if len(acknowledged) >= 32 and not killed.is_set():
                server.process.send_signal(signal.SIGKILL)  # mid-stream, no warning
                killed.set()
    except grpc.RpcError as error:
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    server.process.wait(30)
    assert killed.is_set() and 32 <= len(acknowledged) < 96

    restarted = SearchProcess(data_dir, embed_target)
    try:
        stored = restarted.count()
        # every acknowledged id is there; at most the one batch in flight was committed
        # without its acknowledgement reaching us
        assert len(acknowledged) <= stored <= len(acknowledged) + 16
        for image_id in acknowledged[::7]:
            index = int(image_id.split("-")[1])
            hits = restarted.stub.SearchByImage(search_pb2.SearchByImageRequest(
                image=images[index], k=1), timeout=60).hits
            assert hits[0].id == image_id and hits[0].score > 0.99
    finally:
        restarted.stop()


@pytest.mark.parametrize(("damage", "index"), [("delete", "flat"), ("corrupt", "flat"),
                                               ("corrupt", "ann")])
def test_lost_or_corrupt_snapshot_is_rebuilt(data_dir: Path, embed_target: str, damage: str,
                                             index: str) -> None:
    images = photo_variants(12, seed=3)
    # "ann": a tiny threshold (a server flag, here from the environment) puts the 12 images
    # in the approximate index, so the rebuild from the record must build that kind again
    ann = IndexSettings().ann
    env = {"PERCEPT_SEARCH_ANN_THRESHOLD": "8"} if index == "ann" else {}
    server = SearchProcess(data_dir, embed_target, env)
    try:
        for _ in server.stub.AddImages(iter(add_requests(images, prefix="snap")), timeout=300):
            pass
        expected = ann if index == "ann" else "flat"
        deadline = time.monotonic() + 120  # the switch runs in a background thread
        while server.index_type() != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.index_type() == expected
    finally:
        server.stop()  # a clean stop writes the snapshot
    snapshots = data_dir / "snapshots"
    current = snapshots / (snapshots / "CURRENT").read_text().strip()
    assert json.loads((current / "meta.json").read_text())["kind"] == expected
    if damage == "delete":
        for path in snapshots.rglob("*"):
            if path.is_file():
                path.unlink()
    else:
        index_file = current / "index.faiss"
        data = bytearray(index_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        index_file.write_bytes(bytes(data))
    restarted = SearchProcess(data_dir, embed_target, env)
    try:
        assert restarted.count() == 12 and restarted.index_type() == expected
        hits = restarted.stub.SearchByImage(search_pb2.SearchByImageRequest(image=images[5], k=1),
                                            timeout=60).hits
        assert hits[0].id == "snap-5"
        if index == "ann":  # deletes work on the approximate index
            restarted.stub.DeleteImages(search_pb2.DeleteImagesRequest(ids=["snap-5"]), timeout=60)
            hits = restarted.stub.SearchByImage(search_pb2.SearchByImageRequest(
                image=images[5], k=12), timeout=60).hits
            assert "snap-5" not in {hit.id for hit in hits} and len(hits) == 11
    finally:
        restarted.stop()
    log = restarted.log.read_text()
    assert "rebuilding the index from the record" in log
    assert ("fails its checksum" in log) == (damage == "corrupt")


def test_the_record_is_synced_at_every_commit(tmp_path: Path) -> None:
    """SQLite in WAL mode with synchronous=FULL: an acknowledged write survives a power
    cut, not only a kill -9 (which NORMAL would survive too, so no crash test tells)."""
    from services.search.store import ImageStore

    store = ImageStore(tmp_path / "images.sqlite3", dimension=2)
    try:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        store.close()
