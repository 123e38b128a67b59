"""Nearest-noun search over the unit noun vectors: DeViSE's labelling step.

DeViSE (Frome et al. 2013, sec. 3.3) labels an image by the nearest label vectors to its
projected embedding, by cosine similarity; with unit-normalised noun vectors that is the
maximum inner product. ConSE (Norouzi et al. 2014, eq. 1-2) searches the same space with a
convex combination of the classifier's top label vectors.

Backends (``NounIndex(vectors, backend=...)``):

- ``flat`` (default): FAISS ``IndexFlatIP``, exact.
- ``hnsw``: FAISS ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT`` (Malkov & Yashunin 2018),
  approximate; ``hnsw_m`` and ``ef_search`` tune it.
- ``ivf``: FAISS ``IndexIVFFlat`` (inner product; ``nlist`` k-means cells, ``nprobe`` visited).
- ``torch``: a matmul and ``topk`` on a torch device (CUDA when present): exact, and the
  choice on GPU boxes without faiss.
- ``numpy``: brute force with ``argpartition``; exact; the reference in the tests and the
  baseline of ``benchmarks/bench_noun_search.py``.

An index may hold only some synsets (``ids``: the vocabulary row of each vector, e.g. the
synsets a word-vector file covers); results and filters then speak vocabulary rows.

Filters: ``restrict`` (only these rows may be returned) and ``exclude`` (these may not).
They apply inside the search, never as "search the top N then filter", so every exact
backend returns the exact top-k of the allowed rows: FAISS through ``SearchParameters(sel=
IDSelectorBitmap)``, torch and numpy by masking scores to -inf before the top-k. For the
approximate backends a filter leaving at most ``exact_below`` rows is searched exactly over
those rows (graph/cell search degrades when few rows qualify); a wider one goes to the
index with the selector. Missing results (fewer than ``k`` allowed rows) are index -1 with
score -inf.

Threads: a FAISS search of one query (LabelImage's) runs on one OpenMP thread, whatever the
calling thread was set to; larger batches run on the caller's setting
(:data:`ONE_THREAD_MAX_BATCH`, :func:`_openmp_threads`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any, Literal

import numpy as np

Backend = Literal["flat", "hnsw", "ivf", "torch", "numpy"]
BACKENDS: tuple[str, ...] = ("flat", "hnsw", "ivf", "torch", "numpy")
IdSet = Collection[int] | np.ndarray

_FAISS_MISSING = -1
#: FAISS searches of at most this many queries run on one OpenMP thread. OpenMP's thread
#: count is a per-thread setting (its nthreads-var), so without this a query's speed
#: depended on which worker thread ran it and what had set that thread before (the
#: search service sets 1 on its own threads: services/search/vector_index.py). FAISS's
#: flat search shares its threads out by query, so one query gains nothing from a second
#: thread and only pays for the team: over the 82,115 nouns on the 2-core machine it took
#: 9.5 ms on one thread against 11.7 ms on two when idle, and 15 against 27 ms with the
#: other core busy. From two queries on, two threads were twice as fast when idle (13 %
#: slower at two queries with a core busy, level from four): those batches (an
#: evaluation's, a benchmark's) keep the caller's setting.
ONE_THREAD_MAX_BATCH = 1


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Float32, C-contiguous, each row scaled to unit L2 norm (zero rows stay zero)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.ascontiguousarray(matrix / np.maximum(norms, 1e-12), dtype=np.float32)


def _as_ids(ids: IdSet, n: int) -> np.ndarray:
    array = np.fromiter(ids, dtype=np.int64) if not isinstance(ids, np.ndarray) \
        else ids.astype(np.int64, copy=False).ravel()
    if array.size and (array.min() < 0 or array.max() >= n):
        raise ValueError(f"filter ids must lie in [0, {n}); got {array.min()}..{array.max()}")
    return array


def allowed_mask(n: int, restrict: IdSet | None = None,
                 exclude: IdSet | None = None) -> np.ndarray | None:
    """Boolean (n,) mask of the rows a search may return, or None when nothing is filtered.
    ``restrict`` may also be a boolean mask of length ``n``."""
    if restrict is None and exclude is None:
        return None
    if restrict is None:
        mask = np.ones(n, dtype=bool)
    elif isinstance(restrict, np.ndarray) and restrict.dtype == bool:
        if restrict.shape != (n,):
            raise ValueError(f"a boolean restrict mask must have shape ({n},)")
        mask = restrict.copy()
    else:
        mask = np.zeros(n, dtype=bool)
        mask[_as_ids(restrict, n)] = True
    if exclude is not None:
        if isinstance(exclude, np.ndarray) and exclude.dtype == bool:
            mask &= ~exclude
        else:
            mask[_as_ids(exclude, n)] = False
    return mask


@contextlib.contextmanager
def _openmp_threads(faiss: Any, threads: int | None) -> Iterator[None]:
    """FAISS's OpenMP thread count set to ``threads`` on the calling thread for the
    block, and put back after it, so that a search leaves the thread as it found it (the
    index also serves training and benchmark code with settings of their own); None
    leaves it as it is."""
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def search_threads(batch: int) -> int | None:
    """The OpenMP threads a FAISS search of ``batch`` queries runs on: 1 up to
    :data:`ONE_THREAD_MAX_BATCH`, else None (the calling thread's setting)."""
    return 1 if batch <= ONE_THREAD_MAX_BATCH else None


def _pad(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads (B, j) results to (B, k) with score -inf and index -1."""
    b, have = indices.shape
    if have >= k:
        return scores[:, :k], indices[:, :k]
    out_s = np.full((b, k), -np.inf, dtype=np.float32)
    out_i = np.full((b, k), -1, dtype=np.int64)
    out_s[:, :have] = scores
    out_i[:, :have] = indices
    return out_s, out_i


def brute_force_search(vectors: np.ndarray, queries: np.ndarray, k: int,
                       mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact maximum-inner-product top-k in numpy: the reference implementation.

    Ties are broken by the lower row index. Rows where ``mask`` is False never appear.
    """
    scores = queries @ vectors.T
    if mask is not None:
        scores[:, ~mask] = -np.inf
        available = int(mask.sum())
    else:
        available = vectors.shape[0]
    kk = min(k, available)
    if kk == 0:
        return _pad(np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0),
                    np.int64), k)
    if kk < scores.shape[1]:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    else:
        part = np.broadcast_to(np.arange(scores.shape[1]), scores.shape).copy()
    part_scores = np.take_along_axis(scores, part, axis=1)
    # sort by score descending, then index ascending (lexsort: last key is primary)
    order = np.lexsort((part, -part_scores), axis=1)
    top = np.take_along_axis(part, order, axis=1).astype(np.int64)
    top_scores = np.take_along_axis(part_scores, order, axis=1).astype(np.float32)
    return _pad(top_scores, top, k)


class NounIndex:
    """Top-k maximum-inner-product search over unit noun vectors (row ``i`` = synset ``i``).

    ``vectors`` are normalised on the way in; queries are normalised too
    (``normalise_queries``), so scores are cosine similarities in [-1, 1].
    """

    def __init__(self, vectors: np.ndarray, *, backend: Backend = "flat", hnsw_m: int = 32,
                 ef_construction: int = 100, ef_search: int = 128, nlist: int | None = None,
                 nprobe: int = 32, device: str | None = None, exact_below: int = 20_000,
                 normalise_queries: bool = True, ids: np.ndarray | None = None,
                 id_space: int | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors must be a non-empty (N, D) matrix, got {vectors.shape}")
        # ``ids``: the vocabulary row of each vector when the index holds only some synsets
        # (e.g. those a word-vector file covers); results and filters then use those rows,
        # out of ``id_space`` (default: the largest id + 1).
        self.ids: np.ndarray | None = None
        self.id_space = int(vectors.shape[0])
        if ids is not None:
            ids = np.asarray(ids, dtype=np.int64).ravel()
            if ids.shape != (vectors.shape[0],) or (ids.size and ids.min() < 0) \
                    or len(np.unique(ids)) != len(ids):
                raise ValueError("ids must be distinct non-negative ids, one per vector row")
            self.ids = ids
            self.id_space = int(id_space if id_space is not None else ids.max() + 1)
            if ids.max() >= self.id_space:
                raise ValueError(f"ids must lie in [0, {self.id_space})")
        self.backend: Backend = backend
        self.vectors = normalise_rows(vectors)
        self.size, self.dimension = self.vectors.shape
        self.ef_search = ef_search
        self.nprobe = nprobe
        self.exact_below = exact_below
        self.normalise_queries = normalise_queries
        self._faiss_index: Any = None
        self._torch_vectors: Any = None
        if backend in ("flat", "hnsw", "ivf"):
            self._faiss_index = self._build_faiss(backend, hnsw_m, ef_construction, nlist)
        elif backend == "torch":
            import torch

            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self._torch_vectors = torch.from_numpy(self.vectors).to(device)
        self.device = device or "cpu"

    def _build_faiss(self, backend: str, hnsw_m: int, ef_construction: int,
                     nlist: int | None) -> Any:
        import faiss

        d = self.dimension
        index: Any
        if backend == "flat":
            index = faiss.IndexFlatIP(d)
        elif backend == "hnsw":
            index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = self.ef_search
        else:
            cells = nlist or max(1, min(int(4 * np.sqrt(self.size)), self.size // 39))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, cells, faiss.METRIC_INNER_PRODUCT)
            index.train(self.vectors)
            index.nprobe = min(self.nprobe, cells)
            self._quantizer = quantizer  # the IVF index does not own it
        index.add(self.vectors)
        return index

    def __len__(self) -> int:
        return self.size

    def search(self, queries: np.ndarray, k: int, *, restrict: IdSet | None = None,
               exclude: IdSet | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores (B, k) float32, indices (B, k) int64), best first.

        ``restrict``: only these rows (ids or a bool mask) may be returned; ``exclude``:
        these may not. Padding is score -inf, index -1.
        """
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise ValueError(f"queries must be (B, {self.dimension}), got {queries.shape}")
        if k < 1:
            raise ValueError("k must be at least 1")
        queries = normalise_rows(queries) if self.normalise_queries \
            else np.ascontiguousarray(queries)
        if queries.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        mask = allowed_mask(self.id_space, restrict, exclude)
        if self.ids is None:
            return self._search_rows(queries, k, mask)
        scores, local = self._search_rows(queries, k, mask[self.ids] if mask is not None
                                          else None)
        return scores, np.where(local >= 0, self.ids[np.maximum(local, 0)], -1)

    def _search_rows(self, queries: np.ndarray, k: int,
                     mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "numpy":
            return brute_force_search(self.vectors, queries, k, mask)
        if self.backend == "torch":
            return self._search_torch(queries, k, mask)
        if mask is not None and self.backend != "flat" and int(mask.sum()) <= self.exact_below:
            return self._search_subset(queries, k, mask)
        return self._search_faiss(queries, k, mask)

    def _search_subset(self, queries: np.ndarray, k: int,
                       mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(mask)
        scores, local = brute_force_search(self.vectors[rows], queries, k)
        indices = np.where(local >= 0, rows[np.maximum(local, 0)], -1)
        return scores, indices.astype(np.int64)

    def _search_faiss(self, queries: np.ndarray, k: int,
                      mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import faiss as faiss_module

        faiss: Any = faiss_module  # its SWIG stubs lack SearchParameters* keywords
        kk = min(k, self.size)
        params = None
        bitmap = None
        if mask is not None:
            bitmap = np.packbits(mask, bitorder="little")  # bit (id & 7) of byte id >> 3
            selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bitmap))
            if self.backend == "hnsw":
                params = faiss.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)
            elif self.backend == "ivf":
                params = faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)
            else:
                params = faiss.SearchParameters(sel=selector)
        with _openmp_threads(faiss, search_threads(len(queries))):
            scores, indices = self._faiss_index.search(queries, kk, params=params)
        del bitmap  # the selector points into it: keep it alive until here
        indices = indices.astype(np.int64, copy=False)
        missing = indices == _FAISS_MISSING
        scores = np.where(missing, -np.inf, scores).astype(np.float32)
        return _pad(scores, indices, k)

    def _search_torch(self, queries: np.ndarray, k: int,
                      mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        import torch

        vectors = self._torch_vectors
        with torch.inference_mode():
            q = torch.from_numpy(queries).to(vectors.device)
            scores = q @ vectors.T
            available = self.size
            if mask is not None:
                allowed = torch.from_numpy(mask).to(vectors.device)
                scores.masked_fill_(~allowed, float("-inf"))
                available = int(mask.sum())
            kk = min(k, available)
            if kk == 0:
                empty = np.zeros((len(queries), 0))
                return _pad(empty.astype(np.float32), empty.astype(np.int64), k)
            top = torch.topk(scores, kk, dim=1, largest=True, sorted=True)
            return _pad(top.values.float().cpu().numpy(), top.indices.cpu().numpy()
                        .astype(np.int64), k)
