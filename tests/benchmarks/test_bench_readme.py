"""benchmarks/README.md's sections (benchmarks.run.render): each names the machine that
measured it, and one whose result records no command says so; the search-scale table's
ratio is labelled for what it divides by."""

from __future__ import annotations

import json
import types
from typing import Any

from benchmarks import bench_noun_search, bench_search_scale, run
from benchmarks.common import RESULTS

XEON = {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2}


def _noun_result() -> dict[str, Any]:
    """A result as bench_noun_search saved it before results were stamped: no command,
    no CPU model."""
    return {"date": "2026-11-26T06:29:58+00:00", "k": 10,
            "machine": {"platform": "Linux-6.18-x86_64", "processor": "", "cpus": 2,
                        "threads": 2, "load_avg_1m": 11.04},
            "vectors": {"rows": 100, "dim": 384, "source": "test"},
            "results": [{"backend": "numpy", "batch": 1, "ms_per_query": 1.0,
                         "speedup_vs_numpy": 1.0, "recall@10": 1.0, "build_s": 0.1}]}


def test_a_result_without_a_command_says_so_and_names_its_own_machine() -> None:
    text = run.render(bench_noun_search, _noun_result())
    first = text.splitlines()[0]
    assert first.startswith("_Measured 2026-11-26 on a CPU whose model its result does not "
                            "record, 2 cores, Linux-6.18-x86_64; its result records no command")
    assert "Xeon" not in text


def test_a_section_names_its_machine_unless_its_table_does() -> None:
    module = types.SimpleNamespace(markdown=lambda r: "### Title\n\n| x |\n|---|\n| 1 |")
    result = {"date": "2026-11-28T10:00:00", "command": "python -m benchmarks.run --only x",
              "machine": XEON, "load_average_end": [1.5, 1.0, 1.0]}
    assert run.render(module, result).splitlines()[2] == (
        "_Measured 2026-11-28 by `python -m benchmarks.run --only x` on Intel(R) Xeon(R) "
        "Processor, 2 cores; load average at the end 1.50._")
    shown = types.SimpleNamespace(markdown=lambda r: f"### Title\n\nMachine: {r['machine']}")
    assert "on Intel" not in run.render(shown, result)
    # the command in the text, the machine not: the machine alone under the heading
    own = types.SimpleNamespace(markdown=lambda r: f"### Title\n\n`{r['command']}`")
    assert run.render(own, result).splitlines()[2] == (
        "_Machine: Intel(R) Xeon(R) Processor, 2 cores._")


def test_the_saved_search_scale_section_names_its_own_machine_and_ratio() -> None:
    saved = json.loads((RESULTS / "search_scale.json").read_text())
    text = run.render(bench_search_scale, saved)
    described = f"on {saved['machine']['cpu']}, {saved['machine']['cores']} cores"
    assert described in text.splitlines()[2]
    assert "| x exact b=1 | x exact b=64 |" in text and "x flat" not in text
    for variant in saved.get("variants", []):
        assert f"`{variant['command']}`, {variant['date']}, on {variant['machine']['cpu']}" \
            in text
