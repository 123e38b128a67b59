"""`percept run` / `make run`: the local cluster, one process per service on its own port,
with the demo, serving until Ctrl-C."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from services import client
from services.common.config import SERVICE_PORTS, SERVICES
from services.common.tls import ClientTls
from training.assets import REPO_ROOT

#: The local cluster's servers speak plaintext on loopback, whatever PERCEPT_TLS_* say.
PLAINTEXT = ClientTls()


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def service_command(name: str, search_dir: Path) -> list[str]:
    """`percept serve NAME` as the local cluster runs it: on loopback, with text logs;
    search with the embed service of the cluster and its index in ``search_dir``."""
    extra = ["--embed-target", f"localhost:{SERVICE_PORTS['embed']}",
             "--data-dir", str(search_dir)] if name == "search" else []
    return [sys.executable, "-m", "services.cli", "serve", name, "--host", "127.0.0.1",
            "--log-format", "text", *extra]


def start_services(log_dir: Path, search_dir: Path) -> dict[str, subprocess.Popen[bytes]]:
    """Starts `percept serve NAME` for every service; logs go to ``log_dir/NAME.log``. The
    search index lives in ``search_dir``, apart from `percept serve search`'s own default
    (data/search): the demo's samples must not land in a collection the user indexed."""
    busy = [f"{name} ({SERVICE_PORTS[name]})" for name in SERVICES
            if _port_in_use(SERVICE_PORTS[name])]
    if busy:
        raise RuntimeError(f"ports in use: {', '.join(busy)}; is a cluster already running?")
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = {}
    for name in SERVICES:
        with (log_dir / f"{name}.log").open("wb") as log:
            processes[name] = subprocess.Popen(
                service_command(name, search_dir),
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    return processes


def wait_until_serving(processes: dict[str, subprocess.Popen[bytes]], log_dir: Path,
                       timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    pending = set(processes)
    while pending:
        for name in sorted(pending):
            if processes[name].poll() is not None:
                log = (log_dir / f"{name}.log").read_text()[-2000:]
                raise RuntimeError(f"{name} exited with {processes[name].returncode}:\n{log}")
            try:
                target = f"localhost:{SERVICE_PORTS[name]}"
                if client.health_status(client.connect(target, PLAINTEXT), timeout=1) == "SERVING":
                    print(f"  {name:9s} SERVING on {target} "
                          f"(metrics :{SERVICE_PORTS[name] + 9100 - 50050})", flush=True)
                    pending.discard(name)
            except grpc.RpcError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"not SERVING after {timeout:.0f} s: {', '.join(sorted(pending))}")
        time.sleep(0.3)


def stop_services(processes: dict[str, subprocess.Popen[bytes]], grace: float = 30) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes.values():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()


def run_local_cluster(out_dir: Path, demo: bool = True, keep_serving: bool = True) -> int:
    log_dir = out_dir / "logs"
    print(f"starting {', '.join(SERVICES)} (logs in {log_dir}/)", flush=True)
    try:
        processes = start_services(log_dir, out_dir / "search")
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        wait_until_serving(processes, log_dir)
        code = 0
        if demo:
            from services.demo import run_demo

            report = run_demo(out_dir, {n: f"localhost:{SERVICE_PORTS[n]}" for n in SERVICES},
                              tls=PLAINTEXT)
            code = 1 if report.failures else 0
        if keep_serving:
            print("serving; try `percept stylize IN OUT --style-image S`. Ctrl-C stops.",
                  flush=True)
            signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
            while all(p.poll() is None for p in processes.values()):
                time.sleep(0.5)
            print("a service exited; stopping the cluster", file=sys.stderr)
            code = 1
        return code
    except KeyboardInterrupt:
        print("\nstopping (draining in-flight requests)", flush=True)
        return 0
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        stop_services(processes)
