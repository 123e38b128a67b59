"""A real Prometheus server on loopback (Debian's `prometheus` package, which
scripts/setup.sh installs), scraping one percept server: what the dashboard preview draws
from and what the alert and dashboard tests evaluate in."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class Prometheus:
    """A running Prometheus server and its HTTP API."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}",
                                        timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as error:  # a bad query: 400 with the error in JSON
            body = json.load(error)
        return body

    def query(self, expr: str) -> Any:
        """The instant query's answer: {"status": "success", "data": ...} or an error."""
        return self.api("query", query=expr)


@contextmanager
def prometheus(workdir: Path, port: int, scrape_port: int, rules: Path | None = None,
               labels: dict[str, str] | None = None, scrape_seconds: int = 1
               ) -> Iterator[Prometheus]:
    """A real Prometheus on 127.0.0.1:``port`` that scrapes 127.0.0.1:``scrape_port``
    /metrics every ``scrape_seconds`` (with ``labels``, as a PodMonitor adds namespace and
    pod) and evaluates ``rules`` as often. RuntimeError when it is missing, exits or is
    not ready within a minute."""
    binary = shutil.which("prometheus")
    if not binary:
        raise RuntimeError("prometheus not found: run `make setup` (Debian's prometheus "
                           "package)")
    every = f"{scrape_seconds}s"
    config = {
        "global": {"scrape_interval": every, "evaluation_interval": every},
        "rule_files": [str(rules)] if rules else [],
        "scrape_configs": [{
            "job_name": "percept",
            "static_configs": [{"targets": [f"127.0.0.1:{scrape_port}"],
                                "labels": labels or {}}],
        }],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready in 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield server
    finally:
        stop_process(process, 20)


def stop_process(process: subprocess.Popen[bytes], seconds: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``seconds``."""
    process.terminate()
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
