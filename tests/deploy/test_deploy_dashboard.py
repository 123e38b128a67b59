"""percept's Grafana dashboard (deploy/dashboard.py, deploy/k8s/components/dashboard): the
committed JSON is what the generator builds, every query is PromQL that promtool takes and
reads only what percept's servers export, and the panels tile the grid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import dashboard
from deploy.render import REPO_ROOT
from tests.deploy.prometheus_tools import expression_problems, promtool


def concrete(expr: str, namespace: str = "percept", rate_interval: str = "1m") -> str:
    """A dashboard query as Grafana sends it, its variables replaced."""
    return expr.replace("$namespace", namespace).replace("$__rate_interval", rate_interval)


def _built() -> dict[str, Any]:
    return json.loads(dashboard.DASHBOARD_JSON.read_text())


def test_the_committed_json_is_what_the_generator_builds() -> None:
    assert dashboard.DASHBOARD_JSON.read_text() == dashboard.render(), (
        "run: python -m deploy.dashboard")
    done = subprocess.run([sys.executable, "-m", "deploy.dashboard", "--check"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("percept.json is current")


def test_the_component_ships_the_committed_json() -> None:
    component = yaml.safe_load((dashboard.COMPONENT / "kustomization.yaml").read_text())
    (generator,) = component["configMapGenerator"]
    assert generator["files"] == [dashboard.DASHBOARD_JSON.name]
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.parametrize(("title", "query"), dashboard.queries(),
                         ids=[f"{t}/{q.legend}" for t, q in dashboard.queries()])
def test_each_query_reads_only_what_percept_exports(title: str,
                                                    query: dashboard.Query) -> None:
    assert expression_problems(concrete(query.expr)) == []
    assert '$namespace' in query.expr, "every query keeps to the picked namespaces"


def test_promtool_takes_every_query(tmp_path: Path) -> None:
    """Each query, as a recording rule: promtool parses its PromQL."""
    rules = [{"record": f"dashboard:query{i}", "expr": concrete(q.expr)}
             for i, (_, q) in enumerate(dashboard.queries())]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_promtool_refuses_a_broken_query(tmp_path: Path) -> None:
    """The check above can fail: a missing parenthesis is refused."""
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": "dashboard:broken", "expr": "sum by (pod (percept_inflight_pixels)"}]}]}))
    assert promtool("check", "rules", str(path)).returncode != 0


def test_the_panels_tile_the_grid_without_overlaps() -> None:
    panels = _built()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    taken: set[tuple[int, int]] = set()
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells


def test_every_panel_reads_the_picked_data_source() -> None:
    built = _built()
    variables = {v["name"]: v for v in built["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["namespace"]["multi"] and variables["namespace"]["includeAll"]
    for panel in built["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}"
                                        for t in panel["targets"])
        assert panel["description"], panel["title"]
