"""Which image each workload pulls, read from the YAML `kubectl kustomize` renders: the model
servers and the training Job run the -gpu tag on GPU nodes, search (no GPU, on a CPU node)
the -cpu tag of the same release, and the cpu overlay runs -cpu everywhere. The base names
search's image by a placeholder (percept-cpu-image) that every kustomization maps."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from deploy import render
from deploy.pipeline import Report, validate_targets
from deploy.policy import Bundle, check_by_name
from deploy.policy.model import CPU_IMAGE_PLACEHOLDER, IMAGE_REPOSITORY, split_image

GPU_TAG = f"{IMAGE_REPOSITORY}:0.1.0-gpu"
CPU_TAG = f"{IMAGE_REPOSITORY}:0.1.0-cpu"

#: target -> {kind/name: the image every container of that workload runs}
EXPECTED = {
    "overlays/gpu": {
        "Deployment/superres": GPU_TAG,
        "Deployment/style": GPU_TAG,
        "Deployment/embed": GPU_TAG,
        "StatefulSet/search": CPU_TAG,
    },
    "overlays/cpu": {
        "Deployment/superres": CPU_TAG,
        "Deployment/style": CPU_TAG,
        "Deployment/embed": CPU_TAG,
        "StatefulSet/search": CPU_TAG,
    },
    "jobs/train-superres": {"Job/train-superres": GPU_TAG},
}


def _images(objects: list[dict]) -> dict[str, set[str]]:
    """kind/name -> the images of its containers, for every workload among raw objects."""
    out: dict[str, set[str]] = {}
    for obj in objects:
        if obj.get("kind") not in ("Deployment", "StatefulSet", "Job"):
            continue
        pod = obj["spec"]["template"]["spec"]
        out[f"{obj['kind']}/{obj['metadata']['name']}"] = {
            c["image"] for c in pod.get("initContainers", []) + pod["containers"]
        }
    return out


@pytest.mark.parametrize("target", sorted(EXPECTED))
def test_each_workload_pulls_its_variant(bundles: dict[str, Bundle], target: str) -> None:
    rendered = _images([r.raw for r in bundles[target].resources])
    assert rendered == {ref: {image} for ref, image in EXPECTED[target].items()}


def test_the_validated_report_passes_the_image_checks(report: Report) -> None:
    assert report.targets
    for t in report.targets:
        seen = set()
        for r in t.results:
            if r.check in ("images", "release"):
                seen.add(r.check)
                assert r.failures == [], (t.target.name, r.check, r.failures)
        assert seen == {"images", "release"}, (t.target.name, "image checks not run")


def test_the_base_gives_search_its_own_image_name() -> None:
    """What the overlays rely on: rendered alone, the base names search's image differently
    from the model servers' (so that `images:` can tell them apart), and maps neither."""
    base = render.K8S_DIR / "base"
    assert "images" not in yaml.safe_load((base / "kustomization.yaml").read_text())
    images = _images(render.load_documents(render.kustomize(base)))
    assert {split_image(i)[0] for i in images.pop("StatefulSet/search")} == {
        CPU_IMAGE_PLACEHOLDER}
    assert {split_image(i)[0] for refs in images.values() for i in refs} == {IMAGE_REPOSITORY}


def test_mapping_the_placeholder_in_the_base_would_give_search_the_gpu_tag(
    tmp_path: Path,
) -> None:
    """Why the base does not map the placeholder itself (it would then render a pullable
    reference for search on its own): an overlay sees only the base's output, where search
    would already be ghcr.io/percept/percept, and the gpu overlay's entry for that name
    retags it -gpu with the model servers."""
    base = tmp_path / "base"
    shutil.copytree(render.K8S_DIR / "base", base)
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    kustomization["images"] = [
        {"name": CPU_IMAGE_PLACEHOLDER, "newName": IMAGE_REPOSITORY, "newTag": "0.1.0-cpu"}
    ]
    (base / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    assert _images(render.load_documents(render.kustomize(base)))["StatefulSet/search"] == {
        CPU_TAG}
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    gpu = yaml.safe_load((render.K8S_DIR / "overlays" / "gpu" / "kustomization.yaml").read_text())
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["../base"], "images": gpu["images"]})
    )
    assert _images(render.load_documents(render.kustomize(overlay)))["StatefulSet/search"] == {
        GPU_TAG}


def _overlay(tmp_path: Path, name: str, images: list[dict]) -> Path:
    """A kustomization over the real base with these `images:` entries (no patches)."""
    overlay = tmp_path / name
    overlay.mkdir()
    base = os.path.relpath(render.K8S_DIR / "base", overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [base], "images": images}, sort_keys=False)
    )
    return overlay


def _gpu_images() -> list[dict]:
    path = render.K8S_DIR / "overlays" / "gpu" / "kustomization.yaml"
    return list(yaml.safe_load(path.read_text())["images"])


def test_the_gpu_overlay_entries_in_the_other_order_fail_validation(tmp_path: Path) -> None:
    """kustomize applies the `images:` entries in order: with the placeholder's entry
    first, the ghcr.io/percept/percept entry retags search -gpu, and validation says so."""
    overlay = _overlay(tmp_path, "reversed", list(reversed(_gpu_images())))
    assert _images(render.load_documents(render.kustomize(overlay)))["StatefulSet/search"] == {
        GPU_TAG}
    report = validate_targets((render.Target("tmp/reversed", overlay, "gpu"),))
    assert any(
        "[tmp/reversed] images: StatefulSet/search container server: image "
        f"'{GPU_TAG}' is not the CPU variant (-cpu) but uses no nvidia.com/gpu" in f
        for f in report.failures
    ), report.failures


def _retargeted(images: list[dict], names: set[str], repo: str) -> list[dict]:
    """What `kustomize edit set image NAME=REPO:<same tag>` writes for each of `names`:
    the entries sorted by name."""
    out = []
    for entry in images:
        entry = dict(entry)
        if entry["name"] in names:
            entry["newName"] = repo
        out.append(entry)
    return sorted(out, key=lambda e: e["name"])


def _bundle(target: render.Target) -> Bundle:
    report = validate_targets((target,))
    (t,) = report.targets
    assert t.bundle is not None, t.failures
    return t.bundle


def test_retargeting_both_names_moves_every_workload(tmp_path: Path) -> None:
    repo = "registry.example.com/percept/percept"
    images = _retargeted(_gpu_images(), {IMAGE_REPOSITORY, CPU_IMAGE_PLACEHOLDER}, repo)
    overlay = _overlay(tmp_path, "retargeted", images)
    bundle = _bundle(render.Target("tmp/retargeted", overlay, "gpu"))
    assert _images([r.raw for r in bundle.resources]) == {
        ref: {image.replace(IMAGE_REPOSITORY, repo)}
        for ref, image in EXPECTED["overlays/gpu"].items()
    }
    assert check_by_name("images").func(bundle) == []


def test_retargeting_the_model_image_alone_fails(tmp_path: Path) -> None:
    """`kustomize edit set image ghcr.io/percept/percept=...` without the placeholder: the
    model servers move to the new registry and search stays on ghcr.io."""
    repo = "registry.example.com/percept/percept"
    overlay = _overlay(tmp_path, "half", _retargeted(_gpu_images(), {IMAGE_REPOSITORY}, repo))
    found = check_by_name("images").func(_bundle(render.Target("tmp/half", overlay, "gpu")))
    assert any(
        f"the workloads run different releases: {CPU_TAG}, {repo}:0.1.0-gpu" in f
        for f in found
    ), found
