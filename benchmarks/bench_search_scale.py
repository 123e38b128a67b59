"""Search index scale: exact (flat) vs IVF vs HNSW over synthetic 384-d unit vectors.

At 10k and 100k vectors (with ``--full`` also 1M, and 2k, 5k, 20k and 50k to locate where
approximate search starts to beat exact search) it builds each index type and reports its
build time and serialised bytes per vector. It then sweeps the search-time knob
(``nprobe`` for IVF, ``efSearch`` for HNSW) and measures, for every setting, recall@10
against the exact top-10 from the same run, and QPS at batch 1 and batch 64 with the
"x exact" ratio: over exact search at the same batch size, timed in slices alternating with
the setting's own (not over the flat row's QPS, timed on its own; the JSON keys say
``x_flat``). Per index type and size the *operating point* is the setting with the
highest "x exact" at batch 1 among those with recall@10 >= 0.95. The service's defaults
(``services/search/vector_index.py``) are read off those.

IVF is built exactly as the service builds it (``ivf_nlist``, ``train_ivf``): IndexIVFFlat
with nlist ~ 4 sqrt(n) inverted lists, k-means trained on a sample of the vectors. IVF-SQ8
(8-bit scalar-quantised codes in the same lists, 4x less memory) reuses that quantizer.

Data (``synthetic_vectors``): unit vectors from a fixed generative model shaped like the
service's MiniLM-space embeddings rather than iid noise: 10,000 "concepts" with Zipf-like
popularity, Gaussian spread around each concept, a decaying spectrum (variance of the
i-th principal direction ~ i^-0.66) and a shared mean direction. Queries are held-out
draws from the same model (a different seed, same concepts). ``--calibrate`` prints the
same neighbourhood statistics for this model and for the 82k cached WordNet noun vectors
(the only real 384-d vectors in the repository): mean cosine to the 1st and 10th
neighbour, to a random vector, the spectrum's participation ratio and the mean vector's
norm; the model was tuned to sit close to them (see benchmarks/README.md).

Threads: FAISS uses ``--threads`` OpenMP threads (default: 1, as the search service runs
each query, services.search.vector_index.QUERY_THREADS; a thread per core let OpenMP's
threads wait on each other on a shared 2-core machine, and made exact search look 8-50x
slower than it is); the count is saved with the results. Timings on a shared machine are
noisy; compare the ratios, which are measured against exact search in the same run.

python -m benchmarks.bench_search_scale [--quick] [--full] [--threads N] [--sizes N ...]

A full run is saved to ``results/search_scale.json`` merged with what is saved there
(``merge``: the rows of sizes it did not measure, such as the 1M rows, and the variants);
``--quick`` to ``results/quick/search_scale.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.common import (
    ResultFile,
    describe_machine,
    machine,
    markdown_table,
    script_command,
)
from services.search.vector_index import (
    IVF_TRAIN_POINTS_PER_LIST,
    QUERY_THREADS,
    ivf_nlist,
    train_ivf,
)

DIMENSION = 384
K = 10
TARGET_RECALL = 0.95
TARGET_SPEEDUP = 10.0  # the target at 1M: recall@10 >= 0.95 at >= 10x exact QPS
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
EF_SEARCHES = (16, 32, 64, 128, 256, 512, 1024)
KINDS = ("ivf", "ivf-sq8", "hnsw")
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40  # 80 costs 2x the build time for ~+0.01 recall (measured at 100k)

# the generative model (see the module docstring); fixed, so every size draws from it
CONCEPTS = 10_000
SPECTRUM_DECAY = 0.33  # per-direction standard deviation ~ i^-0.33
CONCEPT_SPREAD = 0.65  # within-concept noise relative to the spread of the concepts
MEAN_NORM = 0.35  # length of the shared mean direction (before normalisation)
ZIPF = 0.5  # concept popularity ~ rank^-0.5
MODEL_SEED = 12345
# --full: 1M, and the sizes in between that locate the flat/ANN crossover
FULL_SIZES = [2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000]


def synthetic_vectors(n: int, seed: int, chunk: int = 100_000,
                      concepts: int = CONCEPTS) -> np.ndarray:
    """``n`` unit vectors (float32) from the fixed generative model; ``seed`` picks the draw."""
    model = np.random.default_rng(MODEL_SEED)
    basis, _ = np.linalg.qr(model.standard_normal((DIMENSION, DIMENSION)))
    scale = (1.0 + np.arange(DIMENSION)) ** -SPECTRUM_DECAY
    scale /= np.sqrt((scale ** 2).sum())
    centres = (model.standard_normal((concepts, DIMENSION)) * scale) @ basis.T
    mean = model.standard_normal(DIMENSION)
    mean *= MEAN_NORM / np.linalg.norm(mean)
    popularity = (1.0 + np.arange(concepts)) ** -ZIPF
    popularity /= popularity.sum()
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIMENSION), dtype=np.float32)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        picks = rng.choice(concepts, size, p=popularity)
        noise = (rng.standard_normal((size, DIMENSION)) * scale) @ basis.T
        block = centres[picks] + CONCEPT_SPREAD * noise + mean
        out[start:start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def neighbourhood_stats(base: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    """How hard a data set is for nearest-neighbour search (see the module docstring)."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    scores, _ = index.search(queries, K + 1)
    rng = np.random.default_rng(0)
    random_cos = float((queries[:200] @ base[rng.choice(len(base), 2000)].T).mean())
    sample = base[rng.choice(len(base), min(len(base), 20_000), replace=False)]
    centred = sample - sample.mean(0)
    eigen = np.linalg.eigvalsh(centred.T.astype(np.float64) @ centred)
    _, exact = index.search(queries, K)
    ivf = train_ivf(base, ivf_nlist(len(base)))
    ivf.add_with_ids(base, np.arange(len(base), dtype=np.int64))
    ivf_recall: dict[str, float] = {}
    for nprobe in (4, 16, 64):
        ivf.nprobe = nprobe
        ivf_recall[f"nprobe={nprobe}"] = recall_at_k(ivf.search(queries, K)[1], exact)
    return {"n": len(base), "cos_nn1": float(scores[:, 0].mean()),
            "cos_nn10": float(scores[:, K - 1].mean()), "cos_random": random_cos,
            "participation_ratio": float(eigen.sum() ** 2 / (eigen ** 2).sum()),
            "mean_norm": float(np.linalg.norm(base.mean(0))),
            f"ivf_recall_at_10 (nlist={ivf.nlist})": ivf_recall}


def calibrate() -> dict[str, Any]:
    """The model's statistics next to the real noun vectors' (needs the cached vectors)."""
    from services.embed.word_vectors import TextEncoder, load_or_build_noun_vectors
    from services.embed.wordnet import load_vocabulary

    real = load_or_build_noun_vectors(load_vocabulary(), encoder=TextEncoder())
    real = np.ascontiguousarray(real / np.linalg.norm(real, axis=1, keepdims=True),
                                dtype=np.float32)
    order = np.random.default_rng(0).permutation(len(real))
    n = len(real) - 1000
    return {"real_nouns": neighbourhood_stats(real[order[1000:]], real[order[:1000]]),
            "synthetic": neighbourhood_stats(synthetic_vectors(n, 1), synthetic_vectors(1000, 2))}


# -- measuring ------------------------------------------------------------------------------
def qps(search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int,
        budget_s: float, min_calls: int = 3) -> float:
    """Queries per second: batches of ``batch`` queries, cycling, for ``budget_s`` seconds."""
    search(queries[:batch])  # warm-up
    return _timed(search, queries, batch, budget_s, min_calls)[0]


def _timed(search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int,
           budget_s: float, min_calls: int, start: int = 0) -> tuple[float, int, float]:
    """(QPS, next position, seconds) of ``search`` over batches from ``start``."""
    done, calls, position = 0, 0, start
    started = time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < budget_s:
        if position + batch > len(queries):
            position = 0
        search(queries[position:position + batch])
        position += batch
        done += batch
        calls += 1
    seconds = time.perf_counter() - started
    return done / seconds, position, seconds


def qps_against(search: Callable[[np.ndarray], object], exact: Callable[[np.ndarray], object],
                queries: np.ndarray, batch: int, budget_s: float,
                rounds: int = 3) -> tuple[float, float]:
    """(QPS of ``search``, QPS of ``exact``) timed in alternating slices, so that the load
    of a shared machine hits both alike and their ratio stays meaningful."""
    search(queries[:batch])
    mine = [0.0, 0.0]  # queries, seconds
    theirs = [0.0, 0.0]
    position = 0
    for _ in range(rounds):
        speed, position, seconds = _timed(search, queries, batch, budget_s / rounds, 3, position)
        mine[0] += speed * seconds
        mine[1] += seconds
        speed, _, seconds = _timed(exact, queries, batch, budget_s / (2 * rounds), 1, position)
        theirs[0] += speed * seconds
        theirs[1] += seconds
    return mine[0] / mine[1], theirs[0] / theirs[1]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    hits = (found[:, :, None] == exact[:, None, :]).any(axis=2)
    return float(hits.sum() / exact.size)


def serialized_bytes(index: Any) -> int:
    blob = faiss.serialize_index(index)
    size = int(blob.size)
    del blob
    return size


def sweep(index: Any, set_knob: Callable[[int], None], values: Sequence[int], name: str,
          queries: np.ndarray, exact: np.ndarray, flat_search: Callable[[np.ndarray], object],
          budget_s: float) -> list[dict[str, Any]]:
    points = []
    for value in values:
        set_knob(value)
        _, found = index.search(queries, K)
        point = {name: value, "recall_at_10": recall_at_k(found, exact)}
        for batch in (1, 64):
            speed, flat_speed = qps_against(partial(index.search, k=K), flat_search, queries,
                                            batch, budget_s)
            point[f"qps_batch{batch}"] = speed
            point[f"flat_qps_batch{batch}"] = flat_speed
            point[f"x_flat_batch{batch}"] = speed / flat_speed
        points.append(point)
        print(f"    {name}={value}: recall@10 {point['recall_at_10']:.3f}, "
              f"QPS b=1 {point['qps_batch1']:.0f} ({point['x_flat_batch1']:.1f}x exact), "
              f"b=64 {point['qps_batch64']:.0f} ({point['x_flat_batch64']:.1f}x)", flush=True)
        if point["recall_at_10"] >= 0.999:  # higher settings only get slower
            break
    return points


def operating_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest setting that reaches the target recall; "fastest" by the ratio to exact
    search timed next to it, which the machine's load drifts affect least."""
    good = [p for p in points if p["recall_at_10"] >= TARGET_RECALL]
    return max(good, key=lambda p: p["x_flat_batch1"]) if good else None


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per size, each index type's operating point, and whether it meets the target."""
    for row in rows:
        if row["index"] != "flat":
            row["operating_point"] = operating_point(row["sweep"])
    summary: dict[str, Any] = {}
    for row in rows:
        best = row.get("operating_point")
        if row["index"] == "flat" or not best:
            continue
        summary.setdefault(str(row["vectors"]), {})[row["index"]] = {
            "setting": {k: v for k, v in best.items() if k in ("nprobe", "efSearch")},
            "x_flat_batch1": round(best["x_flat_batch1"], 2),
            "x_flat_batch64": round(best["x_flat_batch64"], 2),
            "recall_at_10": round(best["recall_at_10"], 4),
            "meets_target": best["x_flat_batch1"] >= TARGET_SPEEDUP}
    return summary


def measure_size(n: int, kinds: Sequence[str], n_queries: int, budget_s: float,
                 hnsw_m: int, ef_construction: int,
                 concepts: int = CONCEPTS) -> list[dict[str, Any]]:
    print(f"[search_scale] {n} vectors: generating", flush=True)
    vectors = synthetic_vectors(n, seed=n, concepts=concepts)
    queries = synthetic_vectors(n_queries, seed=n + 1, concepts=concepts)
    rows: list[dict[str, Any]] = []

    started = time.perf_counter()
    flat_index = faiss.IndexFlatIP(DIMENSION)
    flat_index.add(vectors)
    build_s = time.perf_counter() - started
    _, exact = flat_index.search(queries, K)
    flat: dict[str, Any] = {"vectors": n, "index": "flat", "build_s": build_s,
                            "bytes_per_vector": serialized_bytes(flat_index) / n,
                            "recall_at_10": 1.0}
    for batch in (1, 64):
        flat[f"qps_batch{batch}"] = qps(partial(flat_index.search, k=K), queries, batch,
                                        budget_s * 2)
        flat[f"x_flat_batch{batch}"] = 1.0
    print(f"  flat: QPS b=1 {flat['qps_batch1']:.1f}, b=64 {flat['qps_batch64']:.1f}", flush=True)
    rows.append(flat)
    flat_search = partial(flat_index.search, k=K)  # timed again next to every ANN setting

    quantizer_s = 0.0
    quantizer = None
    nlist = ivf_nlist(n)
    for kind in kinds:
        print(f"  {kind}: building", flush=True)
        started = time.perf_counter()
        if kind == "ivf":
            index = train_ivf(vectors, nlist)
            quantizer_s = time.perf_counter() - started
            quantizer = faiss.clone_index(index.quantizer)
            index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
            params: dict[str, Any] = {
                "nlist": nlist, "train_points": min(n, IVF_TRAIN_POINTS_PER_LIST * nlist)}
        elif kind == "ivf-sq8":
            # the same coarse quantizer as "ivf" (its k-means time is counted here too)
            assert quantizer is not None, "ivf-sq8 needs ivf first"
            index = faiss.IndexIVFScalarQuantizer(quantizer, DIMENSION, nlist,
                                                  faiss.ScalarQuantizer.QT_8bit,
                                                  faiss.METRIC_INNER_PRODUCT)
            index.train(vectors[:min(n, 100_000)])  # the quantizer is trained: SQ ranges only
            index.add(vectors)
            params = {"nlist": nlist}
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(DIMENSION, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.add(vectors)
            params = {"M": hnsw_m, "efConstruction": ef_construction}
        else:
            raise ValueError(kind)
        build_s = time.perf_counter() - started + (quantizer_s if kind == "ivf-sq8" else 0.0)
        print(f"    built in {build_s:.1f} s", flush=True)
        if kind == "hnsw":
            def set_knob(value: int, index: Any = index) -> None:
                index.hnsw.efSearch = value
            points = sweep(index, set_knob, EF_SEARCHES, "efSearch", queries, exact,
                           flat_search, budget_s)
        else:
            def set_knob(value: int, index: Any = index) -> None:
                index.nprobe = value
            points = sweep(index, set_knob, [p for p in NPROBES if p <= nlist], "nprobe",
                           queries, exact, flat_search, budget_s)
        rows.append({"vectors": n, "index": kind, "params": params, "build_s": build_s,
                     "bytes_per_vector": serialized_bytes(index) / n, "sweep": points,
                     "operating_point": operating_point(points),
                     "max_recall_at_10": max(p["recall_at_10"] for p in points)})
        del index
        gc.collect()
    return rows


def run(quick: bool = False, full: bool = False, threads: int | None = None,
        sizes: Sequence[int] | None = None,
        kinds: Sequence[str] = KINDS, hnsw_m: int = HNSW_M,
        ef_construction: int = HNSW_EF_CONSTRUCTION,
        concepts: int = CONCEPTS) -> dict[str, Any]:
    threads = threads or QUERY_THREADS
    faiss.omp_set_num_threads(threads)
    if sizes is None:
        sizes = [10_000] if quick else FULL_SIZES if full else [10_000, 100_000]
    n_queries = 200 if quick else 1000
    budget_s = 0.3 if quick else 1.0
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for n in sizes:
        rows += measure_size(n, kinds, n_queries, budget_s, hnsw_m, ef_construction, concepts)
    summary = summarise(rows)
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {"date": dt.date.today().isoformat(), "machine": machine(), "faiss_threads": threads,
            "faiss": faiss.__version__, "queries": n_queries, "k": K,
            "target_recall": TARGET_RECALL, "qps_budget_s": budget_s,
            "command": "python -m benchmarks.bench_search_scale"
                       + (" --quick" if quick else "") + (" --full" if full else "")
                       + f" --threads {threads}"
                       + (f" --sizes {' '.join(map(str, sizes))}" if sizes != FULL_SIZES
                          and not quick and list(sizes) != [10_000, 100_000] else "")
                       + (f" --kinds {' '.join(kinds)}" if tuple(kinds) != KINDS else "")
                       + (f" --hnsw-m {hnsw_m}" if hnsw_m != HNSW_M else "")
                       + (f" --ef-construction {ef_construction}"
                          if ef_construction != HNSW_EF_CONSTRUCTION else "")
                       + (f" --concepts {concepts}" if concepts != CONCEPTS else ""),
            "data": {"dimension": DIMENSION, "concepts": concepts,
                     "spectrum_decay": SPECTRUM_DECAY, "concept_spread": CONCEPT_SPREAD,
                     "mean_norm": MEAN_NORM, "zipf": ZIPF},
            "rows": rows, "operating_points": summary, "load_average_end": load,
            "wall_s": round(time.perf_counter() - started, 1),
            "note": "1M vectors runs only with --full" if sizes == [10_000, 100_000] else ""}


def merge(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with what an earlier run measured and this one did not: its rows of other
    sizes (1M comes only from --full) and its variants (made with --add-to). Only a result
    taken with the same threads, queries and data model is merged; each kept row is
    marked with the run it came from."""
    same = all(saved.get(key) == new.get(key) for key in ("faiss_threads", "queries", "data"))
    if not same:
        return new
    measured = {row["vectors"] for row in new["rows"]}
    kept = [{**row, "from": row.get("from") or f"{saved['date']}: {saved['command']}"}
            for row in saved["rows"] if row["vectors"] not in measured]
    merged = {**new, "rows": sorted(new["rows"] + kept, key=lambda row: row["vectors"])}
    merged["operating_points"] = summarise(merged["rows"])
    merged["variants"] = saved.get("variants", []) + new.get("variants", [])
    if kept:
        sizes = ", ".join(f"{n:,}" for n in sorted({row["vectors"] for row in kept}))
        merged["note"] = (f"rows for {sizes} vectors are from an earlier run "
                          f"({saved['date']}, `{saved['command']}`)")
    return merged


def add_variant(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with ``new`` appended to its variants (``--add-to``)."""
    return {**saved, "variants": [*saved.get("variants", []), new]}


# -- rendering --------------------------------------------------------------------------------
def markdown(result: dict[str, Any], title: str = "") -> str:
    if "faiss_threads" not in result:  # a result from the old, sweep-less benchmark
        return "### Search index scale\n\n(old result format; rerun the benchmark)"
    table = []
    for row in result["rows"]:
        best = row.get("operating_point") if row["index"] != "flat" else row
        knob = ""
        if row["index"] != "flat":
            knob = ", ".join(f"{k}={v}" for k, v in row["params"].items()
                             if k != "train_points")
            if best:
                setting = {k: v for k, v in best.items() if k in ("nprobe", "efSearch")}
                knob += ", " + ", ".join(f"{k}={v}" for k, v in setting.items())
        if best is None:
            table.append((row["vectors"], row["index"], knob, row["build_s"],
                          row["bytes_per_vector"], "-", "-",
                          f"< {TARGET_RECALL} (max {row['max_recall_at_10']:.3f})", "-", "-"))
            continue
        table.append((row["vectors"], row["index"], knob, row["build_s"],
                      row["bytes_per_vector"], best["qps_batch1"], best["qps_batch64"],
                      best["recall_at_10"], best["x_flat_batch1"], best["x_flat_batch64"]))
    sweeps = []
    for row in result["rows"]:
        if row["index"] == "flat":
            continue
        knob = "efSearch" if row["index"] == "hnsw" else "nprobe"
        cells = " ".join(f"{p[knob]}:{p['recall_at_10']:.3f}/{p['x_flat_batch1']:.0f}x"
                         for p in row["sweep"])
        sweeps.append(f"- {row['vectors']} {row['index']} ({knob}: recall@10 / x exact b=1): "
                      f"{cells}")
    data = result["data"]
    target = []
    for n, kinds in result.get("operating_points", {}).items():
        met = [f"{kind} ({p['x_flat_batch1']:.0f}x)" for kind, p in kinds.items()
               if p["meets_target"]]
        target.append(f"{n}: " + (", ".join(met) if met else "none"))
    variants = [markdown(variant, f"#### Variant: {variant['data']['concepts']} concepts, "
                         + ", ".join(sorted({f"{r['index']} " + ", ".join(
                             f"{k}={v}" for k, v in r["params"].items() if k != "train_points")
                             for r in variant["rows"] if r["index"] != "flat"})))
                for variant in result.get("variants", [])]
    return "\n".join([
        title or "### Search index scale (synthetic 384-d vectors, k=10)", "",
        f"`{result['command']}`, {result['date']}, on {describe_machine(result.get('machine'))}"
        f"; FAISS {result['faiss']} with "
        f"{result['faiss_threads']} thread(s); {result['queries']} held-out queries; load "
        f"average at the end {[round(x, 2) for x in result.get('load_average_end', [])]}; "
        f"{result['wall_s']:.0f} s in all. Data: unit vectors around {data['concepts']} "
        "Zipf-popular concepts with a decaying spectrum, calibrated against the real noun "
        "vectors. ANN rows show the operating point: among the settings with recall@10 >= "
        f"{result['target_recall']}, the one with the highest x exact. x exact is the "
        "setting's QPS over exact search's at the same batch size, exact search timed in "
        "slices alternating with the setting's own in the same run: not over the flat row's "
        "QPS, which was timed on its own before (the flat row's 1 is by definition).", "",
        markdown_table(["vectors", "index", "setting", "build s", "bytes/vector", "QPS b=1",
                        "QPS b=64", "recall@10", "x exact b=1", "x exact b=64"], table),
        "", f"recall@10 >= {result['target_recall']} at >= {TARGET_SPEEDUP:.0f}x exact QPS "
        "(b=1) reached by: " + "; ".join(target),
        "", "Sweeps:", "", *sweeps, "", result.get("note", ""), *variants]).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10k vectors, short timings")
    parser.add_argument("--full", action="store_true",
                        help="also 1M vectors (slow) and the crossover sizes 2k..50k")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"FAISS threads (default: {QUERY_THREADS}, as the service "
                             "runs each query)")
    parser.add_argument("--sizes", type=int, nargs="*", default=None,
                        help="vector counts to run instead of the default ones")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS,
                        help="index types besides exact search (ivf-sq8 needs ivf first)")
    parser.add_argument("--hnsw-m", type=int, default=HNSW_M)
    parser.add_argument("--ef-construction", type=int, default=HNSW_EF_CONSTRUCTION)
    parser.add_argument("--out", default=None,
                        help="where to save the result (default results/search_scale.json, "
                        "merged with what is saved there, or with --quick "
                        "results/quick/search_scale.json)")
    parser.add_argument("--concepts", type=int, default=CONCEPTS,
                        help="concepts in the data model (more: fewer vectors per concept)")
    parser.add_argument("--add-to", default="",
                        help="append this run as a variant to an existing result JSON")
    parser.add_argument("--calibrate", action="store_true",
                        help="print the data model's statistics next to the real noun vectors'")
    args = parser.parse_args(argv)
    if args.add_to and args.quick:
        parser.error("--add-to keeps a variant next to a full result; --quick saves apart")
    if args.add_to and not Path(args.add_to).is_file():
        parser.error(f"--add-to {args.add_to}: no such result")
    if args.calibrate:
        faiss.omp_set_num_threads(args.threads or QUERY_THREADS)
        print(json.dumps(calibrate(), indent=2))
        return 0
    outcome = run(args.quick, args.full, args.threads, args.sizes, args.kinds, args.hnsw_m,
                  args.ef_construction, args.concepts)
    command = script_command("benchmarks.bench_search_scale", sys.argv[1:] if argv is None
                             else argv)
    if args.add_to:  # a variant run (another data model), kept next to the main result
        target = ResultFile("search_scale", quick=False, command=command, merge=add_variant,
                            out=args.add_to)
    else:  # a full run keeps the saved rows it did not measure (merge), as make bench does
        target = ResultFile("search_scale", quick=args.quick, command=command, merge=merge,
                            out=args.out)
    target.save(outcome)
    print(markdown(outcome))
    print(f"[search_scale] saved {target.path}"
          + ("" if target.saved is None else " (merged with what was saved there)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
