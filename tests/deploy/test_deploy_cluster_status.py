"""`percept cluster status` formatting, on typed kubernetes model objects (no API server),
and its exit status when there is no cluster to ask."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from kubernetes import client as k

from services.cluster_status import (
    EXIT_DEGRADED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    cluster_status,
    format_table,
    hpa_metrics_text,
    hpa_rows,
    render_status,
    service_rows,
    status_exit_code,
    workload_rows,
)

IMAGE = "ghcr.io/percept/percept:0.1.0-gpu"


def template() -> k.V1PodTemplateSpec:
    return k.V1PodTemplateSpec(
        metadata=k.V1ObjectMeta(labels={"app.kubernetes.io/name": "x"}),
        spec=k.V1PodSpec(containers=[k.V1Container(name="server", image=IMAGE)]),
    )


def deployment(name: str, replicas: int, ready: int, updated: int) -> k.V1Deployment:
    return k.V1Deployment(
        metadata=k.V1ObjectMeta(name=name),
        spec=k.V1DeploymentSpec(
            replicas=replicas,
            selector=k.V1LabelSelector(match_labels={"app.kubernetes.io/name": name}),
            template=template(),
        ),
        status=k.V1DeploymentStatus(
            replicas=replicas,
            ready_replicas=ready or None,
            updated_replicas=updated,
            available_replicas=ready or None,
        ),
    )


def statefulset(ready: int) -> k.V1StatefulSet:
    return k.V1StatefulSet(
        metadata=k.V1ObjectMeta(name="search"),
        spec=k.V1StatefulSetSpec(
            replicas=1,
            service_name="search",
            selector=k.V1LabelSelector(match_labels={"app.kubernetes.io/name": "search"}),
            template=template(),
        ),
        status=k.V1StatefulSetStatus(
            replicas=1,
            ready_replicas=ready,
            current_replicas=1,
            updated_replicas=None,
            current_revision="search-1",
            update_revision="search-1",
            available_replicas=ready,
        ),
    )


def service(name: str, port: int, headless: bool = True) -> k.V1Service:
    return k.V1Service(
        metadata=k.V1ObjectMeta(name=name),
        spec=k.V1ServiceSpec(
            cluster_ip="None" if headless else "10.0.0.7",
            type="ClusterIP",
            ports=[
                k.V1ServicePort(name="grpc", port=port, protocol="TCP", app_protocol="grpc"),
                k.V1ServicePort(name="metrics", port=port - 50051 + 9101, protocol="TCP"),
            ],
        ),
    )


def hpa(name: str, current: int | None) -> k.V2HorizontalPodAutoscaler:
    status = k.V2HorizontalPodAutoscalerStatus(
        current_replicas=2,
        desired_replicas=3,
        current_metrics=None
        if current is None
        else [
            k.V2MetricStatus(
                type="Resource",
                resource=k.V2ResourceMetricStatus(
                    name="cpu", current=k.V2MetricValueStatus(average_utilization=current)
                ),
            )
        ],
    )
    return k.V2HorizontalPodAutoscaler(
        metadata=k.V1ObjectMeta(name=name),
        spec=k.V2HorizontalPodAutoscalerSpec(
            scale_target_ref=k.V2CrossVersionObjectReference(
                api_version="apps/v1", kind="Deployment", name=name
            ),
            min_replicas=2,
            max_replicas=8,
            metrics=[
                k.V2MetricSpec(
                    type="Resource",
                    resource=k.V2ResourceMetricSource(
                        name="cpu",
                        target=k.V2MetricTarget(type="Utilization", average_utilization=70),
                    ),
                ),
                k.V2MetricSpec(
                    type="Pods",
                    pods=k.V2PodsMetricSource(
                        metric=k.V2MetricIdentifier(name="percept_queue_depth"),
                        target=k.V2MetricTarget(type="AverageValue", average_value="4"),
                    ),
                ),
            ],
        ),
        status=status,
    )


def test_format_table_aligns_columns() -> None:
    text = format_table(("A", "LONGER"), [["x", "1"], ["wide-cell", "22"]])
    assert text.splitlines() == ["A           LONGER", "x           1", "wide-cell   22"]


def test_workload_rows() -> None:
    rows = workload_rows(
        [deployment("superres", 2, 2, 2), deployment("style", 2, 1, 1)], [statefulset(ready=1)]
    )
    assert rows == [
        ["deployment/style", "2", "1", "1", "1", "Progressing", IMAGE],
        ["deployment/superres", "2", "2", "2", "2", "Ready", IMAGE],
        ["statefulset/search", "1", "1", "1", "1", "Ready", IMAGE],
    ]
    (row,) = workload_rows([deployment("embed", 2, 0, 0)], [])
    assert row[5] == "NotReady"


def test_service_rows() -> None:
    rows = service_rows([service("superres", 50051), service("style", 50052, headless=False)])
    assert rows == [
        ["service/style", "ClusterIP", "10.0.0.7", "grpc:50052/TCP (grpc), metrics:9102/TCP"],
        [
            "service/superres",
            "ClusterIP (headless)",
            "None",
            "grpc:50051/TCP (grpc), metrics:9101/TCP",
        ],
    ]


def test_hpa_rows_and_metrics() -> None:
    (row,) = hpa_rows([hpa("embed", current=45)])
    assert row == [
        "hpa/embed",
        "deployment/embed",
        "2",
        "8",
        "2",
        "3",
        "cpu 45%/70%, percept_queue_depth <unknown>/4",
    ]
    assert hpa_metrics_text(hpa("embed", current=None)).startswith("cpu <unknown>/70%")


def test_render_status_and_exit_code() -> None:
    deployments = [deployment("superres", 2, 2, 2)]
    statefulsets = [statefulset(ready=1)]
    text = render_status(
        "percept",
        deployments,
        statefulsets,
        [service("superres", 50051)],
        [hpa("superres", 10)],
        context="gpu-cluster",
    )
    lines = text.splitlines()
    assert lines[0] == "percept on Kubernetes: namespace percept (context gpu-cluster)"
    assert any(line.startswith("WORKLOAD") and "IMAGE" in line for line in lines)
    assert any(line.startswith("service/superres") for line in lines)
    assert any(line.startswith("hpa/superres") for line in lines)
    assert status_exit_code(deployments, statefulsets) == EXIT_OK
    assert status_exit_code([deployment("style", 2, 1, 2)], statefulsets) == EXIT_DEGRADED
    assert status_exit_code([], []) == EXIT_DEGRADED
    empty = render_status("percept", [], [], [], [])
    assert "no Deployments or StatefulSets" in empty and "no Services" in empty


def test_no_kubeconfig_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    out, err = io.StringIO(), io.StringIO()
    assert cluster_status(out=out, err=err) == EXIT_UNAVAILABLE
    assert err.getvalue().startswith("percept cluster status: no usable kubeconfig")
    assert out.getvalue() == ""


def test_a_kubeconfig_that_is_not_yaml_exits_2(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text("apiVersion: v1\nclusters: [ {name: broken\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    err = io.StringIO()
    assert cluster_status(out=io.StringIO(), err=err) == EXIT_UNAVAILABLE
    assert err.getvalue().startswith("percept cluster status: no usable kubeconfig")


def test_unknown_context_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    err = io.StringIO()
    assert cluster_status(context="nope", out=io.StringIO(), err=err) == EXIT_UNAVAILABLE
    assert "no usable kubeconfig context 'nope'" in err.getvalue()


def test_unreachable_cluster_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kubeconfig that points at a closed loopback port: refused at once."""
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(KUBECONFIG)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    err = io.StringIO()
    assert cluster_status(out=io.StringIO(), err=err) == EXIT_UNAVAILABLE
    assert "cannot reach the API server at https://127.0.0.1:9" in err.getvalue()


KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
  - name: local
    cluster:
      server: https://127.0.0.1:9
      insecure-skip-tls-verify: true
contexts:
  - name: local
    context: {cluster: local, user: local, namespace: percept}
current-context: local
users:
  - name: local
    user: {token: not-a-real-token}
"""
