"""Shared benchmark helpers: timing, tables, and in-process servers."""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from services.common.config import ServerConfig
from services.common.device import dtype_name
from services.common.server import RunningServer, start_in_thread
from training.assets import REPO_ROOT

RESULTS = Path(__file__).resolve().parent / "results"


def stamp(result: dict[str, Any], command: str) -> dict[str, Any]:
    """``result`` with the date, command, machine and machine load it was measured under,
    where the benchmark did not record them itself (a machine record without the CPU model
    gets it: the result is saved on the machine that measured it)."""
    result.setdefault("date", dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
    result.setdefault("command", command)
    info = machine()
    recorded = result.setdefault("machine", info)
    if isinstance(recorded, dict) and not recorded.get("cpu"):
        recorded["cpu"] = info["cpu"]
    if hasattr(os, "getloadavg"):
        result.setdefault("load_average_end", [round(v, 2) for v in os.getloadavg()])
    return result


Merge = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


class ResultFile:
    """Where and how one benchmark's result is saved: the one way every entry point
    (``benchmarks.run`` and each ``python -m benchmarks.bench_NAME``) saves a result.

    A quick run goes to ``results/quick/NAME.json`` and leaves the saved results alone. A
    full run goes to ``results/NAME.json`` (or ``out``), merged with what was saved there
    by the benchmark's ``merge(saved, new)`` where it has one (what an earlier run measured
    and this one did not: the search scale's 1M rows, the GPU run's companions). Every
    result is stamped with its date, machine, command and load (:func:`stamp`). The saved
    result is read once, here, so that saving a run's progress repeatedly merges each time
    with what was there before the run."""

    def __init__(self, name: str, *, quick: bool, command: str, merge: Merge | None = None,
                 out: Path | str | None = None, results: Path | None = None) -> None:
        folder = RESULTS if results is None else results
        self.path = Path(out) if out else (folder / "quick" if quick else folder) / f"{name}.json"
        self.quick, self.command, self.merge = quick, command, merge
        self.saved: dict[str, Any] | None = None
        if not quick and merge is not None and self.path.is_file():
            self.saved = json.loads(self.path.read_text())

    def save(self, result: dict[str, Any]) -> dict[str, Any]:
        """Writes ``result`` (stamped, merged) and returns what was written."""
        written = stamp(copy.deepcopy(result), self.command)  # the caller's stays as it is
        if self.saved is not None and self.merge is not None:
            written = self.merge(copy.deepcopy(self.saved), written)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(written, indent=2, default=str) + "\n")
        partial.replace(self.path)  # a run killed while writing leaves the old file whole
        return written


def script_command(module: str, argv: Sequence[str]) -> str:
    """The command line of ``python -m MODULE ARGV...``."""
    return shlex.join(["python", "-m", module, *argv])


def fidelity_failures(result: Any, where: str = "") -> list[str]:
    """Where a result records an output under the fidelity floor (``fidelity_ok`` false:
    benchmarks/image_models.py FIDELITY_FLOOR_DB)."""
    if isinstance(result, dict):
        found = [f"{where or 'result'}: {result.get('variant', '?')} at "
                 f"{result.get('size', '?')} px, {result.get('psnr_db', float('nan')):.1f} dB"
                 ] if result.get("fidelity_ok") is False else []
        for key, value in result.items():
            if key == "companions":  # earlier runs' results, kept beside this one
                continue
            found += fidelity_failures(value, f"{where}.{key}" if where else str(key))
        return found
    if isinstance(result, list):
        return [f for i, item in enumerate(result)
                for f in fidelity_failures(item, f"{where}[{i}]")]
    return []


def run_as_script(name: str, description: str | None,
                  run: Callable[[bool], dict[str, Any]],
                  markdown: Callable[[dict[str, Any]], str],
                  argv: Sequence[str] | None = None,
                  merge: Merge | None = None) -> int:
    """``python -m benchmarks.bench_NAME [--quick]``: runs one benchmark, saves it through
    :class:`ResultFile` (``--quick``: ``results/quick/NAME.json``) and prints its table.
    Returns 1 where an output is under the fidelity floor (as ``make bench`` does)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    args = list(sys.argv[1:] if argv is None else argv)
    quick = parser.parse_args(args).quick
    started = time.perf_counter()
    outcome = run(quick)
    outcome["wall_seconds"] = round(time.perf_counter() - started, 1)
    target = ResultFile(name, quick=quick, merge=merge,
                        command=script_command(f"benchmarks.bench_{name}", args))
    outcome = target.save(outcome)
    print(markdown(outcome))
    print(f"[bench] saved {target.path}", flush=True)
    failures = fidelity_failures(outcome)
    for failure in failures:
        print(f"[bench] FAILED: output under the fidelity floor: {name}: {failure}",
              file=sys.stderr)
    return 1 if failures else 0


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            # what --cpu-dtype auto serves image models in on this CPU
                            "cpu_serving_dtype": dtype_name(torch.device("cpu"))}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_machine(info: Any) -> str:
    """A result's machine record in words: CPU model, cores, GPU (the CPU model, or where
    that is not recorded the platform, so that no section borrows another's machine)."""
    if not isinstance(info, dict) or not info:
        return "a machine its result does not record"
    cpu = info.get("cpu") or info.get("processor")
    parts = [str(cpu) if cpu else "a CPU whose model its result does not record"]
    cores = info.get("cores") or info.get("cpus")
    if cores:
        parts.append(f"{cores} cores")
    if info.get("gpu"):
        parts.append(str(info["gpu"]))
    if not cpu and info.get("platform"):
        parts.append(str(info["platform"]))
    return ", ".join(parts)


def machine_shown(text: str, info: Any) -> bool:
    """Whether ``text`` names the machine of ``info`` (its CPU model or its GPU)."""
    if not isinstance(info, dict):
        return False
    names = (info.get(key) for key in ("cpu", "processor", "gpu"))
    return any(isinstance(name, str) and name and name in text for name in names)


def median_seconds(action: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved_medians(actions: Mapping[str, Callable[[], object]], repeats: int,
                        warmup: int = 1, settle_s: float = 0.0) -> dict[str, float]:
    """Times several variants round-robin, so load drifts hit all of them alike.
    ``settle_s``: an untimed pause before each action, so that what the previous one left
    running (OpenMP workers spin-wait for a few ms after a parallel region, in whichever
    process ran it) does not share the cores with the next."""
    for action in actions.values():
        for _ in range(warmup):
            action()
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(repeats):
        for name, action in actions.items():
            time.sleep(settle_s)
            started = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


#: Rounds of the batching comparison: each variant's burst runs this often, the variants
#: alternating (A B, B A, A B), so a change in the machine's load reaches both.
BURST_ROUNDS = 3


def alternated_bursts(calls: Mapping[str, Callable[[int], object]], requests: int,
                      rounds: int = BURST_ROUNDS, concurrency: int = 16
                      ) -> dict[str, dict[str, Any]]:
    """Throughput of each variant's burst of ``requests`` calls, ``concurrency`` in
    flight, in ``rounds`` rounds that alternate the order. Per variant: the median rate
    (calls/s), each round's rate, and the median of its per-round ratio to the first
    variant (the baseline)."""
    rates: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    with ThreadPoolExecutor(concurrency) as pool:
        for round_index in range(rounds):
            for name in names if round_index % 2 == 0 else names[::-1]:
                started = time.perf_counter()
                list(pool.map(calls[name], range(requests)))
                rates[name].append(requests / (time.perf_counter() - started))
    baseline = rates[names[0]]
    return {name: {"per_s": statistics.median(values), "rounds": values,
                   "x": statistics.median(v / b for v, b in zip(values, baseline, strict=True))}
            for name, values in rates.items()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@contextmanager
def served(service: str, **overrides: Any) -> Iterator[RunningServer]:
    """An in-process server on a free loopback port."""
    values: dict[str, Any] = dict(service=service, host="127.0.0.1", port=0, metrics_port=0,
                                  log_format="text", log_level="warning",
                                  models_dir=REPO_ROOT / "models")
    values.update(overrides)
    running = start_in_thread(ServerConfig(**values), timeout=900)
    try:
        yield running
    finally:
        running.stop()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(service: str, *flags: str, host: str = "127.0.0.1"
                   ) -> Iterator[tuple[Any, Any]]:
    """`percept serve SERVICE [FLAGS]` in a subprocess (its memory and its allocator
    settings are its own), listening on ``host``; yields (process, channel) once it is
    SERVING (the channel dials 127.0.0.1: ``host`` must take IPv4), and stops it
    afterwards. ``process.percept_port`` is its gRPC port."""
    import subprocess
    import sys

    from services import client

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", service,
                                "--host", host, "--port", str(port), "--metrics-port",
                                "0", "--log-format", "text", "--log-level", "warning",
                                *flags],
                               cwd=REPO_ROOT, env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    process.percept_port = port  # type: ignore[attr-defined]
    try:
        channel = client.connect(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"`percept serve {service}` exited with {process.returncode} "
                                   "before it was SERVING")
            try:
                if client.health_status(channel, timeout=1) == "SERVING":
                    break
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)  # NOT_SERVING (warming up) or not listening: ask again soon
        else:
            raise RuntimeError(f"{service} never became SERVING")
        yield process, channel
    finally:
        process.terminate()
        process.wait(60)


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")
