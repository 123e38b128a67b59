"""percept's alerting rules (deploy/k8s/components/alerts): promtool takes them, every alert
passes its promtool unit tests (alerts_test.yaml), which fire and quiet each one, and
every rule reads only metrics and labels that percept's servers export."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import alerts
from deploy.render import REPO_ROOT
from tests.deploy.prometheus_tools import (
    expression_problems,
    output_labels,
    promtool,
    template_labels,
)

UNIT_TESTS = Path(__file__).parent / "alerts_test.yaml"


def _rules() -> list[dict[str, Any]]:
    return [rule for group in alerts.rule_groups()["groups"] for rule in group["rules"]]


def _unit_test_dir(tmp_path: Path, rules: dict[str, Any] | None = None) -> Path:
    """alerts_test.yaml beside rules.yaml (the component's rules, or ``rules``)."""
    (tmp_path / "rules.yaml").write_text(
        yaml.safe_dump(rules) if rules is not None else alerts.rule_file_text())
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    return tmp_path


def test_promtool_checks_every_rule(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(alerts.rule_file_text())
    done = promtool("check", "rules", str(tmp_path / "rules.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in done.stdout


def test_every_alert_passes_its_promtool_unit_tests(tmp_path: Path) -> None:
    done = promtool("test", "rules", UNIT_TESTS.name, cwd=_unit_test_dir(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_unit_tests_fire_and_quiet_every_alert() -> None:
    """Each alert is expected to fire in some test (labels and rendered annotations) and
    to stay quiet in another, and no test names an alert the rules lack."""
    fired, quiet = set(), set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for expectation in case["alert_rule_test"]:
            (fired if expectation["exp_alerts"] else quiet).add(expectation["alertname"])
    names = set(alerts.alert_names())
    assert fired == names, f"never fired: {names - fired}; unknown: {fired - names}"
    assert quiet == names, f"never quiet: {names - quiet}; unknown: {quiet - names}"


@pytest.mark.parametrize(("alert", "old", "new"), [
    ("PerceptServerErrors", "> 0.01", "> 0.5"),            # a threshold
    ("PerceptBusy", 'grpc_code="RESOURCE_EXHAUSTED"', 'grpc_code="UNAVAILABLE"'),
    ("PerceptQueueStalled", "== 1", "== 2"),
])
def test_a_changed_rule_fails_its_unit_tests(tmp_path: Path, alert: str, old: str,
                                             new: str) -> None:
    """The unit tests hold the rules to what they say: an edit shows up as a failure
    naming the alert."""
    groups = alerts.rule_groups()
    (rule,) = [r for g in groups["groups"] for r in g["rules"] if r.get("alert") == alert]
    assert old in rule["expr"]
    rule["expr"] = rule["expr"].replace(old, new)
    done = promtool("test", "rules", UNIT_TESTS.name, cwd=_unit_test_dir(tmp_path, groups))
    assert done.returncode != 0
    assert f"alertname: {alert}" in done.stdout + done.stderr


@pytest.mark.parametrize("rule", _rules(), ids=lambda rule: rule["alert"])
def test_each_rule_reads_only_what_percept_exports(rule: dict[str, Any]) -> None:
    assert expression_problems(rule["expr"]) == []


@pytest.mark.parametrize("rule", _rules(), ids=lambda rule: rule["alert"])
def test_each_annotation_names_only_labels_of_its_alert(rule: dict[str, Any]) -> None:
    """A template label the expression aggregates away renders empty ("in  ...")."""
    labels = output_labels(rule["expr"]) | set(rule.get("labels", {}))
    for key, text in rule["annotations"].items():
        missing = set(template_labels(text)) - labels
        assert not missing, f"{key} reads {missing}, which the alert has not ({labels})"


@pytest.mark.parametrize(("expr", "problem"), [
    ("rate(percept_request_total[5m])", "percept_request_total: no percept server exports"),
    ('percept_queue_stalled{queue="style", pods="a"}', "has no label 'pods'"),
    ("sum by (grpc_code) (percept_inflight_requests)", "by (grpc_code)"),
    ("up == 0", "reads no percept metric"),
])
def test_the_expression_check_finds_misspellings(expr: str, problem: str) -> None:
    assert any(problem in p for p in expression_problems(expr)), expression_problems(expr)


def test_python_m_deploy_alerts_writes_a_rule_file(tmp_path: Path) -> None:
    out = tmp_path / "rules" / "percept-alerts.yaml"
    done = subprocess.run([sys.executable, "-m", "deploy.alerts", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {len(alerts.alert_names())} alerts to {out}"
    assert yaml.safe_load(out.read_text()) == alerts.rule_groups()
    assert promtool("check", "rules", str(out)).returncode == 0
    (tmp_path / "file").write_text("")
    done = subprocess.run([sys.executable, "-m", "deploy.alerts", str(tmp_path / "file" / "x")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2
    assert done.stderr.startswith(f"cannot write {tmp_path / 'file' / 'x'}: ")
