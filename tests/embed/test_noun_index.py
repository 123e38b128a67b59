"""The FAISS noun index on real noun vectors, against numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest

from services.embed.noun_index import (
    BACKENDS,
    ONE_THREAD_MAX_BATCH,
    NounIndex,
    allowed_mask,
    brute_force_search,
    normalise_rows,
)
from services.embed.wordnet import NounVocabulary, imagenet_indices
from tests.embed.conftest import ANIMAL, CAR, DOG, GOLDEN_RETRIEVER, NounVectors

K = 10
ANN_ROWS = 10_000  # an HNSW graph over all 82,115 rows takes too long for a unit test


def _queries(noun_vectors: NounVectors, count: int = 64, seed: int = 1) -> np.ndarray:
    """Realistic queries: noun vectors plus noise (an image embedding never hits a label
    exactly), so that neighbours are near-ties as in real use."""
    rng = np.random.default_rng(seed)
    base = noun_vectors.matrix[rng.choice(len(noun_vectors.matrix), count, replace=False)]
    return (base + 0.05 * rng.standard_normal(base.shape)).astype(np.float32)


def _local(noun_vectors: NounVectors, full_rows: set[int] | np.ndarray) -> np.ndarray:
    """Positions in ``noun_vectors.matrix`` of the given full-vocabulary rows."""
    wanted = np.zeros(len(noun_vectors.vocab), dtype=bool)
    wanted[np.fromiter(full_rows, dtype=np.int64)] = True
    return np.flatnonzero(wanted[noun_vectors.rows])


def _assert_same_topk(scores: np.ndarray, indices: np.ndarray, ref_scores: np.ndarray,
                      ref_indices: np.ndarray) -> None:
    """Same scores; same indices except inside groups of tied scores."""
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    untied = np.ones_like(ref_scores, dtype=bool)
    gaps = np.abs(np.diff(ref_scores, axis=1)) < 1e-5
    untied[:, 1:] &= ~gaps
    untied[:, :-1] &= ~gaps
    assert np.array_equal(indices[untied], ref_indices[untied])
    for row in range(len(indices)):
        assert set(indices[row]) == set(ref_indices[row]) or not untied[row].all()


class LazyIndexes(dict[str, NounIndex]):
    """One index per backend, built on first use; the approximate ones over the first
    ANN_ROWS rows."""

    def __init__(self, vectors: np.ndarray) -> None:
        super().__init__()
        self.vectors = vectors

    def __missing__(self, backend: str) -> NounIndex:
        rows = self.vectors[:ANN_ROWS] if backend in ("hnsw", "ivf") else self.vectors
        index = NounIndex(rows, backend=backend,  # type: ignore[arg-type]
                          hnsw_m=32, ef_construction=64, ef_search=128, nlist=16, nprobe=8)
        self[backend] = index
        return index


@pytest.fixture(scope="module")
def indexes(noun_vectors: NounVectors) -> LazyIndexes:
    return LazyIndexes(noun_vectors.matrix)


@pytest.fixture(scope="module")
def flat(indexes: LazyIndexes) -> NounIndex:
    return indexes["flat"]


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("backend", ["flat", "torch", "numpy"])
def test_exact_backends_match_brute_force(noun_vectors: NounVectors,
                                          indexes: LazyIndexes, backend: str,
                                          batch: int) -> None:
    index = indexes[backend]
    queries = _queries(noun_vectors, batch)
    scores, indices = index.search(queries, K)
    assert scores.shape == indices.shape == (batch, K)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    _assert_same_topk(scores, indices, *brute_force_search(noun_vectors.matrix, unit, K))
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


@pytest.mark.parametrize(("backend", "minimum"), [("hnsw", 0.95), ("ivf", 0.9)])
def test_approximate_recall_at_10(noun_vectors: NounVectors, indexes: LazyIndexes,
                                  backend: str, minimum: float) -> None:
    rows = noun_vectors.matrix[:ANN_ROWS]
    queries = _queries(noun_vectors, 200, seed=2)
    _, approx = indexes[backend].search(queries, K)
    _, exact = NounIndex(rows, backend="numpy").search(queries, K)
    recall = np.mean([len(set(a) & set(e)) / K for a, e in zip(approx, exact, strict=True)])
    assert recall >= minimum, recall


@pytest.mark.parametrize("backend", BACKENDS)
def test_restrict_to_animals_returns_only_animals(noun_vectors: NounVectors,
                                                  vocab: NounVocabulary,
                                                  indexes: LazyIndexes,
                                                  backend: str) -> None:
    animals = _local(noun_vectors, vocab.hyponym_closure(ANIMAL))
    assert 0 < len(animals) < len(noun_vectors.rows)
    index = indexes[backend]
    animals = animals[animals < len(index)]
    car = vocab.index[CAR]
    car_local = int(np.flatnonzero(noun_vectors.rows == car)[0])
    query = noun_vectors.matrix[car_local: car_local + 1]  # a car: no animal is near it
    scores, indices = index.search(query, K, restrict=animals)
    assert set(indices[0].tolist()) <= set(animals.tolist())
    ref_scores, ref_indices = brute_force_search(index.vectors, query, K,
                                                 allowed_mask(len(index), animals))
    _assert_same_topk(scores, indices, ref_scores, ref_indices)  # exact, not post-filtered
    # unrestricted, the car finds itself
    assert index.search(query, 1)[1][0, 0] == car_local or backend in ("hnsw", "ivf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_imagenet_returns_none_of_them(noun_vectors: NounVectors,
                                               vocab: NounVocabulary,
                                               indexes: LazyIndexes,
                                               backend: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    imagenet = _local(noun_vectors, imagenet_indices(vocab))
    assert len(imagenet) > 0
    index = indexes[backend]
    # exact_below=0: the approximate backends use the FAISS selector, not a subset scan
    monkeypatch.setattr(index, "exact_below", 0)
    imagenet = imagenet[imagenet < len(index)]
    golden = int(np.flatnonzero(noun_vectors.rows == vocab.index[GOLDEN_RETRIEVER])[0])
    queries = np.concatenate([noun_vectors.matrix[imagenet[:8]], _queries(noun_vectors, 8)])
    if golden < len(index):
        queries = np.concatenate([queries, noun_vectors.matrix[golden:golden + 1]])
    _, indices = index.search(queries, K, exclude=imagenet)
    assert not set(indices.ravel().tolist()) & set(imagenet.tolist())
    assert (indices >= 0).all()
    if backend in ("flat", "torch", "numpy"):
        ref_scores, _ = brute_force_search(
            index.vectors, queries / np.linalg.norm(queries, axis=1, keepdims=True), K,
            allowed_mask(len(index), exclude=imagenet))
        np.testing.assert_allclose(index.search(queries, K, exclude=imagenet)[0], ref_scores,
                                   atol=1e-5)


def test_restrict_and_exclude_combine_and_pad(flat: NounIndex, noun_vectors: NounVectors,
                                              vocab: NounVocabulary) -> None:
    dogs = _local(noun_vectors, vocab.hyponym_closure(DOG))
    golden = int(np.flatnonzero(noun_vectors.rows == vocab.index[GOLDEN_RETRIEVER])[0])
    query = noun_vectors.matrix[golden:golden + 1]
    _, indices = flat.search(query, 3, restrict=dogs, exclude=[golden])
    assert golden not in indices[0] and set(indices[0].tolist()) <= set(dogs.tolist())
    scores, indices = flat.search(query, 5, restrict=[golden, int(dogs[0])])
    assert indices[0, 0] == golden and indices[0, 2:].tolist() == [-1, -1, -1]
    assert np.isneginf(scores[0, 2:]).all()
    mask = np.zeros(len(flat), dtype=bool)
    mask[golden] = True
    assert flat.search(query, 1, restrict=mask)[1][0, 0] == golden
    _, none = flat.search(query, 2, restrict=[])
    assert none.tolist() == [[-1, -1]]


def test_bad_arguments(flat: NounIndex) -> None:
    with pytest.raises(ValueError, match="queries must be"):
        flat.search(np.zeros((2, 7), np.float32), 3)
    with pytest.raises(ValueError, match="k must be"):
        flat.search(flat.vectors[:1], 0)
    with pytest.raises(ValueError, match="filter ids"):
        flat.search(flat.vectors[:1], 3, restrict=[len(flat)])
    with pytest.raises(ValueError, match="unknown backend"):
        NounIndex(flat.vectors, backend="annoy")  # type: ignore[arg-type]
    assert flat.search(flat.vectors[0], 1)[1].shape == (1, 1)  # one query as a vector


@pytest.mark.parametrize("backend", ["flat", "numpy", "torch", "hnsw"])
def test_an_index_over_some_synsets_speaks_vocabulary_rows(backend: str) -> None:
    """``ids``: the index holds only some rows (the synsets a word-vector file covers);
    results, ``restrict`` and ``exclude`` are vocabulary rows, the others never appear."""
    rng = np.random.default_rng(3)
    full = rng.standard_normal((40, 8)).astype(np.float32)
    ids = np.array([1, 4, 5, 9, 17, 22, 30, 38], dtype=np.int64)
    index = NounIndex(full[ids], ids=ids, id_space=40, backend=backend)  # type: ignore[arg-type]
    assert len(index) == 8 and index.id_space == 40
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    scores, rows = index.search(queries, 4)
    held = np.zeros(40, dtype=bool)
    held[ids] = True
    normalised = full / np.linalg.norm(full, axis=1, keepdims=True)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ref_scores, ref_rows = brute_force_search(normalised, unit_queries, 4, held)
    _assert_same_topk(scores, rows, ref_scores, ref_rows)
    # filters name vocabulary rows, also rows the index does not hold (3 and 39)
    _, restricted = index.search(queries, 8, restrict=[3, 4, 9, 39], exclude=[9])
    assert set(restricted.ravel().tolist()) == {4, -1}
    assert (restricted[:, 0] == 4).all() and (restricted[:, 1:] == -1).all()
    with pytest.raises(ValueError, match="ids must"):
        NounIndex(full[:3], ids=np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="ids must"):
        NounIndex(full[:2], ids=np.array([0, 50]), id_space=40)


def _search_on_worker(index: NounIndex, queries: np.ndarray, caller_threads: int
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """``index.search(queries, K)`` on a fresh thread whose FAISS OpenMP setting is
    ``caller_threads`` (as a server's worker thread might be left), and that thread's
    setting after the search."""
    import threading

    import faiss

    out: list[tuple[np.ndarray, np.ndarray, int]] = []

    def worker() -> None:
        faiss.omp_set_num_threads(caller_threads)
        scores, rows = index.search(queries, K)
        out.append((scores, rows, faiss.omp_get_max_threads()))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    return out[0]


@pytest.mark.parametrize("batch", sorted({1, ONE_THREAD_MAX_BATCH, ONE_THREAD_MAX_BATCH + 1, 16}))
def test_a_single_query_is_searched_on_one_openmp_thread_whatever_the_caller_set(
        flat: NounIndex, noun_vectors: NounVectors, batch: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """LabelImage searches one query from whichever worker thread is free; OpenMP's
    thread count is that thread's own setting. Up to ONE_THREAD_MAX_BATCH queries the
    search runs on one thread (the same results), and the caller's setting is put back
    after; a larger batch runs on the caller's setting, untouched."""
    import faiss

    set_to: list[int] = []
    real_set = faiss.omp_set_num_threads

    def recording_set(threads: int) -> None:  # records, then sets as FAISS would
        set_to.append(threads)
        real_set(threads)

    monkeypatch.setattr(faiss, "omp_set_num_threads", recording_set)
    queries = _queries(noun_vectors, count=batch, seed=7)
    scores, rows, after = _search_on_worker(flat, queries, caller_threads=3)
    monkeypatch.undo()
    # the caller's own setting (3) is set by the worker itself, then the search's own
    assert set_to[0] == 3
    assert set_to[1:] == ([1, 3] if batch <= ONE_THREAD_MAX_BATCH else [])
    assert after == 3
    unit = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    _assert_same_topk(scores, rows, *brute_force_search(flat.vectors, unit, K))


def test_ties_go_to_the_lower_row() -> None:
    """Rows 2, 5 and 7 hold one vector: a query of it finds them in that order. (Small
    integers: their products and sums are exact in float32, so the three scores are equal
    whatever order BLAS adds them in.)"""
    vectors = np.random.default_rng(4).integers(-3, 4, (10, 8)).astype(np.float32)
    vectors[[5, 7]] = vectors[2]
    scores, rows = brute_force_search(vectors, vectors[2:3], 3)
    assert rows.tolist() == [[2, 5, 7]]
    assert scores[0, 0] == scores[0, 1] == scores[0, 2] == float(vectors[2] @ vectors[2])


def test_a_boolean_exclude_mask_excludes_what_it_marks() -> None:
    vectors = np.random.default_rng(5).standard_normal((200, 16)).astype(np.float32)
    index = NounIndex(vectors, backend="flat")
    queries = vectors[:4]
    marked = np.zeros(200, dtype=bool)
    marked[[0, 1, 2, 3, 50, 60]] = True
    by_mask = index.search(queries, 5, exclude=marked)
    by_ids = index.search(queries, 5, exclude=[0, 1, 2, 3, 50, 60])
    assert by_mask[1].tolist() == by_ids[1].tolist()
    assert not set(by_mask[1].ravel().tolist()) & {0, 1, 2, 3, 50, 60}


def test_a_filter_of_exactly_exact_below_rows_is_searched_exactly() -> None:
    """An approximate index (IVF, one cell of 32 probed) searches a filter that leaves
    ``exact_below`` rows or fewer by brute force over them, so every one can be found."""
    rng = np.random.default_rng(6)
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)
    rows = np.sort(rng.choice(2000, 50, replace=False))
    queries = rng.standard_normal((8, 16)).astype(np.float32)
    index = NounIndex(vectors, backend="ivf", nlist=32, nprobe=1, exact_below=50)
    scores, found = index.search(queries, 10, restrict=rows)
    allowed = np.zeros(2000, dtype=bool)
    allowed[rows] = True
    expected_scores, expected = brute_force_search(normalise_rows(vectors),
                                                   normalise_rows(queries), 10, allowed)
    assert found.tolist() == expected.tolist()
    assert np.allclose(scores, expected_scores, atol=1e-5)
