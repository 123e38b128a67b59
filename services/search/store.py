"""The durable record of indexed images: the source of truth for the search service.

SQLite in WAL mode with ``synchronous=FULL``: a batch is one transaction, and it is
acknowledged only after the commit returned, so every acknowledged write survives
``kill -9`` (and power loss, as far as the disk honours fsync). A change log with a
monotonic sequence number lets the in-memory FAISS index catch up from a snapshot; the
changes a durably saved snapshot holds are pruned from it (``prune_changes``).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    uri TEXT NOT NULL,
    vector BLOB NOT NULL,
    added REAL NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('put', 'delete'))
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


#: SQLite's primary result codes (an extended code keeps its primary one in the low byte).
SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 8, 10, 13, 14
#: The extended code of a write to a record whose file was renamed, replaced or deleted
#: while open (SQLite refuses it, lest it write to a file no one will open again).
SQLITE_READONLY_DBMOVED = SQLITE_READONLY | 4 << 8
#: The errnos of a write that found the filesystem full, and of one it refused.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


class DataDirProblem(Exception):
    """A write that the data directory refused for a reason only its operator can fix;
    the message names the directory and the cause. Nothing of the write was kept."""

    #: The google.rpc.ErrorInfo reason of the answer to a call that met it.
    reason = "DATA_DIR_PROBLEM"
    #: What the operator does about it.
    advice = "see the server's log"

    def __init__(self, message: str, data_dir: Path) -> None:
        super().__init__(message)
        self.data_dir = data_dir


class DataDirFull(DataDirProblem):
    """The data directory's filesystem is full (SQLITE_FULL, ENOSPC, EDQUOT)."""

    reason = "DATA_DIR_FULL"
    advice = "free space on its filesystem (or grow the volume)"


class DataDirReadOnly(DataDirProblem):
    """The data directory, or the record in it, cannot be written (SQLITE_READONLY,
    EROFS, EACCES: a read-only mount, or files the server's user may not write)."""

    reason = "DATA_DIR_READ_ONLY"
    advice = "mount it read-write, or give the server's user write access to it"


class RecordMoved(DataDirProblem):
    """The record the server has open was renamed, replaced or deleted under it: its
    writes would go to a file no longer at that path (in WAL mode SQLite takes them,
    into a log no longer beside it; in rollback mode it refuses them,
    SQLITE_READONLY_DBMOVED)."""

    reason = "DATA_DIR_RECORD_MOVED"
    advice = ("move the record the server opened back, or restart the server to serve the "
              "one now there")


def _diagnosed(data_dir: Path) -> type[DataDirProblem] | None:
    """What the filesystem of ``data_dir`` says is wrong with it, for an error that does
    not say so itself (SQLite's I/O and cannot-open errors hide the errno)."""
    try:
        stats = os.statvfs(data_dir)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return DataDirReadOnly
    if stats.f_bavail == 0 or (stats.f_files and stats.f_favail == 0):  # no inodes left
        return DataDirFull
    if not os.access(data_dir, os.W_OK):
        return DataDirReadOnly
    return None


def data_dir_problem(error: BaseException, data_dir: Path) -> DataDirProblem | None:
    """``error`` (from SQLite or the os, met writing under ``data_dir``) as the problem
    of the data directory that it is, or None where it is another error."""
    kind: type[DataDirProblem] | None = None
    if isinstance(error, sqlite3.Error):
        extended = getattr(error, "sqlite_errorcode", None) or 0
        code = extended & 0xFF
        if extended == SQLITE_READONLY_DBMOVED:
            return record_moved(data_dir, f"SQLite: {error}")
        if code == SQLITE_FULL:
            kind = DataDirFull
        elif code == SQLITE_READONLY:
            kind = DataDirReadOnly
        elif code in (SQLITE_IOERR, SQLITE_CANTOPEN):
            kind = _diagnosed(data_dir)
        said = f"SQLite: {error}"
    elif isinstance(error, OSError):
        if error.errno in FULL_ERRNOS:
            kind = DataDirFull
        elif error.errno in READ_ONLY_ERRNOS:
            kind = DataDirReadOnly
        said = error.strerror or str(error)
    if kind is None:
        return None
    state = "full" if kind is DataDirFull else "read-only"
    return kind(f"the data directory {data_dir} is {state} ({said})", data_dir)


def record_moved(data_dir: Path, said: str) -> RecordMoved:
    return RecordMoved(f"the record in the data directory {data_dir} was moved, replaced or "
                       f"deleted while the server had it open ({said})", data_dir)


def _file_identity(path: Path) -> tuple[int, int] | None:
    """The device and inode of the file at ``path`` (None: there is none)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def probe_data_dir(data_dir: Path) -> DataDirProblem | None:
    """Makes ``data_dir`` if it is missing, and writes, syncs and removes a file in it:
    the problem that stops writes there, or None where they can be made."""
    probe = data_dir / f".write-check-{os.getpid()}"
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"percept")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        problem = data_dir_problem(error, data_dir)
        if problem is None:
            raise
        return problem
    finally:
        with contextlib.suppress(OSError):  # a read-only directory, where it was never made
            probe.unlink(missing_ok=True)
    return None


@dataclass(frozen=True)
class Record:
    id: str
    uri: str
    vector: np.ndarray  # float32 (D,)
    added: float


@dataclass(frozen=True)
class Entry:
    """A stored image without its vector."""

    id: str
    uri: str
    added: float  # seconds since the epoch


def _after_every_id_with(prefix: str) -> str | None:
    """The least string greater than every string that starts with ``prefix`` (SQLite
    compares TEXT as UTF-8 bytes, which orders as code points), or None if there is none."""
    while prefix and ord(prefix[-1]) == 0x10FFFF:
        prefix = prefix[:-1]
    if not prefix:
        return None
    last = ord(prefix[-1]) + 1
    if 0xD800 <= last <= 0xDFFF:  # surrogates cannot be encoded; the next code point is
        last = 0xE000
    return prefix[:-1] + chr(last)


#: The most ids one ``IN (...)`` query names: SQLite refuses a statement with more variables
#: than its limit (32,766 in stock builds since 3.32, 999 before; the connection's own
#: limit is kept to where it is lower), so longer lists are read in chunks of this many.
MAX_QUERY_IDS = 10_000

#: The most rows of the change log one pruning transaction deletes: each holds the
#: record's write lock (and the store's) only that long, so writes wait for a chunk, never
#: for a whole log left long by an old snapshot.
PRUNE_CHUNK_ROWS = 10_000


#: Cosine between a probe image's vector now and when the record was made, below which
#: the embedding space is another (the same model agrees with itself but for float
#: rounding; another space's vectors are unrelated to these, and a retrained DeViSE map's
#: moved: 0.96-0.98 for 200 more steps of the default recipe). Every probe image must
#: reach it (services.search.probes).
MIN_PROBE_AGREEMENT = 0.99


def recorded_dimension(path: Path) -> int | None:
    """The dimension of the vectors in the record at ``path``, where it exists and kept the
    probe vector of the space they were made in (so that an embedder met later can be
    checked against it); None otherwise."""
    if not path.is_file():
        return None
    db = sqlite3.connect(str(path))
    try:
        rows = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('dimension', 'probe')")
                    .fetchall())
    except sqlite3.OperationalError:  # no meta table yet (a corrupt file raises at once)
        return None
    finally:
        db.close()
    # without a probe (an older record), the first embedder met gives it, as at start
    return int(rows["dimension"]) if "dimension" in rows else None


def _as_rows(probes: np.ndarray) -> np.ndarray:
    """Probe vectors as float32 rows (one vector alone is one row)."""
    return np.atleast_2d(np.asarray(probes, dtype=np.float32))


def _encode_rows(rows: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(rows, dtype=np.float32).tobytes()).decode()


def _decode_rows(text: str, dimension: int) -> np.ndarray:
    flat = np.frombuffer(base64.b64decode(text), dtype=np.float32)
    if flat.size == 0 or flat.size % dimension:
        return np.zeros((1, dimension), np.float32)  # agrees with nothing: refused
    return flat.reshape(-1, dimension)


def _least_agreement(stored: np.ndarray, now: np.ndarray) -> float:
    """The least cosine between a stored probe vector and the same probe's vector now."""
    norms = np.linalg.norm(stored, axis=1) * np.linalg.norm(now, axis=1) + 1e-12
    return float(((stored * now).sum(axis=1) / norms).min())


class ImageStore:
    """Thread-safe access to ``<data_dir>/images.sqlite3``."""

    def __init__(self, path: Path, dimension: int, probes: np.ndarray | None = None) -> None:
        """Opens (or creates) the record of vectors of ``dimension``; with ``probes``, the
        embedder's vectors of the fixed probe images (services.search.probes, one row
        each), which a new record keeps and an existing one must match: vectors from
        another embedding space have the same dimension, and searching them with this
        one's would return nonsense with confident scores."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.dimension = dimension
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._identity = _file_identity(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        stored = self._db.execute("SELECT value FROM meta WHERE key='dimension'").fetchone()
        if stored is None:
            self._db.execute("INSERT INTO meta VALUES ('dimension', ?)", (str(dimension),))
        elif int(stored[0]) != dimension:
            raise ValueError(f"{path} holds {stored[0]}-d vectors, the embedder makes "
                             f"{dimension}-d ones: use another --data-dir")
        if probes is not None:
            self._check_space(_as_rows(probes))
        #: A name made once for this record (kept in it): a snapshot of the index made
        #: from another record (one made anew, or another data directory's) is told apart
        row = self._db.execute("SELECT value FROM meta WHERE key='record'").fetchone()
        if row is None:
            row = (uuid.uuid4().hex,)
            self._db.execute("INSERT INTO meta VALUES ('record', ?)", row)
        self.record_id: str = row[0]

    def check_space(self, dimension: int, probes: np.ndarray) -> None:
        """ValueError unless an embedder of vectors of ``dimension`` whose probe vectors
        are ``probes`` makes vectors of the space this record holds (for a record opened
        before its embedder answered; the constructor checks the same)."""
        if dimension != self.dimension:
            raise ValueError(f"{self.path} holds {self.dimension}-d vectors, the embedder "
                             f"makes {dimension}-d ones: use another --data-dir")
        with self._lock:
            self._check_space(_as_rows(probes))

    def _check_space(self, probes: np.ndarray) -> None:
        """Compares ``probes`` with the probe vectors the record keeps, and keeps them
        where it has none yet. A record made when there was one probe image (meta key
        'probe') is compared on that one, then keeps them all; a new record keeps the
        first under 'probe' as well, so that such a version still checks it."""
        rows = dict(self._db.execute(
            "SELECT key, value FROM meta WHERE key IN ('probe', 'probes')").fetchall())
        if "probes" in rows:
            stored = _decode_rows(rows["probes"], self.dimension)
        elif "probe" in rows:
            stored = _decode_rows(rows["probe"], self.dimension)
        else:  # a new record, or one written before any probe was kept
            stored = probes[:0]
        count = min(len(stored), len(probes))
        if count:
            agreement = _least_agreement(stored[:count], probes[:count])
            if agreement < MIN_PROBE_AGREEMENT:
                raise ValueError(
                    f"{self.path} holds vectors from another embedding space (the probe "
                    f"images' vectors agree with the ones it was made with at {agreement:.3f}"
                    f" at least, under {MIN_PROBE_AGREEMENT}: another --word-vectors file, "
                    "DeViSE map or method): its vectors cannot be searched with this "
                    "Embedding service's. Use another --data-dir and index the images "
                    "again, or serve the space it was made in")
        if len(probes) > len(stored):
            try:
                self._keep_probes(probes, first_too="probe" not in rows)
            except sqlite3.Error:
                if not len(stored):  # a record must know its space
                    raise
                # an older record on a read-only mount: checked on the probes it keeps

    def _keep_probes(self, probes: np.ndarray, first_too: bool) -> None:
        """Keeps ``probes`` (and, with ``first_too``, the first under 'probe') in one
        transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('probes', ?)",
                             (_encode_rows(probes),))
            if first_too:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('probe', ?)",
                                 (_encode_rows(probes[:1]),))
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @property
    def data_dir(self) -> Path:
        return self.path.parent

    def probe_write(self) -> DataDirProblem | None:
        """Why the record cannot be written (None: it can). SQLite opens a file that it
        may only read (on a read-only mount, or not the server's user's to write) without
        a word, and refuses the first write: this begins one and takes it back (it needs
        no free space)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._check_in_place()
                    self._db.execute("INSERT OR REPLACE INTO meta VALUES ('write-check', '')")
                finally:
                    self._rollback()
            except sqlite3.Error as error:
                problem = data_dir_problem(error, self.data_dir)
                if problem is None:
                    raise
                return problem
            except RecordMoved as problem:
                return problem
        return None

    def _check_in_place(self) -> None:
        """RecordMoved where the file at the record's path is not the one opened (checked
        with the write lock held, so nothing is written to a file that was moved)."""
        if _file_identity(self.path) != self._identity:
            raise record_moved(self.data_dir, f"{self.path} is no longer the file it opened")

    def _rollback(self) -> None:
        """Takes back the transaction under way, where there still is one: SQLite ends it
        by itself after some errors (SQLITE_FULL, SQLITE_IOERR), and a ROLLBACK then
        raises "no transaction is active" over the error that says what went wrong."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _write(self, change: Callable[[sqlite3.Cursor], int]) -> int:
        """Runs ``change`` in one durable transaction and returns what it returned; a
        full or read-only data directory raises DataDirProblem (nothing of the change
        kept), and any other error the error that SQLite raised."""
        with self._lock:
            cursor = self._db.cursor()
            try:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    self._check_in_place()
                    result = change(cursor)
                    cursor.execute("COMMIT")
                except BaseException as error:
                    try:
                        self._rollback()
                    except sqlite3.Error as failed:  # keep the error that said why
                        error.add_note(f"and the ROLLBACK after it failed: {failed}")
                    raise
            except (sqlite3.Error, OSError) as error:
                problem = data_dir_problem(error, self.data_dir)
                if problem is None:
                    raise
                raise problem from error
        return result

    def put_many(self, items: Sequence[tuple[str, str, np.ndarray]]) -> int:
        """Inserts or replaces (id, uri, vector) items in one durable transaction; returns
        the sequence number of the last change. DataDirProblem where the data directory
        is full or read-only (nothing stored)."""
        now = time.time()

        def put(cursor: sqlite3.Cursor) -> int:
            seq = 0
            for image_id, uri, vector in items:
                cursor.execute("INSERT INTO changes (id, op) VALUES (?, 'put')", (image_id,))
                seq = int(cursor.lastrowid or 0)
                blob = np.asarray(vector, dtype=np.float32).tobytes()
                cursor.execute("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?)",
                               (image_id, uri, blob, now, seq))
            return seq

        return self._write(put)

    def delete_many(self, ids: Sequence[str]) -> tuple[list[str], int]:
        """Deletes ids in one durable transaction; returns (the missing ids, last seq).
        DataDirProblem where the data directory is full or read-only (nothing deleted):
        SQLite needs room in its write-ahead log to record a deletion too."""
        missing: list[str] = []

        def delete(cursor: sqlite3.Cursor) -> int:
            missing.clear()
            seq = 0
            for image_id in ids:
                if cursor.execute("DELETE FROM images WHERE id = ?", (image_id,)).rowcount:
                    cursor.execute("INSERT INTO changes (id, op) VALUES (?, 'delete')",
                                   (image_id,))
                    seq = int(cursor.lastrowid or 0)
                else:
                    missing.append(image_id)
            return seq

        seq = self._write(delete)
        return missing, seq

    def _record(self, row: tuple[str, str, bytes, float]) -> Record:
        vector = np.frombuffer(row[2], dtype=np.float32)
        if vector.shape != (self.dimension,):
            raise ValueError(f"record {row[0]!r} has a {vector.size}-d vector")
        return Record(id=row[0], uri=row[1], vector=vector, added=row[3])

    def _rows_of(self, columns: str, ids: Sequence[str]) -> list[tuple]:
        """``columns`` of the stored ones of ``ids``: one ``IN`` query per chunk of at most
        MAX_QUERY_IDS ids (and at most the connection's variable limit), so that any
        number of ids can be asked for."""
        rows: list[tuple] = []
        with self._lock:
            chunk = max(1, min(MAX_QUERY_IDS,
                               self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)))
            for start in range(0, len(ids), chunk):
                part = list(ids[start:start + chunk])
                marks = ",".join("?" * len(part))
                rows += self._db.execute(
                    f"SELECT {columns} FROM images WHERE id IN ({marks})", part).fetchall()
        return rows

    def get(self, ids: Sequence[str]) -> dict[str, Record]:
        return {row[0]: self._record(row) for row in self._rows_of("id, uri, vector, added", ids)}

    def all_records(self, batch: int = 10_000) -> Iterator[Record]:
        """Every record, in id order (a consistent read of the committed state)."""
        last = ""
        while True:
            with self._lock:
                rows = self._db.execute(
                    "SELECT id, uri, vector, added FROM images WHERE id > ? ORDER BY id LIMIT ?",
                    (last, batch)).fetchall()
            if not rows:
                return
            for row in rows:
                yield self._record(row)
            last = rows[-1][0]

    def entries(self, ids: Sequence[str]) -> dict[str, Entry]:
        """The stored ones of ``ids``, without their vectors."""
        return {row[0]: Entry(*row) for row in self._rows_of("id, uri, added", ids)}

    def page(self, after: str, limit: int, prefix: str = "") -> list[Entry]:
        """Up to ``limit`` entries in id order, of ids after ``after`` (not included) that
        start with ``prefix``; a range read of the primary key, however large the record."""
        # the ids that start with the prefix are exactly those from it up to (not including)
        # the least string after all of them: a range of the key, NUL characters and all
        query = "SELECT id, uri, added FROM images WHERE id > ?"
        values: list[object] = [after]
        if prefix and after < prefix:
            query, values = "SELECT id, uri, added FROM images WHERE id >= ?", [prefix]
        upper = _after_every_id_with(prefix) if prefix else None
        if upper is not None:
            query += " AND id < ?"
            values.append(upper)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id LIMIT ?", [*values, limit]).fetchall()
        return [Entry(*row) for row in rows]

    def changes_since(self, seq: int) -> list[tuple[int, str, str]]:
        """(seq, id, op) for every change after ``seq``, oldest first."""
        with self._lock:
            return self._db.execute("SELECT seq, id, op FROM changes WHERE seq > ? ORDER BY seq",
                                    (seq,)).fetchall()

    def last_seq(self) -> int:
        """The seq of the latest change (0: none yet). ``prune_changes`` always keeps the
        latest row, so this stays right after pruning, and the next change's seq is
        above it whether or not the table's key is AUTOINCREMENT."""
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM changes").fetchone()
        return int(row[0] or 0)

    def prune_changes(self, through: int) -> int:
        """Deletes the changes up to seq ``through``, that of a snapshot saved durably: a
        catch-up from it reads only the changes after it, and a rebuild reads the images,
        not the log. The latest change is kept (see ``last_seq``). Returns the rows
        deleted.

        Each chunk of PRUNE_CHUNK_ROWS rows is its own transaction, so writes never wait
        for a whole long log; a crash mid-way leaves only changes the snapshot holds,
        which the next prune deletes. DataDirProblem where the data directory refuses
        the write (nothing of that chunk deleted).

        Each chunk records, in its own transaction, the highest seq deleted so far (meta
        key 'pruned_through', see ``pruned_through``): a snapshot older than that can no
        longer be caught up, the changes after it being gone."""

        def prune(cursor: sqlite3.Cursor) -> int:
            # the chunk is the oldest rows up to ``through``, short of the latest one
            high = cursor.execute(
                "SELECT MAX(seq) FROM (SELECT seq FROM changes WHERE seq <= ? "
                "AND seq < (SELECT MAX(seq) FROM changes) ORDER BY seq LIMIT ?)",
                (through, PRUNE_CHUNK_ROWS)).fetchone()[0]
            if high is None:
                return 0
            rows = cursor.execute("DELETE FROM changes WHERE seq <= ?", (high,)).rowcount
            stored = cursor.execute(
                "SELECT value FROM meta WHERE key='pruned_through'").fetchone()
            if stored is None or int(stored[0]) < high:  # never lowered
                cursor.execute("INSERT OR REPLACE INTO meta VALUES ('pruned_through', ?)",
                               (str(high),))
            return rows

        deleted = 0
        while True:
            chunk = self._write(prune)
            deleted += chunk
            if chunk < PRUNE_CHUNK_ROWS:
                return deleted

    def pruned_through(self) -> int:
        """The highest seq ``prune_changes`` deleted (0: the log was never pruned, as in
        a record made before pruning): the changes up to it are gone, so only a snapshot
        at that seq or later can be caught up from the log."""
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM meta WHERE key='pruned_through'").fetchone()
        return int(row[0]) if row else 0

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
