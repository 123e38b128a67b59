"""A data directory that is full or read-only, or a record moved under the server: writes
are refused with a precise status that names it (RESOURCE_EXHAUSTED / DATA_DIR_FULL,
FAILED_PRECONDITION / DATA_DIR_READ_ONLY or DATA_DIR_RECORD_MOVED), reads go on, the index
stays the record's, a failed snapshot leaves nothing behind and does not stop a shutdown,
and a start on a read-only one is refused.

Real SQLite, real FAISS and real gRPC servers throughout. The faults come in at the
boundary only: SQLite's own ``max_page_count`` (a real SQLITE_FULL, after which SQLite has
rolled the transaction back itself, as on a full filesystem) and ``query_only`` (a real
SQLITE_READONLY, as for a file SQLite may only read), an os call that fails with the errno
a full or read-only filesystem gives, or the store's connection answering a write as SQLite
did on a full 3 MB tmpfs (where the record's deletes need room too).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from percept.v1 import search_pb2, search_pb2_grpc
from services import client
from services.common.server import (
    PerceptServer,
    RunningServer,
    StartupError,
    build_modules,
    start_in_thread,
)
from services.search import vector_index
from services.search.store import (
    DataDirFull,
    DataDirReadOnly,
    ImageStore,
    RecordMoved,
    data_dir_problem,
    probe_data_dir,
)
from services.search.vector_index import VectorIndex
from tests.conftest import REPO, free_port, server_config
from tests.search.conftest import add, add_requests, photo_variants

DIMENSION = 8


# -- faults at the boundary ----------------------------------------------------------------
def full_error() -> sqlite3.OperationalError:
    """The error SQLite raises on a full filesystem (SQLITE_FULL)."""
    error = sqlite3.OperationalError("database or disk is full")
    error.sqlite_errorcode = 13  # type: ignore[attr-defined]
    error.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
    return error


class _FullCursor:
    def __init__(self, cursor: sqlite3.Cursor, db: sqlite3.Connection) -> None:
        self._cursor, self._db = cursor, db

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        if sql.lstrip().upper().startswith(("INSERT", "DELETE", "UPDATE", "REPLACE")):
            if self._db.in_transaction:  # SQLite takes the transaction back by itself
                self._db.execute("ROLLBACK")
            raise full_error()
        return self._cursor.execute(sql, parameters)


class FullDisk:
    """The store's connection answering as SQLite did on a full 3 MB tmpfs: a statement
    that writes (a DELETE as well: its pages go to the write-ahead log) fails with
    SQLITE_FULL, and the transaction is already rolled back when it does."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def cursor(self) -> _FullCursor:
        return _FullCursor(self.db.cursor(), self.db)

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        return self.cursor().execute(sql, parameters)


def fill(store: ImageStore) -> None:
    """No page may be added to the record any more: SQLite answers SQLITE_FULL."""
    with store._lock:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count={pages}")


def unfill(store: ImageStore) -> None:
    with store._lock:
        store._db.execute("PRAGMA max_page_count=1073741823")


def set_query_only(store: ImageStore, on: bool) -> None:
    with store._lock:
        store._db.execute(f"PRAGMA query_only={'ON' if on else 'OFF'}")


def failing_os_open(monkeypatch: pytest.MonkeyPatch, under: Path, code: int,
                    only: Callable[[str], bool] = lambda name: True) -> None:
    """``os.open`` fails with ``code`` for the files under ``under`` (whose names pass
    ``only``), as on a filesystem that is read-only (EROFS) or full (ENOSPC)."""
    real = os.open

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        target = Path(os.fsdecode(path))
        if (flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and target.is_relative_to(under)
                and only(target.name)):
            raise OSError(code, os.strerror(code), str(target))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


# -- the record ----------------------------------------------------------------------------
@pytest.fixture()
def store(tmp_path: Path) -> Iterator[ImageStore]:
    opened = ImageStore(tmp_path / "images.sqlite3", DIMENSION)
    opened.put_many([(f"kept-{i}", "u", np.full(DIMENSION, i + 1, np.float32))
                     for i in range(20)])
    yield opened
    opened.close()


def test_a_full_record_keeps_sqlites_error_and_names_the_data_dir(
        store: ImageStore, tmp_path: Path) -> None:
    """SQLite rolls a transaction back by itself on SQLITE_FULL: the store does not
    ROLLBACK over it ("no transaction is active"), and says the data directory is full."""
    seq, count = store.last_seq(), store.count()
    fill(store)
    vectors = [(f"new-{i}", "x" * 4000, np.ones(DIMENSION, np.float32)) for i in range(50)]
    with pytest.raises(DataDirFull) as refused:
        store.put_many(vectors)
    message = str(refused.value)
    assert message == f"the data directory {tmp_path} is full (SQLite: database or disk is full)"
    assert isinstance(refused.value.__cause__, sqlite3.OperationalError)
    assert refused.value.reason == "DATA_DIR_FULL"
    assert not store._db.in_transaction
    assert (store.last_seq(), store.count()) == (seq, count)  # nothing of it was kept
    unfill(store)  # space freed: the same connection writes again
    assert store.put_many(vectors) > seq and store.count() == count + 50


def test_a_record_sqlite_may_only_read_is_named_read_only(store: ImageStore,
                                                          tmp_path: Path) -> None:
    assert store.probe_write() is None
    seq = store.last_seq()
    set_query_only(store, True)  # SQLite's answer for a file it may only read
    problem = store.probe_write()
    assert isinstance(problem, DataDirReadOnly) and problem.reason == "DATA_DIR_READ_ONLY"
    assert str(problem).startswith(f"the data directory {tmp_path} is read-only (SQLite: ")
    with pytest.raises(DataDirReadOnly):
        store.put_many([("new", "u", np.ones(DIMENSION, np.float32))])
    with pytest.raises(DataDirReadOnly):
        store.delete_many(["kept-0"])
    assert not store._db.in_transaction and store.last_seq() == seq
    set_query_only(store, False)
    assert store.probe_write() is None and store.delete_many(["kept-0"])[0] == []


def test_deleting_on_a_full_disk_is_refused_as_full(store: ImageStore) -> None:
    seq = store.last_seq()
    with store._lock:
        store._db = FullDisk(store._db)  # type: ignore[assignment]
    with pytest.raises(DataDirFull):
        store.delete_many(["kept-1", "kept-2"])
    with store._lock:
        store._db = store._db.db  # type: ignore[attr-defined]
    assert store.last_seq() == seq and len(store.get(["kept-1", "kept-2"])) == 2


@pytest.mark.parametrize(("code", "kind"), [(errno.ENOSPC, DataDirFull),
                                            (errno.EDQUOT, DataDirFull),
                                            (errno.EROFS, DataDirReadOnly),
                                            (errno.EACCES, DataDirReadOnly)])
def test_os_errors_of_a_full_or_read_only_filesystem_are_named(
        tmp_path: Path, code: int, kind: type) -> None:
    problem = data_dir_problem(OSError(code, os.strerror(code)), tmp_path)
    assert type(problem) is kind and os.strerror(code) in str(problem)
    assert data_dir_problem(OSError(errno.EIO, "I/O error"), tmp_path) is None
    assert data_dir_problem(ValueError("x"), tmp_path) is None


@pytest.mark.parametrize(("flag", "available", "kind"), [
    (os.ST_RDONLY, 100, DataDirReadOnly), (0, 0, DataDirFull), (0, 100, type(None))])
def test_an_io_error_of_sqlite_is_named_by_the_filesystem_it_met(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: int, available: int,
        kind: type) -> None:
    """SQLite's I/O errors hide the errno (a filesystem remounted read-only after an error
    answers EROFS, which SQLite reports as SQLITE_IOERR_WRITE): the filesystem says."""
    real = os.statvfs

    def statvfs(path: Any) -> os.statvfs_result:
        if Path(os.fsdecode(path)) != tmp_path:
            return real(path)
        return os.statvfs_result((4096, 4096, 1000, available, available, 1000, 100, 100,
                                  flag, 255))

    monkeypatch.setattr(os, "statvfs", statvfs)
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = 778  # type: ignore[attr-defined]  # SQLITE_IOERR_WRITE
    problem = data_dir_problem(error, tmp_path)
    assert type(problem) is kind
    assert problem is None or str(problem).endswith("(SQLite: disk I/O error)")


def test_a_record_moved_under_a_store_is_named_moved_not_read_only(tmp_path: Path) -> None:
    """Renamed (SQLite's rollback-journal mode says SQLITE_READONLY_DBMOVED, whose primary
    code is read-only) or deleted: writes and the write probe name the move."""
    error = sqlite3.OperationalError("attempt to write a readonly database")
    error.sqlite_errorcode = 1032  # type: ignore[attr-defined]  # SQLITE_READONLY_DBMOVED
    assert isinstance(data_dir_problem(error, tmp_path), RecordMoved)
    error.sqlite_errorcode = 8  # type: ignore[attr-defined]  # SQLITE_READONLY
    assert isinstance(data_dir_problem(error, tmp_path), DataDirReadOnly)
    store = ImageStore(tmp_path / "images.sqlite3", DIMENSION)
    try:
        (tmp_path / "images.sqlite3").unlink()
        assert isinstance(store.probe_write(), RecordMoved)
        with pytest.raises(RecordMoved, match="was moved, replaced or deleted"):
            store.put_many([("new", "u", np.ones(DIMENSION, np.float32))])
        assert not store._db.in_transaction
    finally:
        store.close()


def test_the_data_dir_probe_finds_a_read_only_or_full_filesystem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert probe_data_dir(tmp_path / "new") is None and (tmp_path / "new").is_dir()
    assert list((tmp_path / "new").iterdir()) == []  # the probe file is gone
    failing_os_open(monkeypatch, tmp_path, errno.EROFS)
    assert isinstance(probe_data_dir(tmp_path), DataDirReadOnly)
    monkeypatch.undo()
    failing_os_open(monkeypatch, tmp_path, errno.ENOSPC)
    assert isinstance(probe_data_dir(tmp_path), DataDirFull)


# -- snapshots -----------------------------------------------------------------------------
@pytest.mark.parametrize("failing", ["index.faiss", "meta.json", ".CURRENT.tmp"])
def test_a_failed_snapshot_leaves_nothing_behind(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 failing: str) -> None:
    """A snapshot that meets a full disk, while it writes its files or CURRENT, removes its
    staging folder (and the folder CURRENT does not name): the one before stays current."""
    folder = tmp_path / "snapshots"
    rng = np.random.default_rng(0)
    index = VectorIndex.build(DIMENSION, ["a", "b"], rng.normal(size=(2, DIMENSION))
                              .astype(np.float32))
    index.save_snapshot(folder, seq=1)
    index.put(["c"], rng.normal(size=(1, DIMENSION)).astype(np.float32))
    real = vector_index._write_synced

    def full_disk(path: Path, data: bytes) -> None:
        if path.name == failing:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(vector_index, "_write_synced", full_disk)
    with pytest.raises(OSError, match="No space left"):
        index.save_snapshot(folder, seq=2)
    assert sorted(p.name for p in folder.iterdir()) == ["CURRENT", "snapshot-000000000001"]
    loaded, seq = VectorIndex.load_snapshot(folder, DIMENSION)
    assert seq == 1 and len(loaded) == 2


# -- the service, over gRPC ----------------------------------------------------------------
def start_search(data_dir: Path, embed_target: str) -> RunningServer:
    return start_in_thread(server_config("search", data_dir=data_dir,
                                         embed_target=embed_target), timeout=900)


def search_module(server: RunningServer) -> Any:
    return next(m for m in server.server.modules if m.name == "search")


@pytest.fixture(scope="module")
def search(tmp_path_factory: pytest.TempPathFactory, embed_target: str
           ) -> Iterator[RunningServer]:
    running = start_search(tmp_path_factory.mktemp("faults") / "data", embed_target)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return photo_variants(12, seed=31)


def details(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason of a failed call, and its trailers."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    trailers = {key: value for key, value in error.trailing_metadata() or ()  # type: ignore[attr-defined]
                if isinstance(value, str)}
    return info.reason, trailers


def found_by_image(stub: search_pb2_grpc.ImageSearchStub, image: bytes) -> list[str]:
    return [h.id for h in stub.SearchByImage(search_pb2.SearchByImageRequest(image=image, k=1000),
                                             timeout=60).hits]


def assert_reads_go_on(stub: search_pb2_grpc.ImageSearchStub, stored: list[str],
                       refused: list[str], image: bytes, count: int) -> None:
    assert stub.Stats(search_pb2.StatsRequest(), timeout=30).count == count
    got = stub.GetImages(search_pb2.GetImagesRequest(ids=stored + refused), timeout=30)
    assert sorted(e.id for e in got.images) == sorted(stored)
    assert list(got.missing) == refused
    listed = stub.ListImages(search_pb2.ListImagesRequest(page_size=1000), timeout=30)
    assert len(listed.images) == count
    hits = found_by_image(stub, image)
    assert not set(hits) & set(refused) and len(hits) == count  # the index is the record's


def test_a_full_data_dir_refuses_writes_with_resource_exhausted_and_reads_go_on(
        search: RunningServer, images: list[bytes]) -> None:
    stub = search_pb2_grpc.ImageSearchStub(client.connect(search.target))
    module = search_module(search)
    data_dir = Path(search.server.config.data_dir)
    added, _ = add(stub, add_requests(images[:4], prefix="full-kept"))
    assert len(added) == 4
    count = stub.Stats(search_pb2.StatsRequest(), timeout=30).count
    fill(module.store)
    try:
        refused = add_requests(images[4:8], prefix="full-refused")
        for request in refused:
            request.uri = "x" * 4000  # more than the pages left
        with pytest.raises(grpc.RpcError) as error:
            add(stub, refused)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = error.value.details()
        assert message.startswith(f"the data directory {data_dir} is full (SQLite: database "
                                  "or disk is full): the images not acknowledged yet were "
                                  "not stored"), message
        assert "free space on its filesystem" in message
        reason, trailers = details(error.value)
        # not a busy answer: a retry helps only once space is freed
        assert reason == "DATA_DIR_FULL" and "grpc-retry-pushback-ms" not in trailers
        assert_reads_go_on(stub, [r.id for r in add_requests(images[:4], "full-kept")],
                           [r.id for r in refused], images[5], count)

        # a deletion needs room in the record too
        with module.store._lock:
            module.store._db = FullDisk(module.store._db)
        try:
            with pytest.raises(grpc.RpcError) as error:
                stub.DeleteImages(search_pb2.DeleteImagesRequest(ids=["full-kept-0"]),
                                  timeout=30)
        finally:
            with module.store._lock:
                module.store._db = module.store._db.db
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "nothing was deleted: SQLite needs free space to record a deletion too" in \
            error.value.details()
        assert details(error.value)[0] == "DATA_DIR_FULL"
        assert "full-kept-0" in found_by_image(stub, images[0])  # still in the index too
    finally:
        unfill(module.store)
    added, rejected = add(stub, refused)  # space freed: the same stream is stored
    assert sorted(added) == sorted(r.id for r in refused) and not rejected
    assert stub.DeleteImages(search_pb2.DeleteImagesRequest(ids=["full-kept-0"]),
                             timeout=30).deleted == 1


def test_a_read_only_data_dir_refuses_writes_with_failed_precondition(
        search: RunningServer, images: list[bytes]) -> None:
    stub = search_pb2_grpc.ImageSearchStub(client.connect(search.target))
    module = search_module(search)
    data_dir = Path(search.server.config.data_dir)
    stored = add_requests(images[8:10], prefix="ro-kept")
    assert len(add(stub, stored)[0]) == 2
    count = stub.Stats(search_pb2.StatsRequest(), timeout=30).count
    set_query_only(module.store, True)
    try:
        refused = add_requests(images[10:12], prefix="ro-refused")
        with pytest.raises(grpc.RpcError) as error:
            add(stub, refused)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.value.details().startswith(
            f"the data directory {data_dir} is read-only (SQLite: "), error.value.details()
        assert "mount it read-write, or give the server's user write access to it, then " \
            "retry" in error.value.details()
        assert details(error.value)[0] == "DATA_DIR_READ_ONLY"
        with pytest.raises(grpc.RpcError) as error:
            stub.DeleteImages(search_pb2.DeleteImagesRequest(ids=["ro-kept-0"]), timeout=30)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "nothing was deleted" in error.value.details()
        assert_reads_go_on(stub, [r.id for r in stored], [r.id for r in refused],
                           images[10], count)
    finally:
        set_query_only(module.store, False)
    assert stub.DeleteImages(search_pb2.DeleteImagesRequest(ids=["ro-kept-0"]),
                             timeout=30).deleted == 1


def test_a_record_moved_away_under_the_server_refuses_writes_until_it_is_back(
        search: RunningServer, images: list[bytes]) -> None:
    """The record renamed while open (as a backup script or an operator's mv might): in
    WAL mode SQLite would take the writes, into a log no longer beside the record (lost
    to the next start); the store refuses them, FAILED_PRECONDITION /
    DATA_DIR_RECORD_MOVED. Reads go on, and once the record is back, writes do too."""
    stub = search_pb2_grpc.ImageSearchStub(client.connect(search.target))
    record = Path(search.server.config.data_dir) / "images.sqlite3"
    stored = add_requests(images[0:2], prefix="moved-kept")
    assert len(add(stub, stored)[0]) == 2
    count = stub.Stats(search_pb2.StatsRequest(), timeout=30).count
    record.rename(record.with_name("elsewhere.sqlite3"))
    try:
        refused = add_requests(images[2:4], prefix="moved-refused")
        with pytest.raises(grpc.RpcError) as error:
            add(stub, refused)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.value.details().startswith(
            f"the record in the data directory {record.parent} was moved, replaced or "
            f"deleted while the server had it open ({record} is no longer the file it "
            "opened): "), error.value.details()
        assert "move the record the server opened back, or restart the server to serve " \
            "the one now there, then retry" in error.value.details()
        assert details(error.value)[0] == "DATA_DIR_RECORD_MOVED"
        with pytest.raises(grpc.RpcError) as error:
            stub.DeleteImages(search_pb2.DeleteImagesRequest(ids=["moved-kept-0"]), timeout=30)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert details(error.value)[0] == "DATA_DIR_RECORD_MOVED"
        assert_reads_go_on(stub, [r.id for r in stored], [r.id for r in refused],
                           images[2], count)
    finally:
        record.with_name("elsewhere.sqlite3").rename(record)
    assert stub.DeleteImages(search_pb2.DeleteImagesRequest(ids=["moved-kept-0"]),
                             timeout=30).deleted == 1


def test_a_bad_copy_of_a_stored_id_says_the_good_copy_was_stored(
        search: RunningServer, images: list[bytes]) -> None:
    """The id is in added (a good copy was stored) and in rejected (the bad copy): the
    rejection says which copy was stored, whichever came first; a bad copy alone is only
    rejected."""
    stub = search_pb2_grpc.ImageSearchStub(client.connect(search.target))
    acks = list(stub.AddImages(iter([
        search_pb2.AddImageRequest(id="dup-first", uri="good", image=images[0]),
        search_pb2.AddImageRequest(id="dup-first", uri="bad", image=b"garbage"),
        search_pb2.AddImageRequest(id="dup-last", uri="bad", image=b"garbage"),
        search_pb2.AddImageRequest(id="dup-last", uri="good", image=images[1]),
        search_pb2.AddImageRequest(id="alone", uri="bad", image=b"garbage")]), timeout=120))
    assert len(acks) == 1
    assert sorted(acks[0].added) == ["dup-first", "dup-last"]
    reasons = {r.id: (r.code, r.reason) for r in acks[0].rejected}
    stored_elsewhere = ("; this copy was not stored: another copy of the same id in this "
                        "batch was, the one acknowledged in added")
    for image_id in ("dup-first", "dup-last"):
        code, reason = reasons[image_id]
        assert code == "INVALID_ARGUMENT" and reason.endswith(stored_elsewhere), reason
    assert "another copy" not in reasons["alone"][1]
    got = stub.GetImages(search_pb2.GetImagesRequest(ids=["dup-first", "dup-last", "alone"]),
                         timeout=30)
    assert [(e.id, e.uri) for e in got.images] == [("dup-first", "good"), ("dup-last", "good")]
    assert list(got.missing) == ["alone"]


def test_a_failed_final_snapshot_does_not_stop_the_close(
        tmp_path: Path, embed_target: str, images: list[bytes],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk at shutdown: the final snapshot fails, is logged in one line, leaves no
    staging folder, and the record and the embedder are closed all the same; the next
    start catches up from the record."""
    data_dir = tmp_path / "data"
    running = start_search(data_dir, embed_target)
    module = search_module(running)
    stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
    assert len(add(stub, add_requests(images[:3], prefix="closing"))[0]) == 3

    def full_disk(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(vector_index, "_write_synced", full_disk)
    with caplog.at_level(logging.WARNING, logger="percept.search"):
        running.stop()  # raised before: the close stopped at the snapshot
    warnings = [r for r in caplog.records if "final snapshot failed" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].exc_info is None
    assert "is full (No space left on device)" in warnings[0].why  # type: ignore[attr-defined]
    assert not [p.name for p in (data_dir / "snapshots").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(sqlite3.ProgrammingError):  # the record was closed
        module.store.count()
    monkeypatch.undo()
    running = start_search(data_dir, embed_target)
    try:
        stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
        assert stub.Stats(search_pb2.StatsRequest(), timeout=30).count == 3
        assert "closing-1" in found_by_image(stub, images[1])
    finally:
        running.stop()


_FULL_AT_SHUTDOWN = """
import errno, pathlib, sys
from services.search import vector_index
marker, real = pathlib.Path(sys.argv[1]), vector_index._write_synced
def write_synced(path, data):
    if marker.exists():  # the disk is full from now on
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    real(path, data)
vector_index._write_synced = write_synced
from services.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_on_a_full_data_dir_drains_and_exits_0(
        tmp_path: Path, embed_target: str, images: list[bytes]) -> None:
    """`percept serve search` on a disk that fills before SIGTERM: exit 0 after the drain,
    a one-line warning, no traceback, no staging folder (it exited 1 before)."""
    data_dir, marker = tmp_path / "data", tmp_path / "disk-is-full"
    port = free_port()
    log = tmp_path / "search.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", _FULL_AT_SHUTDOWN, str(marker), "serve", "search",
             "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
             "--data-dir", str(data_dir), "--log-format", "json", "--device", "cpu",
             "--embed-target", embed_target],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        channel = client.connect(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 300
        while client_status(channel) != "SERVING":
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        stub = search_pb2_grpc.ImageSearchStub(channel)
        assert len(add(stub, add_requests(images[:2], prefix="sigterm"))[0]) == 2
        marker.touch()
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert text.count("the final snapshot failed") == 1 and '"msg": "stopped"' in text
    assert not [p.name for p in (data_dir / "snapshots").iterdir() if p.name.endswith(".tmp")]


def client_status(channel: grpc.Channel) -> str:
    try:
        return client.health_status(channel, timeout=1)
    except grpc.RpcError:
        return "UNREACHABLE"


# -- start-up ------------------------------------------------------------------------------
def start_then_stop(data_dir: Path, embed_target: str) -> None:
    """Starts a search server and stops it, as `percept serve` does when the start fails:
    the StartupError of the start, if it failed."""
    config = server_config("search", data_dir=data_dir, embed_target=embed_target)

    async def run() -> None:
        server = PerceptServer(build_modules(config), config)
        try:
            await server.start()
        finally:
            await server.stop(grace=0)

    asyncio.run(run())


def test_a_read_only_data_dir_is_refused_at_start(
        tmp_path: Path, embed_target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """It would answer SERVING, then refuse every write: it does not start, and says why in
    one line (which `percept serve` logs without a traceback, and exits 1)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    failing_os_open(monkeypatch, data_dir, errno.EROFS)
    with pytest.raises(StartupError) as refused:
        start_then_stop(data_dir, embed_target)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"the data directory {data_dir} is read-only (Read-only file "
                              "system): the search service writes its record"), message
    assert message.endswith("or pass another --data-dir")


def test_a_record_it_may_only_read_is_refused_at_start(
        tmp_path: Path, embed_target: str, images: list[bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory can be written but the record only read (SQLite opens it read-only
    without a word, as for a file of another user): refused at start, not at the first
    write."""
    data_dir = tmp_path / "data"
    running = start_search(data_dir, embed_target)
    stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
    assert len(add(stub, add_requests(images[:1], prefix="made"))[0]) == 1
    running.stop()
    record = data_dir / "images.sqlite3"
    real = sqlite3.connect

    def read_only(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        db = real(database, *args, **kwargs)
        if Path(os.fsdecode(database)) == record:
            db.execute("PRAGMA query_only=ON")
        return db

    monkeypatch.setattr(sqlite3, "connect", read_only)
    with pytest.raises(StartupError) as refused:
        start_then_stop(data_dir, embed_target)
    message = str(refused.value)
    assert "\n" not in message and str(record) in message
    assert f"the data directory {data_dir} is read-only (SQLite: " in message, message


def test_a_full_data_dir_at_start_serves_and_warns(
        tmp_path: Path, embed_target: str, images: list[bytes],
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A full disk does not stop a start (its reads can be served, and space may be freed
    while it runs): it is said at start."""
    data_dir = tmp_path / "data"
    running = start_search(data_dir, embed_target)
    stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
    assert len(add(stub, add_requests(images[:1], prefix="made"))[0]) == 1
    running.stop()
    failing_os_open(monkeypatch, data_dir, errno.ENOSPC,
                    only=lambda name: name.startswith(".write-check"))
    with caplog.at_level(logging.WARNING, logger="percept.search"):
        running = start_search(data_dir, embed_target)
    try:
        warned = [r for r in caplog.records if "the data directory is full" in r.getMessage()]
        assert len(warned) == 1 and str(data_dir) in warned[0].why  # type: ignore[attr-defined]
        stub = search_pb2_grpc.ImageSearchStub(client.connect(running.target))
        assert stub.Stats(search_pb2.StatsRequest(), timeout=30).count == 1
    finally:
        running.stop()
