"""`make bench`: every benchmark, each against a baseline measured in the same run.

Results go to benchmarks/results/<name>.json, and the tables to benchmarks/README.md
(between the BEGIN/END markers), with the machine, date and command. A benchmark with a
``merge(saved, new)`` keeps what its saved result measured and this run did not (the
search scale's 1M rows, which only --full measures, and its variants).

``--quick`` is a smoke run (fewer sizes and repeats): its results go to
benchmarks/results/quick/ and its tables to stdout; the saved results and the README
keep the full runs'.

python -m benchmarks.run [--quick] [--full] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine

BENCHMARKS = ["preprocess", "png", "decode_bounds", "superres", "style", "style_gpu",
              "noun_search", "embed", "search_scale"]
# A module renders its result with markdown(result) or table(result), or format_table(result).
README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- BEGIN RESULTS -->", "<!-- END RESULTS -->"


def render(module: Any, result: dict[str, Any]) -> str:
    """The module's own rendering, under a line that says when and how the result was
    measured (unless the rendering says it itself)."""
    text = "```\n" + json.dumps(result, indent=2) + "\n```"
    for name in ("markdown", "table", "format_table"):
        if hasattr(module, name):
            text = str(getattr(module, name)(result))
            is_markdown = any(line.startswith(("|", "#")) for line in text.splitlines())
            text = text if is_markdown else f"```\n{text}\n```"
            break
    command = result.get("command")
    if not command or command in text:
        return text
    load = result.get("load_average_end")
    stamp = (f"_Measured {str(result.get('date', 'on an unrecorded date'))[:10]} by "
             f"`{command}`" + (f"; load average at the end {load[0]:.2f}" if load else "")
             + "._")
    lines = text.splitlines()
    if lines and lines[0].startswith("#"):  # under the section's heading
        return "\n".join([lines[0], "", stamp, *lines[1:]])
    return f"{stamp}\n\n{text}"


def stamp(result: dict[str, Any], name: str, quick: bool) -> dict[str, Any]:
    """``result`` with the date, command and machine load it was measured under, where
    the benchmark did not record them itself."""
    result.setdefault("date", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    result.setdefault("command", f"python -m benchmarks.run --only {name}"
                                 + (" --quick" if quick else ""))
    if hasattr(os, "getloadavg"):
        result.setdefault("load_average_end", [round(v, 2) for v in os.getloadavg()])
    return result


def fidelity_failures(result: Any, where: str = "") -> list[str]:
    """Where a result records an output under the fidelity floor (``fidelity_ok`` false:
    benchmarks/image_models.py FIDELITY_FLOOR_DB)."""
    if isinstance(result, dict):
        found = [f"{where or 'result'}: {result.get('variant', '?')} at "
                 f"{result.get('size', '?')} px, {result.get('psnr_db', float('nan')):.1f} dB"
                 ] if result.get("fidelity_ok") is False else []
        for key, value in result.items():
            found += fidelity_failures(value, f"{where}.{key}" if where else str(key))
        return found
    if isinstance(result, list):
        return [f for i, item in enumerate(result)
                for f in fidelity_failures(item, f"{where}[{i}]")]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=None)
    parser.add_argument("--full", action="store_true",
                        help="the long variants too (search_scale: 1M vectors)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite README.md from the saved results/*.json, run nothing")
    args = parser.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "quick" if args.quick else RESULTS
    out.mkdir(exist_ok=True)
    sections = []
    failures: list[str] = []
    # Every benchmark keeps its section: those not run this time are rendered from their
    # saved results (each section names its own command and machine load).
    for name in BENCHMARKS:
        run_now = not args.render_only and (args.only is None or name in args.only)
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
        except ModuleNotFoundError as error:
            if error.name == f"benchmarks.bench_{name}":
                print(f"[bench] {name}: not present yet, skipped", flush=True)
                continue
            raise
        saved = RESULTS / f"{name}.json"
        reason = getattr(module, "unavailable", lambda: None)() if run_now else None
        if reason:  # e.g. a GPU benchmark on a CPU machine: its saved result stays
            print(f"[bench] {name}: {reason}; showing its saved result", flush=True)
            run_now = False
        if not run_now:
            if not saved.is_file():
                continue
            result = json.loads(saved.read_text())
        else:
            print(f"[bench] {name} ...", flush=True)
            started = time.perf_counter()
            extra = {"full": True} if args.full and "full" in inspect.signature(
                module.run).parameters else {}
            result = stamp(module.run(quick=args.quick, **extra), name, args.quick)
            result["wall_seconds"] = round(time.perf_counter() - started, 1)
            if not args.quick and hasattr(module, "merge") and saved.is_file():
                result = module.merge(json.loads(saved.read_text()), result)
            (out / saved.name).write_text(json.dumps(result, indent=2, default=str))
            failures += [f"{name}: {f}" for f in fidelity_failures(result)]
        section = render(module, result)
        if run_now:
            print(section, flush=True)
        sections.append(section)
    for failure in failures:
        print(f"[bench] FAILED: output under the fidelity floor: {failure}", file=sys.stderr)
    status = 1 if failures else 0
    if args.quick:  # a smoke run: the README keeps the full runs' tables
        print(f"[bench] quick results in {out}; benchmarks/README.md left as it was")
        return status
    command = "make bench"
    if args.full:
        command += " ARGS=--full"
    if args.only:
        command += " (--only " + " ".join(args.only) + "; the other sections are from their "\
            "saved results)"
    header = (f"Latest run: {dt.date.today().isoformat()}, `{command}`, machine: {machine()}"
              if not args.render_only else
              f"Rendered {dt.date.today().isoformat()} from benchmarks/results/*.json; each "
              "section names its own command and machine load.")
    block = "\n\n".join([header, *sections])
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        README.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    return status


if __name__ == "__main__":
    sys.exit(main())
