"""Noun-search latency and recall@10: numpy brute force vs FAISS flat / HNSW / IVF vs torch.

The DeViSE labelling step (Frome et al. 2013, sec. 3.3) is a top-k maximum-inner-product
search of an image embedding among the 82,115 WordNet noun vectors (384-d). The baseline is
numpy brute force (a matmul and ``argpartition``) measured in the same run; every other
backend reports its speed-up against it at the same batch size, and its recall@10 against
the exact top-10.

Queries are noun vectors of random synsets plus Gaussian noise (sigma 0.05 per dimension),
renormalised: like projected image embeddings, they sit near a label but not on it.

Run: ``python -m benchmarks.bench_noun_search [--quick]`` (from the repository root); it
prints a table and writes ``benchmarks/results/noun_search.json`` (``--quick``:
``benchmarks/results/quick/noun_search.json``). The full run needs the
cached noun vectors (``python -m services.embed.word_vectors build``; it builds them when
absent, which takes minutes). ``--quick`` uses the first 20,000 rows (or, with no cache,
real vectors for 5,000 synsets encoded on the spot) and fewer repetitions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.embed.noun_index import NounIndex
from services.embed.word_vectors import (
    TextEncoder,
    build_noun_vectors,
    load_or_build_noun_vectors,
    noun_vectors_path,
)
from services.embed.wordnet import load_vocabulary

K = 10
BATCH_SIZES = (1, 64)
QUICK_ROWS = 20_000
QUICK_SUBSET = 5_000


def _noun_vectors(quick: bool) -> tuple[np.ndarray, str]:
    vocab = load_vocabulary()
    encoder = TextEncoder()
    cached = noun_vectors_path(vocab, encoder).is_file()
    if quick and not cached:
        rows = np.random.default_rng(0).choice(len(vocab), QUICK_SUBSET, replace=False)
        matrix = build_noun_vectors(vocab, encoder, rows=sorted(rows.tolist()))
        return matrix, f"{QUICK_SUBSET} synsets encoded now (no cache)"
    matrix = load_or_build_noun_vectors(vocab, encoder=encoder)
    if quick:
        return matrix[:QUICK_ROWS], f"first {QUICK_ROWS} cached noun vectors"
    return matrix, "all cached noun vectors"


def _queries(vectors: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = vectors[rng.choice(len(vectors), count, replace=False)]
    noisy = base + 0.05 * rng.standard_normal(base.shape).astype(np.float32)
    return (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)


def _time_pass(index: NounIndex, queries: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Milliseconds per query of one pass over ``queries`` in batches, and what it found."""
    results = np.empty((len(queries), K), dtype=np.int64)
    start = time.perf_counter()
    for first in range(0, len(queries), batch):
        _, results[first:first + batch] = index.search(queries[first:first + batch], K)
    return 1000.0 * (time.perf_counter() - start) / len(queries), results


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    hits = [len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)) / K


def run(quick: bool = False, threads: int = 1) -> dict[str, Any]:
    """Measures every backend at batch sizes 1 and 64 on ``threads`` threads; returns the
    results as a dict. Every index is built first; then each round times one pass of
    every backend in turn, and a backend's figure is its best round: a change of load
    falls on all of them alike, not on whichever ran last."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    with threadpool_limits(limits=threads, user_api="blas"):  # numpy's BLAS, the baseline
        return _run(quick, threads)


def _run(quick: bool, threads: int) -> dict[str, Any]:
    import faiss
    import torch

    vectors, source = _noun_vectors(quick)
    n = len(vectors)
    queries = {1: _queries(vectors, 32 if quick else 200, seed=1),
               64: _queries(vectors, 128 if quick else 640, seed=2)}
    rounds = 2 if quick else 5

    configs: list[tuple[str, dict[str, Any]]] = [
        ("numpy", {"backend": "numpy"}),
        ("faiss-flat", {"backend": "flat"}),
        ("faiss-hnsw", {"backend": "hnsw", "hnsw_m": 32, "ef_construction": 100,
                        "ef_search": 128}),
        ("torch", {"backend": "torch"}),
    ]
    if not quick:
        configs.append(("faiss-ivf", {"backend": "ivf", "nprobe": 32}))

    indexes: dict[str, NounIndex] = {}
    build_s: dict[str, float] = {}
    for name, options in configs:
        start = time.perf_counter()
        indexes[name] = NounIndex(vectors, **options)
        build_s[name] = time.perf_counter() - start
        for batch in BATCH_SIZES:  # warm-up (allocations, torch kernels, caches)
            indexes[name].search(queries[batch][:batch], K)
    best = {(name, b): float("inf") for name, _ in configs for b in BATCH_SIZES}
    found: dict[tuple[str, int], np.ndarray] = {}
    for _ in range(rounds):
        for batch in BATCH_SIZES:
            for name, _ in configs:
                ms, found[name, batch] = _time_pass(indexes[name], queries[batch], batch)
                best[name, batch] = min(best[name, batch], ms)

    rows: list[dict[str, Any]] = []
    for name, options in configs:
        for batch in BATCH_SIZES:
            ms = best[name, batch]
            rows.append({
                "backend": name, "device": indexes[name].device if name == "torch" else "cpu",
                "batch": batch, "ms_per_query": round(ms, 4),
                "speedup_vs_numpy": round(best["numpy", batch] / ms, 2),
                f"recall@{K}": round(_recall(found[name, batch], found["numpy", batch]), 4),
                "build_s": round(build_s[name], 2),
                "options": {k: v for k, v in options.items() if k != "backend"}})
    return {
        "benchmark": "noun_search",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "threads": threads,
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": {"numpy": np.__version__, "faiss": faiss.__version__,
                     "torch": torch.__version__},
        "quick": quick, "vectors": {"rows": n, "dim": int(vectors.shape[1]), "source": source},
        "k": K, "queries": {str(b): len(q) for b, q in queries.items()}, "rounds": rounds,
        "timing": "every index built first; each round times one pass of every backend in "
                  "turn; best round per backend; torch, FAISS and numpy's BLAS all held to "
                  "the same threads",
        "baseline": "numpy brute force, same run, same batch size, interleaved",
        "results": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"noun search: {result['vectors']['rows']} x {result['vectors']['dim']} "
             f"({result['vectors']['source']}), k={result['k']}, "
             f"{result['machine']['threads']} threads, load {result['machine']['load_avg_1m']}",
             f"{'backend':<12} {'batch':>5} {'ms/query':>10} {'vs numpy':>9} "
             f"{'recall@10':>9} {'build s':>8}"]
    for row in result["results"]:
        lines.append(f"{row['backend']:<12} {row['batch']:>5} {row['ms_per_query']:>10.3f} "
                     f"{row['speedup_vs_numpy']:>8.2f}x {row['recall@10']:>9.3f} "
                     f"{row['build_s']:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and repetitions")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and FAISS threads (default 1: the services search a "
                        "query on one thread while they answer others)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/noun_search.json (--quick: "
                        "benchmarks/results/quick/noun_search.json)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    result = run(quick=args.quick, threads=args.threads)
    print(format_table(result))
    from benchmarks.common import ResultFile, script_command

    target = ResultFile("noun_search", quick=args.quick, out=args.out, command=script_command(
        "benchmarks.bench_noun_search", sys.argv[1:] if argv is None else argv))
    target.save(result)
    print(f"wrote {target.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
