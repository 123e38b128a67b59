"""Monitoring through the Prometheus Operator and Grafana.

- Scraping: each PodMonitor a target renders (deploy/k8s/components/podmonitor) against
  the pods it selects, the target's own or those of the overlay a component is added to
  (its companion), and the NetworkPolicies in front of them. Part of the `ports` policy.
- Alerting: each PrometheusRule (deploy/k8s/components/alerts) routes and explains its
  alerts: the `alerts` policy.
- Dashboards: each ConfigMap labelled for Grafana's dashboard sidecar
  (deploy/k8s/components/dashboard) lives in the monitoring namespace and holds dashboards
  that Grafana can load and whose panels all query something: the `dashboards` policy.
  `check_object_namespaces` is the `namespace` policy with those ConfigMaps left to it.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from typing import Any

from deploy.crds import duration_seconds
from deploy.objects import Resource
from deploy.policy.model import (
    MONITORING_NAMESPACE,
    SERVICES,
    WORKLOAD_KINDS,
    Bundle,
    app_name,
    named_ports,
    pod_labels,
    pod_template,
    selector_is_empty,
    selector_matches,
    server_container,
)
from deploy.policy.network import Peer, ingress_allowed
from deploy.policy.services import check_namespace

#: the path the servers serve their metrics on (and Prometheus' default)
METRICS_PATH = "/metrics"
#: the `severity` label values Alertmanager's routes know (deploy/README.md, section 5)
SEVERITIES = ("critical", "warning", "info")
#: the annotations every alert carries for whoever it pages
ALERT_ANNOTATIONS = ("summary", "description")
#: the ConfigMap label that kube-prometheus-stack's Grafana sidecar loads dashboards from
DASHBOARD_LABEL = "grafana_dashboard"
#: what each dashboard of such a ConfigMap must have, non-empty
DASHBOARD_FIELDS = ("uid", "title", "panels")


def _pod_ports(res: Resource) -> dict[str, int]:
    """The named container ports of a workload's pods."""
    ports: dict[str, int] = {}
    for c in pod_template(res).spec.containers or []:
        ports.update(named_ports(c))
    return ports


def _durations(where: str, endpoint: Any) -> list[str]:
    """An endpoint's interval and scrapeTimeout are set, and the timeout fits the interval
    (the operator rejects a PodMonitor whose timeout is longer)."""
    failures = []
    seconds = {}
    for attr, name in (("interval", "interval"), ("scrape_timeout", "scrapeTimeout")):
        raw = getattr(endpoint, attr)
        value = duration_seconds(raw) if isinstance(raw, str) else None
        if not value:
            failures.append(f"{where}: {name} is {raw!r}, want a duration such as 30s")
        seconds[name] = value
    interval, timeout = seconds["interval"], seconds["scrapeTimeout"]
    if interval and timeout and timeout > interval:
        failures.append(
            f"{where}: scrapeTimeout {endpoint.scrape_timeout} is longer than interval "
            f"{endpoint.interval} (the operator rejects it)"
        )
    return failures


def check_pod_monitors(bundle: Bundle) -> list[str]:
    """Every PodMonitor selects the pods of every percept server in its namespace and no
    other pods; each endpoint names the container port `metrics` that all of them declare,
    at /metrics, with an interval and a scrapeTimeout no longer than it; the
    NetworkPolicies let the monitoring namespace reach that port; its jobLabel is a label
    of those pods."""
    monitors = bundle.of_kind("PodMonitor")
    if not monitors:
        return []
    failures = []
    workloads = bundle.workloads + [r for r in bundle.companions if r.kind in WORKLOAD_KINDS]
    policies = [r for r in bundle.resources + bundle.companions if r.kind == "NetworkPolicy"]
    monitoring = Peer(MONITORING_NAMESPACE, (), "the monitoring namespace")
    for pm in monitors:
        spec = pm.model.spec
        ns = pm.namespace or bundle.namespace
        if selector_is_empty(spec.selector):
            failures.append(f"{pm.ref}: empty selector: it would scrape every pod in {ns}")
            continue
        here = [w for w in workloads if (w.namespace or bundle.namespace) == ns]
        selected = [w for w in here if selector_matches(spec.selector, pod_labels(w))]
        servers = [w for w in here if app_name(w) in SERVICES and server_container(w)]
        for w in servers:
            if w not in selected:
                failures.append(f"{pm.ref}: does not select the pods of {w.ref} ({ns})")
        for w in selected:
            if w not in servers:
                failures.append(f"{pm.ref}: selects the pods of {w.ref}, which is no server")
        if not servers:
            failures.append(f"{pm.ref}: there is no percept server in its namespace {ns}")
        if spec.job_label:
            for w in selected:
                if spec.job_label not in pod_labels(w):
                    failures.append(
                        f"{pm.ref}: jobLabel {spec.job_label} is not a label of the pods "
                        f"of {w.ref}"
                    )
        for i, endpoint in enumerate(spec.pod_metrics_endpoints or []):
            where = f"{pm.ref} podMetricsEndpoints[{i}]"
            if (endpoint.path or METRICS_PATH) != METRICS_PATH:
                failures.append(
                    f"{where}: path {endpoint.path!r}, but the servers serve {METRICS_PATH}"
                )
            failures += _durations(where, endpoint)
            missing: dict[str, set[str]] = {}
            for w in selected:
                ports = _pod_ports(w)
                number = ports.get(endpoint.port or "")
                if number is None:
                    missing[w.ref] = set(ports)
                    continue
                service = SERVICES.get(app_name(w))
                if service is not None and number != service.metrics_port:
                    failures.append(
                        f"{where}: port {endpoint.port!r} of {w.ref} is {number}, not its "
                        f"metrics port {service.metrics_port}"
                    )
                elif not ingress_allowed(policies, ns, pod_labels(w), ports, number, monitoring):
                    failures.append(
                        f"{where}: the NetworkPolicies deny {monitoring.description} port "
                        f"{endpoint.port} ({number}) of {w.ref}: Prometheus could not scrape it"
                    )
            if missing:
                declared = sorted(set().union(*missing.values()))
                failures.append(
                    f"{where}: port {endpoint.port!r} is not a container port of "
                    f"{', '.join(missing)} (they declare {', '.join(declared) or 'none'}): "
                    "Prometheus would find no target to scrape"
                )
    return failures


# ---------------------------------------------------------------------------------------
# Alerting rules (PrometheusRule)
# ---------------------------------------------------------------------------------------


def _duplicates(names: list[str]) -> list[str]:
    """The names that occur more than once, in order of their first occurrence."""
    counts = Counter(names)
    return [name for name in counts if counts[name] > 1]


def check_alert_rules(bundle: Bundle) -> list[str]:
    """Every PrometheusRule (components/alerts) has unique group names and alert names
    unique across its groups; every alert has a `severity` label of critical, warning or
    info (what Alertmanager routes on) and non-empty `summary` and `description`
    annotations."""
    failures = []
    for rule in bundle.of_kind("PrometheusRule"):
        groups = rule.model.spec.groups or []
        for name in _duplicates([g.name for g in groups]):
            failures.append(f"{rule.ref}: more than one group is named {name!r}")
        alerts: list[str] = []
        for g in groups:
            for r in g.rules or []:
                if r.alert is None:
                    continue  # a recording rule: nothing pages
                alerts.append(r.alert)
                where = f"{rule.ref} group {g.name} alert {r.alert}"
                severity = dict(r.labels or {}).get("severity")
                if severity not in SEVERITIES:
                    failures.append(
                        f"{where}: label severity is {severity!r}, want one of "
                        f"{', '.join(SEVERITIES)}"
                    )
                annotations = dict(r.annotations or {})
                for key in ALERT_ANNOTATIONS:
                    if not str(annotations.get(key) or "").strip():
                        failures.append(f"{where}: no {key} annotation (or an empty one)")
        for name in _duplicates(alerts):
            failures.append(
                f"{rule.ref}: more than one alert is named {name!r} (each needs its own "
                "name to be silenced, routed and documented)"
            )
    return failures


# ---------------------------------------------------------------------------------------
# Grafana dashboards (ConfigMaps for the dashboard sidecar)
# ---------------------------------------------------------------------------------------


def dashboard_configmaps(bundle: Bundle) -> list[Resource]:
    """The ConfigMaps labelled for Grafana's dashboard sidecar (DASHBOARD_LABEL)."""
    return [
        r
        for r in bundle.of_kind("ConfigMap")
        if DASHBOARD_LABEL in dict(r.model.metadata.labels or {})
    ]


def _panels(panels: Any) -> list[dict[str, Any]]:
    """Every panel of a dashboard, those inside (collapsed) rows included."""
    out = []
    for panel in panels if isinstance(panels, list) else []:
        if isinstance(panel, dict):
            out.append(panel)
            out += _panels(panel.get("panels"))
    return out


def _dashboard_failures(where: str, text: str) -> list[str]:
    """What is wrong with one dashboard's JSON text."""
    try:
        dashboard = json.loads(text)
    except ValueError as exc:
        return [f"{where}: not JSON ({exc})"]
    if not isinstance(dashboard, dict):
        return [f"{where}: not a dashboard (a JSON {type(dashboard).__name__})"]
    failures = []
    for key in DASHBOARD_FIELDS:
        value = dashboard.get(key)
        if not value or (isinstance(value, str) and not value.strip()):
            failures.append(f"{where}: no {key} (or an empty one)")
    if not isinstance(dashboard.get("panels"), list):
        if dashboard.get("panels"):
            failures.append(f"{where}: panels is not a list")
        return failures
    for panel in _panels(dashboard["panels"]):
        title = panel.get("title") or f"id {panel.get('id')}"
        for target in panel.get("targets") or []:
            expr = target.get("expr") if isinstance(target, dict) else None
            if not isinstance(expr, str) or not expr.strip():
                ref = target.get("refId", "?") if isinstance(target, dict) else "?"
                failures.append(
                    f"{where}: panel {title!r} target {ref}: empty expr (the panel shows "
                    "nothing)"
                )
    return failures


def check_dashboards(bundle: Bundle) -> list[str]:
    """Every ConfigMap labelled grafana_dashboard (components/dashboard) lives in the
    monitoring namespace, where Grafana's sidecar reads it; each of its data values is a
    dashboard in JSON with a non-empty uid, title and panels, every panel target (in rows
    too) has a non-empty `expr`, and no two dashboards share a uid."""
    failures = []
    uids: list[str] = []
    for cm in dashboard_configmaps(bundle):
        if cm.namespace != MONITORING_NAMESPACE:
            failures.append(
                f"{cm.ref}: namespace {cm.namespace!r}, want {MONITORING_NAMESPACE!r} (where "
                "Grafana's dashboard sidecar looks)"
            )
        data = dict(cm.model.data or {})
        if not data:
            failures.append(f"{cm.ref}: holds no dashboard (no data)")
        for key, text in data.items():
            where = f"{cm.ref} {key}"
            found = _dashboard_failures(where, text)
            failures += found
            if not found:
                uids.append(str(json.loads(text)["uid"]))
    for uid in _duplicates(uids):
        failures.append(f"more than one dashboard has uid {uid!r}: Grafana keeps one of them")
    return failures


def check_object_namespaces(bundle: Bundle) -> list[str]:
    """Every namespaced object lives in `percept`, but for the Grafana dashboard
    ConfigMaps (label grafana_dashboard), which live in `monitoring` (the `dashboards`
    check); the cluster target (deploy/k8s/cluster, applied once before the overlays)
    creates that Namespace with the Pod Security "restricted" level enforced."""
    dashboards = {id(r) for r in dashboard_configmaps(bundle)}
    others = [r for r in bundle.resources if id(r) not in dashboards]
    return check_namespace(dataclasses.replace(bundle, resources=others))
