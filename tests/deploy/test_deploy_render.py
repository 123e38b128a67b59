"""Every kustomize target renders offline, validates strictly against the bundled
Kubernetes schemas, and loads into the kubernetes client's typed models."""

from __future__ import annotations

import copy
import os
import stat
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from deploy import crds, render
from deploy.objects import (
    MIN_KUBERNETES,
    ModelError,
    model_class_name,
    schema_errors,
    schema_version,
    to_model,
)
from deploy.pipeline import Report

# No Namespace and no PersistentVolumeClaim: those are the cluster target's, so that
# `kubectl delete -k` of an overlay deletes no data.
EXPECTED_APP_KINDS = Counter(
    {
        "ConfigMap": 2,
        "Service": 4,
        "Deployment": 3,
        "StatefulSet": 1,
        "HorizontalPodAutoscaler": 3,
        "PodDisruptionBudget": 4,
        "NetworkPolicy": 4,
    }
)


def test_every_target_renders_validates_and_types(report: Report) -> None:
    assert [t.target.name for t in report.targets] == [t.name for t in render.TARGETS]
    for t in report.targets:
        for stage in ("render", "schema", "typed-models"):
            assert t.stages.get(stage) == [], (t.target.name, stage, t.stages.get(stage))
        assert t.bundle is not None and t.bundle.resources


def test_whole_validation_passes(report: Report) -> None:
    assert report.ok, "\n".join(report.failures)


@pytest.mark.parametrize("name", ["overlays/gpu", "overlays/cpu"])
def test_overlays_render_the_whole_stack(report: Report, name: str) -> None:
    t = next(t for t in report.targets if t.target.name == name)
    assert t.bundle is not None
    assert Counter(r.kind for r in t.bundle.resources) == EXPECTED_APP_KINDS


def test_cluster_target_renders_the_namespace_and_the_models_claim(report: Report) -> None:
    t = next(t for t in report.targets if t.target.kind == "cluster")
    assert t.target.name == "cluster" and t.bundle is not None
    assert sorted(r.ref for r in t.bundle.resources) == [
        "Namespace/percept",
        "PersistentVolumeClaim/percept-models",
    ]
    names = [t.target.name for t in report.targets]
    assert names.index("cluster") < names.index("jobs/train-superres")  # its companion


def test_job_target_renders_one_training_job(report: Report) -> None:
    t = next(t for t in report.targets if t.target.kind == "job")
    assert t.bundle is not None
    assert [r.ref for r in t.bundle.resources] == ["Job/train-superres"]


def test_objects_are_typed_client_models(report: Report) -> None:
    for t in report.targets:
        assert t.bundle is not None
        for r in t.bundle.resources:
            if crds.schema_for(r.raw) is not None:  # the PodMonitor: typed by our schema
                assert isinstance(r.model, crds.CustomModel), r.ref
                assert isinstance(r.model.metadata, client.V1ObjectMeta), r.ref
                continue
            cls = getattr(client, model_class_name(r.raw["apiVersion"], r.kind))
            assert isinstance(r.model, cls), r.ref
    gpu = next(t for t in report.targets if t.target.name == "overlays/gpu").bundle
    assert gpu is not None
    hpa = gpu.of_kind("HorizontalPodAutoscaler")[0].model
    assert isinstance(hpa, client.V2HorizontalPodAutoscaler)
    assert hpa.spec.scale_target_ref.kind == "Deployment"


def test_schema_version_is_the_newest_bundled_and_recent() -> None:
    from kubernetes_validate import utils

    version = schema_version()
    newest = utils.latest_version()
    assert newest.startswith(version + ".") or newest == version
    major, minor = (int(x) for x in version.split("."))
    want_major, want_minor = (int(x) for x in MIN_KUBERNETES.split("."))
    assert (major, minor) >= (want_major, want_minor)


def test_kubectl_is_the_venv_one() -> None:
    beside = Path(sys.executable).parent / "kubectl"
    if not beside.exists():
        pytest.skip("no kubectl in this interpreter's bin/ (not the project venv)")
    assert render.find_kubectl() == str(beside)


def test_find_kubectl_falls_back_to_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "kubectl"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(fake.parent))
    assert render.find_kubectl() == str(fake)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(render.RenderError, match="kubectl not found"):
        render.find_kubectl()


def test_render_error_is_reported(tmp_path: Path) -> None:
    with pytest.raises(render.RenderError, match="failed"):
        render.kustomize(tmp_path / "no-such-kustomization")


def test_overlays_are_patches_not_copies() -> None:
    for name in ("gpu", "cpu"):
        overlay = render.K8S_DIR / "overlays" / name
        kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
        assert kustomization["resources"] == ["../../base"]
        patch_files = {p["path"] for p in kustomization.get("patches", [])}
        others = {p.name for p in overlay.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert others == patch_files, f"{name}: files that are not patches: {others - patch_files}"


def _deployment(report: Report) -> dict:
    t = next(t for t in report.targets if t.target.name == "overlays/gpu")
    assert t.bundle is not None
    return copy.deepcopy(t.bundle.of_kind("Deployment")[0].raw)


def test_strict_schema_rejects_an_unknown_field(report: Report) -> None:
    obj = _deployment(report)
    obj["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    errors = schema_errors(obj, schema_version())
    assert errors and "imagePullPolice" in errors[0]


def test_schema_rejects_a_wrong_type(report: Report) -> None:
    obj = _deployment(report)
    obj["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "forty"
    assert schema_errors(obj, schema_version())


def test_schema_fails_an_unknown_kind() -> None:
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
    }
    assert schema_errors(obj, schema_version())


def test_typed_models_reject_a_missing_required_field(report: Report) -> None:
    obj = _deployment(report)
    del obj["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ModelError, match="V1Deployment"):
        to_model(obj)


def test_typed_models_reject_a_dropped_field(report: Report) -> None:
    obj = _deployment(report)
    obj["spec"]["template"]["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(ModelError, match="bogus"):
        to_model(obj)


def test_typed_models_reject_an_unknown_kind() -> None:
    with pytest.raises(ModelError, match="no model"):
        to_model({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})


def test_validate_script_passes_and_prints_the_table() -> None:
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(render.REPO_ROOT / "deploy" / "validate.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "overlays/gpu" in proc.stdout and "network-policy" in proc.stdout
    assert "FAIL" not in proc.stdout


def test_the_training_job_runs_a_command_the_trainer_accepts(report: Report) -> None:
    """The Job's command and args are a `percept train` command line its parser takes, with
    the loss of the committed superres-perceptual (its provenance), fine-tuned from a model
    the image holds."""
    import argparse

    from training import cli_superres

    t = next(t for t in report.targets if t.target.kind == "job")
    assert t.bundle is not None
    container = t.bundle.resources[0].model.spec.template.spec.containers[0]
    assert container.command == ["percept", "train", "superres"]
    env = {var.name: var for var in container.env}
    assert env["JOB_UID"].value_from.field_ref.field_path == (
        "metadata.labels['batch.kubernetes.io/controller-uid']")
    args = [a.replace("$(JOB_UID)", "0d1c9a3e") for a in container.args]
    parser = argparse.ArgumentParser()
    cli_superres.register_train(parser.add_subparsers())
    parsed = parser.parse_args(["superres", *args])
    assert parsed.resume_if_present and parsed.run_dir.endswith("-0d1c9a3e")
    assert parsed.perceptual_weight == 1e-5 and parsed.tv_weight == 0.1
    init = Path(parsed.init_from)
    assert init.parts[:3] == ("/", "app", "models")
    assert (render.REPO_ROOT / "models" / init.name / "config.json").is_file()
