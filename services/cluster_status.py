"""`percept cluster status`: what the percept namespace of a Kubernetes cluster is running.

It reads the cluster with the `kubernetes` Python client (the current kubeconfig context,
another one with `--context`, or the in-cluster service account) and prints three tables:
the Deployments and StatefulSets (desired, ready, updated and available replicas, and the
image), the Services (headless or not, ports) and the HorizontalPodAutoscalers (replicas
and each metric's current value against its target).

Exit status: 0 when every workload has all its desired replicas ready and updated, 1 when
one does not (or nothing is deployed), 2 when there is no kubeconfig or the cluster cannot
be reached or read.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

EXIT_OK = 0
EXIT_DEGRADED = 1
EXIT_UNAVAILABLE = 2
REQUEST_TIMEOUT = (3.05, 10.0)  # (connect, read) seconds for each API call


class ClusterUnavailable(RuntimeError):
    """No usable kubeconfig, or the API server cannot be reached or refuses the request."""


# -- formatting (pure: typed model objects in, text out) --------------------------------


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A plain-text table with left-aligned columns, like `kubectl get`."""
    rows = [list(map(str, r)) for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]
    lines = [headers, *rows]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _images(pod_template: Any) -> str:
    spec = pod_template.spec if pod_template is not None else None
    containers = (spec.containers or []) if spec is not None else []
    return ",".join(c.image or "?" for c in containers) or "-"


def workload_state(kind: str, workload: Any) -> tuple[int, int, int, int]:
    """(desired, ready, updated, available) replicas of a Deployment or StatefulSet."""
    spec, status = workload.spec, workload.status
    desired = spec.replicas if spec is not None and spec.replicas is not None else 1
    ready = (status.ready_replicas or 0) if status is not None else 0
    updated = (status.updated_replicas or 0) if status is not None else 0
    available = (status.available_replicas or 0) if status is not None else 0
    if (
        kind == "StatefulSet"
        and status is not None
        and status.current_revision
        and (status.update_revision and status.current_revision == status.update_revision)
    ):
        updated = max(updated, status.current_replicas or 0)
    return desired, ready, updated, available


def workload_is_ready(kind: str, workload: Any) -> bool:
    """Whether a workload has all its desired replicas ready and updated."""
    desired, ready, updated, _ = workload_state(kind, workload)
    return ready >= desired and updated >= desired


def workload_rows(deployments: Iterable[Any], statefulsets: Iterable[Any]) -> list[list[str]]:
    """One row per workload: name, desired/ready/updated/available, status, image."""
    rows = []
    for kind, items in (("Deployment", deployments), ("StatefulSet", statefulsets)):
        for w in sorted(items, key=lambda x: x.metadata.name):
            desired, ready, updated, available = workload_state(kind, w)
            state = (
                "Ready"
                if workload_is_ready(kind, w)
                else ("Progressing" if ready > 0 else "NotReady")
            )
            rows.append(
                [
                    f"{kind.lower()}/{w.metadata.name}",
                    str(desired),
                    str(ready),
                    str(updated),
                    str(available),
                    state,
                    _images(w.spec.template if w.spec else None),
                ]
            )
    return rows


def service_rows(services: Iterable[Any]) -> list[list[str]]:
    """One row per Service: name, type (headless or not), cluster IP, ports."""
    rows = []
    for s in sorted(services, key=lambda x: x.metadata.name):
        spec = s.spec
        headless = spec.cluster_ip == "None"
        kind = f"{spec.type or 'ClusterIP'}{' (headless)' if headless else ''}"
        ports = []
        for p in spec.ports or []:
            text = f"{p.name + ':' if p.name else ''}{p.port}/{p.protocol or 'TCP'}"
            if p.app_protocol:
                text += f" ({p.app_protocol})"
            ports.append(text)
        rows.append(
            [
                f"service/{s.metadata.name}",
                kind,
                "None" if headless else (spec.cluster_ip or "-"),
                ", ".join(ports) or "-",
            ]
        )
    return rows


def _metric_name(spec: Any) -> str:
    if spec.type == "Resource" and spec.resource is not None:
        return spec.resource.name
    if spec.type == "ContainerResource" and spec.container_resource is not None:
        return spec.container_resource.name
    for attr in ("pods", "object", "external"):
        source = getattr(spec, attr, None)
        if source is not None and source.metric is not None:
            return source.metric.name
    return spec.type or "?"


def _metric_source(obj: Any) -> Any:
    for attr in ("resource", "container_resource", "pods", "object", "external"):
        source = getattr(obj, attr, None)
        if source is not None:
            return source
    return None


def _target_text(target: Any) -> str:
    if target is None:
        return "?"
    if target.average_utilization is not None:
        return f"{target.average_utilization}%"
    value = target.average_value if target.average_value is not None else target.value
    return str(value) if value is not None else "?"


def _current_text(current: Any) -> str:
    if current is None:
        return "<unknown>"
    if current.average_utilization is not None:
        return f"{current.average_utilization}%"
    value = current.average_value if current.average_value is not None else current.value
    return str(value) if value is not None else "<unknown>"


def hpa_metrics_text(hpa: Any) -> str:
    """Each metric as `name current/target`, e.g. `cpu 45%/70%`."""
    status_by_name: dict[str, Any] = {}
    for current in (hpa.status.current_metrics if hpa.status else None) or []:
        source = _metric_source(current)
        status_by_name[_metric_name(current)] = source.current if source is not None else None
    parts = []
    for spec in hpa.spec.metrics or []:
        name = _metric_name(spec)
        source = _metric_source(spec)
        target = source.target if source is not None else None
        parts.append(f"{name} {_current_text(status_by_name.get(name))}/{_target_text(target)}")
    return ", ".join(parts) or "-"


def hpa_rows(hpas: Iterable[Any]) -> list[list[str]]:
    """One row per HPA: name, target, min, max, current and desired replicas, metrics."""
    rows = []
    for h in sorted(hpas, key=lambda x: x.metadata.name):
        ref = h.spec.scale_target_ref
        status = h.status
        rows.append(
            [
                f"hpa/{h.metadata.name}",
                f"{ref.kind.lower()}/{ref.name}",
                str(h.spec.min_replicas if h.spec.min_replicas is not None else 1),
                str(h.spec.max_replicas),
                str(
                    status.current_replicas
                    if status and status.current_replicas is not None
                    else "-"
                ),
                str(
                    status.desired_replicas
                    if status and status.desired_replicas is not None
                    else "-"
                ),
                hpa_metrics_text(h),
            ]
        )
    return rows


WORKLOAD_HEADERS = ("WORKLOAD", "DESIRED", "READY", "UPDATED", "AVAILABLE", "STATUS", "IMAGE")
SERVICE_HEADERS = ("SERVICE", "TYPE", "CLUSTER-IP", "PORTS")
HPA_HEADERS = ("HPA", "TARGET", "MIN", "MAX", "CURRENT", "DESIRED", "METRICS (current/target)")


def render_status(
    namespace: str,
    deployments: Sequence[Any],
    statefulsets: Sequence[Any],
    services: Sequence[Any],
    hpas: Sequence[Any],
    context: str | None = None,
) -> str:
    """The whole report for one namespace."""
    where = f"namespace {namespace}" + (f" (context {context})" if context else "")
    parts = [f"percept on Kubernetes: {where}", ""]
    if deployments or statefulsets:
        parts.append(format_table(WORKLOAD_HEADERS, workload_rows(deployments, statefulsets)))
    else:
        parts.append("no Deployments or StatefulSets")
    parts.append("")
    parts.append(
        format_table(SERVICE_HEADERS, service_rows(services)) if services else "no Services"
    )
    parts.append("")
    parts.append(
        format_table(HPA_HEADERS, hpa_rows(hpas)) if hpas else "no HorizontalPodAutoscalers"
    )
    return "\n".join(parts)


def status_exit_code(deployments: Sequence[Any], statefulsets: Sequence[Any]) -> int:
    """EXIT_OK when every workload is ready and updated, else EXIT_DEGRADED."""
    workloads = [("Deployment", d) for d in deployments] + [
        ("StatefulSet", s) for s in statefulsets
    ]
    if not workloads:
        return EXIT_DEGRADED
    return EXIT_OK if all(workload_is_ready(k, w) for k, w in workloads) else EXIT_DEGRADED


# -- talking to the cluster ---------------------------------------------------------------


def api_client(context: str | None = None) -> Any:
    """An ApiClient for the kubeconfig context (the current one by default), or the
    in-cluster service account when there is no kubeconfig and we run in a pod."""
    import os

    import yaml
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    # Read KUBECONFIG now (the client reads it once, at import); it may list several files.
    kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    except (ConfigException, OSError, TypeError, ValueError, yaml.YAMLError) as kube_error:
        if context is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException as incluster_error:
                raise ClusterUnavailable(
                    f"in-cluster config: {incluster_error}"
                ) from incluster_error
        else:
            where = f"kubeconfig context {context!r}" if context else "kubeconfig"
            raise ClusterUnavailable(
                f"no usable {where} in {kubeconfig}: {kube_error} (set KUBECONFIG or run "
                "`kubectl config use-context`)"
            ) from kube_error
    configuration.retries = 1
    return client.ApiClient(configuration)


def fetch(namespace: str, api: Any) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """(deployments, statefulsets, services, hpas) of the namespace, as typed models."""
    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    apps = client.AppsV1Api(api)
    core = client.CoreV1Api(api)
    autoscaling = client.AutoscalingV2Api(api)
    timeout = REQUEST_TIMEOUT
    try:
        deployments = apps.list_namespaced_deployment(namespace, _request_timeout=timeout).items
        statefulsets = apps.list_namespaced_stateful_set(namespace, _request_timeout=timeout).items
        services = core.list_namespaced_service(namespace, _request_timeout=timeout).items
        hpas = autoscaling.list_namespaced_horizontal_pod_autoscaler(
            namespace, _request_timeout=timeout
        ).items
    except ApiException as exc:
        raise ClusterUnavailable(
            f"the API server answered {exc.status} {exc.reason}".rstrip()
        ) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        host = getattr(api.configuration, "host", "?")
        raise ClusterUnavailable(f"cannot reach the API server at {host}: {exc}") from exc
    return list(deployments), list(statefulsets), list(services), list(hpas)


def cluster_status(
    namespace: str = "percept",
    context: str | None = None,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the percept workloads, Services and HPAs of a namespace; see the module doc
    for the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        api = api_client(context)
        with api:
            deployments, statefulsets, services, hpas = fetch(namespace, api)
    except ClusterUnavailable as exc:
        print(f"percept cluster status: {exc}", file=err)
        return EXIT_UNAVAILABLE
    print(render_status(namespace, deployments, statefulsets, services, hpas, context), file=out)
    return status_exit_code(deployments, statefulsets)
