"""How the benchmarks save their results (benchmarks.common.ResultFile, the one way every
entry point saves): a quick run never touches the saved results, every result is stamped
with its date, machine and command, and a full run is merged with what was saved the way
`make bench` merges (the search scale's 1M rows, the GPU run's companions and note).

No benchmark is measured here: the measurements are stand-ins, the saving is the real one.
(This folder has no __init__.py: one would make it a package named ``benchmarks`` under
pytest's rootdir import and hide the real one.)"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_search_scale, common, run


@pytest.fixture()
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty results folder in place of benchmarks/results."""
    folder = tmp_path / "results"
    folder.mkdir()
    monkeypatch.setattr(common, "RESULTS", folder)
    monkeypatch.setattr(run, "RESULTS", folder)
    return folder


def _search_result(date: str, sizes: list[int]) -> dict[str, Any]:
    """A search-scale result of ``sizes`` (a flat and an HNSW row each), as run() returns."""
    point = {"efSearch": 64, "recall_at_10": 0.97, "x_flat_batch1": 20.0,
             "x_flat_batch64": 20.0, "qps_batch1": 100.0, "qps_batch64": 120.0}
    rows: list[dict[str, Any]] = []
    for n in sizes:
        rows.append({"vectors": n, "index": "flat", "build_s": 1.0, "bytes_per_vector": 1536,
                     "recall_at_10": 1.0, "qps_batch1": 5.0, "qps_batch64": 6.0,
                     "x_flat_batch1": 1.0, "x_flat_batch64": 1.0})
        rows.append({"vectors": n, "index": "hnsw", "params": {"M": 32, "efConstruction": 40},
                     "build_s": 2.0, "bytes_per_vector": 1808, "sweep": [point],
                     "max_recall_at_10": 0.97})
    return {"date": date, "machine": {"cpu": "AMD EPYC", "cores": 2}, "faiss_threads": 1,
            "faiss": "1.15.1", "queries": 1000, "k": 10, "target_recall": 0.95,
            "command": f"python -m benchmarks.bench_search_scale --sizes {sizes}",
            "data": {"concepts": 10_000}, "rows": rows,
            "operating_points": bench_search_scale.summarise(rows),
            "load_average_end": [1.0, 1.0, 1.0], "wall_s": 3.0, "note": "", "variants": []}


def test_a_quick_run_of_one_benchmark_goes_to_quick_and_is_stamped(
        results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (results / "png.json").write_text(json.dumps({"ratio": 7.5}))
    status = common.run_as_script("png", None, lambda quick: {"ratio": 3.0, "quick": quick},
                                  lambda result: f"ratio {result['ratio']}", argv=["--quick"])
    assert status == 0
    assert json.loads((results / "png.json").read_text()) == {"ratio": 7.5}
    quick = json.loads((results / "quick" / "png.json").read_text())
    assert (quick["ratio"], quick["quick"]) == (3.0, True)
    assert quick["command"] == "python -m benchmarks.bench_png --quick"
    assert quick["date"].startswith("20") and len(quick["load_average_end"]) == 3
    assert quick["machine"]["cpu"] == common.machine()["cpu"]
    assert "ratio 3.0" in capsys.readouterr().out


def test_a_full_run_of_one_benchmark_is_merged_and_fails_under_the_fidelity_floor(
        results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (results / "style.json").write_text(json.dumps({"kept": "from before"}))
    measured = {"rows": [{"variant": "served", "size": 256, "psnr_db": 12.0,
                          "fidelity_ok": False}]}
    status = common.run_as_script("style", None, lambda quick: dict(measured),
                                  lambda result: "table", argv=[],
                                  merge=lambda saved, new: {**new, "kept": saved["kept"]})
    assert status == 1
    assert "FAILED: output under the fidelity floor: style: rows[0]: served at 256 px" \
        in capsys.readouterr().err
    saved = json.loads((results / "style.json").read_text())
    assert saved["kept"] == "from before" and saved["rows"] == measured["rows"]
    assert saved["command"] == "python -m benchmarks.bench_style"


def test_saving_progress_merges_each_time_with_what_was_there_before_the_run(
        results: Path) -> None:
    (results / "style_gpu.json").write_text(json.dumps({"companions": ["later.json"]}))
    target = common.ResultFile("style_gpu", quick=False, command="cmd",
                               merge=lambda saved, new: {**new, **saved})
    target.save({"rows": [1]})
    written = target.save({"rows": [1, 2]})
    assert written["rows"] == [1, 2] and written["companions"] == ["later.json"]
    assert json.loads((results / "style_gpu.json").read_text()) == written
    assert not list(results.glob("*.partial"))


def test_search_scale_quick_leaves_the_saved_million_rows_alone(
        results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _search_result("2026-11-20", [10_000, 1_000_000])
    (results / "search_scale.json").write_text(json.dumps(saved))
    monkeypatch.setattr(bench_search_scale, "run",
                        lambda *args: _search_result("2026-11-28", [10_000]))
    assert bench_search_scale.main(["--quick"]) == 0
    assert json.loads((results / "search_scale.json").read_text()) == saved
    quick = json.loads((results / "quick" / "search_scale.json").read_text())
    assert {row["vectors"] for row in quick["rows"]} == {10_000}


def test_a_full_search_scale_run_keeps_the_rows_it_did_not_measure(
        results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (results / "search_scale.json").write_text(json.dumps(
        _search_result("2026-11-20", [10_000, 1_000_000])))
    monkeypatch.setattr(bench_search_scale, "run",
                        lambda *args: _search_result("2026-11-28", [10_000]))
    assert bench_search_scale.main([]) == 0
    merged = json.loads((results / "search_scale.json").read_text())
    assert [(r["vectors"], r["index"]) for r in merged["rows"]] == [
        (10_000, "flat"), (10_000, "hnsw"), (1_000_000, "flat"), (1_000_000, "hnsw")]
    assert merged["date"] == "2026-11-28"
    assert "1,000,000 vectors are from an earlier run (2026-11-20" in merged["note"]


def test_search_scale_add_to_needs_a_full_result(results: Path) -> None:
    with pytest.raises(SystemExit):
        bench_search_scale.main(["--quick", "--add-to", str(results / "search_scale.json")])
    with pytest.raises(SystemExit):
        bench_search_scale.main(["--add-to", str(results / "missing.json")])


def test_make_bench_only_without_names_is_refused(
        results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"{run.BEGIN}\nthe full run's tables\n{run.END}\n")
    monkeypatch.setattr(run, "README", readme)
    with pytest.raises(SystemExit) as raised:
        run.main(["--only"])
    assert raised.value.code == 2
    assert readme.read_text() == f"{run.BEGIN}\nthe full run's tables\n{run.END}\n"


def test_make_bench_passes_its_result_file_to_a_benchmark_that_saves_progress(
        results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU benchmark saves its progress to where benchmarks.run tells it (never on its
    own), a full run keeps the saved result's companions and note, and a failed variant
    fails the run with the result saved."""
    from benchmarks import bench_style_gpu

    (results / "style_gpu.json").write_text(json.dumps(
        {"date": "2026-11-27", "command": "old", "rows": [], "note": "labels renamed",
         "companions": ["style_gpu_forms.json"]}))
    readme = tmp_path / "README.md"
    readme.write_text(f"{run.BEGIN}\n{run.END}\n")
    told: list[Path] = []

    def measure(quick: bool = False, out: common.ResultFile | None = None) -> dict[str, Any]:
        assert out is not None
        told.append(out.path)
        rows = [{"net": "n", "size": 64, "variant": "fp16", "error": "RuntimeError: boom"}]
        result = {"command": "python -m benchmarks.bench_style_gpu --device cuda",
                  "rows": rows}
        progress = out.save(result)  # what a run cut short here would leave
        assert ("companions" in progress) == (not quick)
        return result

    monkeypatch.setattr(run, "README", readme)
    monkeypatch.setattr(run, "BENCHMARKS", ["style_gpu"])
    monkeypatch.setattr(run.importlib, "import_module", lambda name: types.SimpleNamespace(
        run=measure, merge=bench_style_gpu.merge, failures=bench_style_gpu.failures,
        markdown=lambda result: "table"))
    assert run.main(["--quick"]) == 1  # the failed variant; its own file, nothing merged
    assert told[-1] == results / "quick" / "style_gpu.json"
    assert "companions" not in json.loads(told[-1].read_text())
    assert run.main([]) == 1
    assert told[-1] == results / "style_gpu.json"
    saved = json.loads((results / "style_gpu.json").read_text())
    assert saved["companions"] == ["style_gpu_forms.json"]
    assert saved["note"] == ("From the result this run replaced (2026-11-27, `old`): "
                             "labels renamed")
    assert saved["command"] == "python -m benchmarks.bench_style_gpu --device cuda"
    assert "[bench] FAILED: style_gpu: n at 64 px, fp16: RuntimeError: boom" \
        in capsys.readouterr().err


def test_earlier_runs_kept_as_companions_do_not_fail_this_one() -> None:
    from benchmarks.common import fidelity_failures

    result = {"rows": [{"variant": "fp16", "size": 512, "psnr_db": 48.0, "fidelity_ok": True}],
              "companions": {"old.json": {"rows": [{"variant": "x", "size": 512,
                                                    "psnr_db": 30.0, "fidelity_ok": False}]}}}
    assert fidelity_failures(result) == []
    result["rows"][0].update(psnr_db=30.0, fidelity_ok=False)
    assert fidelity_failures(result) == ["rows[0]: fp16 at 512 px, 30.0 dB"]
