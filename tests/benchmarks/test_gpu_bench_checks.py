"""The GPU style benchmark's checks, on the CPU: the command it records re-runs what it
measured, a failed baseline or variant and an output under the fidelity floor fail it,
and a kernel profile labelled torch.compile is taken while the compiled graph is live
and is not presented when it holds no compiled (Triton) kernel."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from benchmarks import bench_style_gpu as gpu
from benchmarks.common import fidelity_failures
from benchmarks.kernel_profile import top_kernels

CPU = torch.device("cpu")


@pytest.mark.parametrize("kwargs", [
    {},  # make bench's run(): the defaults
    {"repeats": 10, "paper_width": False,  # make bench --quick, saved apart
     "out": Path("benchmarks/results/quick/style_gpu.json")},
    {"only": ["starry-night", "paper"], "profile": True, "served": False,
     "forms": ["traced", "served"], "baselines_only": True, "autotune": True,
     "budget_s": 170.5, "sizes": [64], "device": CPU, "out": Path("/tmp/x y.json")},
])
def test_the_recorded_command_reruns_the_same_measurement(kwargs: dict[str, Any]) -> None:
    call: dict[str, Any] = {"sizes": [1024, 512], "device": torch.device("cuda"),
                            "repeats": 30, "budget_s": 240.0, "paper_width": True, **kwargs}
    command = gpu.command_line(**call)
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "benchmarks.bench_style_gpu"]
    args = gpu.arguments().parse_args(words[3:])
    assert (args.sizes, args.device, args.repeats, args.budget_s) == (
        call["sizes"], call["device"].type, call["repeats"], call["budget_s"])
    assert args.no_paper_width is not call["paper_width"]
    assert args.only == call.get("only") and args.forms == call.get("forms")
    assert args.profile is call.get("profile", False)
    assert args.autotune is call.get("autotune", False)
    assert args.networks_only is not call.get("served", True)
    assert args.baselines_only is call.get("baselines_only", False)
    out = call.get("out")
    assert args.out == (None if out is None else out)


def test_failed_rows_and_sections_fail_the_run_and_skipped_ones_do_not() -> None:
    result: dict[str, Any] = {"rows": [
        {"net": "n", "size": 64, "variant": gpu.BASELINE, "error": "RuntimeError: oom"},
        {"net": "n", "size": 64, "variant": "fp16", "ms": 1.0},
        {"net": "n", "size": 64, "variant": "compiled variants", "skipped": "budget"}],
        "served_form": {"error": "ValueError: x"}, "grpc": [], "superres_served": [],
        "kernel_profile": [{"net": "n", "size": 64, "variant": "torch.compile, f",
                            "error": "E"}]}
    assert gpu.failures(result) == [
        f"n at 64 px, {gpu.BASELINE}: RuntimeError: oom", "served_form: ValueError: x",
        "kernel profile of n at 64 px, torch.compile, f: E"]
    assert gpu.failures({"rows": result["rows"][1:]}) == []


def _size_run(profile: bool = False) -> gpu.SizeRun:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 3, 3, padding=1), nn.Sigmoid()).eval()
    return gpu.SizeRun("tiny", net, 32, CPU, repeats=2, profile=profile)


def test_rows_get_the_fidelity_check_and_a_raising_variant_is_a_failure() -> None:
    run = _size_run()
    x = gpu.as_input(run.image, CPU, torch.float32, False)
    run.time(gpu.STRICT, run.module, x)
    run.time("close", lambda t: run.module(t) + 1e-4, x)
    run.time("wrong", lambda t: run.module(t) * 0.5, x)

    def broken() -> tuple[nn.Module, torch.dtype, bool]:
        raise RuntimeError("no kernel")

    run.eager(gpu.BASELINE, broken)
    result = {"rows": gpu.all_rows([run])}
    assert [r.get("fidelity_ok") for r in result["rows"]] == [True, True, False, None]
    failed = fidelity_failures(result)
    assert len(failed) == 1 and failed[0].startswith("rows[2]: wrong at 32 px, ")
    assert gpu.failures(result) == [f"tiny at 32 px, {gpu.BASELINE}: RuntimeError: no kernel"]


def test_main_saves_what_was_measured_and_exits_1_when_a_variant_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def measure_all(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"date": "2026-11-28", "command": "c", "device": "cpu", "torch": "t",
                "cudnn": None, "sizes": [64], "rows": [
                    {"net": "n", "size": 64, "variant": "fp16", "error": "RuntimeError: x"}]}

    monkeypatch.setattr(gpu, "measure_all", measure_all)
    out = tmp_path / "gpu.json"
    assert gpu.main(["--device", "cpu", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["rows"][0]["error"] == "RuntimeError: x"
    assert "[gpu-bench] FAILED: n at 64 px, fp16: RuntimeError: x" in capsys.readouterr().err


def test_each_compiled_form_is_profiled_before_the_next_dynamo_reset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The order of events (torch.compile itself stands aside: compiling on this CPU takes
    longer than a test may): a form's profile comes after its timing and before the reset
    that starts the next form, so it profiles the compiled graph that was timed."""
    events: list[str] = []

    def compile_stand_in(net: nn.Module, **kwargs: Any) -> nn.Module:
        events.append("compile")
        return net

    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))
    monkeypatch.setattr(torch, "compile", compile_stand_in)

    def profiled(*args: Any, **kwargs: Any) -> dict[str, Any]:
        events.append("profile")
        return top_kernels(*args, **kwargs)

    monkeypatch.setattr(gpu, "top_kernels", profiled)
    run = _size_run(profile=True)
    original = run.time

    def timed(variant: str, *args: Any, **kwargs: Any) -> None:
        events.append("time")
        original(variant, *args, **kwargs)

    monkeypatch.setattr(run, "time", timed)
    build = gpu.builder(run.module, CPU, torch.float32, channels_last=True, fold=False)
    run.compiled(build, "folded, one form", plain_too=True)
    run.compiled(build, "folded, another", plain_too=True)
    assert events == ["reset", "compile", "time", "profile"] * 2
    assert [p["variant"] for p in run.profiles] == [
        "torch.compile, folded, one form, no CUDA graph",
        "torch.compile, folded, another, no CUDA graph"]
    assert all(p["total_us_per_pass"] > 0 for p in run.profiles)


def test_a_compiled_profile_without_triton_kernels_is_marked_invalid(
        capsys: pytest.CaptureFixture[str]) -> None:
    net = nn.Conv2d(3, 8, 3, padding=1).eval()
    eager = top_kernels(net, torch.rand(1, 3, 32, 32), CPU, passes=2)
    assert eager["triton_kernels"] == 0  # counted over every event, not only the top ones
    cuda = torch.device("cuda")
    found = gpu.triton_checked(dict(eager), cuda, "n at 64 px, torch.compile, f")
    assert found["compiled_kernels_found"] is False
    assert "holds no Triton kernel" in capsys.readouterr().err
    assert gpu.triton_checked({**eager, "triton_kernels": 3}, cuda, "w")[
        "compiled_kernels_found"] is True
    assert "compiled_kernels_found" not in gpu.triton_checked(dict(eager), CPU, "w")
    # and the README's table shows it as not what it claims
    profile = {"net": "n", "size": 64, "variant": "torch.compile, f, no CUDA graph", **found}
    result = {"device": "cuda", "sizes": [64], "rows": [], "kernel_profile": [profile]}
    text = "\n".join(gpu._network_tables(result))
    assert "holds no Triton kernel" in text and "| kernel |" not in text
    profile["compiled_kernels_found"] = True
    assert "| kernel |" in "\n".join(gpu._network_tables(result))


def test_a_full_run_keeps_the_saved_companions_and_the_note_of_its_run() -> None:
    saved = {"date": "2026-11-27", "command": "old", "note": "renamed",
             "companions": ["a.json"]}
    merged = gpu.merge(saved, {"rows": [1]})
    assert merged == {"rows": [1], "companions": ["a.json"],
                      "note": "From the result this run replaced (2026-11-27, `old`): renamed"}
    assert gpu.merge({**merged, "date": "2026-11-29"}, {"rows": [2]})["note"] == merged["note"]
    assert gpu.merge(saved, {"rows": [1], "note": "own"})["note"] == "own"
