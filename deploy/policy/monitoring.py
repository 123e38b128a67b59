"""Scraping through the Prometheus Operator: each PodMonitor a target renders
(deploy/k8s/components/podmonitor) against the pods it selects, the target's own or those
of the overlay a component is added to (its companion), and the NetworkPolicies in front
of them. Part of the `ports` policy."""

from __future__ import annotations

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

#: the path the servers serve their metrics on (and Prometheus' default)
METRICS_PATH = "/metrics"


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
