"""benchmarks/run.py, the `make bench` harness: a quick run leaves the saved results and
the README alone, and a benchmark's merge keeps what an earlier run measured and this one
did not (the search scale's 1M rows and variants)."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import bench_search_scale, run


def _fake_benchmark(value: float) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        run=lambda quick=False: {"ratio": value, "quick": quick},
        markdown=lambda result: f"| ratio |\n|---|\n| {result['ratio']} |")


@pytest.fixture()
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    results, readme = tmp_path / "results", tmp_path / "README.md"
    results.mkdir()
    (results / "png.json").write_text(json.dumps({"ratio": 7.5, "quick": False}))
    readme.write_text(f"# Benchmarks\n\n{run.BEGIN}\nthe full run's tables\n{run.END}\n")
    monkeypatch.setattr(run, "RESULTS", results)
    monkeypatch.setattr(run, "README", readme)
    monkeypatch.setattr(run, "BENCHMARKS", ["png"])
    monkeypatch.setattr(run.importlib, "import_module", lambda name: _fake_benchmark(3.0))
    return tmp_path


def test_a_quick_run_keeps_the_saved_results_and_the_readme(harness: Path) -> None:
    readme_before = (harness / "README.md").read_text()
    assert run.main(["--quick"]) == 0
    assert json.loads((harness / "results" / "png.json").read_text())["ratio"] == 7.5
    quick = json.loads((harness / "results" / "quick" / "png.json").read_text())
    assert (quick["ratio"], quick["quick"]) == (3.0, True)
    assert quick["command"] == "python -m benchmarks.run --only png --quick"
    assert (harness / "README.md").read_text() == readme_before


def test_a_full_run_writes_the_results_and_the_readme(harness: Path) -> None:
    assert run.main([]) == 0
    assert json.loads((harness / "results" / "png.json").read_text())["ratio"] == 3.0
    text = (harness / "README.md").read_text()
    assert "| 3.0 |" in text and "`make bench`" in text and "the full run's" not in text
    # a benchmark that records no date or command of its own is stamped with them
    assert "_Measured 20" in text and "by `python -m benchmarks.run --only png`" in text


def _row(vectors: int, index: str, speedup: float) -> dict[str, Any]:
    point = {"recall_at_10": 0.97, "x_flat_batch1": speedup, "x_flat_batch64": speedup,
             "qps_batch1": 1.0, "qps_batch64": 1.0}
    row: dict[str, Any] = {"vectors": vectors, "index": index}
    if index != "flat":
        row["sweep"] = [{**point, "efSearch": 64}]
    return row


def _result(date: str, sizes: list[int], threads: int = 1) -> dict[str, Any]:
    rows = [r for n in sizes for r in (_row(n, "flat", 1.0), _row(n, "hnsw", n / 1000))]
    return {"date": date, "command": f"bench {sizes}", "faiss_threads": threads,
            "queries": 1000, "data": {"concepts": 10_000}, "rows": rows,
            "operating_points": bench_search_scale.summarise(rows), "variants": []}


def test_search_scale_keeps_the_rows_and_variants_this_run_did_not_measure() -> None:
    saved = _result("2026-11-20", [10_000, 100_000, 1_000_000])
    saved["variants"] = [{"command": "--concepts 100000"}]
    new = _result("2026-11-28", [10_000, 100_000])
    merged = bench_search_scale.merge(saved, new)
    assert [(r["vectors"], r["index"]) for r in merged["rows"]] == [
        (10_000, "flat"), (10_000, "hnsw"), (100_000, "flat"), (100_000, "hnsw"),
        (1_000_000, "flat"), (1_000_000, "hnsw")]
    assert all(r.get("from") == "2026-11-20: bench [10000, 100000, 1000000]"
               for r in merged["rows"] if r["vectors"] == 1_000_000)
    assert not any("from" in r for r in merged["rows"] if r["vectors"] < 1_000_000)
    assert set(merged["operating_points"]) == {"10000", "100000", "1000000"}
    assert merged["variants"] == saved["variants"]
    assert "1,000,000 vectors are from an earlier run (2026-11-20" in merged["note"]


def test_search_scale_does_not_mix_runs_of_other_settings() -> None:
    saved = _result("2026-11-20", [1_000_000], threads=2)
    new = _result("2026-11-28", [10_000])
    assert bench_search_scale.merge(saved, new) is new


def test_an_output_under_the_fidelity_floor_fails_the_run(harness: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """A faster variant whose output is not the network's (PSNR against fp32 eager under
    the floor) fails `make bench`: its speed is no win. The results are still written."""
    from benchmarks.image_models import FIDELITY_FLOOR_DB, fidelity

    reference = np.zeros((8, 8, 3), np.uint8)
    broken = fidelity(np.full((8, 8, 3), 60, np.uint8), reference)
    close = fidelity(np.ones((8, 8, 3), np.uint8), reference)
    assert broken["fidelity_ok"] is False and broken["psnr_db"] < FIDELITY_FLOOR_DB
    assert close["fidelity_ok"] is True
    result = {"latency": [{"variant": "served", "size": 256, **close},
                          {"variant": "served+compile", "size": 512, **broken}]}
    monkeypatch.setattr(run.importlib, "import_module", lambda name: types.SimpleNamespace(
        run=lambda quick=False: result, markdown=lambda r: "table"))
    assert run.main([]) == 1
    err = capsys.readouterr().err
    assert "FAILED: output under the fidelity floor: png: latency[1]: served+compile at " \
           "512 px" in err
    assert json.loads((harness / "results" / "png.json").read_text())["latency"]
