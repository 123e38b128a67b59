"""Fixtures for the deployment tests: every kustomize target rendered, validated and
typed once per session (about 5 s), and the parsed Dockerfile."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # `deploy` is a top-level folder, not an installed package
    sys.path.insert(0, str(REPO_ROOT))

from deploy import render  # noqa: E402
from deploy.dockerfile import Dockerfile  # noqa: E402
from deploy.dockerfile import load as load_dockerfile  # noqa: E402
from deploy.pipeline import Report, validate_targets  # noqa: E402
from deploy.policy import Bundle  # noqa: E402


@pytest.fixture(scope="session")
def report() -> Report:
    """The full offline validation of every target."""
    return validate_targets()


@pytest.fixture(scope="session")
def bundles(report: Report) -> dict[str, Bundle]:
    """target name -> its typed bundle."""
    out = {}
    for t in report.targets:
        assert t.bundle is not None, t.failures
        out[t.target.name] = t.bundle
    return out


@pytest.fixture(scope="session")
def cluster(bundles: dict[str, Bundle]) -> Bundle:
    """deploy/k8s/cluster: the Namespace and the models claim, applied once."""
    return bundles["cluster"]


@pytest.fixture(scope="session")
def gpu(bundles: dict[str, Bundle]) -> Bundle:
    """The default (GPU) overlay."""
    return bundles["overlays/gpu"]


@pytest.fixture(scope="session")
def cpu(bundles: dict[str, Bundle]) -> Bundle:
    """The CPU overlay."""
    return bundles["overlays/cpu"]


@pytest.fixture(scope="session")
def job(bundles: dict[str, Bundle]) -> Bundle:
    """The training Job template."""
    return bundles["jobs/train-superres"]


@pytest.fixture(scope="session")
def dockerfile() -> Dockerfile:
    """deploy/docker/Dockerfile, parsed."""
    return load_dockerfile(render.DOCKERFILE)
