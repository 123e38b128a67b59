"""The in-memory FAISS index of the search service, and its atomic on-disk snapshots.

The index is derived state: it is rebuilt from the durable record (``store.py``) whenever
the snapshot is missing or fails its checksum, and caught up from the record's change log
when the snapshot is older than the record. Flat (exact inner product) while small; HNSW
past ``hnsw_threshold`` vectors (the threshold comes from ``make bench``'s scale table).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

SNAPSHOT_FORMAT = 1


@dataclass(frozen=True)
class IndexSettings:
    hnsw_threshold: int = 100_000
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128


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
        self._labels: dict[str, int] = {}  # id -> faiss label
        self._ids: dict[int, str] = {}  # faiss label -> id
        self._tombstones: set[int] = set()  # labels removed from an index without remove_ids
        self._next_label = 0
        self.kind = "flat"
        self._index: Any = self._empty("flat")

    def _empty(self, kind: str) -> Any:
        if kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))
        hnsw = faiss.IndexHNSWFlat(self.dimension, self.settings.hnsw_m,
                                   faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.settings.ef_construction
        hnsw.hnsw.efSearch = self.settings.ef_search
        return faiss.IndexIDMap2(hnsw)

    def __len__(self) -> int:
        with self._lock:
            return len(self._labels)

    def put(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Adds or replaces ``ids``."""
        if len(ids) == 0:
            return
        vectors = _normalise(vectors)
        with self._lock:
            self.remove([i for i in ids if i in self._labels])
            labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
            self._next_label += len(ids)
            self._index.add_with_ids(vectors, labels)
            for image_id, label in zip(ids, labels.tolist(), strict=True):
                self._labels[image_id] = label
                self._ids[label] = image_id
            if self.kind == "flat" and len(self._labels) >= self.settings.hnsw_threshold:
                self._rebuild("hnsw")

    def remove(self, ids: Iterable[str]) -> None:
        with self._lock:
            labels = [self._labels.pop(i) for i in ids if i in self._labels]
            if not labels:
                return
            for label in labels:
                del self._ids[label]
            if self.kind == "flat":
                self._index.remove_ids(np.asarray(labels, dtype=np.int64))
            else:  # HNSW cannot remove: hide the labels, and rebuild when many are hidden
                self._tombstones.update(labels)
                if len(self._tombstones) > max(1000, len(self._labels) // 10):
                    self._rebuild("hnsw")

    def _rebuild(self, kind: str) -> None:
        """Rebuilds the index from its own live vectors (drops tombstones)."""
        labels = np.fromiter(self._ids.keys(), dtype=np.int64, count=len(self._ids))
        vectors = np.vstack([self._index.reconstruct(int(label)) for label in labels]) \
            if len(labels) else np.zeros((0, self.dimension), np.float32)
        index = self._empty(kind)
        if len(labels):
            index.add_with_ids(vectors, labels)
        self._index, self.kind, self._tombstones = index, kind, set()

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """For each query, up to k (id, cosine score) pairs, best first."""
        queries = _normalise(np.atleast_2d(queries))
        with self._lock:
            if not self._labels:
                return [[] for _ in range(len(queries))]
            wanted = min(k + len(self._tombstones), self._index.ntotal)
            scores, labels = self._index.search(queries, wanted)
            results = []
            for row_scores, row_labels in zip(scores, labels, strict=True):
                hits = [(self._ids[int(label)], float(score))
                        for score, label in zip(row_scores, row_labels, strict=True)
                        if label >= 0 and int(label) in self._ids]
                results.append(hits[:k])
            return results

    # -- snapshots -----------------------------------------------------------------------
    def save_snapshot(self, folder: Path, seq: int) -> Path:
        """Writes the index atomically: a fresh directory, fsynced, then CURRENT renamed."""
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            blob = faiss.serialize_index(self._index).tobytes()
            mapping = json.dumps({"ids": self._ids, "tombstones": sorted(self._tombstones),
                                  "next_label": self._next_label}).encode()
            kind = self.kind
        name = f"snapshot-{seq:012d}"
        staging = folder / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        files = {"index.faiss": blob, "mapping.json": mapping}
        for filename, data in files.items():
            _write_synced(staging / filename, data)
        meta = {"format": SNAPSHOT_FORMAT, "seq": seq, "kind": kind, "dimension": self.dimension,
                "count": len(self), "sha256": {f: hashlib.sha256(d).hexdigest()
                                              for f, d in files.items()}}
        _write_synced(staging / "meta.json", json.dumps(meta).encode())
        target = folder / name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        _fsync_dir(folder)
        _write_synced(folder / ".CURRENT.tmp", name.encode())
        os.replace(folder / ".CURRENT.tmp", folder / "CURRENT")
        _fsync_dir(folder)
        for old in folder.glob("snapshot-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return target

    @classmethod
    def load_snapshot(cls, folder: Path, dimension: int,
                      settings: IndexSettings | None = None) -> tuple[VectorIndex, int]:
        """Loads and verifies the current snapshot; raises ValueError when it is missing,
        corrupt or of another dimension (the caller then rebuilds from the record)."""
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
        if index._index.ntotal != len(index._ids) + len(index._tombstones):
            raise ValueError(f"snapshot {name}: index and mapping disagree")
        return index, int(meta["seq"])


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
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
