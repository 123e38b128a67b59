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
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    ResultFile,
    describe_machine,
    fidelity_failures,
    machine,
    machine_shown,
)

BENCHMARKS = ["preprocess", "png", "decode_bounds", "superres", "style", "style_gpu",
              "noun_search", "embed", "search_scale", "tls", "fairness"]
# A module renders its result with markdown(result) or table(result), or format_table(result).
README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- BEGIN RESULTS -->", "<!-- END RESULTS -->"


def render(module: Any, result: dict[str, Any]) -> str:
    """The module's own rendering, under a line that says when, by which command and on
    which machine the result was measured, where the rendering does not say it itself (a
    result that records no command says so)."""
    text = "```\n" + json.dumps(result, indent=2) + "\n```"
    for name in ("markdown", "table", "format_table"):
        if hasattr(module, name):
            text = str(getattr(module, name)(result))
            is_markdown = any(line.startswith(("|", "#")) for line in text.splitlines())
            text = text if is_markdown else f"```\n{text}\n```"
            break
    command = result.get("command")
    info = result.get("machine")
    on = "" if machine_shown(text, info) else f" on {describe_machine(info)}"
    if command and command in text:
        if not on:
            return text
        stamp = f"_Machine: {describe_machine(info)}._"
    else:
        load = result.get("load_average_end")
        stamp = (f"_Measured {str(result.get('date', 'on an unrecorded date'))[:10]}"
                 + (f" by `{command}`" if command else "") + on
                 + ("" if command else "; its result records no command")
                 + (f"; load average at the end {load[0]:.2f}" if load else "") + "._")
    lines = text.splitlines()
    if lines and lines[0].startswith("#"):  # under the section's heading
        return "\n".join([lines[0], "", stamp, *lines[1:]])
    return f"{stamp}\n\n{text}"


def _latest_run_line(readme: str) -> str | None:
    """The "Latest run: ..." line of the README's results block, if it has one."""
    if BEGIN not in readme or END not in readme:
        return None
    block = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    return next((line for line in block.splitlines() if line.startswith("Latest run: ")),
                None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=None,
                        help="run these benchmarks (at least one); the other sections are "
                        "rendered from their saved results")
    parser.add_argument("--full", action="store_true",
                        help="the long variants too (search_scale: 1M vectors)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite README.md from the saved results/*.json, run nothing")
    args = parser.parse_args(argv)
    sections = []
    fidelity: list[str] = []  # outputs under the fidelity floor
    failures: list[str] = []  # measurements that failed (a benchmark's failures(result))
    # Every benchmark keeps its section: those not run this time are rendered from their
    # saved results (each section names its own command, machine and machine load).
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
            parameters = inspect.signature(module.run).parameters
            full = args.full and "full" in parameters
            target = ResultFile(name, quick=args.quick, merge=getattr(module, "merge", None),
                                results=RESULTS,
                                command=f"python -m benchmarks.run --only {name}"
                                + (" --quick" if args.quick else "")
                                + (" --full" if full else ""))
            extra: dict[str, Any] = {"full": True} if full else {}
            if "out" in parameters:  # it saves its progress itself, to where it is told
                extra["out"] = target
            result = module.run(quick=args.quick, **extra)
            result["wall_seconds"] = round(time.perf_counter() - started, 1)
            result = target.save(result)
            fidelity += [f"{name}: {f}" for f in fidelity_failures(result)]
            failures += [f"{name}: {f}" for f in getattr(module, "failures", lambda _: [])(result)]
        section = render(module, result)
        if run_now:
            print(section, flush=True)
        sections.append(section)
    for failure in fidelity:
        print(f"[bench] FAILED: output under the fidelity floor: {failure}", file=sys.stderr)
    for failure in failures:
        print(f"[bench] FAILED: {failure}", file=sys.stderr)
    status = 1 if fidelity or failures else 0
    if args.quick:  # a smoke run: the README keeps the full runs' tables
        print(f"[bench] quick results in {RESULTS / 'quick'}; benchmarks/README.md left as it "
              "was")
        return status
    command = "make bench"
    if args.full:
        command += " ARGS=--full"
    if args.only:
        command += " (--only " + " ".join(args.only) + "; the other sections are from their "\
            "saved results)"
    text = README.read_text() if README.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if args.render_only:  # the last `make bench` line stays: re-rendering ran nothing
        latest = _latest_run_line(text)
        header = "\n\n".join(filter(None, [latest, (
            f"Rendered {dt.date.today().isoformat()} from benchmarks/results/*.json; each "
            "section names its own command (or says its result records none), machine and "
            "machine load.")]))
    else:
        header = f"Latest run: {dt.date.today().isoformat()}, `{command}`, machine: {machine()}"
    block = "\n\n".join([header, *sections])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        README.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    return status


if __name__ == "__main__":
    sys.exit(main())
