"""The optional alerting and dashboard components (deploy/k8s/components/alerts and
components/dashboard): they render on their own and inside overlays/gpu-monitored, the
PrometheusRule validates against our own strict schema (deploy/crds.py), and the `alerts`
and `dashboards` policies pass on the real objects and fail on broken copies."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from deploy import crds, render
from deploy.objects import Resource, schema_errors, schema_version, to_model
from deploy.pipeline import Report, validate_targets
from deploy.policy import CHECKS, Bundle, check_by_name
from deploy.policy.model import MONITORING_NAMESPACE, NAMESPACE

ALERTS_DIR = render.K8S_DIR / "components" / "alerts"
DASHBOARD_DIR = render.K8S_DIR / "components" / "dashboard"
ALERTS = next(t for t in render.TARGETS if t.name == "components/alerts")
DASHBOARD = next(t for t in render.TARGETS if t.name == "components/dashboard")
MONITORED = next(t for t in render.TARGETS if t.name == "overlays/gpu-monitored")
GPU_TARGET = next(t for t in render.TARGETS if t.name == "overlays/gpu")
RULE_REF = "PrometheusRule/percept"
DASHBOARD_REF = "ConfigMap/percept-dashboard"
MONITORING_LABELS = {
    "app.kubernetes.io/name": "percept",
    "app.kubernetes.io/component": "monitoring",
    "app.kubernetes.io/part-of": "percept",
}

Mutation = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def alerts(bundles: dict[str, Bundle]) -> Bundle:
    """components/alerts on its own (overlays/gpu its companion)."""
    return bundles[ALERTS.name]


@pytest.fixture(scope="module")
def dashboard(bundles: dict[str, Bundle]) -> Bundle:
    """components/dashboard on its own (overlays/gpu its companion)."""
    return bundles[DASHBOARD.name]


@pytest.fixture(scope="module")
def monitored(bundles: dict[str, Bundle]) -> Bundle:
    """overlays/gpu-monitored: overlays/gpu with podmonitor, alerts and dashboard."""
    return bundles[MONITORED.name]


def failures(check: str, bundle: Bundle) -> list[str]:
    """What one check says about a bundle."""
    return check_by_name(check).func(bundle)


def _raw(bundle: Bundle, ref: str) -> dict[str, Any]:
    (res,) = [r for r in bundle.resources if r.ref == ref]
    return copy.deepcopy(res.raw)


def _with(bundle: Bundle, ref: str, mutate: Mutation) -> Bundle:
    """The bundle with one object changed (and typed again, as the pipeline types it)."""
    resources = []
    for r in bundle.resources:
        if r.ref == ref:
            raw = copy.deepcopy(r.raw)
            mutate(raw)
            r = Resource(raw, to_model(raw))
        resources.append(r)
    return dataclasses.replace(bundle, resources=resources)


def _with_raw(raw: dict[str, Any]) -> Bundle:
    """A component bundle of one object."""
    return Bundle(target="tmp", accelerator="gpu", kind="component",
                  resources=[Resource(raw, to_model(raw))])


def _rule(raw: dict[str, Any], group: int = 0, index: int = 0) -> dict[str, Any]:
    return raw["spec"]["groups"][group]["rules"][index]


def _edit_dashboard(edit: Callable[[dict[str, Any]], None]) -> Mutation:
    """A mutation of the dashboard ConfigMap that edits its percept.json as JSON."""

    def mutate(raw: dict[str, Any]) -> None:
        dashboard = json.loads(raw["data"]["percept.json"])
        edit(dashboard)
        raw["data"]["percept.json"] = json.dumps(dashboard, indent=2)

    return mutate


def _first_target(dashboard: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in dashboard["panels"] if p.get("targets"))["targets"][0]


def _object_schemas(schema: Any) -> list[dict[str, Any]]:
    """Every sub-schema that declares properties (the `then` of a recording rule aside:
    it only forbids some of a rule's properties)."""
    out = []
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" in schema:
            out.append(schema)
        for key, value in schema.items():
            if key != "then":
                out += _object_schemas(value)
    elif isinstance(schema, list):
        for value in schema:
            out += _object_schemas(value)
    return out


# The targets ----------------------------------------------------------------------------


def test_the_targets_are_registered_after_their_companion() -> None:
    names = [t.name for t in render.TARGETS]
    assert MONITORED.kind == "app" and MONITORED.accelerator == "gpu"
    assert MONITORED.companion is None
    for t in (ALERTS, DASHBOARD):
        assert t.kind == "component" and t.companion == "overlays/gpu", t.name
        assert names.index("overlays/gpu") < names.index(t.name)
    for path in (ALERTS_DIR, DASHBOARD_DIR):
        k = yaml.safe_load((path / "kustomization.yaml").read_text())
        assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    overlay = yaml.safe_load((MONITORED.path / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../gpu"]
    assert overlay["components"] == [
        "../../components/podmonitor",
        "../../components/alerts",
        "../../components/dashboard",
    ]


# Rendering, on their own and inside the overlay ------------------------------------------


@pytest.mark.parametrize(
    ("target", "refs"),
    [
        pytest.param(ALERTS, [RULE_REF], id="alerts"),
        pytest.param(DASHBOARD, [DASHBOARD_REF], id="dashboard"),
    ],
)
def test_each_component_renders_its_own_objects(
    report: Report, target: render.Target, refs: list[str]
) -> None:
    objects = render.render(target)  # the venv's kubectl, afresh
    assert [f"{o['kind']}/{o['metadata']['name']}" for o in objects] == refs
    t = next(t for t in report.targets if t.target.name == target.name)
    assert t.stages == {"render": [], "schema": [], "typed-models": []}
    assert t.bundle is not None and [r.ref for r in t.bundle.resources] == refs
    results = {r.check: r for r in t.results}
    for name in ("alerts", "dashboards", "labels", "namespace", "teardown"):
        assert results[name].applied and results[name].failures == [], name
    assert not results["resources"].applied  # a component runs no pods
    assert all(r.failures == [] for r in t.results)


def test_the_components_keep_their_namespace_and_labels(alerts: Bundle, dashboard: Bundle) -> None:
    (rule,) = alerts.resources
    assert (rule.namespace, dict(rule.model.metadata.labels)) == (NAMESPACE, MONITORING_LABELS)
    (cm,) = dashboard.resources
    assert cm.namespace == MONITORING_NAMESPACE
    assert dict(cm.model.metadata.labels) == {**MONITORING_LABELS, "grafana_dashboard": "1"}
    # a fixed name (no hash suffix) and the file as it is
    assert cm.name == "percept-dashboard"
    assert cm.model.data == {"percept.json": (DASHBOARD_DIR / "percept.json").read_text()}


def test_the_overlay_is_the_gpu_overlay_with_the_three_components(
    report: Report, monitored: Bundle, gpu: Bundle, alerts: Bundle, dashboard: Bundle,
    bundles: dict[str, Bundle],
) -> None:
    t = next(t for t in report.targets if t.target.name == MONITORED.name)
    assert t.stages == {"render": [], "schema": [], "typed-models": []}
    assert all(r.failures == [] for r in t.results), report.failures
    added = {r.ref for r in monitored.resources} - {r.ref for r in gpu.resources}
    assert added == {"PodMonitor/percept", RULE_REF, DASHBOARD_REF}
    assert len(monitored.resources) == len(gpu.resources) + 3
    # the overlay's objects are overlays/gpu's, the components' as rendered on their own
    podmonitor = bundles["components/podmonitor"]
    alone = {r.ref: r.raw for b in (gpu, podmonitor, alerts, dashboard) for r in b.resources}
    for r in monitored.resources:
        assert r.raw == alone[r.ref], r.ref
    # the overlay's namespace does not pull the dashboard into percept
    cm = monitored.get("ConfigMap", "percept-dashboard")
    assert cm is not None and cm.namespace == MONITORING_NAMESPACE
    results = {r.check: r for r in t.results}
    assert results["alerts"].applied and results["dashboards"].applied


# Our PrometheusRule schema ----------------------------------------------------------------


def test_the_schema_is_ours_strict_and_valid() -> None:
    schema = crds.PROMETHEUSRULE_SCHEMA
    jsonschema.Draft202012Validator.check_schema(schema)
    assert crds.SCHEMAS[("monitoring.coreos.com/v1", "PrometheusRule")] is schema
    doc = " ".join((crds.__doc__ or "").split())
    assert "One kind so far" not in doc and "PROMETHEUSRULE_SCHEMA" in doc
    objects = _object_schemas(schema)
    assert len(objects) == 4  # the object, its spec, a group, a rule
    for sub in objects:
        assert sub["additionalProperties"] is False, sorted(sub["properties"])


def test_the_prometheusrule_validates_and_types(alerts: Bundle) -> None:
    raw = _raw(alerts, RULE_REF)
    assert schema_errors(raw, schema_version()) == []
    model = to_model(raw)
    assert isinstance(model, crds.CustomModel)
    groups = model.spec.groups
    assert [g.name for g in groups] == [g["name"] for g in raw["spec"]["groups"]]
    first = groups[0].rules[0]
    assert first.alert == _rule(raw)["alert"]
    assert first.var_for == _rule(raw)["for"]  # `for`, a Python keyword, as the client would
    assert first.labels["severity"] in ("critical", "warning", "info")
    assert first.record is None
    with pytest.raises(AttributeError, match="not a field"):
        _ = first.exprr


# (id, mutation, text in one schema error: each names the path)
SCHEMA_CASES: list[tuple[str, Mutation, str]] = [
    ("expr-misspelt", lambda r: _rule(r).update(exprr=_rule(r).pop("expr")),
     "spec.groups.0.rules.0: Additional properties are not allowed ('exprr' was unexpected)"),
    ("expr-missing", lambda r: _rule(r).pop("expr"),
     "spec.groups.0.rules.0: 'expr' is a required property"),
    ("neither-alert-nor-record", lambda r: _rule(r).pop("alert"),
     "spec.groups.0.rules.0: a rule has exactly one of `alert` (an alerting rule) and "
     "`record` (a recording rule)"),
    ("both-alert-and-record", lambda r: _rule(r).update(record="percept:errors:ratio5m"),
     "spec.groups.0.rules.0: a rule has exactly one of `alert`"),
    ("for-not-a-duration", lambda r: _rule(r).update({"for": "5 minutes"}),
     "spec.groups.0.rules.0.for: '5 minutes' is not a duration"),
    ("for-a-number", lambda r: _rule(r, 1).update({"for": 60}),
     "spec.groups.1.rules.0.for: 60 is not of type 'string'"),
    ("recording-rule-with-for",
     lambda r: _rule(r).update(record=_rule(r).pop("alert").lower(), labels={}),
     "spec.groups.0.rules.0.for: a recording rule has no `for`"),
    ("severity-a-number", lambda r: _rule(r)["labels"].update(severity=2),
     "spec.groups.0.rules.0.labels.severity: 2 is not of type 'string'"),
    ("annotation-a-list", lambda r: _rule(r)["annotations"].update(summary=["a", "b"]),
     "spec.groups.0.rules.0.annotations.summary: ['a', 'b'] is not of type 'string'"),
    ("groups-missing", lambda r: r["spec"].pop("groups"),
     "spec: 'groups' is a required property"),
    ("rules-empty", lambda r: r["spec"]["groups"][0].update(rules=[]),
     "spec.groups.0.rules: [] should be non-empty"),
    ("group-name-missing", lambda r: r["spec"]["groups"][0].pop("name"),
     "spec.groups.0: 'name' is a required property"),
    ("a-field-the-operator-has-but-we-do-not",
     lambda r: r["spec"]["groups"][0].update(interval="1m"),
     "spec.groups.0: Additional properties are not allowed ('interval' was unexpected)"),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [pytest.param(*c[1:], id=c[0]) for c in SCHEMA_CASES]
)
def test_the_schema_rejects(alerts: Bundle, mutate: Mutation, expected: str) -> None:
    raw = _raw(alerts, RULE_REF)
    version = schema_version()
    assert schema_errors(raw, version) == []
    mutate(raw)
    errors = schema_errors(raw, version)
    assert any(e.startswith(expected) for e in errors), errors
    assert all(e.endswith(f"({crds.SOURCE})") for e in errors), errors


def test_a_recording_rule_validates(alerts: Bundle) -> None:
    """`record` is the other kind of rule the schema takes (the component has none yet)."""
    raw = _raw(alerts, RULE_REF)
    raw["spec"]["groups"][0]["rules"].append(
        {"record": "percept:requests:rate5m", "expr": "sum(rate(percept_requests_total[5m]))",
         "labels": {"team": "percept"}})
    assert schema_errors(raw, schema_version()) == []
    assert failures("alerts", _with_raw(raw)) == []  # nothing pages: no severity needed


# The `alerts` policy ----------------------------------------------------------------------


# (id, mutation, text in one failure of the `alerts` check)
ALERT_CASES: list[tuple[str, Mutation, str]] = [
    ("severity-missing", lambda r: _rule(r)["labels"].pop("severity"),
     "group percept.calls alert PerceptServerErrors: label severity is None, want one of "
     "critical, warning, info"),
    ("severity-unknown", lambda r: _rule(r)["labels"].update(severity="page"),
     "alert PerceptServerErrors: label severity is 'page'"),
    ("labels-missing", lambda r: _rule(r, 1).pop("labels"),
     "label severity is None"),
    ("summary-empty", lambda r: _rule(r)["annotations"].update(summary=" "),
     "alert PerceptServerErrors: no summary annotation (or an empty one)"),
    ("description-missing", lambda r: _rule(r)["annotations"].pop("description"),
     "alert PerceptServerErrors: no description annotation"),
    ("annotations-missing", lambda r: _rule(r).pop("annotations"),
     "alert PerceptServerErrors: no summary annotation"),
    ("alert-name-twice-across-groups",
     lambda r: _rule(r, 1).update(alert=_rule(r, 0)["alert"]),
     "PrometheusRule/percept: more than one alert is named 'PerceptServerErrors'"),
    ("alert-name-twice-in-a-group",
     lambda r: _rule(r, 0, 1).update(alert=_rule(r, 0)["alert"]),
     "more than one alert is named 'PerceptServerErrors'"),
    ("group-name-twice",
     lambda r: r["spec"]["groups"][1].update(name=r["spec"]["groups"][0]["name"]),
     "PrometheusRule/percept: more than one group is named 'percept.calls'"),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [pytest.param(*c[1:], id=c[0]) for c in ALERT_CASES]
)
@pytest.mark.parametrize("where", ["component", "overlay"])
def test_the_alerts_check_fails(
    alerts: Bundle, monitored: Bundle, where: str, mutate: Mutation, expected: str
) -> None:
    bundle = alerts if where == "component" else monitored
    assert failures("alerts", bundle) == []
    raw = _raw(bundle, RULE_REF)
    mutate(raw)
    assert schema_errors(raw, schema_version()) == []  # the schema lets it through
    found = failures("alerts", _with(bundle, RULE_REF, mutate))
    assert any(expected in f for f in found), found


def test_every_real_alert_pages_with_a_known_severity(alerts: Bundle) -> None:
    (rule,) = alerts.resources
    rules = [r for g in rule.model.spec.groups for r in g.rules]
    assert rules and all(r.alert for r in rules)
    names = [r.alert for r in rules]
    assert len(names) == len(set(names))
    for r in rules:
        assert r.labels["severity"] in ("critical", "warning", "info"), r.alert
        assert r.annotations["summary"].strip() and r.annotations["description"].strip()


# The `dashboards` policy ------------------------------------------------------------------


# (id, mutation of the ConfigMap, text in one failure of the `dashboards` check)
DASHBOARD_CASES: list[tuple[str, Mutation, str]] = [
    ("in-namespace-percept", lambda r: r["metadata"].update(namespace="percept"),
     "ConfigMap/percept-dashboard: namespace 'percept', want 'monitoring'"),
    ("not-json", lambda r: r["data"].update({"percept.json": "{'uid': 'percept'"}),
     "ConfigMap/percept-dashboard percept.json: not JSON"),
    ("a-json-list", lambda r: r["data"].update({"percept.json": "[]"}),
     "percept.json: not a dashboard (a JSON list)"),
    ("no-data", lambda r: r.update(data={}), "holds no dashboard"),
    ("uid-empty", _edit_dashboard(lambda d: d.update(uid="")),
     "percept.json: no uid (or an empty one)"),
    ("title-missing", _edit_dashboard(lambda d: d.pop("title")),
     "percept.json: no title"),
    ("panels-empty", _edit_dashboard(lambda d: d.update(panels=[])),
     "percept.json: no panels"),
    ("target-expr-empty", _edit_dashboard(lambda d: _first_target(d).update(expr="")),
     "percept.json: panel 'Calls per second' target A: empty expr"),
    ("target-expr-missing", _edit_dashboard(lambda d: _first_target(d).pop("expr")),
     "target A: empty expr"),
    ("target-in-a-collapsed-row",
     _edit_dashboard(lambda d: d["panels"].append(
         {"type": "row", "title": "Hidden", "collapsed": True, "panels": [
             {"type": "timeseries", "title": "Nested", "targets": [{"refId": "Z", "expr": ""}]}
         ]})),
     "panel 'Nested' target Z: empty expr"),
    ("a-second-dashboard-with-the-same-uid",
     lambda r: r["data"].update({"copy.json": r["data"]["percept.json"]}),
     "more than one dashboard has uid 'percept'"),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [pytest.param(*c[1:], id=c[0]) for c in DASHBOARD_CASES]
)
@pytest.mark.parametrize("where", ["component", "overlay"])
def test_the_dashboards_check_fails(
    dashboard: Bundle, monitored: Bundle, where: str, mutate: Mutation, expected: str
) -> None:
    bundle = dashboard if where == "component" else monitored
    assert failures("dashboards", bundle) == []
    found = failures("dashboards", _with(bundle, DASHBOARD_REF, mutate))
    assert any(expected in f for f in found), found


def test_the_real_dashboard_queries_in_every_panel(dashboard: Bundle) -> None:
    (cm,) = dashboard.resources
    board = json.loads(cm.model.data["percept.json"])
    assert board["uid"] and board["title"] and board["panels"]
    targets = [t for p in board["panels"] for t in p.get("targets") or []]
    assert targets and all(t["expr"].strip() for t in targets)


def test_a_configmap_without_the_label_is_no_dashboard(monitored: Bundle) -> None:
    """The check reads the ConfigMaps labelled grafana_dashboard only: the server's
    environment ConfigMaps are none of its business."""
    plain = _with(monitored, DASHBOARD_REF, lambda r: r["metadata"]["labels"].pop(
        "grafana_dashboard"))
    assert failures("dashboards", plain) == []


# The `namespace` policy beside the dashboard ------------------------------------------------


def test_the_namespace_check_leaves_the_dashboard_to_the_dashboards_check(
    dashboard: Bundle, monitored: Bundle
) -> None:
    for bundle in (dashboard, monitored):
        assert failures("namespace", bundle) == []
    # the exemption is the label's: unlabelled, the same ConfigMap is out of place
    unlabelled = _with(dashboard, DASHBOARD_REF, lambda r: r["metadata"]["labels"].pop(
        "grafana_dashboard"))
    assert failures("namespace", unlabelled) == [
        "ConfigMap/percept-dashboard: namespace 'monitoring', want 'percept'"]
    # and it covers no other object: the server ConfigMap moved to monitoring still fails
    (server_cm,) = [r for r in monitored.of_kind("ConfigMap")
                    if r.name.startswith("percept-server-")]
    moved = _with(monitored, server_cm.ref, lambda r: r["metadata"].update(
        namespace=MONITORING_NAMESPACE))
    assert f"{server_cm.ref}: namespace 'monitoring', want 'percept'" in failures(
        "namespace", moved)
    # a PrometheusRule in monitoring is out of place too
    rule_moved = _with(monitored, RULE_REF, lambda r: r["metadata"].update(
        namespace=MONITORING_NAMESPACE))
    assert f"{RULE_REF}: namespace 'monitoring', want 'percept'" in failures(
        "namespace", rule_moved)


def test_the_checks_are_registered() -> None:
    names = [c.name for c in CHECKS]
    for name in ("alerts", "dashboards"):
        assert name in names
        check = check_by_name(name)
        assert set(check.scopes) == {"app", "component"}, name


# End to end: deploy/validate.py's pipeline on broken copies --------------------------------


def _copy(tmp_path: Path, source: Path, file: str, old: str, new: str) -> render.Target:
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    path = folder / file
    text = path.read_text()
    assert old in text, (file, old)
    path.write_text(text.replace(old, new, 1))
    target = ALERTS if source == ALERTS_DIR else DASHBOARD
    return dataclasses.replace(target, name=f"tmp/{source.name}", path=folder)


@pytest.mark.parametrize(
    ("source", "file", "old", "new", "expected"),
    [
        pytest.param(
            ALERTS_DIR, "prometheusrule.yaml", "          expr: |", "          exprr: |",
            "[tmp/alerts] schema: PrometheusRule/percept: spec.groups.0.rules.0: Additional "
            "properties are not allowed ('exprr' was unexpected)", id="alerts-expr-misspelt"),
        pytest.param(
            ALERTS_DIR, "prometheusrule.yaml", "          for: 5m", "          for: 5 min",
            "[tmp/alerts] schema: PrometheusRule/percept: spec.groups.0.rules.0.for: '5 min' "
            "is not a duration", id="alerts-bad-for"),
        pytest.param(
            ALERTS_DIR, "prometheusrule.yaml", "severity: critical", "severity: page",
            "[tmp/alerts] alerts: PrometheusRule/percept group percept.calls alert "
            "PerceptServerErrors: label severity is 'page'", id="alerts-unknown-severity"),
        pytest.param(
            DASHBOARD_DIR, "kustomization.yaml", "namespace: monitoring", "namespace: percept",
            "[tmp/dashboard] dashboards: ConfigMap/percept-dashboard: namespace 'percept', "
            "want 'monitoring'", id="dashboard-in-percept"),
        pytest.param(
            DASHBOARD_DIR, "percept.json", '"uid": "percept"', '"uid": ""',
            "[tmp/dashboard] dashboards: ConfigMap/percept-dashboard percept.json: no uid",
            id="dashboard-no-uid"),
    ],
)
def test_validation_fails_on_a_broken_copy(
    tmp_path: Path, source: Path, file: str, old: str, new: str, expected: str
) -> None:
    target = _copy(tmp_path, source, file, old, new)
    report = validate_targets((GPU_TARGET, target))
    assert not report.ok
    assert any(f.startswith(expected) for f in report.failures), report.failures
    assert not any(f.startswith("[overlays/gpu]") for f in report.failures)
