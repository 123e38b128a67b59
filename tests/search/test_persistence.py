"""The index's persistence under the faults a crash audit found: a catch-up over more ids
than SQLite takes in one query, a catch-up never saved, a stop during a periodic snapshot,
staging folders left by a kill -9, Stats walking the data dir while a snapshot changes it,
a snapshot newer than the record (restored from an older copy, or made anew), and two
servers on one data dir.

Real SQLite, FAISS and gRPC servers on loopback; faults come in at the boundary only (the
connection's own variable limit, a kill -9 of a real process, an os call).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from percept.v1 import search_pb2, search_pb2_grpc
from services import client
from services.common.server import StartupError
from services.search import service as search_service
from services.search import store as search_store
from services.search import vector_index
from services.search.service import recover_index
from services.search.store import ImageStore, recorded_dimension
from services.search.vector_index import IndexSettings, VectorIndex, disk_bytes
from tests.conftest import REPO
from tests.search.conftest import add, add_requests, photo_variants
from tests.search.test_data_dir_faults import search_module, start_search, start_then_stop

DIMENSION = 8


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIMENSION)).astype(np.float32)


def put(store: ImageStore, prefix: str, n: int, seed: int = 0) -> None:
    store.put_many([(f"{prefix}-{i}", f"file:///{prefix}/{i}", v)
                    for i, v in enumerate(vectors(n, seed))])


def snapshot_seq(snapshots: Path) -> int:
    return VectorIndex.load_snapshot(snapshots, DIMENSION)[1]


# -- 1: a catch-up over more ids than one SQLite statement takes ---------------------------
def test_a_catch_up_over_more_ids_than_sqlite_takes_at_once_is_read_in_chunks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite refuses a statement with more variables than its limit ("too many SQL
    variables"; 32,766 in stock builds): start-up put every changed id in one IN list, and
    failed on every restart once that many changed after the last snapshot. Here the
    connection's limit is 50 (SQLite's own limit, lowered), and 120 ids changed."""
    store = ImageStore(tmp_path / "images.sqlite3", DIMENSION)
    snapshots = tmp_path / "snapshots"
    put(store, "old", 5)
    recover_index(store, snapshots, DIMENSION, IndexSettings())  # snapshot at seq 5
    put(store, "new", 120, seed=1)
    store._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)
    index, _ = recover_index(store, snapshots, DIMENSION, IndexSettings())
    assert len(index) == 125 == store.count()
    assert index.search(vectors(120, seed=1)[77], 1)[0][0][0] == "new-77"
    wanted = [f"new-{i}" for i in range(120)] + ["missing"]
    assert len(store.get(wanted)) == len(store.entries(wanted)) == 120
    monkeypatch.setattr(search_store, "MAX_QUERY_IDS", 7)  # the module's own chunk size
    assert sorted(store.entries(wanted)) == sorted(wanted[:-1])
    store.close()


# -- 2: a catch-up is saved by the next snapshot -------------------------------------------
@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return photo_variants(6, seed=47)


def test_the_snapshot_after_a_catch_up_is_written(tmp_path: Path, embed_target: str,
                                                  images: list[bytes]) -> None:
    """A start that caught up from the change log (changes after the last snapshot, as
    a kill -9 leaves them) kept the snapshot's seq as saved: no later snapshot, periodic
    or final, was written, and every start replayed the log again."""
    data_dir = tmp_path / "data"
    running = start_search(data_dir, embed_target)
    stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
    assert len(add(stub, add_requests(images[:2], prefix="snap"))[0]) == 2
    running.stop()  # the final snapshot holds both
    record = data_dir / "images.sqlite3"
    dimension = recorded_dimension(record)
    assert dimension is not None
    # changes after that snapshot, as a server killed before its next one leaves them
    store = ImageStore(record, dimension)
    vector = next(store.all_records()).vector
    store.put_many([(f"later-{i}", f"file:///later/{i}", vector) for i in range(3)])
    last = store.last_seq()
    store.close()
    snapshots = data_dir / "snapshots"
    assert VectorIndex.load_snapshot(snapshots, dimension)[1] < last

    running = start_search(data_dir, embed_target)
    try:
        module = search_module(running)
        assert len(module.index) == 5
        assert REGISTRY.get_sample_value("percept_search_index_images") == 5
        # a periodic snapshot (the same code as the final one)
        asyncio.run_coroutine_threadsafe(module.snapshot(), running.loop).result(60)
        assert VectorIndex.load_snapshot(snapshots, dimension)[1] == last
    finally:
        running.stop()


# -- 3: a stop during a periodic snapshot --------------------------------------------------
def test_a_stop_during_a_periodic_snapshot_waits_for_it(
        tmp_path: Path, embed_target: str, images: list[bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while a periodic snapshot was being written: close() cancelled its task,
    but its worker thread ran on, and the final snapshot wrote the same snapshot through
    the same staging folder beside it; each removed the other's files, and CURRENT was
    left naming a folder that was gone. The final snapshot now waits for the one under
    way. The periodic one is held before its meta.json until another snapshot writes a
    file beside it (what the stop did) or, where none does, a while after the stop began."""
    monkeypatch.setattr(search_service, "SNAPSHOT_EVERY_SECONDS", 0.05)
    data_dir = tmp_path / "data"
    running = start_search(data_dir, embed_target)
    stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
    assert len(add(stub, add_requests(images[:2], prefix="before"))[0]) == 2
    armed, held, release = threading.Event(), threading.Event(), threading.Event()
    periodic: list[threading.Thread] = []
    beside: list[str] = []  # files another snapshot wrote while the periodic one was held
    real = vector_index._write_synced

    def write_synced(path: Path, data: bytes) -> None:
        if armed.is_set():
            me = threading.current_thread()
            if not periodic:
                periodic.append(me)
            if me is periodic[0]:
                if path.name == "meta.json" and not held.is_set():
                    held.set()
                    release.wait(120)
            elif not release.is_set():
                beside.append(path.name)
                release.set()
        real(path, data)

    monkeypatch.setattr(vector_index, "_write_synced", write_synced)
    armed.set()
    assert len(add(stub, add_requests(images[2:3], prefix="during"))[0]) == 1
    assert held.wait(120)  # a periodic snapshot is under way
    stopper = threading.Thread(target=running.stop)
    stopper.start()
    timer = threading.Timer(2.0, release.set)  # lets it go on where nothing else did
    timer.start()
    stopper.join(120)
    timer.cancel()
    release.set()
    assert not stopper.is_alive()
    assert beside == []
    snapshots = data_dir / "snapshots"
    assert not [p.name for p in snapshots.iterdir() if p.name.endswith(".tmp")]
    db = sqlite3.connect(data_dir / "images.sqlite3")
    last = db.execute("SELECT MAX(seq) FROM changes").fetchone()[0]
    db.close()
    dimension = recorded_dimension(data_dir / "images.sqlite3")
    assert dimension is not None
    loaded, seq = VectorIndex.load_snapshot(snapshots, dimension)
    assert seq == last and len(loaded) == 3


def test_a_snapshot_of_the_current_ones_seq_never_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot written again at the seq of the current one (a rebuild at the same
    seq) removed the current folder before renaming its own into place: a crash between
    the two left CURRENT naming nothing. It now takes another name."""
    folder = tmp_path / "snapshots"
    first = VectorIndex.build(DIMENSION, ["a", "b"], vectors(2))
    first.save_snapshot(folder, seq=5)
    second = VectorIndex.build(DIMENSION, ["c"], vectors(1, seed=1))
    real = os.replace

    def crash_before_the_rename(source: Any, destination: Any) -> None:
        if Path(os.fsdecode(source)).name.startswith(".snapshot-"):
            raise OSError("the process died here")
        real(source, destination)

    monkeypatch.setattr(os, "replace", crash_before_the_rename)
    with pytest.raises(OSError, match="died"):
        second.save_snapshot(folder, seq=5)
    monkeypatch.undo()
    loaded, seq = VectorIndex.load_snapshot(folder, DIMENSION)
    assert seq == 5 and len(loaded) == 2
    second.save_snapshot(folder, seq=5)
    loaded, seq = VectorIndex.load_snapshot(folder, DIMENSION)
    assert seq == 5 and len(loaded) == 1
    assert len([p for p in folder.iterdir() if p.name.startswith("snapshot-")]) == 1


# -- 4: staging folders of a snapshot killed mid-write ------------------------------------
_KILLED_MID_SNAPSHOT = """
import os, signal, sys
from pathlib import Path
import numpy as np
from services.search import vector_index
from services.search.service import recover_index
from services.search.store import ImageStore
from services.search.vector_index import IndexSettings
data = Path(sys.argv[1])
store = ImageStore(data / "images.sqlite3", 8)
rows = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
store.put_many([(f"k-{i}", "u", rows[i]) for i in range(2)])
index, _ = recover_index(store, data / "snapshots", 8, IndexSettings())
seq = store.put_many([("k-2", "u", rows[2])])
index.put(["k-2"], rows[2:])
real = vector_index._write_synced
def write_synced(path, data):
    if path.name == "meta.json":
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
vector_index._write_synced = write_synced
index.save_snapshot(data / "snapshots", seq)
"""


def test_staging_folders_of_a_snapshot_killed_mid_write_are_removed_at_start(
        tmp_path: Path) -> None:
    """A kill -9 during a snapshot write left its `.snapshot-N.tmp` folder for ever (the
    cleanup after a snapshot looks at `snapshot-*` only), counted by Stats' disk_bytes."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_SNAPSHOT, str(data_dir)],
                          cwd=REPO, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    snapshots = data_dir / "snapshots"
    staging = snapshots / ".snapshot-000000000003.tmp"
    assert (staging / "index.faiss").is_file()
    store = ImageStore(data_dir / "images.sqlite3", DIMENSION)
    try:
        index, seq = recover_index(store, snapshots, DIMENSION, IndexSettings())
        assert seq == 2 and len(index) == 3  # the snapshot before, caught up
        assert sorted(p.name for p in snapshots.iterdir()) == ["CURRENT",
                                                               "snapshot-000000000002"]
    finally:
        store.close()


# -- 5: Stats walking the data dir while a snapshot changes it -----------------------------
class _Listing:
    def __init__(self, entries: list[os.DirEntry[str]]) -> None:
        self.entries = entries

    def __enter__(self) -> Iterator[os.DirEntry[str]]:
        return iter(self.entries)

    def __exit__(self, *exc: object) -> None:
        pass


def test_disk_bytes_leaves_out_what_snapshots_remove_while_it_walks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stats answered INTERNAL (FileNotFoundError) when snapshots renamed or removed a
    folder or a file between disk_bytes' listing of a directory and its look inside. Here
    each listing of the snapshots directory is followed by one step of snapshots being
    written (a staging folder renamed into place, the snapshot before removed, the next
    staging folder begun), and a file goes just after its folder was listed."""
    snapshots = tmp_path / "snapshots"
    VectorIndex.build(DIMENSION, ["a", "b"], vectors(2)).save_snapshot(snapshots, seq=1)
    VectorIndex.build(DIMENSION, ["c"], vectors(1)).save_snapshot(tmp_path / "other", seq=1)
    (tmp_path / "record").write_bytes(b"x" * 1000)
    real = os.scandir
    steps = [2, 3, 4]  # the seqs of the snapshots written while it walks

    def begin(seq: int) -> None:
        staging = snapshots / f".snapshot-{seq:012d}.tmp"
        staging.mkdir()
        (staging / "index.faiss").write_bytes(b"i" * 100)

    def scandir(path: Any) -> Any:
        if isinstance(path, int):  # shutil.rmtree's own walk
            return real(path)
        with real(path) as listing:
            entries = list(listing)
        listed = Path(os.fsdecode(path))
        if listed == snapshots and steps:
            seq = steps.pop(0)
            (snapshots / f".snapshot-{seq:012d}.tmp").rename(snapshots / f"snapshot-{seq:012d}")
            shutil.rmtree(snapshots / f"snapshot-{seq - 1:012d}")
            begin(seq + 1)
        elif listed == tmp_path / "other" / "snapshot-000000000001":
            (listed / "index.faiss").unlink(missing_ok=True)
        return _Listing(entries)

    begin(2)
    monkeypatch.setattr(os, "scandir", scandir)
    size = disk_bytes(tmp_path)
    monkeypatch.undo()
    assert steps != [2, 3, 4]  # snapshots were written while it walked
    assert not (tmp_path / "other" / "snapshot-000000000001" / "index.faiss").exists()
    assert 1000 < size < 1000 + disk_bytes(snapshots) + 10_000


# -- 6: a snapshot newer than the record ---------------------------------------------------
def _replace_record(data_dir: Path, by: Path | None) -> None:
    for name in ("images.sqlite3", "images.sqlite3-wal", "images.sqlite3-shm"):
        (data_dir / name).unlink(missing_ok=True)
    if by is not None:
        shutil.copy(by, data_dir / "images.sqlite3")


@pytest.mark.parametrize("record", ["older-copy", "made-anew", "another-one"])
def test_a_snapshot_the_record_does_not_match_is_rebuilt_from_the_record(
        tmp_path: Path, record: str, caplog: pytest.LogCaptureFixture) -> None:
    """The record restored from an older copy, deleted to start over, or replaced by
    another with as many changes, while snapshots/ stays: the snapshot was loaded as it
    was, so the index held images the record did not (found by searches, written into
    every later snapshot), and later adds got seqs at or below the snapshot's."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    snapshots = data_dir / "snapshots"
    store = ImageStore(data_dir / "images.sqlite3", DIMENSION)
    put(store, "a", 6)
    recover_index(store, snapshots, DIMENSION, IndexSettings())
    backup = tmp_path / "backup.sqlite3"
    with sqlite3.connect(backup) as copy:
        store._db.backup(copy)
    copy.close()
    put(store, "b", 4, seed=1)
    index, _ = recover_index(store, snapshots, DIMENSION, IndexSettings())
    index.save_snapshot(snapshots, store.last_seq(), record=store.record_id)  # seq 10
    store.close()
    if record == "another-one":
        other = ImageStore(tmp_path / "other.sqlite3", DIMENSION)
        put(other, "z", 10, seed=2)
        other.close()
    _replace_record(data_dir, {"older-copy": backup, "made-anew": None,
                               "another-one": tmp_path / "other.sqlite3"}[record])
    store = ImageStore(data_dir / "images.sqlite3", DIMENSION)
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING, logger="percept.search"):
            index, _ = recover_index(store, snapshots, DIMENSION, IndexSettings())
        expected = {"older-copy": 6, "made-anew": 0, "another-one": 10}[record]
        assert len(index) == store.count() == expected
        found = {i for row in index.search(vectors(4, seed=1), 10) for i, _ in row}
        assert not {"b-0", "b-1", "b-2", "b-3"} & found
        warned = [r for r in caplog.records if "rebuilding the index" in r.getMessage()]
        assert len(warned) == 1, [r.reason for r in warned]  # type: ignore[attr-defined]
        reason = warned[0].reason  # type: ignore[attr-defined]
        # a record made anew is another record too (each record names itself)
        assert ("another record" in reason) if record != "older-copy" else \
            ("the record's last change is 6" in reason), reason
        # the index now agrees with the record: a change after it is caught up next time
        put(store, "c", 2, seed=3)
        assert snapshot_seq(snapshots) == store.last_seq() - 2
        index, _ = recover_index(store, snapshots, DIMENSION, IndexSettings())
        assert len(index) == expected + 2 == store.count()
    finally:
        store.close()


# -- 7: two servers on one data dir --------------------------------------------------------
def test_a_second_server_on_a_data_dir_in_use_is_refused(
        tmp_path: Path, embed_target: str, images: list[bytes]) -> None:
    """Nothing stopped a second server on the same --data-dir: each then snapshotted an
    index without the other's images. The second is refused at start, naming the
    directory; the first serves on, and once it stops the directory can be used again
    (in the same process too)."""
    data_dir = tmp_path / "data"
    running = start_search(data_dir, embed_target)
    try:
        stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
        assert len(add(stub, add_requests(images[:1], prefix="first"))[0]) == 1
        with pytest.raises(StartupError) as refused:
            start_then_stop(data_dir, embed_target)
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"the data directory {data_dir} is in use: another search "
                                  f"server holds it (process {os.getpid()} took it)"), message
        assert len(add(stub, add_requests(images[1:2], prefix="second"))[0]) == 1
    finally:
        running.stop()
    running = start_search(data_dir, embed_target)
    try:
        stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
        assert stub.Stats(search_pb2.StatsRequest(), timeout=30).count == 2
    finally:
        running.stop()


def test_another_users_lock_file_is_taken_and_not_mistaken_for_a_holder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .lock left by another user (a root `make run`, then a pod's uid) cannot be opened
    for writing: it is locked through a read-only descriptor, not reported as held by
    another server; a lock held elsewhere still is."""
    from services.search.service import _lock_data_dir

    (tmp_path / ".lock").write_text("1\n")
    real_open = os.open

    def not_ours(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(".lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", not_ours)
    held = _lock_data_dir(tmp_path)
    assert held is not None
    try:
        monkeypatch.setattr(os, "open", real_open)
        with pytest.raises(StartupError, match=r"is in use: another search server holds it"):
            _lock_data_dir(tmp_path)
    finally:
        os.close(held)
