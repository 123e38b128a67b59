"""Shared benchmark helpers: timing, tables, and in-process servers."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


def run_as_script(name: str, description: str | None,
                  run: Callable[[bool], dict[str, Any]],
                  markdown: Callable[[dict[str, Any]], str]) -> None:
    """``python -m benchmarks.bench_NAME [--quick]``: runs one benchmark, saves
    ``results/NAME.json`` and prints its table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    outcome = run(parser.parse_args().quick)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(outcome, indent=2))
    print(markdown(outcome))


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
def server_process(service: str, *flags: str) -> Iterator[tuple[Any, Any]]:
    """`percept serve SERVICE [FLAGS]` in a subprocess (its memory and its allocator
    settings are its own); yields (process, channel) once it is SERVING, and stops it
    afterwards."""
    import subprocess
    import sys

    from services import client

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", service,
                                "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                                "0", "--log-format", "text", "--log-level", "warning",
                                *flags],
                               cwd=REPO_ROOT, env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
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
