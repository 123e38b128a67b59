"""What the alert and dashboard tests share: the metrics percept's servers define, a check of
a PromQL expression's metric and label names against them, promtool, and a real Prometheus
server (deploy/local_prometheus.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from deploy.local_prometheus import Prometheus, prometheus, stop_process

__all__ = ["Prometheus", "prometheus", "stop_process"]

#: labels a Prometheus scrape adds to every series (the PodMonitor's, and its own)
SCRAPE_LABELS = frozenset({"namespace", "pod", "container", "endpoint", "instance", "job",
                           "service"})


def percept_metrics() -> dict[str, frozenset[str]]:
    """Each sample name percept's servers export (``percept_requests_total``,
    ``percept_request_seconds_bucket`` ...) -> its label names, from the metric objects
    the servers' modules define (the search service's too)."""
    import services.common.metrics
    import services.search.embedder
    import services.search.service

    names: dict[str, frozenset[str]] = {}
    for module in (services.common.metrics, services.search.service, services.search.embedder):
        for metric in vars(module).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            name, labels = metric._name, frozenset(metric._labelnames)
            suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                        "histogram": ("_bucket", "_sum", "_count", "_created")}[str(metric._type)]
            for suffix in suffixes:
                names[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


_METRIC = re.compile(r"\b(percept_[a-z_]+)\b(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_TEMPLATE_LABEL = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def expression_problems(expr: str) -> list[str]:
    """What in ``expr`` is not among percept's metrics: a ``percept_*`` name no server
    exports, a label matcher or a grouping label that none of the expression's metrics has
    (nor a scrape). Empty when it reads only what the servers export."""
    metrics = percept_metrics()
    problems = []
    used: set[str] = set()
    for name, selector in _METRIC.findall(expr):
        if name not in metrics:
            problems.append(f"{name}: no percept server exports it")
            continue
        used |= metrics[name]
        for label in _MATCHER.findall(selector or ""):
            if label not in metrics[name] | SCRAPE_LABELS:
                problems.append(f"{name}: has no label {label!r} (it has "
                                f"{', '.join(sorted(metrics[name])) or 'none'})")
    if not _METRIC.search(expr):
        problems.append("reads no percept metric")
    for clause, labels in _GROUPING.findall(expr):
        for label in _names(labels):
            if label not in used | SCRAPE_LABELS:
                problems.append(f"{clause} ({label}): no metric of the expression has it")
    return problems


def output_labels(expr: str) -> frozenset[str]:
    """The labels of an expression's result: its outermost (first) ``by`` grouping's, else
    every label of its metrics and of the scrape. Enough for percept's alert expressions,
    which aggregate at most with one outer ``by``."""
    grouping = _GROUPING.search(expr)
    if grouping and grouping.group(1) == "by":
        return frozenset(_names(grouping.group(2)))
    metrics = percept_metrics()
    labels: set[str] = set(SCRAPE_LABELS)
    for name, _ in _METRIC.findall(expr):
        labels |= metrics.get(name, frozenset())
    return frozenset(labels)


def template_labels(text: str) -> list[str]:
    """The labels a rule's annotation template reads (``{{ $labels.pod }}``)."""
    return _TEMPLATE_LABEL.findall(text)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    assert found, "promtool not found: run `make setup` (Debian's prometheus package)"
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, check=False)
