"""Search index scale: synthetic unit vectors in the service's dimension (384) at 10k and
100k (and 1M with --full), for each index type: build time, memory per vector, QPS at batch
1 and 64, and recall@10 against exact search measured in the same run.

python -m benchmarks.bench_search_scale [--quick] [--full]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import faiss
import numpy as np

from benchmarks.common import RESULTS, machine, markdown_table

DIMENSION = 384


def clustered_vectors(n: int, seed: int) -> np.ndarray:
    """Unit vectors around 1000 random centres: closer to real embeddings than iid noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, DIMENSION)).astype(np.float32)
    vectors = centres[rng.integers(0, 1000, n)] + 0.6 * rng.standard_normal(
        (n, DIMENSION)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


def build(kind: str, vectors: np.ndarray) -> Any:
    n = len(vectors)
    if kind == "flat":
        index = faiss.IndexFlatIP(DIMENSION)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(DIMENSION, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIMENSION), DIMENSION, nlist,
                                   faiss.METRIC_INNER_PRODUCT)
        index.train(vectors[: min(n, 50 * nlist)])
        index.nprobe = max(8, nlist // 16)
    index.add(vectors)
    return index


def qps(index: Any, queries: np.ndarray, batch: int, budget_s: float) -> float:
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < budget_s:
        chunk = queries[done % len(queries):][:batch]
        if len(chunk) < batch:
            chunk = queries[:batch]
        index.search(chunk, 10)
        done += batch
    return done / (time.perf_counter() - started)


def run(quick: bool = False, full: bool = False) -> dict[str, Any]:
    sizes = [10_000] if quick else [10_000, 100_000] + ([1_000_000] if full else [])
    rows = []
    for n in sizes:
        vectors = clustered_vectors(n, seed=n)
        queries = clustered_vectors(256, seed=n + 1)
        exact = None
        for kind in ("flat", "hnsw", "ivf"):
            started = time.perf_counter()
            index = build(kind, vectors)
            build_s = time.perf_counter() - started
            _, found = index.search(queries, 10)
            if kind == "flat":
                exact = found
            assert exact is not None
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact,
                                                                             strict=True)]))
            memory = len(faiss.serialize_index(index)) / n
            rows.append({"vectors": n, "index": kind, "build_s": build_s,
                         "bytes_per_vector": memory,
                         "qps_batch1": qps(index, queries, 1, 1.0 if quick else 3.0),
                         "qps_batch64": qps(index, queries, 64, 1.0 if quick else 3.0),
                         "recall_at_10": recall})
        flat = next(r for r in rows if r["vectors"] == n and r["index"] == "flat")
        for row in rows:
            if row["vectors"] == n:
                row["x_flat_qps_b1"] = row["qps_batch1"] / flat["qps_batch1"]
    return {"machine": machine(), "rows": rows,
            "note": "1M runs only with --full" if not full else ""}


def markdown(result: dict[str, Any]) -> str:
    rows = [(r["vectors"], r["index"], r["build_s"], r["bytes_per_vector"], r["qps_batch1"],
             r["qps_batch64"], r["recall_at_10"], r["x_flat_qps_b1"]) for r in result["rows"]]
    return "\n".join(["### Search index scale (synthetic 384-d vectors, k=10)", "",
                      markdown_table(["vectors", "index", "build s", "bytes/vector", "QPS b=1",
                                      "QPS b=64", "recall@10", "x flat (b=1)"], rows),
                      "", result.get("note", "")])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true", help="also 1M vectors (slow)")
    arguments = parser.parse_args()
    outcome = run(arguments.quick, arguments.full)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_scale.json").write_text(json.dumps(outcome, indent=2))
    print(markdown(outcome))
