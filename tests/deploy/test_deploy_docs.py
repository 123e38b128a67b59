"""What the deployment's kustomization files, docs and Makefile promise beside the rendered
objects: one image release in every kustomization, image builds that record the commit,
rollout waits that outlast the progress deadline, the teardown order, and the
train-devise evaluations scoring the model that was trained."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy import render
from deploy.policy import CHECKS, Bundle
from deploy.policy.model import IMAGE_REPOSITORY, image_version, split_image

REPO = render.REPO_ROOT
DEPLOY_README = REPO / "deploy" / "README.md"
README = REPO / "README.md"
MAKEFILE = REPO / "Makefile"
DOCKERFILE = render.DOCKERFILE


def _kustomizations() -> dict[str, dict]:
    """deploy/k8s-relative folder -> its kustomization.yaml."""
    return {
        str(path.parent.relative_to(render.K8S_DIR)): yaml.safe_load(path.read_text())
        for path in sorted(render.K8S_DIR.rglob("kustomization.yaml"))
    }


def test_every_kustomization_naming_the_image_names_one_release() -> None:
    """`kustomize edit set image` in some kustomizations but not the others (the training
    Job kept ghcr.io/... while the overlay moved on) fails here, before anything renders:
    one name, one new name, one version; the variant suffix is the target's."""
    naming: dict[str, list[dict]] = {}
    for folder, k in _kustomizations().items():
        for entry in k.get("images") or []:
            naming.setdefault(folder, []).append(entry)
    targets_with_pods = {t.name for t in render.TARGETS if t.kind != "cluster"}
    assert set(naming) == targets_with_pods, "each overlay and job names the image itself"
    releases = set()
    for folder, entries in naming.items():
        assert len(entries) == 1, folder
        (entry,) = entries
        assert entry["name"] == IMAGE_REPOSITORY, (folder, entry)  # what the manifests use
        tag = entry.get("newTag")
        version, variant = image_version(str(tag) if tag is not None else None)
        want = "cpu" if folder == "overlays/cpu" else "gpu"
        assert variant == want, (folder, tag)
        releases.add((entry.get("newName", entry["name"]), version))
    assert len(releases) == 1, f"kustomizations name different images: {sorted(releases)}"


def test_the_manifests_use_the_image_name_the_kustomizations_set() -> None:
    """kustomize matches `images:` by name: a manifest with another name is never set."""
    for path in sorted((render.K8S_DIR / "base").glob("*.yaml")) + sorted(
        (render.K8S_DIR / "jobs").rglob("job.yaml")
    ):
        for image in re.findall(r"^\s*image:\s*(\S+)", path.read_text(), flags=re.M):
            assert split_image(image)[0] == IMAGE_REPOSITORY, (path, image)


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def test_step_2_retargets_every_kustomization_naming_the_image() -> None:
    step = _section(DEPLOY_README.read_text(), "## 2. Build and push the image")
    assert "kustomize edit set image" in step
    for folder, k in _kustomizations().items():
        if k.get("images"):
            assert folder in step, f"deploy/README.md step 2 does not retarget {folder}"


def _docker_builds(text: str) -> list[str]:
    """Every `docker build ...` command (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    return re.findall(r"docker build [^\n`]*", joined)


@pytest.mark.parametrize("path", [DEPLOY_README, README, MAKEFILE, DOCKERFILE],
                         ids=lambda p: str(Path(p).relative_to(REPO)))
def test_image_builds_record_the_commit(path: Path) -> None:
    """A model trained in the image records PERCEPT_GIT_SHA (it has no .git): every
    documented build passes it."""
    builds = _docker_builds(path.read_text())
    for build in builds:
        assert "--build-arg PERCEPT_GIT_SHA=" in build, f"{path.name}: {build}"
    if path in (MAKEFILE, DEPLOY_README, DOCKERFILE):
        assert builds, f"no docker build in {path.name}"


def test_documented_rollout_waits_outlast_the_progress_deadline(gpu: Bundle) -> None:
    """A fixed `rollout status --timeout` shorter than one Deployment's
    progressDeadlineSeconds would give up on a healthy rollout the controller still
    allows; the Makefile computes its waits from the Deployments themselves."""
    deadline = max(d.model.spec.progress_deadline_seconds for d in gpu.of_kind("Deployment"))
    units = {"s": 1, "m": 60, "h": 3600}
    for path in (DEPLOY_README, README, MAKEFILE):
        for value, unit in re.findall(r"rollout status [^\n]*--timeout=(\d+)([smh])",
                                      path.read_text()):
            assert int(value) * units[unit] >= deadline, (path.name, value + unit)
    make = MAKEFILE.read_text()
    assert "{.spec.replicas} {.spec.progressDeadlineSeconds}" in make


def test_policy_docs_list_every_check() -> None:
    """deploy/README.md's table names every policy, and README.md counts them."""
    checks = _section(DEPLOY_README.read_text(), "What `make deploy-validate` checks")
    table = set(re.findall(r"^\| ([a-z-]+) \|", checks, flags=re.M))
    table.discard("policy")
    assert table == {c.name for c in CHECKS}
    counted = re.search(r"check (\d+) policies", README.read_text())
    assert counted is not None and int(counted.group(1)) == len(CHECKS)


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    return subprocess.run([make, "-n", "-C", str(REPO), *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_make_deploy_applies_the_cluster_kustomization_first() -> None:
    proc = _make("-o", "deploy-validate", "deploy")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    cluster = out.index("kubectl apply -k deploy/k8s/cluster")
    overlay = out.index("kubectl apply -k deploy/k8s/overlays/gpu")
    assert cluster < overlay < out.index("rollout status")


def test_make_image_passes_the_commit() -> None:
    proc = _make("image")
    assert proc.returncode == 0, proc.stderr
    assert "--build-arg PERCEPT_GIT_SHA=$sha" in proc.stdout
    assert "sha=$(git rev-parse HEAD)" in proc.stdout


def _eval_lines(out: str) -> list[str]:
    return [line.strip() for line in out.splitlines() if " eval " in line]


def test_train_devise_evaluates_the_default_model_by_default() -> None:
    proc = _make("train-devise")
    assert proc.returncode == 0, proc.stderr
    evals = _eval_lines(proc.stdout)
    assert any("eval devise --model models/devise-minilm --update-metrics" in e for e in evals)
    assert any("eval search --method both --update-metrics" in e for e in evals)


def test_train_devise_refuses_another_model_without_devise_model() -> None:
    """The README's example trains models/devise-glove-6b-300d; the evaluations must not
    score (and rewrite the metrics of) models/devise-minilm instead."""
    for args in ("--word-vectors glove.6B.300d.txt", "--name devise-x", "--out=models/x"):
        proc = _make("train-devise", f"ARGS={args}")
        assert proc.returncode != 0, args
        assert "DEVISE_MODEL" in proc.stderr, proc.stderr
        assert "train devise" not in proc.stdout


def test_train_devise_evaluates_the_model_it_is_told() -> None:
    proc = _make("train-devise", "ARGS=--word-vectors glove.6B.300d.txt",
                 "DEVISE_MODEL=models/devise-glove-6b-300d")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "train devise --word-vectors glove.6B.300d.txt" in out
    assert "eval devise --model models/devise-glove-6b-300d --update-metrics" in out
    # eval search has no --model: it runs only when the model is the default one
    assert re.search(r'if \[ "\S+/models/devise-glove-6b-300d" = "\S+/models/devise-minilm" \]',
                     out)
    assert "percept eval search skipped" in out
