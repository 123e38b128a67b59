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
from deploy.policy.model import (
    CPU_IMAGE_PLACEHOLDER,
    GPU_RESOURCE,
    IMAGE_REPOSITORY,
    WORKLOAD_KINDS,
    image_version,
    split_image,
)

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


def _built_on(folder: str) -> str:
    """The overlay an overlay's pods come from: itself, or (for one whose only resource is
    another overlay and that names no image, like overlays/gpu-tls) that overlay's."""
    k = _kustomizations()[folder]
    resources = k.get("resources") or []
    if k.get("images") or len(resources) != 1:
        return folder
    other = (render.K8S_DIR / folder / resources[0]).resolve()
    if other.parent != (render.K8S_DIR / "overlays").resolve():
        return folder
    return _built_on(str(other.relative_to(render.K8S_DIR.resolve())))


#: deploy/k8s folder -> {image name in the manifests: the variant its kustomization maps it
#: to}: the model servers and the trainer (GPU) name IMAGE_REPOSITORY, search (no GPU) the
#: placeholder, which is always the CPU variant
WANT_IMAGES = {
    "overlays/gpu": {IMAGE_REPOSITORY: "gpu", CPU_IMAGE_PLACEHOLDER: "cpu"},
    "overlays/cpu": {IMAGE_REPOSITORY: "cpu", CPU_IMAGE_PLACEHOLDER: "cpu"},
    "jobs/train-superres": {IMAGE_REPOSITORY: "gpu"},
}


def test_every_kustomization_naming_the_image_names_one_release() -> None:
    """`kustomize edit set image` in some kustomizations but not the others (the training
    Job kept ghcr.io/... while the overlay moved on), or of one image name but not the
    other, fails here, before anything renders: each name mapped once, to one new name and
    one version; the variant suffix is the one that name needs in that target."""
    naming: dict[str, list[dict]] = {}
    for folder, k in _kustomizations().items():
        for entry in k.get("images") or []:
            naming.setdefault(folder, []).append(entry)
    targets_with_pods = {t.name for t in render.TARGETS if t.kind in ("app", "job")}
    # an overlay built on another one (overlays/gpu-tls on overlays/gpu) takes its images
    # from it and names none itself: step 2 then has nothing more to retarget
    built_on = {name: _built_on(name) for name in targets_with_pods}
    assert not set(naming) & {n for n, base in built_on.items() if base != n}
    assert set(naming) == set(built_on.values()) == set(WANT_IMAGES), (
        "each overlay and job names the image itself, or is built on one that does")
    releases = set()
    for folder, entries in naming.items():
        names = [entry["name"] for entry in entries]
        assert sorted(names) == sorted(WANT_IMAGES[folder]), (folder, names)
        for entry in entries:
            tag = entry.get("newTag")
            version, variant = image_version(str(tag) if tag is not None else None)
            assert variant == WANT_IMAGES[folder][entry["name"]], (folder, entry)
            if entry["name"] == CPU_IMAGE_PLACEHOLDER:
                assert entry.get("newName"), f"{folder}: the placeholder needs a newName"
            releases.add((entry.get("newName", entry["name"]), version))
    assert len(releases) == 1, f"kustomizations name different images: {sorted(releases)}"


def test_gpu_overlay_maps_the_model_image_before_the_placeholder() -> None:
    """kustomize applies `images:` entries one after the other: once the placeholder entry
    has renamed search's image ghcr.io/percept/percept, an entry for that name after it
    retags search with the models' -gpu tag. `kustomize edit set image` writes the
    entries sorted by name, so that order must also be the sorted one."""
    for folder in ("overlays/gpu", "overlays/cpu"):
        names = [e["name"] for e in _kustomizations()[folder]["images"]]
        assert names == [IMAGE_REPOSITORY, CPU_IMAGE_PLACEHOLDER] == sorted(names), folder


def _manifest_containers(path: Path) -> list[tuple[str, dict]]:
    """(kind/name, container) of every workload container in a manifest file."""
    out = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc or doc.get("kind") not in WORKLOAD_KINDS:
            continue
        pod = doc["spec"]["template"]["spec"]
        for c in pod.get("initContainers", []) + pod["containers"]:
            out.append((f"{doc['kind']}/{doc['metadata']['name']}", c))
    return out


def test_the_manifests_use_the_image_name_the_kustomizations_set() -> None:
    """kustomize matches `images:` by name: a manifest with another name is never set. A
    container that uses a GPU names the image itself, one that uses none (search) the
    CPU placeholder, so that the gpu overlay can give it the -cpu tag."""
    used: dict[str, set[str]] = {"base": set(), "jobs/train-superres": set()}
    for key, paths in (
        ("base", sorted((render.K8S_DIR / "base").glob("*.yaml"))),
        ("jobs/train-superres", sorted((render.K8S_DIR / "jobs").rglob("job.yaml"))),
    ):
        for path in paths:
            for ref, c in _manifest_containers(path):
                limits = (c.get("resources") or {}).get("limits") or {}
                want = IMAGE_REPOSITORY if GPU_RESOURCE in limits else CPU_IMAGE_PLACEHOLDER
                assert split_image(c["image"])[0] == want, (path.name, ref, c["image"])
                used[key].add(want)
    assert used["base"] == {IMAGE_REPOSITORY, CPU_IMAGE_PLACEHOLDER}
    for folder, names in WANT_IMAGES.items():
        rendered = used["jobs/train-superres" if folder.startswith("jobs/") else "base"]
        assert set(names) == rendered, (folder, sorted(names), sorted(rendered))


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def test_step_2_retargets_every_kustomization_naming_the_image() -> None:
    step = _section(DEPLOY_README.read_text(), "## 2. Build and push the image")
    assert "kustomize edit set image" in step
    commands = re.sub(r"\\\n\s*", " ", step)
    for folder, k in _kustomizations().items():
        if not k.get("images"):
            continue
        assert folder in step, f"deploy/README.md step 2 does not retarget {folder}"
        command = next((line for line in commands.splitlines()
                        if f"deploy/k8s/{folder} " in line and "edit set image" in line), "")
        for entry in k["images"]:
            variant = WANT_IMAGES[folder][entry["name"]]
            assert re.search(rf"\b{re.escape(entry['name'])}=\S+-{variant}\b", command), (
                f"step 2 does not retarget {entry['name']} in {folder} to -{variant}: "
                f"{command!r}")


def test_step_2_pushes_every_tag_the_gpu_overlay_pulls(gpu: Bundle) -> None:
    """The gpu overlay pulls two tags (-gpu for the models, -cpu for search): pushing only
    the -gpu one would leave search in ErrImagePull."""
    step = _section(DEPLOY_README.read_text(), "## 2. Build and push the image")
    variants = {image_version(split_image(c.image)[1])[1]
                for w in gpu.workloads for c in w.model.spec.template.spec.containers}
    assert variants == {"gpu", "cpu"}
    for variant in variants:
        assert re.search(rf"^docker push \S+:\S+-{variant}\b", step, flags=re.M), variant


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
