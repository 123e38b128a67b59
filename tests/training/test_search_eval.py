"""``percept eval search``: the retrieval metrics, their chance baseline, and the real
evaluation (real embedding service, SQLite store and FAISS index over the 28 labelled
evaluation photos) against chance."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from training.evaluate_search import (
    DEFAULT_KS,
    build_queries,
    chance_metrics,
    query_metrics,
    summarise,
)

PHOTOS = Path(__file__).resolve().parents[2] / "training" / "evalsets" / "photos"


def _missing_assets() -> str | None:
    """Why the real evaluation cannot run here (None when it can)."""
    from services.embed.word_vectors import TextEncoder, noun_vectors_path
    from services.embed.wordnet import load_vocabulary
    from training.assets import AssetMissingError, efficientnet_lite0_weights_path

    try:
        weights = efficientnet_lite0_weights_path()
        vocab = load_vocabulary()
    except AssetMissingError as error:
        return str(error)
    if not weights.is_file():
        return f"EfficientNet-Lite0 weights missing at {weights}; run `make setup`"
    if not noun_vectors_path(vocab, TextEncoder()).is_file():
        return ("no cached 82,115 noun vectors (the embed service would spend minutes "
                "building them); build them with `python -m services.embed.word_vectors build`")
    return None


# -- metrics --------------------------------------------------------------------------------
def test_query_metrics_of_a_known_ranking() -> None:
    ranking = ["a", "b", "c", "d", "e", "f"]
    metrics = query_metrics(ranking, {"c", "f"}, ks=(1, 2, 5))
    assert metrics["reciprocal_rank"] == pytest.approx(1 / 3)
    assert (metrics["recall@1"], metrics["recall@2"], metrics["recall@5"]) == (0.0, 0.0, 1.0)
    assert metrics["relevant_recall@5"] == pytest.approx(0.5)
    top = query_metrics(ranking, {"a"}, ks=(1, 2, 5))
    assert top["reciprocal_rank"] == top["recall@1"] == top["relevant_recall@1"] == 1.0
    missing = query_metrics(ranking[:3], {"z"}, ks=(1,))  # a relevant item never returned
    assert missing["reciprocal_rank"] == missing["recall@1"] == 0.0
    with pytest.raises(ValueError):
        query_metrics(ranking, set(), ks=(1,))
    summary = summarise([metrics, top])
    assert summary["mrr"] == pytest.approx((1 / 3 + 1) / 2)
    assert "reciprocal_rank" not in summary


@pytest.mark.parametrize("relevant", [1, 2, 3])
def test_chance_metrics_are_the_expectation_of_random_rankings(relevant: int) -> None:
    """The closed forms match 20,000 random rankings of 28 photos (fixed seed)."""
    n, ks, trials = 28, (1, 5, 10), 20_000
    rng = np.random.default_rng(relevant)
    # the ranks of the relevant photos in a random ranking: a random relevant-subset of 1..n
    ranks = np.sort(rng.random((trials, n)).argsort(axis=1)[:, :relevant] + 1, axis=1)
    expected = chance_metrics(n, relevant, ks)
    assert expected["reciprocal_rank"] == pytest.approx(np.mean(1.0 / ranks[:, 0]), abs=0.01)
    for k in ks:
        assert expected[f"recall@{k}"] == pytest.approx(np.mean(ranks[:, 0] <= k), abs=0.01)
        assert expected[f"relevant_recall@{k}"] == pytest.approx(np.mean(ranks <= k), abs=0.01)
    if relevant == 1:  # E[1/U] for U uniform on 1..n is the harmonic number over n
        assert expected["reciprocal_rank"] == pytest.approx(
            sum(1 / r for r in range(1, n + 1)) / n)
    with pytest.raises(ValueError):
        chance_metrics(n, 0, ks)


def test_one_query_per_label_and_kinds_of_it_are_relevant() -> None:
    from services.embed.wordnet import load_vocabulary
    from training.assets import AssetMissingError
    from training.evaluate_devise import load_eval_set

    try:
        vocab = load_vocabulary()
    except AssetMissingError as error:
        pytest.skip(str(error))
    evalset = load_eval_set(PHOTOS, vocab)
    queries = {q.text: q for q in build_queries(evalset, vocab)}
    assert len(queries) == len(set(evalset.wnids)) == 26
    assert queries["dog"].relevant == {"darknet-dog.jpg", "opencv-chicky.jpg"}
    # an orange and an apple are edible fruit; a soccer player is a person
    assert queries["edible fruit"].relevant == {"opencv-fruits.jpg", "opencv-apple.jpg",
                                                "opencv-orange.jpg"}
    assert queries["edible fruit"].exact == {"opencv-fruits.jpg"}
    assert queries["person"].relevant == {"darknet-person.jpg", "opencv-messi5.jpg"}
    # ... but a person is not known to be a soccer player
    assert queries["soccer player"].relevant == {"opencv-messi5.jpg"}
    assert "American red squirrel" in queries and "printed circuit" in queries
    for query in queries.values():
        assert query.exact and query.exact <= query.relevant


# -- the real evaluation --------------------------------------------------------------------
def _percept(*argv: str) -> tuple[int, str]:
    from services.cli import main

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(list(argv))
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def evaluation(one_torch_thread: None, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[dict[str, Any], Path]]:
    """``percept eval search --method both --json`` run once on the 28 evaluation photos."""
    reason = _missing_assets()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("eval-search")
    code, stdout = _percept("eval", "search", "--method", "both", "--json", "--quiet",
                            "--out", str(out))
    assert code == 0, stdout
    yield json.loads(stdout), out


def test_report_is_well_formed(evaluation: tuple[dict[str, Any], Path]) -> None:
    report, out = evaluation
    assert json.loads((out / "metrics.json").read_text())["results"] == report["results"]
    assert "| query |" in (out / "per_query.md").read_text()
    assert report["eval_set"]["photos"] == 28 and report["queries"] == 26
    assert report["methods"] == ["conse", "devise"] and report["k"] == list(DEFAULT_KS)
    for scores in [*(report["results"][m][r] for m in report["methods"]
                     for r in ("is_a", "exact")), *report["chance"].values()]:
        assert all(0.0 <= value <= 1.0 for value in scores.values()), scores
        recalls = [scores[f"recall@{k}"] for k in report["k"]]
        assert recalls == sorted(recalls)  # more photos looked at never finds fewer
        assert scores["mrr"] >= scores["recall@1"]
        for k in report["k"]:
            assert scores[f"relevant_recall@{k}"] <= scores[f"recall@{k}"] + 1e-12
    for entry in report["per_query"]:
        for method in report["methods"]:
            hits = entry[method]["top"]
            assert len(hits) == max(report["k"])
            assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
            first = entry[method]["is_a"]["first_rank"]
            assert 1 <= first <= 28
            assert (first <= len(hits)) == any(h["relevant"] for h in hits)


def test_default_method_finds_photos_by_word_far_better_than_chance(
        evaluation: tuple[dict[str, Any], Path]) -> None:
    """Measured (ConSE, the default): MRR 0.80, R@1 0.73, R@5 0.88 against chance 0.15,
    0.04, 0.21. The floors sit well below the measurement and far above chance."""
    report, _ = evaluation
    default = report["results"][report["default_method"]]["is_a"]
    chance = report["chance"]["is_a"]
    assert chance["mrr"] < 0.2 and chance["recall@5"] < 0.25
    assert default["mrr"] >= 0.6 > 3 * chance["mrr"]
    assert default["recall@1"] >= 0.5
    assert default["recall@5"] >= 0.7
    for method in report["methods"]:  # DeViSE too (measured MRR 0.50)
        scores = report["results"][method]["is_a"]
        assert scores["mrr"] > 2 * chance["mrr"], (method, scores)
        assert scores["recall@5"] > chance["recall@5"] + 0.2, (method, scores)


def test_errors_are_reported_not_raised(tmp_path: Path) -> None:
    code, _ = _percept("eval", "search", "--photos", str(tmp_path), "--quiet",
                       "--out", str(tmp_path / "out"))
    assert code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("held, message", [
    ({"config.json": "{}", "metrics.json": '{"steps": 600}'}, "holds other files (config.json)"),
    ({"metrics.json": '{"steps": 600}'}, "holds a metrics.json that is not an earlier report"),
])
def test_an_out_holding_what_it_did_not_write_is_refused_before_anything_loads(
        tmp_path: Path, held: dict[str, str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--out models/devise-minilm` replaced the artifact's metrics.json with the report."""
    out = tmp_path / "artifact"
    out.mkdir()
    for name, text in held.items():
        (out / name).write_text(text)
    started = time.perf_counter()
    code, _ = _percept("eval", "search", "--quiet", "--out", str(out))
    assert code == 2 and time.perf_counter() - started < 5.0
    assert f"--out {out} {message}" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in out.iterdir()} == held


def test_negative_threads_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    code, _ = _percept("eval", "search", "--threads", "-1", "--out", str(tmp_path / "o"))
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: --threads must be >= 0, got -1"
    assert not (tmp_path / "o").exists()


def test_score_separation_compares_the_best_relevant_and_irrelevant_scores() -> None:
    from training.evaluate_search import Query, score_separation

    queries = [Query("n1", "dog", frozenset({"dog.jpg"}), frozenset({"dog.jpg"})),
               Query("n2", "cat", frozenset({"cat.jpg", "tabby.jpg"}), frozenset({"cat.jpg"}))]
    rankings = [[("dog.jpg", "", 0.7), ("cat.jpg", "", 0.3), ("tabby.jpg", "", 0.2)],
                [("dog.jpg", "", 0.6), ("tabby.jpg", "", 0.5), ("cat.jpg", "", 0.1)]]
    seen = score_separation(rankings, queries, [("zxqv", 0.25)])
    assert seen["best_relevant"] == {"min": 0.5, "median": 0.6, "max": 0.7}
    assert seen["best_irrelevant"] == {"min": 0.3, "median": 0.45, "max": 0.6}
    assert seen["queries_irrelevant_first"] == 1  # cat: dog.jpg 0.6 over tabby 0.5
    assert seen["control_top_scores"] == {"zxqv": 0.25}
