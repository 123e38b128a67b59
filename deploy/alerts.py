"""percept's alerting rules as a Prometheus rule file, for a Prometheus run without the
Prometheus Operator: the `spec` of the PrometheusRule in deploy/k8s/components/alerts,
which is one.

    python -m deploy.alerts out/percept-alerts.yaml   # then list it in rule_files:
    python -m deploy.alerts                            # the same, on stdout
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from deploy.render import K8S_DIR

#: the PrometheusRule of the optional alerts component
PROMETHEUS_RULE = K8S_DIR / "components" / "alerts" / "prometheusrule.yaml"


def rule_groups(path: Path = PROMETHEUS_RULE) -> dict[str, Any]:
    """The PrometheusRule's spec: ``{"groups": [...]}``, a rule file's content."""
    rule = yaml.safe_load(path.read_text())
    if not isinstance(rule, dict) or rule.get("kind") != "PrometheusRule":
        raise ValueError(f"{path}: not a PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def rule_file_text(path: Path = PROMETHEUS_RULE) -> str:
    header = (f"# percept's alerting rules, from {path.relative_to(K8S_DIR.parent.parent)}\n"
              "# (python -m deploy.alerts writes this file); promtool check rules takes it.\n")
    return header + yaml.safe_dump(rule_groups(path), sort_keys=False, width=100)


def alert_names(path: Path = PROMETHEUS_RULE) -> list[str]:
    return [rule["alert"] for group in rule_groups(path)["groups"]
            for rule in group["rules"] if "alert" in rule]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.alerts",
        description="Write percept's alerting rules as a Prometheus rule file.")
    parser.add_argument("out", nargs="?", type=Path,
                        help="the file to write (default: stdout)")
    args = parser.parse_args(argv)
    text = rule_file_text()
    if args.out is None:
        sys.stdout.write(text)
        return 0
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    except OSError as error:
        print(f"cannot write {args.out}: {error.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {len(alert_names())} alerts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
