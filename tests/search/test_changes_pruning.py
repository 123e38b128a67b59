"""The record's change log is pruned once a snapshot holding its changes is saved: it grew
without bound (a soak left 5,657 rows for 21 live images), while a start reads only the
changes after the current snapshot's seq (a catch-up) or none (a rebuild from the images).

Real SQLite and FAISS on tmp_path, and a real search server on loopback; a crash is the
state it leaves (a prune cut off between its chunks, a snapshot saved and not pruned).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from percept.v1 import search_pb2, search_pb2_grpc
from services import client
from services.common.config import ServerConfig
from services.search import service as search_service
from services.search import store as search_store
from services.search.service import ImageSearchService, recover_index
from services.search.store import ImageStore
from services.search.vector_index import IndexSettings, VectorIndex
from tests.search.conftest import add, add_requests, photo_variants
from tests.search.test_data_dir_faults import search_module, start_search

DIMENSION = 8

#: The record's schema as the first search service wrote it (a record made by older code).
OLD_SCHEMA = """
CREATE TABLE images (id TEXT PRIMARY KEY, uri TEXT NOT NULL, vector BLOB NOT NULL,
                     added REAL NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL,
                      op TEXT NOT NULL CHECK (op IN ('put', 'delete')));
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=DIMENSION).astype(np.float32)


class Images:
    """What the record should hold: the live ids' vectors, and the ids deleted since."""

    def __init__(self) -> None:
        self.live: dict[str, np.ndarray] = {}
        self.deleted: set[str] = set()
        self._seed = 0

    def new(self, image_id: str) -> tuple[str, str, np.ndarray]:
        self._seed += 1
        self.live[image_id] = vector(self._seed)
        self.deleted.discard(image_id)
        return image_id, f"file:///{image_id}", self.live[image_id]

    def gone(self, image_id: str) -> str:
        del self.live[image_id]
        self.deleted.add(image_id)
        return image_id


def open_service(data_dir: Path) -> ImageSearchService:
    """The search service's record, index and snapshots over ``data_dir``, recovered as a
    start recovers them (no embedder, no gRPC: the writes are given vectors)."""
    service = ImageSearchService(ServerConfig(service="search", data_dir=data_dir))
    service.store = ImageStore(data_dir / "images.sqlite3", DIMENSION)
    service.snapshots = data_dir / "snapshots"
    service.index, service.snapshot_seq = recover_index(service.store, service.snapshots,
                                                        DIMENSION, IndexSettings())
    service._write_thread_lock = threading.Lock()
    service._snapshot_lock = threading.Lock()
    return service


def restart(service: ImageSearchService) -> ImageSearchService:
    service.store.close()
    return open_service(service.store.data_dir)


def change_rows(record: Path) -> int:
    db = sqlite3.connect(record)
    try:
        return int(db.execute("SELECT COUNT(*) FROM changes").fetchone()[0])
    finally:
        db.close()


def assert_index_holds(service: ImageSearchService, images: Images) -> None:
    """Every live image is its own nearest hit, and no deleted one is found at all."""
    assert len(service.index) == service.store.count() == len(images.live)
    ids = list(images.live)
    if ids:
        hits = service.index.search(np.vstack([images.live[i] for i in ids]), 1)
        assert [row[0][0] for row in hits] == ids
    found = {i for row in service.index.search(np.vstack(
        [vector(s) for s in range(1, 40)]), len(ids) + 5) for i, _ in row}
    assert not found & images.deleted


@pytest.fixture()
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "data"
    path.mkdir()
    yield path


def test_the_change_log_stays_bounded_over_many_put_and_delete_cycles(data_dir: Path) -> None:
    """200 cycles of puts, replaces and deletes, a snapshot every 5: the log holds the
    changes after the latest snapshot and the latest change, not every change ever made."""
    service = open_service(data_dir)
    record = service.store.path
    images = Images()
    for cycle in range(200):
        service._put([images.new(f"keep-{cycle % 21}"), images.new(f"gone-{cycle}")])
        assert service._delete([images.gone(f"gone-{cycle}")]) == []
        if cycle % 5 == 4:
            service._snapshot()
            assert service.snapshot_seq == service.store.last_seq() == 3 * (cycle + 1)
            assert change_rows(record) == 1
        assert change_rows(record) <= 1 + 3 * 5
    assert service.store.last_seq() == 600
    service = restart(service)
    try:
        assert_index_holds(service, images)
    finally:
        service.store.close()


def test_a_restart_after_pruning_catches_up_from_the_snapshot(
        data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Changes after a pruned snapshot (as a kill -9 before the next snapshot leaves them)
    are all still in the log, and the start applies them: new, replaced and deleted ids."""
    service = open_service(data_dir)
    images = Images()
    service._put([images.new(f"a-{i}") for i in range(10)])
    service._delete([images.gone("a-0"), images.gone("a-1")])
    service._snapshot()
    snapshot = service.snapshot_seq
    assert change_rows(service.store.path) == 1
    service._put([images.new("a-2"), images.new("b-0"), images.new("b-1")])  # a replace
    service._delete([images.gone("a-3"), images.gone("b-1")])
    assert len(service.store.changes_since(snapshot)) == 5
    with caplog.at_level(logging.INFO, logger="percept.search"):
        service = restart(service)
    try:
        assert service.snapshot_seq == snapshot < service.store.last_seq()
        assert any("caught up from the change log" in r.getMessage() for r in caplog.records)
        assert_index_holds(service, images)
    finally:
        service.store.close()


def _make_changes_without_autoincrement(record: Path) -> None:
    """A changes table whose key SQLite may reuse: without AUTOINCREMENT a new row's key is
    one more than the largest left, so a log pruned to nothing would start again at 1."""
    db = sqlite3.connect(record)
    db.executescript("CREATE TABLE changes (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, "
                     "op TEXT NOT NULL CHECK (op IN ('put', 'delete')));")
    db.close()


@pytest.mark.parametrize("key", ["autoincrement", "reusable"])
def test_the_seq_stays_monotonic_after_pruning_everything_and_restarting(
        data_dir: Path, key: str) -> None:
    """Every image deleted, snapshotted and pruned, then a restart: the next change gets a
    seq above the snapshot's (a reused one would be taken for a change it holds, and the
    catch-up would skip it), and last_seq is not 0 (which reads as a new record)."""
    if key == "reusable":
        _make_changes_without_autoincrement(data_dir / "images.sqlite3")
    service = open_service(data_dir)
    images = Images()
    service._put([images.new(f"x-{i}") for i in range(5)])
    service._delete([images.gone(f"x-{i}") for i in range(5)])
    service._snapshot()
    assert service.snapshot_seq == 10 and service.store.count() == 0
    service = restart(service)
    try:
        assert service.store.last_seq() == service.snapshot_seq == 10
        assert service.store.put_many([images.new("after")]) == 11
        assert change_rows(service.store.path) == 2  # the latest pruned one is kept
    finally:
        service.store.close()
    service = open_service(data_dir)  # a kill -9 after that put: the catch-up finds it
    try:
        assert_index_holds(service, images)
        service._snapshot()
        assert service.store.put_many([images.new("later")]) == 12
    finally:
        service.store.close()


def _old_format_record(data_dir: Path) -> tuple[Images, int]:
    """A record as older code left it (the first schema, no record id, an unpruned log of
    5,657 changes for 21 live images) and its snapshot (no record named), 40 changes old.
    Returns what it holds and the snapshot's seq."""
    db = sqlite3.connect(data_dir / "images.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO meta VALUES ('dimension', ?)", (str(DIMENSION),))
    images = Images()

    def change(image_id: str, op: str) -> None:
        seq = db.execute("INSERT INTO changes (id, op) VALUES (?, ?)", (image_id, op)).lastrowid
        if op == "put":
            _, uri, vec = images.new(image_id)
            db.execute("INSERT OR REPLACE INTO images VALUES (?, ?, ?, 0, ?)",
                       (image_id, uri, vec.tobytes(), seq))
        else:
            images.gone(image_id)
            db.execute("DELETE FROM images WHERE id = ?", (image_id,))

    snapshot = 5_657 - 40
    for n in range(5_657):
        image_id = f"img-{n % 24}"
        change(image_id, "delete" if image_id in images.live and n % 3 == 0 else "put")
        if n + 1 == snapshot:
            ids = list(images.live)
            index = VectorIndex.build(DIMENSION, ids, np.vstack([images.live[i] for i in ids]))
            index.save_snapshot(data_dir / "snapshots", snapshot)
    while len(images.live) > 21:
        change(next(iter(images.live)), "delete")
    while len(images.live) < 21:
        change(f"extra-{len(images.live)}", "put")
    db.commit()
    db.close()
    return images, snapshot


def test_an_old_format_record_opens_catches_up_and_is_pruned(data_dir: Path) -> None:
    images, snapshot = _old_format_record(data_dir)
    record = data_dir / "images.sqlite3"
    assert change_rows(record) > 5_657 - 1
    service = open_service(data_dir)
    try:
        assert service.snapshot_seq == snapshot  # loaded and caught up, not rebuilt
        assert len(images.live) == 21
        assert_index_holds(service, images)
        last = service.store.last_seq()
        service._snapshot()
        assert change_rows(record) == 1 and service.store.last_seq() == last
        service._put([images.new("new-0")])
        assert service.store.last_seq() == last + 1
    finally:
        service.store.close()
    service = open_service(data_dir)
    try:
        assert_index_holds(service, images)
    finally:
        service.store.close()


def test_a_rebuild_prunes_the_log_it_did_not_need(data_dir: Path) -> None:
    """A missing snapshot is rebuilt from the images, not the log; once the rebuilt one is
    saved, the log before it is pruned."""
    service = open_service(data_dir)
    images = Images()
    service._put([images.new(f"r-{i}") for i in range(30)])
    service._delete([images.gone(f"r-{i}") for i in range(0, 30, 3)])
    service.store.close()
    assert change_rows(data_dir / "images.sqlite3") == 40
    (data_dir / "snapshots" / "CURRENT").unlink()
    service = open_service(data_dir)
    try:
        assert service.snapshot_seq == service.store.last_seq() == 40
        assert change_rows(service.store.path) == 1
        assert_index_holds(service, images)
    finally:
        service.store.close()


def _failing_after(calls: int, write: Callable[..., int]) -> tuple[Callable[..., int], list[int]]:
    """``write``, recording each chunk's row count, that fails (as a kill -9 between two
    commits would stop it) once ``calls`` chunks were committed."""
    done: list[int] = []

    def chunk(change: Callable[[sqlite3.Cursor], int]) -> int:
        if len(done) == calls:
            raise sqlite3.OperationalError("the process died here")
        done.append(write(change))
        return done[-1]

    return chunk, done


def test_a_prune_commits_in_chunks_and_one_cut_short_is_finished_later(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_store, "PRUNE_CHUNK_ROWS", 7)
    service = open_service(data_dir)
    images = Images()
    for i in range(60):
        service._put([images.new(f"c-{i % 25}")])
    with monkeypatch.context() as crash:
        crash.setattr(service.store, "_write", _failing_after(3, service.store._write)[0])
        service._snapshot()  # saved; its prune stops after 3 chunks (and logs why)
    assert service.snapshot_seq == 60
    assert change_rows(service.store.path) == 60 - 3 * 7
    service._put([images.new("c-3")])  # after the snapshot, before the crash
    service = restart(service)
    try:
        assert service.snapshot_seq == 60
        assert_index_holds(service, images)
        write, chunks = _failing_after(-1, service.store._write)
        monkeypatch.setattr(service.store, "_write", write)
        service._put([images.new("c-4")])
        service._snapshot()
        assert chunks[1:] == [7, 7, 7, 7, 7, 5]  # the put's, then 40 rows in chunks of 7
        assert change_rows(service.store.path) == 1
    finally:
        service.store.close()


def test_a_crash_between_the_snapshot_and_its_prune_is_recovered(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot saved, the prune never run: the start catches up from that snapshot
    (the rows it holds are merely still there), and the next snapshot prunes them all."""
    service = open_service(data_dir)
    images = Images()
    service._put([images.new(f"d-{i}") for i in range(12)])
    with monkeypatch.context() as crash:
        crash.setattr(search_service, "prune_changes", lambda store, seq: None)
        service._snapshot()
    assert change_rows(service.store.path) == 12
    service._delete([images.gone("d-5")])
    service = restart(service)
    try:
        assert service.snapshot_seq == 12
        assert_index_holds(service, images)
        service._snapshot()
        assert change_rows(service.store.path) == 1
    finally:
        service.store.close()


def _rebuilt(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The reasons of the start's "rebuilding the index from the record" warnings."""
    return [str(getattr(r, "reason", "")) for r in caplog.records
            if r.getMessage() == "rebuilding the index from the record"]


def _score_of(service: ImageSearchService, image_id: str, query: np.ndarray) -> float:
    hits = dict(service.index.search(query, len(service.index))[0])
    return hits[image_id]


def test_a_snapshot_older_than_the_pruned_log_is_rebuilt_not_caught_up(
        data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A snapshot restored from an older copy after a prune: the log lacks the changes
    between it and the prune point, and a catch-up would keep the old vectors of ids
    replaced since (the count agrees). The start rebuilds from the images, and says why."""
    service = open_service(data_dir)
    images = Images()
    service._put([images.new(f"p-{i}") for i in range(6)])
    service._snapshot()
    assert service.snapshot_seq == 6
    old_copy = data_dir.parent / "snapshots-backup"
    shutil.copytree(service.snapshots, old_copy)
    old = {i: images.live[i] for i in ("p-1", "p-4")}
    service._put([images.new("p-1")])  # replaced under the same ids
    service._put([images.new("p-4")])
    service._snapshot()
    assert service.snapshot_seq == 8 and service.store.pruned_through() == 7
    shutil.rmtree(service.snapshots)
    shutil.copytree(old_copy, service.snapshots)  # the older snapshot, restored
    with caplog.at_level(logging.INFO, logger="percept.search"):
        service = restart(service)
    try:
        assert _rebuilt(caplog) == [
            "the snapshot holds the record's changes up to 6, but the record's change log "
            "was pruned through 7: the snapshot is older than the one the log was pruned "
            "for (restored from an older copy, or copied apart from the record), and the "
            "changes in between are gone"]
        assert service.snapshot_seq == service.store.last_seq() == 8
        for image_id, before in old.items():  # its new vector, not the one replaced
            now = images.live[image_id]
            assert _score_of(service, image_id, now) == pytest.approx(1.0, abs=1e-5)
            assert _score_of(service, image_id, before) < 0.99
        assert_index_holds(service, images)
    finally:
        service.store.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="percept.search"):
        service = open_service(data_dir)  # the rebuilt snapshot is caught up from again
    try:
        assert service.snapshot_seq == 8 and not _rebuilt(caplog)
        assert_index_holds(service, images)
    finally:
        service.store.close()


@pytest.mark.parametrize("written_before_the_prune", [False, True])
def test_a_snapshot_at_the_prune_point_is_caught_up_not_rebuilt(
        data_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        written_before_the_prune: bool) -> None:
    """The snapshot a prune was made for is caught up from at every start: pruned through
    its seq less one (the latest row kept), or through its seq exactly where writes came
    between the save and the prune."""
    service = open_service(data_dir)
    images = Images()
    service._put([images.new(f"q-{i}") for i in range(8)])
    with monkeypatch.context() as late:
        late.setattr(search_service, "prune_changes", lambda store, seq: None)
        service._snapshot()
    snapshot = service.snapshot_seq
    if written_before_the_prune:
        service._put([images.new("q-2"), images.new("q-9")])
        service._delete([images.gone("q-5")])
    search_service.prune_changes(service.store, snapshot)
    assert service.store.pruned_through() == (
        snapshot if written_before_the_prune else snapshot - 1)
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="percept.search"):
            service = restart(service)
        assert service.snapshot_seq == snapshot and not _rebuilt(caplog)
        assert_index_holds(service, images)
    service.store.close()


def test_a_record_never_pruned_opens_and_catches_up_as_before(
        data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A record made before pruning has no 'pruned_through': its snapshot, however old,
    is caught up from the whole log; the first prune then records how far it went."""
    images, snapshot = _old_format_record(data_dir)
    with caplog.at_level(logging.INFO, logger="percept.search"):
        service = open_service(data_dir)
    try:
        assert service.store.pruned_through() == 0
        assert service.snapshot_seq == snapshot and not _rebuilt(caplog)
        assert_index_holds(service, images)
        last = service.store.last_seq()
        service._snapshot()
        assert service.store.pruned_through() == last - 1
    finally:
        service.store.close()


def test_the_prune_point_is_recorded_with_each_chunk_and_never_lowered(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_store, "PRUNE_CHUNK_ROWS", 4)
    store = ImageStore(data_dir / "images.sqlite3", DIMENSION)
    try:
        images = Images()
        for i in range(20):
            store.put_many([images.new(f"s-{i}")])
        assert store.pruned_through() == 0
        with monkeypatch.context() as crash:
            crash.setattr(store, "_write", _failing_after(2, store._write)[0])
            with pytest.raises(sqlite3.OperationalError):
                store.prune_changes(15)
        assert store.pruned_through() == 8  # the two chunks committed, and no further
        assert store.prune_changes(15) == 7 and store.pruned_through() == 15
        assert store.prune_changes(10) == 0 and store.pruned_through() == 15
        assert store.prune_changes(30) == 4 and store.pruned_through() == 19
        assert store.last_seq() == 20
    finally:
        store.close()


# -- through a real search server on loopback ----------------------------------------------
def _snapshot(running: Any) -> None:
    """A periodic snapshot of the running server (the same code as the final one)."""
    asyncio.run_coroutine_threadsafe(search_module(running).snapshot(), running.loop).result(60)


def test_a_server_prunes_its_log_and_a_restart_finds_every_live_image(
        tmp_path: Path, embed_target: str) -> None:
    images = photo_variants(5, seed=61)
    data_dir = tmp_path / "data"
    record = data_dir / "images.sqlite3"
    running = start_search(data_dir, embed_target)
    try:
        stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
        for cycle in range(4):  # puts, replaces and deletes, then a periodic snapshot
            assert len(add(stub, add_requests(images[:4], prefix="keep"))[0]) == 4
            assert len(add(stub, add_requests(images[4:], prefix=f"gone{cycle}"))[0]) == 1
            stub.DeleteImages(search_pb2.DeleteImagesRequest(ids=[f"gone{cycle}-0"]),
                              timeout=30)
            _snapshot(running)
            assert search_module(running).snapshot_seq == 6 * (cycle + 1)
            assert change_rows(record) == 1
    finally:
        running.stop()
    store = ImageStore(record, search_module(running).store.dimension)
    assert store.delete_many(["keep-3"]) == ([], 25)  # a change after the last snapshot
    store.close()
    running = start_search(data_dir, embed_target)
    try:
        stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
        assert len(search_module(running).index) == 3
        gone = [f"gone{c}-0" for c in range(4)]
        got = stub.GetImages(search_pb2.GetImagesRequest(ids=["keep-0", "keep-3", *gone]),
                             timeout=30)
        assert sorted(got.missing) == sorted(["keep-3", *gone])
        for i, image in enumerate(images):
            hits = stub.SearchByImage(search_pb2.SearchByImageRequest(image=image, k=10),
                                      timeout=60).hits
            assert sorted(h.id for h in hits) == ["keep-0", "keep-1", "keep-2"]
            if i < 3:
                assert hits[0].id == f"keep-{i}"
    finally:
        running.stop()
