"""percept's Grafana dashboard, built from the panel list below into
deploy/k8s/components/dashboard/percept.json (which the component ships as a ConfigMap
that Grafana's dashboard sidecar loads).

    python -m deploy.dashboard           # writes percept.json
    python -m deploy.dashboard --check   # exit 1 when percept.json is not what this builds

Every query reads the metrics of services/common/metrics.py and services/search, for the
pods of the namespaces picked in the `namespace` variable, with the `namespace` and `pod`
labels a PodMonitor scrape adds (deploy/k8s/components/podmonitor). The rates of calls,
failures, busy answers and drops keep only what is above 0: a server makes the series of
every method, status, queue and reason at 0 from its start (so that rate() counts the
first), and a panel would list them all.
tests/deploy/test_deploy_dashboard.py checks each query against those metrics, with
promtool, and in a real Prometheus scraping a real server.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from deploy.render import K8S_DIR

COMPONENT = K8S_DIR / "components" / "dashboard"
DASHBOARD_JSON = COMPONENT / "percept.json"
#: the dashboard's uid: its address in Grafana (/d/percept), kept across edits
UID = "percept"
#: the grid is 24 units wide; a panel is half of it, a row's header one unit high
WIDTH, HEIGHT = 12, 8
#: the pods of the picked namespaces (the `namespace` variable, any number of them)
NS = 'namespace=~"$namespace"'
RATE = "[$__rate_interval]"
#: the model services' calls: not health checks, reflection or ServerInfo
MODEL_SERVICES = 'grpc_service=~"percept.v1.*", grpc_service!="percept.v1.ServerInfo"'


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """A time series (or, with kind "table", the latest values as a table)."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    stacked: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def _q(expr: str, legend: str) -> tuple[Query, ...]:
    return (Query(expr, legend),)


def _latency(quantile: str) -> Query:
    return Query(
        f"histogram_quantile({quantile}, sum by (grpc_method, le) ("
        f"rate(percept_request_seconds_bucket{{{NS}, {MODEL_SERVICES}}}{RATE})))",
        f"{{{{grpc_method}}}} p{quantile[2:].ljust(2, '0')}")


ROWS: tuple[Row, ...] = (
    Row("Calls", (
        Panel("Calls per second",
              "Finished calls of the model services, by method (health checks and "
              "ServerInfo left out).",
              _q(f"sum by (grpc_method) (rate(percept_requests_total{{{NS}, {MODEL_SERVICES}}}"
                 f"{RATE})) > 0", "{{grpc_method}}"),
              unit="reqps", stacked=True),
        Panel("Failed calls per second, by status",
              "Calls that did not end OK, by gRPC status: INVALID_ARGUMENT and NOT_FOUND "
              "are bad input, RESOURCE_EXHAUSTED busy answers, DEADLINE_EXCEEDED calls out "
              "of time, INTERNAL faults of the server (its log has each call's request id).",
              _q(f"sum by (grpc_code) (rate(percept_requests_total{{{NS}, "
                 f"grpc_code!=\"OK\"}}{RATE})) > 0", "{{grpc_code}}"),
              unit="reqps", stacked=True),
        Panel("Latency by method (p50, p99)",
              "Time from a call's arrival to its answer, queueing included.",
              (_latency("0.5"), _latency("0.99")), unit="s"),
        Panel("Calls in progress, by pod",
              "Calls of the model services being handled (reading, queued, computing or "
              "answering): the load a prometheus-adapter HPA rule scales on.",
              _q(f"sum by (pod) (percept_inflight_requests{{{NS}, {MODEL_SERVICES}}})",
                 "{{pod}}")),
    )),
    Row("Capacity", (
        Panel("Busy answers per second, by queue",
              "Requests refused because a queue, the pixel budget (--max-inflight-mpixels) "
              "or the process's --max-concurrent-rpcs (queue server-calls) was full, or "
              "the client held its share of that while others called (queue "
              "client-share, --fair-share); clients retry them after the pushback.",
              _q(f"sum by (queue) (rate(percept_rejected_total{{{NS}}}{RATE})) > 0",
                 "{{queue}}"),
              unit="reqps", stacked=True),
        Panel("Dropped before compute, per second",
              "Requests whose deadline passed (deadline) or whose client hung up "
              "(cancelled) while they waited in a queue: no compute was spent on them.",
              _q(f"sum by (queue, reason) (rate(percept_dropped_total{{{NS}}}{RATE})) > 0",
                 "{{queue}} {{reason}}"),
              unit="reqps", stacked=True),
        Panel("Queue depth, by pod and queue",
              "Work items waiting or running: tiles for the image models (one large image "
              "counts many), images or texts for embed.",
              _q(f"sum by (pod, queue) (percept_queue_depth{{{NS}}})", "{{pod}} {{queue}}")),
        Panel("Request slots in use, by pod and queue",
              "Requests held against --max-queue (--max-optimisations for "
              "StylizeWithImage); a queue at its limit answers busy.",
              _q(f"sum by (pod, queue) (percept_request_slots_in_use{{{NS}}})",
                 "{{pod}} {{queue}}")),
        Panel("Pixels in flight, by pod",
              "Input plus output pixels of the image requests held, against "
              "--max-inflight-mpixels.",
              _q(f"sum by (pod) (percept_inflight_pixels{{{NS}}})", "{{pod}}")),
        Panel("Mean batch size, by queue",
              "Items per micro-batch: above 1 when concurrent requests share the model's "
              "forward passes (--max-batch, --max-wait-ms).",
              _q(f"sum by (queue) (rate(percept_batch_size_sum{{{NS}}}{RATE})) / "
                 f"(sum by (queue) (rate(percept_batch_size_count{{{NS}}}{RATE})) > 0)",
                 "{{queue}}")),
        Panel("Model busy, by pod and queue",
              "The share of the time each model queue ran a batch (wall time, counted as "
              "each batch ends). Near 100 %, its batches run back to back and calls wait "
              "for the model: scale out, or batch more. The queues of one pod (style: one "
              "per style; embed: images and texts) share its device, so read their sum; "
              "a Gatys run (style-optimise) shows as one spike when it ends.",
              _q(f"sum by (pod, queue) (rate(percept_batch_seconds_sum{{{NS}}}{RATE}))",
                 "{{pod}} {{queue}}"),
              unit="percentunit"),
    )),
    Row("Health", (
        Panel("Stalled queues and search pods that cannot embed",
              "Queues whose running batch has passed --stall-seconds (a hung model or "
              "GPU), and search pods refusing the calls that embed (embed unreachable, or "
              "in another space than the index): both should stay at 0.",
              (Query(f"sum(percept_queue_stalled{{{NS}}}) or vector(0)", "stalled queues"),
               Query(f"count(percept_search_embedding_served{{{NS}}} == 0) or vector(0)",
                     "search pods that cannot embed"),
               Query(f"sum(increase(percept_search_space_refusals_total{{{NS}}}{RATE})) "
                     "or vector(0)", "embeddings refused: another space")),
              ),
        Panel("Images in the search index",
              "Images in each search pod's FAISS index.",
              _q(f"sum by (pod) (percept_search_index_images{{{NS}}})", "{{pod}}")),
        Panel("TLS certificates: days left",
              "Days until each TLS certificate in use expires (with --tls-cert, "
              "--embed-tls-cert); cert-manager renews at a third of its life left.",
              _q(f"(percept_tls_certificate_expiry_timestamp_seconds{{{NS}}} - time()) "
                 "/ 86400", "{{pod}} {{certificate}}"),
              unit="none"),
    )),
    Row("Versions", (
        Panel("percept build, by pod",
              "The release and commit each pod runs: more than one for long is a stuck "
              "rollout.",
              _q(f"max by (namespace, pod, version, revision) (percept_build_info{{{NS}}})",
                 ""),
              kind="table"),
        Panel("Models, by pod",
              "Each model each pod serves, with its artifact version and whether it is "
              "the service's default.",
              _q(f"max by (namespace, pod, grpc_service, model, version, default) "
                 f"(percept_model_info{{{NS}}})", ""),
              kind="table"),
    )),
)


def queries() -> list[tuple[str, Query]]:
    """Every query of the dashboard, with its panel's title."""
    return [(panel.title, query) for row in ROWS for panel in row.panels
            for query in panel.queries]


def _datasource() -> dict[str, str]:
    return {"type": "prometheus", "uid": "${datasource}"}


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = []
    for ref, query in zip("ABCDEFGH", panel.queries, strict=False):
        target: dict[str, Any] = {"datasource": _datasource(), "expr": query.expr,
                                  "legendFormat": query.legend, "refId": ref}
        if panel.kind == "table":
            target.update(instant=True, range=False, format="table")
        targets.append(target)
    built: dict[str, Any] = {
        "id": panel_id, "type": panel.kind, "title": panel.title,
        "description": panel.description, "datasource": _datasource(),
        "gridPos": {"h": HEIGHT, "w": WIDTH, "x": x, "y": y}, "targets": targets,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "timeseries":
        built["fieldConfig"]["defaults"]["custom"] = {
            "stacking": {"mode": "normal" if panel.stacked else "none"},
            "fillOpacity": 20 if panel.stacked else 0}
        built["options"] = {"legend": {"displayMode": "table", "placement": "right"},
                            "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        built["transformations"] = [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True}}}]
    return built


def build() -> dict[str, Any]:
    """The dashboard's JSON model (Grafana 10 and later)."""
    panels: list[dict[str, Any]] = []
    y = 0
    panel_id = 1
    for row in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id += 1
        y += 1
        for i, panel in enumerate(row.panels):
            panels.append(_panel(panel, panel_id, (i % 2) * WIDTH, y + (i // 2) * HEIGHT))
            panel_id += 1
        y += -(-len(row.panels) // 2) * HEIGHT
    return {
        "uid": UID, "title": "percept", "tags": ["percept"], "editable": True,
        "schemaVersion": 39, "version": 1, "timezone": "browser", "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "description": "percept's gRPC model services: calls, capacity, health and versions "
                       "(generated by deploy/dashboard.py)",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            {"name": "namespace", "label": "Namespace", "type": "query",
             "datasource": _datasource(),
             "query": {"query": "label_values(percept_build_info, namespace)",
                       "refId": "namespaces"},
             "definition": "label_values(percept_build_info, namespace)",
             "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
             "current": {"text": "percept", "value": ["percept"]}, "sort": 1, "hide": 0},
        ]},
        "panels": panels,
        "annotations": {"list": []},
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.dashboard",
                                     description="Build percept's Grafana dashboard.")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if {DASHBOARD_JSON.name} is not what this builds")
    args = parser.parse_args(argv)
    text = render()
    where = DASHBOARD_JSON.relative_to(K8S_DIR.parent.parent)
    if args.check:
        if not DASHBOARD_JSON.is_file() or DASHBOARD_JSON.read_text() != text:
            print(f"{where} is stale: run python -m deploy.dashboard", file=sys.stderr)
            return 1
        print(f"{where} is current")
        return 0
    DASHBOARD_JSON.write_text(text)
    print(f"wrote {where}: {sum(len(r.panels) for r in ROWS)} panels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
