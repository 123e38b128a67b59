"""The in-memory FAISS index of the search service, and its atomic on-disk snapshots.

The index is derived state: it is rebuilt from the durable record (``store.py``) whenever
the snapshot is missing or fails its checksum, and caught up from the record's change log
when the snapshot is older than the record.

Index type (the defaults come from ``make bench ARGS=--full``'s scale table in
benchmarks/README.md, "Search index scale"; one thread, 384-d, recall@10 against exact
search in the same run):

- below ``ann_threshold`` (10,000) vectors: exact inner product (``IndexFlatIP``). Under
  10k the best approximate index at recall@10 >= 0.95 was at most 1.6x faster (5k) or no
  faster (2k). From 10k on it was 3x faster, 21x at 100k and 312x at 1M.
- from ``ann_threshold`` on: HNSW (``ann="hnsw"``, the default; M=32, efConstruction=80,
  efSearch=64). efSearch=64 gave recall@10 0.956-0.985 at every size from 5k to 1M. From
  20k on it was the fastest index at that recall: 5x exact at 20k, 21x at 100k and 312x at
  1M, against IVF's 2x, 5x and 93x at its own best nprobe (at the served 128: 2x, 5x and
  12x). On a harder 1M set (100k concepts instead of 10k),
  0.95 needs efSearch=512 (0.969 at 21x exact, with efConstruction=80; 40 tops out at
  0.947). IVF needs nprobe=512 there (0.967 at 4x). HNSW cannot remove vectors, so deleted
  or replaced ids are hidden by a search-time selector. The graph is rebuilt once more than
  max(1000, 10%) are hidden, or a quarter of the live ids in an index under 4,000 (at a
  small ``ann_threshold``: a graph of mostly hidden nodes returned a fraction of the ids).
- or IVF (``ann="ivf"``): ``IndexIVFFlat`` with nlist ~ 4 sqrt(n) lists, k-means trained on
  the vectors it holds when it switches, and ``nprobe`` lists searched (128 reached recall
  0.95 at every size from 10k to 1M on the main set). It builds 2-3x faster and deletes in
  place (``remove_ids`` through a hash-table direct map). It is retrained, with a new
  nlist, once the index has grown ``retrain_growth`` (4) times past the count it was
  trained on.

An approximate index goes back to exact search when the index shrinks below half the
threshold. A switch, retrain or rebuild builds the new index outside the lock (searches and,
with ``background``, writes go on with the old one), then swaps it in after applying the
puts and deletes that landed meanwhile.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

log = logging.getLogger("percept.search")

SNAPSHOT_FORMAT = 1
ANN_KINDS = ("hnsw", "ivf")
#: OpenMP threads per query (VectorIndex.search); builds and retrains keep FAISS's default.
QUERY_THREADS = 1
IVF_TRAIN_POINTS_PER_LIST = 64  # k-means sample: 64 vectors per list (FAISS warns below 39)
#: Held by each snapshot write (and the start's removal of those cut short): two never
#: interleave in one process.
_SAVING = threading.Lock()
#: A score this close to 1 is reported as 1. The inner product of two float32 unit
#: vectors is a cosine only to a few float32 ulps: an image searched by itself scored
#: 1 - 6e-8 to 1 + 2.4e-7 (its vector embedded alone and in a batch differ by up to 7e-8
#: per component), and a Hit's score is documented -1..1, with min_score 1 finding exact
#: duplicates.
SCORE_ONE_WITHIN = 1e-6


def hidden_limit(live: int) -> int:
    """How many hidden (deleted or replaced) ids an HNSW graph of ``live`` ids may hold
    before it is rebuilt: max(1000, 10%), but at most a quarter of the live ids (the
    search-time selector cannot find live neighbours through a mostly hidden graph)."""
    return max(live // 10, min(1000, live // 4))


@dataclass(frozen=True)
class IndexSettings:
    """Defaults from ``make bench`` (benchmarks/README.md): see the module docstring."""

    ann_threshold: int = 10_000  # exact search below, ``ann`` at and above
    ann: str = "hnsw"  # "hnsw" or "ivf"
    nprobe: int = 128  # IVF lists searched per query
    retrain_growth: float = 4.0  # retrain IVF once the index is this many times larger
    background: bool = False  # switch/retrain/rebuild in a thread (the service: True)
    hnsw_m: int = 32
    ef_construction: int = 80  # 2x the build time of 40; needed for 0.95 on the hard 1M set
    ef_search: int = 64

    def __post_init__(self) -> None:
        if self.ann not in ANN_KINDS:
            raise ValueError(f"ann must be one of {ANN_KINDS}, got {self.ann!r}")
        if self.ann_threshold < 1 or self.nprobe < 1 or self.retrain_growth <= 1:
            raise ValueError("ann_threshold and nprobe must be >= 1, retrain_growth > 1")


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: ~4 sqrt(n), but at least 39 vectors per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def train_ivf(vectors: np.ndarray, nlist: int, seed: int = 0) -> Any:
    """An empty, trained ``IndexIVFFlat`` (inner product) whose lists hold arbitrary int64
    ids (hash-table direct map: ``remove_ids`` and ``reconstruct`` by id work)."""
    dimension = vectors.shape[1]
    quantizer = faiss.IndexFlatIP(dimension)
    index = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()  # type: ignore[attr-defined]  # the IVF index frees it
    sample = vectors
    if len(vectors) > IVF_TRAIN_POINTS_PER_LIST * nlist:
        rows = np.random.default_rng(seed).choice(len(vectors), IVF_TRAIN_POINTS_PER_LIST * nlist,
                                                  replace=False)
        sample = vectors[np.sort(rows)]
    index.cp.seed = seed
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
    return index


def cosine_score(score: float) -> float:
    """An inner product of unit vectors as a cosine, -1..1: float32 rounding takes it a
    little past 1 (or -1); within SCORE_ONE_WITHIN of 1, it is 1."""
    if score >= 1.0 - SCORE_ONE_WITHIN:
        return 1.0
    return max(-1.0, float(score))


def _normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


class VectorIndex:
    """Ids -> unit vectors, searchable by inner product; safe for concurrent use."""

    def __init__(self, dimension: int, settings: IndexSettings | None = None) -> None:
        self.dimension = dimension
        self.settings = settings or IndexSettings()
        self._lock = threading.RLock()
        self._rebuild_lock = threading.Lock()  # one switch/retrain at a time
        self._worker: threading.Thread | None = None
        self._params: tuple[Any, ...] = ()  # cached HNSW search parameters (_search_params)
        self._labels: dict[str, int] = {}  # id -> faiss label
        self._ids: dict[int, str] = {}  # faiss label -> id
        self._tombstones: set[int] = set()  # labels hidden in an HNSW graph (no remove_ids)
        self._next_label = 0
        self._trained_on = 0  # vectors in the index when the IVF index was trained
        self.kind = "flat"
        self._index: Any = self._empty_flat()

    @classmethod
    def build(cls, dimension: int, ids: Sequence[str], vectors: np.ndarray,
              settings: IndexSettings | None = None) -> VectorIndex:
        """An index over ``ids`` (unique) built in one go, of the kind their count calls
        for: a rebuild from the record trains IVF once, on every vector."""
        index = cls(dimension, settings)
        if len(ids) != len(set(ids)):
            raise ValueError("ids must be unique")
        if len(ids) == 0:
            return index
        labels = np.arange(len(ids), dtype=np.int64)
        kind = index.settings.ann if len(ids) >= index.settings.ann_threshold else "flat"
        index._index = index._build(kind, labels, _normalise(vectors))
        index.kind, index._next_label = kind, len(ids)
        index._trained_on = len(ids) if kind == "ivf" else 0
        index._ids = dict(zip(labels.tolist(), ids, strict=True))
        index._labels = {image_id: label for label, image_id in index._ids.items()}
        index._configure()
        return index

    def _empty_flat(self) -> Any:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))

    def _configure(self) -> None:
        """Applies the search-time settings to the current index."""
        if self.kind == "ivf":
            self._index.nprobe = min(self.settings.nprobe, self._index.nlist)
        elif self.kind == "hnsw":
            hnsw: Any = faiss.downcast_index(self._index.index)
            hnsw.hnsw.efSearch = self.settings.ef_search

    def __len__(self) -> int:
        with self._lock:
            return len(self._labels)

    def put(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Adds or replaces ``ids``."""
        if len(ids) == 0:
            return
        vectors = _normalise(vectors)
        with self._lock:
            self._remove_locked([i for i in ids if i in self._labels])
            labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
            self._next_label += len(ids)
            self._index.add_with_ids(vectors, labels)
            for image_id, label in zip(ids, labels.tolist(), strict=True):
                self._labels[image_id] = label
                self._ids[label] = image_id
            target = self._wanted_kind()
        if target is not None:
            self._schedule(target)

    def remove(self, ids: Iterable[str]) -> None:
        with self._lock:
            if not self._remove_locked(ids):
                return
            target = self._wanted_kind()
        if target is not None:
            self._schedule(target)

    def _remove_locked(self, ids: Iterable[str]) -> int:
        labels = [self._labels.pop(i) for i in ids if i in self._labels]
        for label in labels:
            del self._ids[label]
        if labels and self.kind == "hnsw":  # HNSW cannot remove: hide the labels
            self._tombstones.update(labels)
            self._params = ()
        elif labels:
            self._index.remove_ids(np.asarray(labels, dtype=np.int64))
        return len(labels)

    def _wanted_kind(self) -> str | None:
        """The kind to rebuild into now, or None (call with the lock held)."""
        count, settings = len(self._labels), self.settings
        if self.kind == "flat":
            return settings.ann if count >= settings.ann_threshold else None
        if count < settings.ann_threshold // 2:
            return "flat"
        if self.kind != settings.ann:
            return settings.ann
        if self.kind == "ivf" and count >= settings.retrain_growth * max(self._trained_on, 1):
            return "ivf"
        if self.kind == "hnsw" and len(self._tombstones) > hidden_limit(count):
            return "hnsw"
        return None

    def _live(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels and vectors of every live id (call with the lock held)."""
        labels = np.fromiter(self._ids.keys(), dtype=np.int64, count=len(self._ids))
        if not len(labels):
            return labels, np.zeros((0, self.dimension), np.float32)
        return labels, np.ascontiguousarray(self._index.reconstruct_batch(labels),
                                            dtype=np.float32)

    def _build(self, kind: str, labels: np.ndarray, vectors: np.ndarray) -> Any:
        if kind == "flat":
            index = self._empty_flat()
        elif kind == "ivf":
            index = train_ivf(vectors, ivf_nlist(len(vectors)))
        else:
            hnsw = faiss.IndexHNSWFlat(self.dimension, self.settings.hnsw_m,
                                       faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.settings.ef_construction
            index = faiss.IndexIDMap2(hnsw)
        if len(labels):
            index.add_with_ids(vectors, labels)
        return index

    def _schedule(self, kind: str) -> None:
        if not self.settings.background:
            self._rebuild(kind)
        elif not self._rebuild_lock.locked():  # a running rebuild picks up later changes
            self._worker = threading.Thread(target=self._rebuild, args=(kind,),
                                            name="index-rebuild", daemon=True)
            self._worker.start()

    def wait_for_rebuild(self, timeout: float | None = None) -> bool:
        """Waits for a background switch/retrain/rebuild; False if it is still running."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
            return not worker.is_alive()
        return True

    def _rebuild(self, kind: str) -> None:
        """Builds a ``kind`` index from the live vectors outside the lock, then swaps it in
        with the puts and deletes that happened meanwhile applied; repeats while the
        index then still calls for another kind (changes that landed during the build)."""
        if not self._rebuild_lock.acquire(blocking=False):
            return  # another thread is rebuilding; it picks up this thread's changes
        try:
            target: str | None = kind
            while target is not None:
                self._rebuild_once(target)
                with self._lock:
                    target = self._wanted_kind()
        except Exception:
            log.exception("index rebuild failed; the current index stays in use")
            if not self.settings.background:
                raise
        finally:
            self._rebuild_lock.release()

    def _rebuild_once(self, kind: str) -> None:
        with self._lock:
            labels, vectors = self._live()
        started = time.perf_counter()
        index = self._build(kind, labels, vectors)
        with self._lock:
            live = self._ids.keys()
            gone = [label for label in labels.tolist() if label not in live]
            known = set(labels.tolist())
            new = np.fromiter((label for label in live if label not in known), dtype=np.int64)
            if len(new):
                index.add_with_ids(np.ascontiguousarray(
                    self._index.reconstruct_batch(new), dtype=np.float32), new)
            tombstones: set[int] = set()
            if gone and kind == "hnsw":
                tombstones = set(gone)
            elif gone:
                index.remove_ids(np.asarray(gone, dtype=np.int64))
            previous = self.kind
            self._index, self.kind, self._tombstones = index, kind, tombstones
            self._params = ()
            self._trained_on = len(labels) if kind == "ivf" else 0
            self._configure()
        log.info("search index rebuilt", extra={
            "from": previous, "to": kind, "vectors": len(labels) + len(new) - len(gone),
            "seconds": round(time.perf_counter() - started, 2)})

    def _search_params(self) -> Any:
        """HNSW with hidden labels: search parameters whose selector skips them, so that a
        search asks for k results, not k + the hidden count (call with the lock held)."""
        if self.kind != "hnsw" or not self._tombstones:
            return None
        if not self._params:  # emptied whenever the hidden labels change
            module: Any = faiss  # its stubs lack the SearchParameters* classes
            hidden = np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
            batch = module.IDSelectorBatch(len(hidden), module.swig_ptr(hidden))  # copies them
            skip = module.IDSelectorNot(batch)
            params = module.SearchParametersHNSW()
            params.sel, params.efSearch = skip, self.settings.ef_search
            self._params = (params, skip, batch)  # the selectors must outlive the parameters
        return self._params[0]

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """For each query, up to k (id, cosine score) pairs, best first; a score is -1..1
        (:func:`cosine_score`). On one OpenMP thread (:data:`QUERY_THREADS`): the server
        answers many queries at once, and FAISS's default of a thread per core made one
        exact search over 10k vectors 8-50x slower on a 2-core machine with other work on
        it (a few hundred queries/s against 2,600-3,500 on one thread)."""
        queries = _normalise(np.atleast_2d(queries))
        faiss.omp_set_num_threads(QUERY_THREADS)  # this thread's own setting (OpenMP ICV)
        with self._lock:
            if not self._labels:
                return [[] for _ in range(len(queries))]
            wanted = min(k, self._index.ntotal)
            scores, labels = self._index.search(queries, wanted, params=self._search_params())
            results = []
            for row_scores, row_labels in zip(scores, labels, strict=True):
                hits = [(self._ids[int(label)], cosine_score(float(score)))
                        for score, label in zip(row_scores, row_labels, strict=True)
                        if label >= 0 and int(label) in self._ids]
                results.append(hits[:k])
            return results

    # -- snapshots -----------------------------------------------------------------------
    def capture(self) -> tuple[bytes, bytes, str, int]:
        """The index's state for a snapshot: (index blob, mapping, kind, count)."""
        with self._lock:
            blob = faiss.serialize_index(self._index).tobytes()
            mapping = json.dumps({"ids": self._ids, "tombstones": sorted(self._tombstones),
                                  "next_label": self._next_label,
                                  "trained_on": self._trained_on}).encode()
            return blob, mapping, self.kind, len(self._labels)

    def save_snapshot(self, folder: Path, seq: int,
                      state: tuple[bytes, bytes, str, int] | None = None,
                      record: str | None = None) -> Path:
        """Writes the index (or a ``capture()`` of it taken at ``seq``) atomically: a fresh
        directory, fsynced, then CURRENT renamed. A snapshot that fails (a full or
        read-only disk) leaves nothing behind: not its staging directory, nor a directory
        that CURRENT does not name; the snapshot before it stays current. ``record`` names
        the record it was made from (``ImageStore.record_id``), which a load checks.

        Snapshot writes in a process take turns (two writing one folder at once would
        remove each other's staging directory), and none removes the directory that
        CURRENT names: one of the same ``seq`` as the current one gets another name."""
        with _SAVING:
            return self._save_snapshot(folder, seq, state, record)

    def _save_snapshot(self, folder: Path, seq: int,
                       state: tuple[bytes, bytes, str, int] | None,
                       record: str | None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        blob, mapping, kind, count = state or self.capture()
        name = f"snapshot-{seq:012d}"
        current = _current_name(folder)
        attempt = 1
        while name == current or (folder / name).exists():  # never write over CURRENT's
            attempt += 1
            name = f"snapshot-{seq:012d}-{attempt}"
        staging = folder / f".{name}.tmp"
        target = folder / name
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            files = {"index.faiss": blob, "mapping.json": mapping}
            for filename, data in files.items():
                _write_synced(staging / filename, data)
            meta = {"format": SNAPSHOT_FORMAT, "seq": seq, "kind": kind,
                    "dimension": self.dimension, "count": count,
                    "sha256": {f: hashlib.sha256(d).hexdigest() for f, d in files.items()}}
            if record is not None:
                meta["record"] = record
            _write_synced(staging / "meta.json", json.dumps(meta).encode())
            os.replace(staging, target)
            _fsync_dir(folder)
            _write_synced(folder / ".CURRENT.tmp", name.encode())
            os.replace(folder / ".CURRENT.tmp", folder / "CURRENT")
            _fsync_dir(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                (folder / ".CURRENT.tmp").unlink(missing_ok=True)
            if _current_name(folder) != name:
                shutil.rmtree(target, ignore_errors=True)
            raise
        current = _current_name(folder)
        for old in folder.glob("snapshot-*"):
            if old.name not in (name, current):
                shutil.rmtree(old, ignore_errors=True)
        return target

    @classmethod
    def load_snapshot(cls, folder: Path, dimension: int, settings: IndexSettings | None = None,
                      record: str | None = None) -> tuple[VectorIndex, int]:
        """Loads and verifies the current snapshot; raises ValueError when it is missing,
        corrupt, of another dimension, or made from another record than ``record`` (where
        both are named; the caller then rebuilds from the record)."""
        try:
            name = (folder / "CURRENT").read_text().strip()
            directory = folder / name
            meta = json.loads((directory / "meta.json").read_text())
            blobs = {f: (directory / f).read_bytes() for f in ("index.faiss", "mapping.json")}
        except (OSError, ValueError) as error:
            raise ValueError(f"no readable snapshot in {folder}: {error}") from error
        for filename, data in blobs.items():
            if hashlib.sha256(data).hexdigest() != meta.get("sha256", {}).get(filename):
                raise ValueError(f"snapshot {name}: {filename} fails its checksum")
        if meta.get("format") != SNAPSHOT_FORMAT or meta.get("dimension") != dimension:
            raise ValueError(f"snapshot {name}: format/dimension mismatch")
        if record is not None and meta.get("record", record) != record:
            raise ValueError(f"snapshot {name} was made from another record than the one in "
                             f"{folder.parent} (a record made anew, or another data "
                             "directory's)")
        index = cls(dimension, settings)
        try:
            index._index = faiss.deserialize_index(np.frombuffer(blobs["index.faiss"], np.uint8))
            mapping = json.loads(blobs["mapping.json"])
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"snapshot {name}: unreadable ({error})") from error
        index.kind = meta["kind"]
        index._ids = {int(label): image_id for label, image_id in mapping["ids"].items()}
        index._labels = {image_id: label for label, image_id in index._ids.items()}
        index._tombstones = set(mapping["tombstones"])
        index._next_label = int(mapping["next_label"])
        index._trained_on = int(mapping.get("trained_on", index._index.ntotal))
        if index._index.ntotal != len(index._ids) + len(index._tombstones):
            raise ValueError(f"snapshot {name}: index and mapping disagree")
        if index.kind not in ("flat", *ANN_KINDS):
            raise ValueError(f"snapshot {name}: unknown index kind {index.kind!r}")
        index._configure()
        target = index._wanted_kind()  # the settings changed since the snapshot was taken
        if target is not None:
            index._rebuild(target)
        return index, int(meta["seq"])


def remove_staging(folder: Path) -> list[str]:
    """Removes what snapshot writes cut short (a kill -9, a power cut) left in ``folder``:
    their staging directories (``.snapshot-*.tmp``) and CURRENT's (``.CURRENT.tmp``). For
    the start, before any snapshot is written; returns the names removed."""
    removed = []
    with _SAVING:
        for path in [*folder.glob(".snapshot-*.tmp"), folder / ".CURRENT.tmp"]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
                continue
            removed.append(path.name)
    return removed


def _current_name(folder: Path) -> str | None:
    """The snapshot that ``folder``'s CURRENT names, if it can be read."""
    try:
        return (folder / "CURRENT").read_text().strip()
    except (OSError, UnicodeError):
        return None


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder``. It is walked while snapshots are written and
    old ones removed: a file or directory gone before it is counted is left out."""
    total, pending = 0, [os.fspath(folder)]
    while pending:
        try:
            with os.scandir(pending.pop()) as listing:
                entries = list(listing)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file():
                    total += entry.stat().st_size
            except FileNotFoundError:
                continue
    return total
