"""Validate percept's Kubernetes deployment offline: `.venv/bin/python deploy/validate.py`.

Renders every kustomize target (deploy/k8s/cluster, overlays/gpu, overlays/cpu,
overlays/gpu-tls (overlays/gpu with the optional components/tls), overlays/gpu-monitored
(overlays/gpu with the optional components/podmonitor, alerts and dashboard), the training
Job and the optional components/podmonitor, components/alerts and components/dashboard on
their own) with the venv's `kubectl kustomize`,
validates each object against the bundled Kubernetes JSON schemas in strict mode
(kubernetes-validate; the PodMonitor and the PrometheusRule against our own schemas,
deploy/crds.py), loads it
into the `kubernetes` client's typed models, runs the policy checks of deploy/policy/
(some across targets: every target runs one image release; the PodMonitor is checked
against the pods of overlays/gpu; the `images` check wants the variant each container
needs, -gpu with nvidia.com/gpu and -cpu without, so that the gpu overlay's search, whose
base image name is the percept-cpu-image placeholder, never pulls the CUDA image), and
prints a summary table ("n/a": the check does not apply to that kind of target). Exit
status: 0 when everything passes, 1 on any failure, 2 when the tooling itself is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import `deploy` from the repository root, and keep deploy/ itself off
    # sys.path so that its modules (render, policy ...) cannot shadow top-level ones.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

from deploy import render
from deploy.pipeline import STAGES, Report, validate_targets
from deploy.policy import CHECKS


def format_table(report: Report) -> str:
    """The per-check summary: one row per stage or check, one column per target."""
    columns = [t.target.name for t in report.targets]
    rows: list[list[str]] = []
    for stage in STAGES:
        row = [stage]
        for t in report.targets:
            if stage not in t.stages:
                row.append("-")
            else:
                n = len(t.stages[stage])
                row.append("PASS" if n == 0 else f"FAIL ({n})")
        rows.append(row)
    for check in CHECKS:
        row = [check.name]
        for t in report.targets:
            result = next((r for r in t.results if r.check == check.name), None)
            if result is None:
                row.append("skipped" if t.bundle is None else "-")
            elif not result.applied:
                row.append("n/a")
            else:
                n = len(result.failures)
                row.append("PASS" if n == 0 else f"FAIL ({n})")
        rows.append(row)
    headers = ["check", *columns]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def main(argv: list[str] | None = None) -> int:
    """Run the validation and print the table; the exit status says whether it passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the policy checks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for check in CHECKS:
            print(f"{check.name}: {check.summary}")
        return 0
    try:
        report = validate_targets()
    except (render.RenderError, RuntimeError, ImportError) as exc:
        print(f"deploy-validate: {exc}", file=sys.stderr)
        return 2
    print(
        f"kubectl: {report.kubectl}\n"
        f"schemas: Kubernetes {report.kubernetes_version} "
        f"(kubernetes-validate {report.validator_version}, strict)\n"
    )
    print(format_table(report))
    failures = report.failures
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    n_objects = sum(len(t.bundle.resources) for t in report.targets if t.bundle)
    print(f"\nOK: {len(report.targets)} targets, {n_objects} objects, {len(CHECKS)} policies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
