"""The optional PodMonitor component (deploy/k8s/components/podmonitor): it renders on its
own and inside an overlay, validates against our own strict schema (deploy/crds.py), and
the `ports` policy checks it against the pods it scrapes; a misspelt field or port fails."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from deploy import crds, render
from deploy.objects import ModelError, Resource, schema_errors, schema_version, to_model
from deploy.pipeline import Report, validate_targets
from deploy.policy import SERVICES, Bundle, check_by_name
from deploy.policy.model import MONITORING_NAMESPACE, app_name, pod_labels, selector_matches
from deploy.policy.network import Peer, ingress_allowed

COMPONENT = render.K8S_DIR / "components" / "podmonitor"
TARGET = next(t for t in render.TARGETS if t.name == "components/podmonitor")
GPU_TARGET = next(t for t in render.TARGETS if t.name == "overlays/gpu")
DEPLOY_README = render.REPO_ROOT / "deploy" / "README.md"

Mutation = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def component(bundles: dict[str, Bundle]) -> Bundle:
    """The component's own objects, with overlays/gpu as its companion."""
    return bundles[TARGET.name]


def _monitor(bundle: Bundle) -> dict[str, Any]:
    (pm,) = bundle.of_kind("PodMonitor")
    return copy.deepcopy(pm.raw)


def _with(bundle: Bundle, mutate: Mutation) -> Bundle:
    """The bundle with its PodMonitor changed (and typed again)."""
    raw = _monitor(bundle)
    mutate(raw)
    others = [r for r in bundle.resources if r.kind != "PodMonitor"]
    return dataclasses.replace(bundle, resources=[*others, Resource(raw, to_model(raw))])


def ports(bundle: Bundle) -> list[str]:
    return check_by_name("ports").func(bundle)


def _endpoint(raw: dict[str, Any]) -> dict[str, Any]:
    return raw["spec"]["podMetricsEndpoints"][0]


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


# The component as it is ---------------------------------------------------------------


def test_the_component_is_a_kustomize_component() -> None:
    k = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert k["kind"] == "Component"
    assert k["resources"] == ["podmonitor.yaml"]
    # validated against the pods of the default overlay, after it (dependency order)
    assert TARGET.kind == "component" and TARGET.companion == "overlays/gpu"
    names = [t.name for t in render.TARGETS]
    assert names.index("overlays/gpu") < names.index(TARGET.name)
    # optional: only overlays/gpu-monitored (the Prometheus Operator's monitoring) includes it
    including = []
    for overlay in (render.K8S_DIR / "overlays").glob("*/kustomization.yaml"):
        components = yaml.safe_load(overlay.read_text()).get("components") or []
        if any(c.rstrip("/").endswith("components/podmonitor") for c in components):
            including.append(overlay.parent.name)
    assert including == ["gpu-monitored"]


def test_the_component_renders_one_valid_podmonitor(report: Report, component: Bundle) -> None:
    t = next(t for t in report.targets if t.target.name == TARGET.name)
    assert t.stages == {"render": [], "schema": [], "typed-models": []}
    assert [r.ref for r in component.resources] == ["PodMonitor/percept"]
    results = {r.check: r for r in t.results}
    for name in ("ports", "labels", "namespace", "teardown"):
        assert results[name].applied and results[name].failures == [], name
    assert not results["resources"].applied  # the component runs no pods


def test_the_podmonitor_scrapes_every_server_on_its_metrics_port(
    component: Bundle, bundles: dict[str, Bundle]
) -> None:
    (pm,) = component.of_kind("PodMonitor")
    assert pm.namespace == "percept"
    labels = dict(pm.model.metadata.labels)
    assert labels == {
        "app.kubernetes.io/name": "percept",
        "app.kubernetes.io/component": "monitoring",
        "app.kubernetes.io/part-of": "percept",
    }
    (endpoint,) = pm.model.spec.pod_metrics_endpoints
    assert (endpoint.port, endpoint.path, endpoint.interval) == ("metrics", "/metrics", "30s")
    timeout = crds.duration_seconds(endpoint.scrape_timeout)
    assert timeout is not None and 0 < timeout < 30
    for name in ("overlays/gpu", "overlays/cpu"):
        overlay = bundles[name]
        selected = {app_name(w) for w in overlay.workloads
                    if selector_matches(pm.model.spec.selector, pod_labels(w))}
        assert selected == set(SERVICES), name
        # and the same PodMonitor beside the cpu overlay's pods passes too
        assert ports(dataclasses.replace(component, companions=overlay.resources)) == []


def test_the_training_job_pods_are_not_selected(component: Bundle, job: Bundle) -> None:
    (pm,) = component.of_kind("PodMonitor")
    (train,) = job.workloads
    assert not selector_matches(pm.model.spec.selector, pod_labels(train))
    beside = dataclasses.replace(component, companions=[*component.companions, train])
    assert ports(beside) == []
    everything = _with(beside, lambda r: r["spec"]["selector"].pop("matchExpressions"))
    assert f"PodMonitor/percept: selects the pods of {train.ref}, which is no server" in (
        ports(everything))


def test_the_network_policy_still_admits_the_monitoring_namespace(component: Bundle) -> None:
    """What the PodMonitor relies on: the monitoring namespace reaches every metrics port
    (the network-policy check), and only that port."""
    policies = [r for r in component.companions if r.kind == "NetworkPolicy"]
    monitoring = Peer(MONITORING_NAMESPACE)
    workloads = [r for r in component.companions if r.kind in ("Deployment", "StatefulSet")]
    assert len(workloads) == len(SERVICES)
    for w in workloads:
        spec = SERVICES[app_name(w)]
        named = {"grpc": spec.grpc_port, "metrics": spec.metrics_port}
        assert ingress_allowed(policies, "percept", pod_labels(w), named, spec.metrics_port,
                               monitoring), w.ref
        assert not ingress_allowed(policies, "percept", pod_labels(w), named, spec.grpc_port,
                                   monitoring), w.ref


# Our schema -----------------------------------------------------------------------------


def _object_schemas(schema: Any) -> list[dict[str, Any]]:
    """Every sub-schema of PODMONITOR_SCHEMA that declares properties."""
    out = []
    if isinstance(schema, dict):
        if "properties" in schema:
            out.append(schema)
        for value in schema.values():
            out += _object_schemas(value)
    elif isinstance(schema, list):
        for value in schema:
            out += _object_schemas(value)
    return out


def test_the_schema_is_ours_strict_and_valid() -> None:
    schema = crds.PODMONITOR_SCHEMA
    jsonschema.Draft202012Validator.check_schema(schema)
    assert crds.SCHEMAS[("monitoring.coreos.com/v1", "PodMonitor")] is schema
    assert "written for this project" in (crds.__doc__ or "")
    assert "not the operator's" in " ".join((crds.__doc__ or "").split())
    objects = _object_schemas(schema)
    assert len(objects) == 3  # the object, its spec, an endpoint
    for sub in objects:
        assert sub["additionalProperties"] is False, sorted(sub["properties"])


# (id, mutation, text in the schema error)
SCHEMA_CASES: list[tuple[str, Mutation, str]] = [
    ("endpoints-misspelt",
     lambda r: r["spec"].update(podMetricEndpoints=r["spec"].pop("podMetricsEndpoints")),
     "spec: Additional properties are not allowed ('podMetricEndpoints' was unexpected)"),
    ("endpoints-missing", lambda r: r["spec"].pop("podMetricsEndpoints"),
     "spec: 'podMetricsEndpoints' is a required property"),
    ("endpoints-empty", lambda r: r["spec"].update(podMetricsEndpoints=[]),
     "spec.podMetricsEndpoints: [] should be non-empty"),
    ("timeout-misspelt",
     lambda r: _endpoint(r).update(scrapeTimout=_endpoint(r).pop("scrapeTimeout")),
     "spec.podMetricsEndpoints.0: Additional properties are not allowed ('scrapeTimout'"),
    ("port-missing", lambda r: _endpoint(r).pop("port"),
     "spec.podMetricsEndpoints.0: 'port' is a required property"),
    ("port-number", lambda r: _endpoint(r).update(port=9101),
     "spec.podMetricsEndpoints.0.port: 9101 is not of type 'string'"),
    ("interval-not-a-duration", lambda r: _endpoint(r).update(interval="30 seconds"),
     "spec.podMetricsEndpoints.0.interval: '30 seconds' is not a duration"),
    ("selector-misspelt",
     lambda r: r["spec"]["selector"].update(matchLabel=r["spec"]["selector"].pop("matchLabels")),
     "spec.selector: Additional properties are not allowed ('matchLabel' was unexpected)"),
    ("metadata-misspelt", lambda r: r["metadata"].update(label=r["metadata"].pop("labels")),
     "metadata: Additional properties are not allowed ('label' was unexpected)"),
    ("a-field-the-operator-has-but-we-do-not",
     lambda r: _endpoint(r).update(honorLabels=True),
     "('honorLabels' was unexpected)"),
    ("spec-missing", lambda r: r.pop("spec"), "(root): 'spec' is a required property"),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [pytest.param(*c[1:], id=c[0]) for c in SCHEMA_CASES]
)
def test_the_schema_rejects(component: Bundle, mutate: Mutation, expected: str) -> None:
    raw = _monitor(component)
    version = schema_version()
    assert schema_errors(raw, version) == []
    mutate(raw)
    errors = schema_errors(raw, version)
    assert any(expected in e for e in errors), errors
    assert all(e.endswith(f"({crds.SOURCE})") for e in errors), errors


def test_the_typed_model_drops_no_field(component: Bundle) -> None:
    raw = _monitor(component)
    model = to_model(raw)
    assert model.spec.pod_metrics_endpoints[0].scrape_timeout == "10s"
    assert model.spec.job_label == "app.kubernetes.io/name"
    with pytest.raises(AttributeError, match="not a field"):
        _ = model.spec.podMetricsEndpoints  # a misspelt attribute does not read as None
    raw["spec"]["podMetricEndpoints"] = raw["spec"].pop("podMetricsEndpoints")
    with pytest.raises(ModelError, match=r"spec\.podMetricEndpoints is lost"):
        to_model(raw)


# The ports policy on the PodMonitor ------------------------------------------------------

# (id, mutation, text in one failure of the `ports` check)
POLICY_CASES: list[tuple[str, Mutation, str]] = [
    ("port-misspelt", lambda r: _endpoint(r).update(port="metric"),
     "PodMonitor/percept podMetricsEndpoints[0]: port 'metric' is not a container port of "
     "Deployment/"),
    ("grpc-port", lambda r: _endpoint(r).update(port="grpc"),
     "port 'grpc' of Deployment/superres is 50051, not its metrics port 9101"),
    ("path", lambda r: _endpoint(r).update(path="/"), "path '/', but the servers serve /metrics"),
    ("timeout-over-interval", lambda r: _endpoint(r).update(scrapeTimeout="1m"),
     "scrapeTimeout 1m is longer than interval 30s"),
    ("no-interval", lambda r: _endpoint(r).pop("interval"), "interval is None"),
    ("search-left-out",
     lambda r: r["spec"]["selector"]["matchExpressions"][0]["values"].remove("search"),
     "PodMonitor/percept: does not select the pods of StatefulSet/search"),
    ("selector-on-a-label-the-pods-lack",
     lambda r: r["spec"]["selector"]["matchLabels"].update({"app": "percept"}),
     "does not select the pods of Deployment/superres"),
    ("empty-selector", lambda r: r["spec"].update(selector={}), "empty selector"),
    ("another-namespace", lambda r: r["metadata"].update(namespace="monitoring"),
     "there is no percept server in its namespace monitoring"),
    ("job-label", lambda r: r["spec"].update(jobLabel="app"),
     "jobLabel app is not a label of the pods of"),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [pytest.param(*c[1:], id=c[0]) for c in POLICY_CASES]
)
def test_the_ports_check_fails(component: Bundle, mutate: Mutation, expected: str) -> None:
    assert ports(component) == []
    found = ports(_with(component, mutate))
    assert any(expected in f for f in found), found


def test_a_port_the_network_policy_closes_fails(component: Bundle) -> None:
    closed = dataclasses.replace(component, companions=[
        r for r in component.companions if r.ref != "NetworkPolicy/allow-monitoring-metrics"])
    found = ports(closed)
    assert any("the NetworkPolicies deny the monitoring namespace port metrics (9104) of "
               "StatefulSet/search" in f for f in found), found


def test_the_labels_check_reads_the_podmonitor(component: Bundle) -> None:
    found = check_by_name("labels").func(_with(
        component, lambda r: r["metadata"]["labels"].pop("app.kubernetes.io/component")))
    assert found == ["PodMonitor/percept: no app.kubernetes.io/component label"]


# End to end: deploy/validate.py's pipeline on a broken copy, and inside an overlay -------


def _copy_component(tmp_path: Path, old: str, new: str) -> render.Target:
    folder = tmp_path / "podmonitor"
    shutil.copytree(COMPONENT, folder)
    manifest = folder / "podmonitor.yaml"
    text = manifest.read_text()
    assert old in text
    manifest.write_text(text.replace(old, new))
    return dataclasses.replace(TARGET, name="tmp/podmonitor", path=folder)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            "  podMetricsEndpoints:", "  podMetricEndpoints:",
            "[tmp/podmonitor] schema: PodMonitor/percept: spec: Additional properties are not "
            "allowed ('podMetricEndpoints' was unexpected)", id="field-misspelt"),
        pytest.param(
            "- port: metrics", "- port: metrcs",
            "[tmp/podmonitor] ports: PodMonitor/percept podMetricsEndpoints[0]: port 'metrcs' "
            "is not a container port of", id="port-misspelt"),
    ],
)
def test_validation_fails_on_a_broken_copy(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    report = validate_targets((GPU_TARGET, _copy_component(tmp_path, old, new)))
    assert not report.ok
    failures = [f for f in report.failures if f.startswith("[tmp/podmonitor]")]
    assert failures and all(f in report.failures for f in failures)
    assert any(f.startswith(expected) for f in failures), failures
    assert not any(f.startswith("[overlays/gpu]") for f in report.failures)


def _documented_overlay() -> str:
    """The overlay of deploy/README.md, section 5, over overlays/gpu-monitored."""
    section = _section(DEPLOY_README.read_text(), "## 5. Scaling")
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    (block,) = [b for b in blocks if "gpu-monitored" in b]
    return textwrap.dedent(block)


def test_the_documented_overlay_over_gpu_monitored_validates(
    tmp_path: Path, gpu: Bundle
) -> None:
    """What a user of kube-prometheus-stack writes (deploy/README.md, section 5): an
    overlay over overlays/gpu-monitored with the release label on the PodMonitor and the
    PrometheusRule; it validates as a whole, and its PodMonitor is checked against the
    overlay's own pods."""
    overlay = tmp_path / "mine"
    overlay.mkdir()
    text = _documented_overlay()
    documented = "../gpu-monitored"
    assert f"- {documented}\n" in text
    real = os.path.relpath(render.K8S_DIR / "overlays" / "gpu-monitored", overlay)
    (overlay / "kustomization.yaml").write_text(text.replace(f"- {documented}\n",
                                                             f"- {real}\n"))
    report = validate_targets((render.Target("tmp/mine", overlay, "gpu"),))
    assert report.ok, "\n".join(report.failures)
    (t,) = report.targets
    assert t.bundle is not None
    (pm,) = t.bundle.of_kind("PodMonitor")
    assert pm.ref == "PodMonitor/percept"
    assert pm.model.metadata.labels["release"] == "kube-prometheus-stack"
    (rule,) = t.bundle.of_kind("PrometheusRule")
    assert rule.raw["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (dashboard,) = [r for r in t.bundle.of_kind("ConfigMap")
                    if "grafana_dashboard" in (r.raw["metadata"].get("labels") or {})]
    assert "release" not in dashboard.raw["metadata"]["labels"]
    assert len(t.bundle.resources) == len(gpu.resources) + 3
    # the PodMonitor is checked against the overlay's own pods: break one port name there
    bundle = t.bundle
    sts = bundle.get("StatefulSet", "search")
    assert sts is not None
    raw = copy.deepcopy(sts.raw)
    for port in raw["spec"]["template"]["spec"]["containers"][0]["ports"]:
        if port["name"] == "metrics":
            port["name"] = "prometheus"
    renamed = dataclasses.replace(bundle, resources=[
        Resource(raw, to_model(raw)) if r is sts else r for r in bundle.resources])
    assert any("port 'metrics' is not a container port of StatefulSet/search" in f
               for f in ports(renamed))


# The docs -------------------------------------------------------------------------------


def test_the_docs_say_what_the_component_is() -> None:
    text = DEPLOY_README.read_text()
    scaling = " ".join(_section(text, "## 5. Scaling").split())
    assert "components: [../../components/podmonitor]" in scaling
    assert "`overlays/gpu-monitored`" in scaling
    assert "release:" in scaling and "podMonitorSelectorNilUsesHelmValues=false" in scaling
    assert "ruleSelectorNilUsesHelmValues=false" in scaling
    assert "add a PodMonitor for the" not in scaling  # the old advice: now it is provided
    checks = " ".join(_section(text, "## 11. What `make deploy-validate` checks").split())
    for t in render.TARGETS:
        assert f"`{t.name}`" in checks, t.name
    assert "deploy/crds.py" in checks
    ports_row = re.search(r"^\| ports \|.*$", _section(text, "## 11."), flags=re.M)
    assert ports_row is not None and "PodMonitor" in ports_row.group(0)
