"""``percept eval search``: word -> image retrieval over the labelled evaluation photos.

The photos of ``training/evalsets/photos`` (the DeViSE evaluation set, ``labels.json``: file
-> WordNet 3.0 noun wnid) are indexed with the search service's own parts, and every distinct
label is searched for by its word:

- **Index**: the service's write path (``ImageSearchService._add_batch``) over the same
  public classes: :meth:`EmbeddingService.embed_images` (EfficientNet-Lite0, then ConSE or
  the DeViSE map into the all-MiniLM-L6-v2 space, Norouzi et al. 2014 / Frome et al. 2013),
  the durable :class:`ImageStore` (SQLite) and the FAISS :class:`VectorIndex`, in a
  temporary data dir, one per method. The photo files' bytes go in as ``percept index``
  sends them.
- **Queries**: one per distinct label wnid; the text is the synset's first WordNet lemma
  with spaces for underscores (``"dog"``, ``"American red squirrel"``), embedded by
  :meth:`EmbeddingService.embed_texts` and searched like ``SearchByText``
  (``ImageSearchService._hits``). Each query ranks every indexed photo.
- **Relevance** (``is_a``, the headline): a photo is relevant to a query when its label is
  the query's synset *or a kind of it* (in the query synset's WordNet hyponym closure). A
  photo labelled *orange* is an *edible fruit* and a *soccer player* is a *person*, so a
  user searching for those words should get them; the converse does not hold (a photo
  labelled *person* is not known to show a soccer player). ``exact`` (the photo's label is
  the query's synset) is reported beside it.

Metrics, averaged over queries (Manning, Raghavan & Schuetze 2008, ch. 8; Voorhees 1999
for MRR):

- **MRR**: mean of 1 / (rank of the first relevant photo).
- **recall@k**: the fraction of queries with at least one relevant photo in the top k (the
  "R@k" of image-text retrieval benchmarks; hit@k / success@k elsewhere).
- **relevant_recall@k**: the textbook recall, (relevant photos in the top k) / (relevant
  photos), averaged over queries.

**Chance** is the expectation of each metric under a uniformly random ranking of the same
N photos, computed exactly per query from its number of relevant photos R
(:func:`chance_metrics`): recall@k = 1 - C(N-R, k) / C(N, k), relevant_recall@k = k / N,
and E[1/rank] = sum_r (1/r) C(N-r, R-1) / C(N, R).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Any

import numpy as np

from training.assets import REPO_ROOT
from training.evaluate_devise import LABELS_FILE, EvalSet, EvalSetError, load_eval_set
from training.files import listed, other_files, read_json_object, write_text_atomically

METHODS = ("conse", "devise")
RELEVANCE = ("is_a", "exact")
DEFAULT_KS = (1, 5, 10)


@dataclass(frozen=True)
class Query:
    """One word query: the label's synset, its text, and the photos that answer it."""

    wnid: str
    text: str
    relevant: frozenset[str]  # photo file names whose label is the synset or a kind of it
    exact: frozenset[str]  # photo file names labelled with exactly this synset

    def answers(self, relevance: str) -> frozenset[str]:
        return self.relevant if relevance == "is_a" else self.exact


def build_queries(evalset: EvalSet, vocab: Any) -> list[Query]:
    """One query per distinct label wnid of ``evalset`` (first-seen order of the sorted
    files), with its is-a and exact answer sets."""
    photo_rows = {path.name: vocab.index[wnid]
                  for path, wnid in zip(evalset.files, evalset.wnids, strict=True)}
    queries = []
    for wnid in dict.fromkeys(evalset.wnids):
        kinds = vocab.hyponym_closure(wnid)
        queries.append(Query(
            wnid=wnid, text=vocab[wnid].names[0],
            relevant=frozenset(name for name, row in photo_rows.items() if row in kinds),
            exact=frozenset(path.name for path, label in
                            zip(evalset.files, evalset.wnids, strict=True) if label == wnid)))
    return queries


# -- metrics --------------------------------------------------------------------------------
def relevant_ranks(ranking: Sequence[str], relevant: frozenset[str] | set[str]) -> list[int]:
    """1-based ranks of the relevant ids in ``ranking`` (best first)."""
    return [rank for rank, item in enumerate(ranking, start=1) if item in relevant]


def query_metrics(ranking: Sequence[str], relevant: frozenset[str] | set[str],
                  ks: Sequence[int]) -> dict[str, float]:
    """MRR term, recall@k and relevant_recall@k of one ranked list.

    A relevant id missing from ``ranking`` counts as never found (reciprocal rank 0)."""
    if not relevant:
        raise ValueError("a query needs at least one relevant item")
    ranks = relevant_ranks(ranking, relevant)
    metrics = {"reciprocal_rank": 1.0 / ranks[0] if ranks else 0.0}
    for k in ks:
        metrics[f"recall@{k}"] = float(bool(ranks) and ranks[0] <= k)
    for k in ks:
        metrics[f"relevant_recall@{k}"] = sum(r <= k for r in ranks) / len(relevant)
    return metrics


def chance_metrics(n: int, relevant: int, ks: Sequence[int]) -> dict[str, float]:
    """The exact expectation of :func:`query_metrics` under a uniformly random ranking of
    ``n`` items of which ``relevant`` are relevant."""
    if not 1 <= relevant <= n:
        raise ValueError(f"need 1 <= relevant <= n, got {relevant} of {n}")
    total = comb(n, relevant)
    # P(first relevant at rank r) = C(n - r, relevant - 1) / C(n, relevant)
    mrr = sum(comb(n - r, relevant - 1) / r for r in range(1, n - relevant + 2)) / total
    metrics = {"reciprocal_rank": mrr}
    for k in ks:
        metrics[f"recall@{k}"] = 1.0 - comb(n - relevant, min(k, n)) / comb(n, min(k, n))
    for k in ks:
        metrics[f"relevant_recall@{k}"] = min(k, n) / n
    return metrics


def summarise(per_query: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Means over queries; ``reciprocal_rank`` becomes ``mrr``."""
    if not per_query:
        raise ValueError("no queries")
    keys = list(per_query[0])
    summary = {("mrr" if key == "reciprocal_rank" else key):
               float(np.mean([row[key] for row in per_query])) for key in keys}
    return summary


# -- the search index under test -----------------------------------------------------------
class ServiceSearchIndex:
    """The search service's write and read paths over its own classes, in ``data_dir``.

    ``add`` is ``ImageSearchService._add_batch`` (embed, one durable SQLite transaction,
    then the FAISS index); ``search`` is ``SearchByText`` (embed the text, FAISS inner
    product over unit vectors, records from the store), with the image-embedding method
    pinned to ``method`` instead of the service default.
    """

    def __init__(self, embed: Any, method: int, data_dir: Path) -> None:
        from services.search.store import ImageStore
        from services.search.vector_index import VectorIndex

        self.embed = embed
        self.method = method
        dimension = int(embed.index.dimension)
        self.store = ImageStore(data_dir / "images.sqlite3", dimension)
        self.index = VectorIndex(dimension)

    async def add(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        vectors = await self.embed.embed_images([image for _, _, image in items], self.method)
        entries = [(image_id, uri, vector)
                   for (image_id, uri, _), vector in zip(items, vectors, strict=True)]
        await asyncio.to_thread(self.store.put_many, entries)
        self.index.put([image_id for image_id, _, _ in items], np.vstack(vectors))

    async def search(self, text: str, k: int) -> list[tuple[str, str, float]]:
        """(id, uri, cosine score) best first, at most k."""
        vector = (await self.embed.embed_texts([text]))[0]
        found = (await asyncio.to_thread(self.index.search, vector[None], k))[0]
        records = await asyncio.to_thread(self.store.get, [i for i, _ in found])
        return [(i, records[i].uri, score) for i, score in found if i in records]

    def close(self) -> None:
        self.store.close()


# -- evaluation -----------------------------------------------------------------------------
def _method_codes() -> dict[str, int]:
    from percept.v1 import embed_pb2

    return {"conse": embed_pb2.EMBEDDING_METHOD_CONSE,
            "devise": embed_pb2.EMBEDDING_METHOD_DEVISE}


async def _run(evalset: EvalSet, queries: Sequence[Query], methods: Sequence[str] | None,
               config: Any, progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    from services.embed.service import EmbeddingService

    codes = _method_codes()
    names = {code: name for name, code in codes.items()}
    service = EmbeddingService(config)
    try:
        started = time.perf_counter()
        await service.load()
        await service.warmup()  # as the server does before SERVING: loads the text encoder
        load_seconds = time.perf_counter() - started
        default = names[service.default_method]
        chosen = list(methods) if methods else [default]
        images = [(path.name, path.resolve().as_uri(), path.read_bytes())
                  for path in evalset.files]
        n = len(images)
        rankings: dict[str, list[list[tuple[str, str, float]]]] = {}
        controls: dict[str, list[tuple[str, float]]] = {}
        timings: dict[str, dict[str, float]] = {}
        for method in chosen:
            with tempfile.TemporaryDirectory(prefix="percept-eval-search-") as tmp:
                index = ServiceSearchIndex(service, codes[method], Path(tmp))
                try:
                    started = time.perf_counter()
                    batch = max(1, int(config.max_batch))
                    with tqdm(total=n, desc=f"index ({method})", unit="img",
                              disable=not progress) as bar:
                        for start in range(0, n, batch):
                            await index.add(images[start:start + batch])
                            bar.update(len(images[start:start + batch]))
                    index_seconds = time.perf_counter() - started
                    started = time.perf_counter()
                    rankings[method] = [await index.search(q.text, n) for q in
                                        tqdm(queries, desc=f"search ({method})", unit="query",
                                             disable=not progress)]
                    search_seconds = time.perf_counter() - started
                    controls[method] = [(text, (await index.search(text, 1))[0][2])
                                        for text in CONTROL_TEXTS]
                finally:
                    index.close()
            timings[method] = {"index_seconds": round(index_seconds, 3),
                               "query_ms_mean": round(1000 * search_seconds / len(queries), 2)}
        devise_tag = service.devise.tag if service.devise is not None else None
        devise_path = str(service.devise.path) if service.devise is not None else None
        text_space = str(getattr(service.text, "name", type(service.text).__name__))
        device = str(service.device)
    finally:
        await service.close()
    return {"default_method": default, "methods": chosen, "rankings": rankings,
            "controls": controls, "timings": timings,
            "load_seconds": round(load_seconds, 1), "devise": devise_tag,
            "devise_path": devise_path, "text_space": text_space, "device": device}


#: Texts that name nothing in any photo, searched for the score a query with no match gets
#: (the floor a --min-score must clear).
CONTROL_TEXTS = ("asdfgh qwerty", "zxqv", "blorft wimble")


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": round(float(min(values)), 4), "median": round(float(np.median(values)), 4),
            "max": round(float(max(values)), 4)}


def score_separation(rankings: Sequence[Sequence[tuple[str, str, float]]],
                     queries: Sequence[Query], controls: Sequence[tuple[str, float]]
                     ) -> dict[str, Any]:
    """How far scores alone tell a match from none: per query, the best relevant (is-a)
    photo's score and the best irrelevant one's, over all photos; the queries where an
    irrelevant photo outscores every relevant one; and the top score of texts that name
    nothing (:data:`CONTROL_TEXTS`)."""
    best_relevant, best_irrelevant = [], []
    for hits, query in zip(rankings, queries, strict=True):
        best_relevant.append(max(score for i, _, score in hits if i in query.relevant))
        best_irrelevant.append(max((score for i, _, score in hits if i not in query.relevant),
                                   default=float("nan")))
    return {"best_relevant": _spread(best_relevant),
            "best_irrelevant": _spread(best_irrelevant),
            "queries_irrelevant_first": int(sum(b > a for a, b in
                                                zip(best_relevant, best_irrelevant,
                                                    strict=True))),
            "control_top_scores": {text: round(score, 4) for text, score in controls}}


def evaluate(photos: Path, *, methods: Sequence[str] | None = None,
             models_dir: Path = REPO_ROOT / "models", ks: Sequence[int] = DEFAULT_KS,
             device: str = "auto", progress: bool = True) -> dict[str, Any]:
    """Indexes ``photos`` per method, runs one word query per distinct label and returns
    the JSON report (methods default to the embedding service's default)."""
    from services.common.config import ServerConfig
    from services.embed.wordnet import load_vocabulary

    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be >= 1, got {ks}")
    for method in methods or ():
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    vocab = load_vocabulary()
    evalset = load_eval_set(Path(photos), vocab)
    queries = build_queries(evalset, vocab)
    config = ServerConfig(service="embed", device=device, models_dir=Path(models_dir),
                          log_format="text")
    run = asyncio.run(_run(evalset, queries, methods, config, progress))
    n = len(evalset.files)
    label_of = {p.name: lemma for p, lemma in zip(evalset.files, evalset.lemmas, strict=True)}

    chance = {relevance: summarise([chance_metrics(n, len(q.answers(relevance)), ks)
                                    for q in queries]) for relevance in RELEVANCE}
    results: dict[str, dict[str, dict[str, float]]] = {}
    scores: dict[str, dict[str, Any]] = {}
    per_query: list[dict[str, Any]] = [
        {"query": q.text, "wnid": q.wnid, "relevant": sorted(q.relevant),
         "exact": sorted(q.exact)} for q in queries]
    for method in run["methods"]:
        ranked = [[hit[0] for hit in hits] for hits in run["rankings"][method]]
        results[method] = {}
        for relevance in RELEVANCE:
            rows = [query_metrics(r, q.answers(relevance), ks)
                    for r, q in zip(ranked, queries, strict=True)]
            results[method][relevance] = summarise(rows)
            for r, q, row, entry in zip(ranked, queries, rows, per_query, strict=True):
                ranks = relevant_ranks(r, q.answers(relevance))
                entry.setdefault(method, {})[relevance] = {
                    "first_rank": ranks[0] if ranks else None, **row}
        scores[method] = score_separation(run["rankings"][method], queries,
                                          run["controls"][method])
        for hits, entry, q in zip(run["rankings"][method], per_query, queries, strict=True):
            entry[method]["top"] = [
                {"file": i, "label": label_of[i], "score": round(score, 4),
                 "relevant": i in q.relevant} for i, _, score in hits[:max(ks)]]
    from training.evalsets.build_photos import labels_digest

    return {
        "eval_set": {"path": _display(evalset.folder), "photos": n,
                     "labels_sha256": labels_digest(evalset.folder / LABELS_FILE),
                     "distinct_labels": len(queries)},
        "queries": len(queries), "k": ks, "default_method": run["default_method"],
        "methods": run["methods"],
        "model": {"devise": run["devise"], "text_space": run["text_space"],
                  "models_dir": _display(Path(models_dir))},
        "index": "services.search: ImageStore (SQLite) + VectorIndex (FAISS flat inner "
                 "product), temporary data dir per method",
        "query_text": "the label synset's first WordNet lemma, underscores as spaces",
        "relevance": {"is_a": "the photo's label is the query synset or one of its WordNet "
                              "hyponyms (headline)",
                      "exact": "the photo's label is the query synset"},
        "metrics": {"mrr": "mean over queries of 1 / rank of the first relevant photo",
                    "recall@k": "fraction of queries with >= 1 relevant photo in the top k",
                    "relevant_recall@k": "relevant photos in the top k / relevant photos, "
                                         "mean over queries",
                    "chance": "exact expectation under a uniformly random ranking"},
        "results": results, "chance": chance, "scores": scores,
        "device": run["device"], "load_seconds": run["load_seconds"],
        "timings": run["timings"], "devise_path": run["devise_path"],
        "per_query": per_query,
    }


def _display(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# -- presentation ---------------------------------------------------------------------------
def _columns(ks: Sequence[int]) -> list[tuple[str, str]]:
    return ([("mrr", "MRR")] + [(f"recall@{k}", f"R@{k}") for k in ks]
            + [(f"relevant_recall@{k}", f"rel. recall@{k}") for k in ks])


def markdown_table(report: Mapping[str, Any], relevance: str = "is_a") -> str:
    """Methods and chance x MRR, recall@k, relevant_recall@k."""
    columns = _columns(report["k"])
    lines = ["| method | " + " | ".join(title for _, title in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for method in report["methods"]:
        row = report["results"][method][relevance]
        name = f"{method} (default)" if method == report["default_method"] else method
        lines.append(f"| {name} | " + " | ".join(f"{row[key]:.3f}" for key, _ in columns)
                     + " |")
    row = report["chance"][relevance]
    lines.append("| chance (random ranking) | "
                 + " | ".join(f"{row[key]:.3f}" for key, _ in columns) + " |")
    return "\n".join(lines)


def per_query_table(report: Mapping[str, Any], top: int = 3) -> str:
    """One row per query: relevant photos, and per method the first relevant rank and the
    top photos' labels (* = relevant)."""
    methods = report["methods"]
    header = ["query", "wnid", "relevant"]
    for method in methods:
        header += [f"{method} rank", f"{method} top {top}"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---:|" + "---:|---|" * len(methods)]
    for entry in report["per_query"]:
        cells = [entry["query"], entry["wnid"], str(len(entry["relevant"]))]
        for method in methods:
            rank = entry[method]["is_a"]["first_rank"]
            cells.append(str(rank) if rank is not None else "-")
            cells.append(", ".join(f"{hit['label'].replace('_', ' ')}"
                                   f"{'*' if hit['relevant'] else ''}"
                                   for hit in entry[method]["top"][:top]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_lines(report: Mapping[str, Any]) -> str:
    """The score separation of each method, one line each."""
    def spread(values: Mapping[str, float]) -> str:
        return f"{values['min']:.2f}..{values['max']:.2f} (median {values['median']:.2f})"

    lines = []
    for method, seen in report.get("scores", {}).items():
        controls = ", ".join(f"{text!r} {score:.2f}"
                             for text, score in seen["control_top_scores"].items())
        lines.append(f"scores ({method}): best relevant photo {spread(seen['best_relevant'])}"
                     f", best irrelevant {spread(seen['best_irrelevant'])}; an irrelevant "
                     f"photo first for {seen['queries_irrelevant_first']} of "
                     f"{report['queries']} queries; texts naming nothing: {controls}")
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], out: Path) -> None:
    """``out/metrics.json`` and ``out/per_query.md``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "metrics.json", json.dumps(report, indent=2) + "\n")
    write_text_atomically(
        out / "per_query.md",
        "# percept eval search: per query\n\n"
        f"{report['eval_set']['photos']} photos, relevance = is-a (the photo's label is the "
        "query synset or a kind of it); rank = rank of the first relevant photo; "
        "* = relevant.\n\n" + per_query_table(report, top=5) + "\n")


#: What :func:`write_report` writes into --out; a folder holding anything else is refused.
REPORT_FILES = frozenset({"metrics.json", "per_query.md", "metrics.json.partial",
                          "per_query.md.partial"})
#: Keys every report holds: a metrics.json without them is not an earlier report.
REPORT_KEYS = ("eval_set", "queries", "results", "chance")


def check_inputs(args: argparse.Namespace) -> None:
    """Before anything loads: the numbers, the photos, the models folder, and an --out
    folder that can be written and holds nothing but an earlier report."""
    from training.data.folders import check_folder_to_make

    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if min(args.k) < 1:
        raise ValueError(f"--k must be >= 1, got {' '.join(map(str, args.k))}")
    if not (Path(args.photos) / LABELS_FILE).is_file():
        raise EvalSetError(f"--photos {args.photos}: {LABELS_FILE} not found")
    if not Path(args.models_dir).is_dir():
        raise FileNotFoundError(f"--models-dir {args.models_dir}: not a folder")
    out = Path(args.out)
    check_folder_to_make(out, "--out")
    if out.is_dir():
        others = other_files(out, lambda name: name in REPORT_FILES)
        if others:
            raise ValueError(f"--out {out} holds other files ({listed(others)}), not an earlier "
                             "report: choose a new or empty folder")
        held = out / "metrics.json"
        if held.exists():
            report = read_json_object(held)
            if not (report is not None and all(key in report for key in REPORT_KEYS)):
                raise ValueError(f"--out {out} holds a metrics.json that is not an earlier "
                                 "report of percept eval search: choose another folder")


def command(args: argparse.Namespace) -> int:
    """``percept eval search``."""
    from services.common.errors import ServiceError
    from training.assets import AssetMissingError
    from training.export import update_metrics

    try:
        check_inputs(args)
    except (EvalSetError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = list(METHODS) if args.method == "both" else (
        [args.method] if args.method else None)
    started = time.perf_counter()
    try:
        report = evaluate(Path(args.photos), methods=methods, models_dir=Path(args.models_dir),
                          ks=args.k, device=args.device, progress=not args.quiet)
    except ServiceError as error:
        print(f"{error.code.name}: {error.message}", file=sys.stderr, flush=True)
        return 2
    except (EvalSetError, AssetMissingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    write_report(report, out)
    if args.update_metrics:
        if report["devise_path"] is None:
            print("error: --update-metrics: no DeViSE artifact under "
                  f"{args.models_dir}", file=sys.stderr, flush=True)
            return 2
        update_metrics(Path(report["devise_path"]), {"eval_search": {
            key: report[key] for key in ("eval_set", "queries", "k", "default_method",
                                         "results", "chance", "scores")}})
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print()
    print(f"{report['eval_set']['photos']} photos, {report['queries']} word queries (one per "
          "distinct label: its first WordNet lemma); relevant = the photo's label is the "
          "query synset or a kind of it")
    print()
    print(per_query_table(report))
    print()
    print(markdown_table(report))
    print()
    print("exact label only (the photo's label is the query synset itself):")
    print()
    print(markdown_table(report, "exact"))
    print()
    print("R@k: queries with a relevant photo in the top k; rel. recall@k: share of the "
          "relevant photos in the top k; chance: exact expectation of a random ranking")
    print()
    print(score_lines(report))
    print(f"report: {out / 'metrics.json'}, {out / 'per_query.md'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Adds ``search`` to the ``percept eval`` subparsers (see training.cli_search)."""
    from training.cli_search import register_eval

    return register_eval(subparsers)
