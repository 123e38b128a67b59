"""The search service's FAISS index: exact search while small, approximate (IVF or HNSW)
past the threshold, deletes and replaces on every kind, snapshots and rebuilds.

The threshold is tiny here (200 vectors, set through ``IndexSettings`` and the server flags)
so that the approximate path runs on a few hundred vectors; the data is easy (well separated
clusters), so the approximate answers must match exact search.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import faiss
import numpy as np
import pytest

from services.common.config import ServerConfig, add_server_arguments, config_from_args
from services.search.service import ImageSearchService, index_settings, recover_index
from services.search.store import ImageStore
from services.search.vector_index import IndexSettings, VectorIndex, ivf_nlist

DIMENSION = 48
THRESHOLD = 200


def settings(ann: str = "ivf", **changes: object) -> IndexSettings:
    values: dict[str, object] = {"ann_threshold": THRESHOLD, "ann": ann, "nprobe": 4}
    values.update(changes)
    return IndexSettings(**values)  # type: ignore[arg-type]


def clustered(n: int, seed: int = 0, clusters: int = 12) -> np.ndarray:
    """Unit vectors in tight, well separated clusters (the same clusters for every seed)."""
    centres = np.random.default_rng(1234).standard_normal((clusters, DIMENSION))
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, clusters, n)] + 0.15 * rng.standard_normal((n, DIMENSION))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def ids(n: int, prefix: str = "v") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def exact_top(vectors: dict[str, np.ndarray], query: np.ndarray, k: int) -> list[str]:
    names = list(vectors)
    scores = np.stack([vectors[name] for name in names]) @ query
    return [names[i] for i in np.argsort(-scores, kind="stable")[:k]]


def agreement(index: VectorIndex, vectors: dict[str, np.ndarray], queries: np.ndarray,
              k: int = 10) -> float:
    """recall@k of ``index`` against exact search over ``vectors``."""
    found = index.search(queries, k)
    hits = sum(len({i for i, _ in row} & set(exact_top(vectors, q, k)))
               for row, q in zip(found, queries, strict=True))
    return hits / (k * len(queries))


def filled(ann: str, n: int = 600, **changes: object) -> tuple[VectorIndex, dict[str, np.ndarray]]:
    index = VectorIndex(DIMENSION, settings(ann, **changes))
    data = clustered(n)
    names = ids(n)
    for start in range(0, n, 64):  # in batches, like the service
        index.put(names[start:start + 64], data[start:start + 64])
    return index, dict(zip(names, data, strict=True))


def test_switches_to_ivf_at_the_threshold() -> None:
    index = VectorIndex(DIMENSION, settings("ivf"))
    data = clustered(THRESHOLD)
    index.put(ids(THRESHOLD - 1), data[:-1])
    assert index.kind == "flat" and len(index) == THRESHOLD - 1
    index.put([f"v{THRESHOLD - 1}"], data[-1:])
    assert index.kind == "ivf" and len(index) == THRESHOLD
    ivf = faiss.extract_index_ivf(index._index)
    assert ivf.nlist == ivf_nlist(THRESHOLD) and ivf.nprobe == 4 and ivf.ntotal == THRESHOLD
    assert index._trained_on == THRESHOLD


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_approximate_search_agrees_with_exact_search(ann: str) -> None:
    index, vectors = filled(ann)
    assert index.kind == ann
    queries = clustered(40, seed=1)
    assert agreement(index, vectors, queries) >= 0.95
    # every stored vector finds itself first, with cosine ~1
    sample = list(vectors)[::37]
    for name, row in zip(sample, index.search(np.stack([vectors[s] for s in sample]), 3),
                         strict=True):
        assert row[0][0] == name and row[0][1] > 0.999
        assert [score for _, score in row] == sorted((score for _, score in row), reverse=True)


def test_ivf_search_is_approximate_with_one_probe() -> None:
    """The ANN path is really taken: on scattered data one probed list misses neighbours."""
    index = VectorIndex(DIMENSION, settings("ivf", nprobe=1))
    rng = np.random.default_rng(3)
    data = rng.standard_normal((600, DIMENSION)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    index.put(ids(600), data)
    assert index.kind == "ivf"
    queries = rng.standard_normal((40, DIMENSION)).astype(np.float32)
    assert agreement(index, dict(zip(ids(600), data, strict=True)), queries) < 0.9


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_delete_and_replace_after_the_switch(ann: str) -> None:
    index, vectors = filled(ann)
    gone = [f"v{i}" for i in range(0, 600, 5)]
    index.remove([*gone, "never-added"])
    for name in gone:
        del vectors[name]
    assert len(index) == 600 - len(gone) and index.kind == ann
    queries = clustered(40, seed=1)
    rows = index.search(queries, 20)
    assert all(len(row) == 20 for row in rows)  # deleted ids do not leave holes
    assert not {i for row in rows for i, _ in row} & set(gone)
    assert agreement(index, vectors, queries) >= 0.95

    # replace: v1 takes v2's place in space, and its old vector no longer finds it
    old = vectors["v1"]
    index.put(["v1"], vectors["v2"][None])
    vectors["v1"] = vectors["v2"]
    assert len(index) == 600 - len(gone)
    top = [i for i, _ in index.search(vectors["v2"], 2)[0]]
    assert set(top) == {"v1", "v2"}
    for name, score in index.search(old, 5)[0]:  # v1 now scores as its new vector
        if name == "v1":
            assert score == pytest.approx(float(old @ vectors["v2"]), abs=1e-4)
    rows = index.search(queries, 30)
    assert all(len(row) == len({i for i, _ in row}) for row in rows)  # no duplicates


def test_hnsw_hides_ids_deleted_after_a_search() -> None:
    """The cached search-time selector follows later deletes (no holes, no ghosts)."""
    index, vectors = filled("hnsw")
    queries = np.stack([vectors[f"v{i}"] for i in range(20)])
    index.remove(["v0"])
    assert index.search(queries[1], 1)[0][0][0] == "v1"  # builds the selector
    index.remove([f"v{i}" for i in range(1, 10)])
    rows = index.search(queries, 10)
    assert all(len(row) == 10 for row in rows)
    assert not {i for row in rows for i, _ in row} & {f"v{i}" for i in range(10)}


def test_hnsw_rebuilds_once_many_ids_are_hidden() -> None:
    index, _ = filled("hnsw", n=2400)
    index.remove([f"v{i}" for i in range(1100)])
    assert index.kind == "hnsw" and not index._tombstones  # rebuilt without them
    assert index._index.ntotal == len(index) == 1300


def test_a_small_hnsw_graph_is_rebuilt_before_hidden_ids_swamp_it() -> None:
    """At a small --search-ann-threshold, replacing ids again and again hid up to 1000
    nodes in a graph of 80 live ones, and a search for every id (k=1000) found 17-28 of
    them (a crash audit saw 19 of 84): the graph is now rebuilt once a quarter of the live
    ids are hidden, and finds them (HNSW is approximate: nearly all)."""
    index, _ = filled("hnsw", n=80, ann_threshold=40)
    assert index.kind == "hnsw"
    for round_ in range(6):  # 360 replacements
        index.put(ids(60), clustered(60, seed=100 + round_))
    assert len(index._tombstones) <= 80 // 4
    rows = index.search(clustered(5, seed=7), 1000)
    assert min(len(row) for row in rows) >= 72, [len(row) for row in rows]


def test_ivf_retrains_after_growth_and_shrinks_back_to_flat() -> None:
    index, vectors = filled("ivf", n=THRESHOLD, retrain_growth=2.0)
    assert index.kind == "ivf" and index._trained_on == THRESHOLD
    more = clustered(THRESHOLD, seed=5)
    index.put(ids(THRESHOLD, "w"), more)
    assert index._trained_on == 2 * THRESHOLD
    assert faiss.extract_index_ivf(index._index).nlist == ivf_nlist(2 * THRESHOLD)
    vectors.update(zip(ids(THRESHOLD, "w"), more, strict=True))
    assert agreement(index, vectors, clustered(30, seed=9)) >= 0.95

    drop = list(vectors)[: 2 * THRESHOLD - THRESHOLD // 2 + 1]
    index.remove(drop)
    for name in drop:
        del vectors[name]
    assert index.kind == "flat" and len(index) == THRESHOLD // 2 - 1
    assert agreement(index, vectors, clustered(30, seed=9)) == 1.0


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_changes_during_a_rebuild_are_not_lost(ann: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new index is built outside the lock; puts and deletes that land meanwhile are
    applied to it before it is swapped in."""
    index = VectorIndex(DIMENSION, settings(ann))
    data = clustered(THRESHOLD + 50)
    index.put(ids(THRESHOLD - 1), data[:THRESHOLD - 1])
    build = index._build

    def build_with_traffic(kind: str, labels: np.ndarray, vectors: np.ndarray) -> object:
        index.put(ids(50, "late"), data[THRESHOLD:])  # lands while the new index is built
        index.remove(["v0", "v1"])
        index.put(["v2"], data[THRESHOLD - 1:THRESHOLD])  # a replace
        return build(kind, labels, vectors)

    monkeypatch.setattr(index, "_build", build_with_traffic)
    index.put([f"v{THRESHOLD - 1}"], data[THRESHOLD - 1:THRESHOLD])
    assert index.kind == ann and len(index) == THRESHOLD + 50 - 2
    assert index._index.ntotal == len(index) + len(index._tombstones)
    for i in (3, 100, THRESHOLD - 1):
        assert index.search(data[i], 1)[0][0][0] in (f"v{i}", "v2")
    assert index.search(data[THRESHOLD + 7], 1)[0][0][0] == "late7"
    found = {i for row in index.search(data[:5], 20) for i, _ in row}
    assert not found & {"v0", "v1"}
    top = {i for i, _ in index.search(data[THRESHOLD - 1], 2)[0]}
    assert top == {"v2", f"v{THRESHOLD - 1}"}


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_snapshot_round_trip_after_the_switch(ann: str, tmp_path: Path) -> None:
    index, vectors = filled(ann)
    index.remove(["v3", "v4"])
    queries = clustered(20, seed=2)
    before = index.search(queries, 10)
    index.save_snapshot(tmp_path / "snapshots", seq=42)
    loaded, seq = VectorIndex.load_snapshot(tmp_path / "snapshots", DIMENSION, settings(ann))
    assert seq == 42 and loaded.kind == ann and len(loaded) == len(index)
    assert loaded._trained_on == index._trained_on
    assert [[i for i, _ in row] for row in loaded.search(queries, 10)] == \
        [[i for i, _ in row] for row in before]
    loaded.remove(["v5"])
    loaded.put(["v3"], vectors["v3"][None])
    assert loaded.search(vectors["v3"], 1)[0][0][0] == "v3"
    assert "v5" not in {i for row in loaded.search(queries, 50) for i, _ in row}


def test_a_snapshot_of_another_kind_is_rebuilt_into_the_configured_one(tmp_path: Path) -> None:
    index, vectors = filled("hnsw")
    index.remove(["v7"])
    index.save_snapshot(tmp_path / "snapshots", seq=1)
    loaded, _ = VectorIndex.load_snapshot(tmp_path / "snapshots", DIMENSION, settings("ivf"))
    assert loaded.kind == "ivf" and len(loaded) == 599 and not loaded._tombstones
    del vectors["v7"]
    assert agreement(loaded, vectors, clustered(20, seed=2)) >= 0.95


def test_a_corrupt_snapshot_is_refused(tmp_path: Path) -> None:
    index, _ = filled("ivf")
    target = index.save_snapshot(tmp_path / "snapshots", seq=1)
    blob = bytearray((target / "index.faiss").read_bytes())
    blob[len(blob) // 3] ^= 0x55
    (target / "index.faiss").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="fails its checksum"):
        VectorIndex.load_snapshot(tmp_path / "snapshots", DIMENSION, settings("ivf"))


@pytest.mark.parametrize("damage", ["missing", "corrupt", "stale"])
def test_recovery_from_the_record_after_the_switch(damage: str, tmp_path: Path) -> None:
    """Rebuilt from SQLite when the snapshot is gone or corrupt (as IVF, trained once, on
    every vector), or caught up from the change log when it is old."""
    store = ImageStore(tmp_path / "images.sqlite3", DIMENSION)
    data = clustered(600)
    names = ids(600)
    store.put_many([(n, f"file:///{n}", v) for n, v in zip(names, data, strict=True)][:500])
    snapshots = tmp_path / "snapshots"
    index, snapshot_seq = recover_index(store, snapshots, DIMENSION, settings("ivf"))
    assert index.kind == "ivf" and len(index) == 500 and index._trained_on == 500
    assert (snapshots / "CURRENT").is_file() and snapshot_seq == store.last_seq()
    # more changes after the snapshot: 100 puts, 10 deletes, 1 replace
    store.put_many([(n, f"file:///{n}", v) for n, v in zip(names, data, strict=True)][500:])
    store.delete_many(names[:10])
    store.put_many([("v20", "file:///moved", data[599])])
    if damage == "missing":
        for path in snapshots.rglob("*"):
            if path.is_file():
                path.unlink()
    elif damage == "corrupt":
        current = snapshots / (snapshots / "CURRENT").read_text().strip()
        blob = bytearray((current / "index.faiss").read_bytes())
        blob[-100] ^= 0xFF
        (current / "index.faiss").write_bytes(bytes(blob))
    recovered, seq = recover_index(store, snapshots, DIMENSION, settings("ivf"))
    # rebuilt: saved at once; caught up: the snapshot's, so that the next one is written
    assert seq == (snapshot_seq if damage == "stale" else store.last_seq())
    assert recovered.kind == "ivf" and len(recovered) == 590 == store.count()
    if damage != "stale":
        assert recovered._trained_on == 590  # trained once, on everything
    expected = {n: data[i] for i, n in enumerate(names) if i >= 10}
    expected["v20"] = data[599]
    assert agreement(recovered, expected, clustered(30, seed=4)) >= 0.95
    assert {i for i, _ in recovered.search(data[599], 2)[0]} == {"v20", "v599"}
    assert not {"v0", "v9"} & {i for row in recovered.search(data[:10], 10) for i, _ in row}
    store.close()


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_background_switch_keeps_serving(ann: str) -> None:
    """In the service the switch runs in a thread: puts, deletes and searches go on, and
    the result is the same as a synchronous switch."""
    index = VectorIndex(DIMENSION, settings(ann, background=True))
    data = clustered(THRESHOLD + 100)
    index.put(ids(THRESHOLD), data[:THRESHOLD])  # crosses the threshold: a thread starts
    index.put(ids(100, "late"), data[THRESHOLD:])
    index.remove(["v0"])
    assert index.search(data[5], 1)[0][0][0] == "v5"  # served by whichever index is current
    assert index.wait_for_rebuild(timeout=120)
    assert index.kind == ann and len(index) == THRESHOLD + 99
    assert index._index.ntotal == len(index) + len(index._tombstones)
    vectors = dict(zip(ids(THRESHOLD) + ids(100, "late"), data, strict=True))
    del vectors["v0"]
    assert agreement(index, vectors, clustered(30, seed=6)) >= 0.95


def test_build_in_one_go_picks_the_kind_by_count() -> None:
    small = VectorIndex.build(DIMENSION, ids(50), clustered(50), settings("ivf"))
    large = VectorIndex.build(DIMENSION, ids(300), clustered(300), settings("hnsw"))
    assert small.kind == "flat" and large.kind == "hnsw" and len(large) == 300
    with pytest.raises(ValueError):
        VectorIndex.build(DIMENSION, ["a", "a"], clustered(2), settings("ivf"))


def test_server_flags_set_the_index_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    monkeypatch.setenv("PERCEPT_SEARCH_NPROBE", "7")
    parser_env = argparse.ArgumentParser()
    add_server_arguments(parser_env)
    config = config_from_args("search", parser_env.parse_args(
        ["--search-ann-threshold", "200", "--search-index", "hnsw", "--search-ef-search", "99"]))
    assert index_settings(config) == IndexSettings(ann_threshold=200, ann="hnsw", nprobe=7,
                                                   ef_search=99, background=True)
    # the flags' defaults are the index's defaults
    assert index_settings(ServerConfig(service="search")) == IndexSettings(background=True)
    defaults = config_from_args("search", parser.parse_args([]))
    assert index_settings(defaults) == IndexSettings(background=True)
    with pytest.raises(SystemExit):
        parser.parse_args(["--search-index", "flat"])
    with pytest.raises(ValueError):
        IndexSettings(ann="pq")


def test_a_snapshot_waits_for_a_write_in_progress(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's snapshot reads the record's seq and the index together: one taken
    while a write has committed to SQLite but not yet reached the index would claim a
    change that its index lacks, and the catch-up after a restart would skip it."""
    service = ImageSearchService(ServerConfig(service="search", data_dir=tmp_path))
    service.store = ImageStore(tmp_path / "images.sqlite3", DIMENSION)
    service.snapshots = tmp_path / "snapshots"
    service.index, service.snapshot_seq = recover_index(service.store, service.snapshots,
                                                        DIMENSION, settings("ivf"))
    service._write_thread_lock = threading.Lock()
    service._snapshot_lock = threading.Lock()
    data = clustered(2)
    put = service.index.put
    snapshotter: list[threading.Thread] = []

    def put_while_snapshotting(ids: list[str], vectors: np.ndarray) -> None:
        # the record has the change now; a snapshot starts before the index gets it
        thread = threading.Thread(target=service._snapshot)
        thread.start()
        thread.join(timeout=0.5)
        snapshotter.append(thread)
        put(ids, vectors)

    monkeypatch.setattr(service.index, "put", put_while_snapshotting)
    service._put([("a", "file:///a", data[0]), ("b", "file:///b", data[1])])
    snapshotter[0].join(timeout=30)
    loaded, seq = VectorIndex.load_snapshot(service.snapshots, DIMENSION, settings("ivf"))
    assert seq == service.store.last_seq() == service.snapshot_seq
    assert len(loaded) == 2 and loaded.search(data[1], 1)[0][0][0] == "b"
    service.store.close()


def test_a_query_runs_on_one_openmp_thread_in_whatever_thread_asks() -> None:
    """The service searches from worker threads, each with OpenMP's own per-thread
    setting (a thread started later does not inherit the main thread's): every search
    sets its own to QUERY_THREADS, so queries do not each claim every core."""
    from services.search.vector_index import QUERY_THREADS

    index = VectorIndex.build(DIMENSION, ids(50), clustered(50), settings("ivf"))
    seen: list[int] = []

    def worker() -> None:
        faiss.omp_set_num_threads(4)  # as FAISS's default would be on a 4-core machine
        index.search(clustered(1), 3)
        seen.append(faiss.omp_get_max_threads())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [QUERY_THREADS] == [1]


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_the_index_stays_approximate_until_half_the_threshold_is_left(ann: str) -> None:
    """The way back to flat is at half the threshold, not at it: an index near the
    threshold does not flip kinds (a whole rebuild each time) on every add and delete."""
    index, vectors = filled(ann, n=THRESHOLD)
    assert index.kind == ann
    names = list(vectors)
    index.remove(names[: THRESHOLD // 2])
    assert index.kind == ann and len(index) == THRESHOLD // 2
    index.remove(names[THRESHOLD // 2: THRESHOLD // 2 + 1])
    assert index.kind == "flat" and len(index) == THRESHOLD // 2 - 1


def test_scores_stay_within_minus_one_and_one_for_opposite_vectors() -> None:
    """A unit vector's opposite scores -1: float32 sums take some a little past it
    (-1.0000002 for 31 of 200 random 384-d vectors), which a hit's score never shows."""
    vectors = np.random.default_rng(7).standard_normal((200, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex(384, settings(ann_threshold=10_000))
    index.put(ids(200), vectors)
    found = index.search(-vectors, 200)  # every vector; its own opposite last
    assert [row[-1][0] for row in found] == ids(200)
    scores = [score for row in found for _, score in row]
    assert min(scores) == -1.0 and all(-1.0 <= score <= 1.0 for score in scores)


def test_a_snapshot_is_on_disk_before_current_names_it_and_the_name_is_synced_too(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a power cut needs (a kill -9 cannot show it): the snapshot's files are synced,
    then its directory is renamed into place and the folder synced, then CURRENT is
    written, synced, renamed, and the folder synced once more, so CURRENT never names a
    snapshot that is not on disk, nor is itself lost after the call returned."""
    from services.search import vector_index

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(source: str | Path, target: str | Path) -> None:
        events.append(("rename", Path(target).name))
        real_replace(source, target)

    index, _ = filled("ivf", n=50)
    folder = tmp_path / "snapshots"
    folder.mkdir()
    monkeypatch.setattr(vector_index.os, "fsync", fsync)
    monkeypatch.setattr(vector_index.os, "replace", replace)
    index.save_snapshot(folder, seq=7)
    name = "snapshot-000000000007"
    files = {("fsync", f) for f in ("index.faiss", "mapping.json", "meta.json")}
    assert set(events[:3]) == files
    assert events[3:] == [("rename", name), ("fsync", "snapshots"),
                          ("fsync", ".CURRENT.tmp"), ("rename", "CURRENT"),
                          ("fsync", "snapshots")]


def test_a_snapshot_that_disagrees_with_its_record_is_rebuilt(tmp_path: Path) -> None:
    """A snapshot of this record at its last change, but holding other images (a copy of
    the data directory whose snapshots and record went apart): the index it gives does
    not match the record's count, so the record is read again, and the images the
    snapshot lacked are found."""
    store = ImageStore(tmp_path / "images.sqlite3", DIMENSION)
    data = clustered(30)
    names = ids(30)
    store.put_many([(n, f"file:///{n}", v) for n, v in zip(names, data, strict=True)])
    snapshots = tmp_path / "snapshots"
    wrong = VectorIndex(DIMENSION, settings())
    wrong.put(names[:20], data[:20])  # ten images short, at the record's last change
    wrong.save_snapshot(snapshots, store.last_seq(), record=store.record_id)
    recovered, seq = recover_index(store, snapshots, DIMENSION, settings())
    assert len(recovered) == 30 == store.count() and seq == store.last_seq()
    assert [row[0][0] for row in recovered.search(data[20:], 1)] == names[20:]
    store.close()
