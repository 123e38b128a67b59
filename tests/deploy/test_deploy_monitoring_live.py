"""The alerts and the dashboard in a real Prometheus that scrapes a real superres server
under a steady load of good and bad calls: every rule evaluates without error, none fires
on that healthy server, and every dashboard query runs, with data wherever the server has
some."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from deploy import alerts, dashboard, dashboard_preview
from deploy.render import REPO_ROOT
from percept.v1 import superres_pb2, superres_pb2_grpc
from services import client
from tests.conftest import encode, free_port
from tests.deploy.prometheus_tools import Prometheus, prometheus, stop_process
from tests.deploy.test_deploy_dashboard import concrete

# one Prometheus and one server for the module, in one xdist worker (make test runs
# --dist loadgroup), not one per worker that gets a test of it
pytestmark = pytest.mark.xdist_group("prometheus")

#: dashboard panels a superres server under this load leaves empty, and why
EMPTY_HERE = {
    "Busy answers per second, by queue": "nothing is refused busy at this load (and the "
                                         "panel keeps rates above 0)",
    "Dropped before compute, per second": "no call runs out of time or is cancelled",
    "Images in the search index": "only search pods export it",
    "TLS certificates: days left": "the server runs without TLS",
}
#: answers of the load other than those it expects
UNEXPECTED: list[str] = []


def _load(target: str, stop: threading.Event, unexpected: list[str]) -> None:
    """Upscales of a 24 px image, and an undecodable one every fifth call; what else than
    OK and INVALID_ARGUMENT (for those) comes back goes to ``unexpected``."""
    image = encode(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    with grpc.insecure_channel(target) as channel:
        stub = superres_pb2_grpc.SuperResolutionStub(channel)
        sent = 0
        while not stop.is_set():
            data = b"not an image" if sent % 5 == 4 else image
            try:
                stub.Upscale(superres_pb2.UpscaleRequest(image=data), timeout=30)
                if data != image:
                    unexpected.append(f"call {sent}: an undecodable image answered OK")
            except grpc.RpcError as error:
                if data == image or error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    unexpected.append(f"call {sent}: {error.code().name} {error.details()}")
            sent += 1
            stop.wait(0.05)


def _value(prom: Prometheus, expr: str) -> float:
    answer = prom.query(expr)
    assert answer["status"] == "success", answer
    result = answer["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


@contextmanager
def _superres_process(workdir: Path) -> Iterator[tuple[str, int]]:
    """`percept serve superres` in a process of its own, as in a pod: this test process
    may have imported the search service, whose metrics a server here would export.
    Yields its gRPC target and metrics port once it is SERVING."""
    port, metrics_port = free_port(), free_port()
    log = workdir / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", "superres", "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", str(metrics_port), "--device", "cpu",
             "--log-format", "text"],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    target = f"127.0.0.1:{port}"
    try:
        channel = client.connect(target)
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(grpc.RpcError):
                if client.health_status(channel, timeout=1) == "SERVING":
                    break
            assert time.monotonic() < deadline, "never SERVING: " + log.read_text()[-3000:]
            time.sleep(0.2)
        channel.close()
        yield target, metrics_port
    finally:
        stop_process(process, 60)


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """Prometheus with percept's rules, after it has scraped the loaded server for a while
    (the `namespace` and `pod` labels set as a PodMonitor sets them)."""
    workdir = Path(tmp_path_factory.mktemp("prometheus"))
    rules = workdir / "rules.yaml"
    rules.write_text(alerts.rule_file_text())
    stop = threading.Event()
    with _superres_process(workdir) as (target, metrics_port):
        load = threading.Thread(target=_load, args=(target, stop, UNEXPECTED), daemon=True)
        try:
            with prometheus(workdir, free_port(), metrics_port, rules,
                            labels={"namespace": "percept", "pod": "superres-0"}) as prom:
                load.start()
                deadline = time.monotonic() + 120
                # rates need two scrapes that both saw calls; then a few more evaluations
                while _value(prom,
                             'sum(rate(percept_requests_total{grpc_code="OK"}[1m]))') <= 0:
                    assert time.monotonic() < deadline, prom.log.read_text()[-2000:]
                    time.sleep(0.5)
                time.sleep(3)
                yield prom
        finally:
            stop.set()
            if load.is_alive():
                load.join(30)


def test_every_rule_evaluates_without_error(scraped: Prometheus) -> None:
    groups = scraped.api("rules")["data"]["groups"]
    evaluated = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert sorted(evaluated) == sorted(alerts.alert_names())
    for name, rule in evaluated.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
        assert not rule["lastEvaluation"].startswith("0001-"), f"{name} never evaluated"


def test_no_alert_fires_or_pends_on_a_healthy_server(scraped: Prometheus) -> None:
    """A fifth of the calls are bad input (INVALID_ARGUMENT): the client's fault."""
    assert UNEXPECTED == []
    assert _value(scraped, 'sum(rate(percept_requests_total{grpc_code="INVALID_ARGUMENT"}'
                           '[1m]))') > 0
    assert scraped.api("alerts")["data"]["alerts"] == []


def _series(answer: dict[str, Any]) -> list[float]:
    return [float(r["value"][1]) for r in answer["data"]["result"]]


@pytest.mark.parametrize(("title", "query"), dashboard.queries(),
                         ids=[f"{t}/{q.legend}" for t, q in dashboard.queries()])
def test_each_dashboard_query_runs_with_data_where_there_is_some(
        scraped: Prometheus, title: str, query: dashboard.Query) -> None:
    answer = scraped.query(concrete(query.expr))
    assert answer["status"] == "success", answer
    values = _series(answer)
    if title in EMPTY_HERE:
        assert values == [], f"{title}: {EMPTY_HERE[title]}, yet {values}"
        return
    assert values, f"{title}: no data"
    assert all(math.isfinite(v) for v in values), f"{title}: {values}"


def test_the_preview_draws_every_panel_from_prometheus(scraped: Prometheus,
                                                       tmp_path: Path) -> None:
    """deploy/dashboard_preview.py's drawing, over the last half minute of this run."""
    out = tmp_path / "dashboard.png"
    end = time.time()
    dashboard_preview.draw(scraped.url, end - 30, end, out, namespace="percept")
    with Image.open(out) as image:
        image.load()
        width, height = image.size
    panels = sum(len(row.panels) for row in dashboard.ROWS)
    assert width >= 900 and height >= 100 * panels


@pytest.mark.parametrize(("args", "message"), [
    (["--seconds", "5"], "--seconds must be at least 10"),
    (["--out", "dashboard.jpg"], "--out must be a .png file"),
])
def test_the_preview_refuses_bad_options(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "deploy.dashboard_preview", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_another_namespace_shows_nothing(scraped: Prometheus) -> None:
    """The namespace variable keeps each query to the picked namespaces."""
    title, query = dashboard.queries()[0]
    assert _series(scraped.query(concrete(query.expr, namespace="elsewhere"))) == []
    assert _series(scraped.query(concrete(query.expr))), title
