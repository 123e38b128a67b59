"""Export -> load round trip through training.nets.build (and the services' loader)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import nets
from training.assets import REPO_ROOT as REPO
from training.export import (
    data_entry,
    export_artifact,
    fp16_state_dict,
    load_exported,
    update_metrics,
)

ARCH = {"type": "superres-resnet", "width": 8, "blocks": 2, "upsample": "pixelshuffle"}


def _export(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    module = nets.build(ARCH)
    data_file = tmp_path / "data.bin"
    data_file.write_bytes(b"prepared")
    out = export_artifact(tmp_path / "models" / "sr-test", name="sr-test", task="superres",
                          architecture=ARCH, module=module,
                          metrics={"note": "cpu, reduced size", "steps": 1},
                          data=[data_entry(data_file)], command="pytest", device="cpu",
                          config_extra={"scale": 4})
    return module, out


def test_artifact_files_and_fields(tmp_path: Path) -> None:
    _, out = _export(tmp_path)
    config = json.loads((out / "config.json").read_text())
    digest = hashlib.sha256((out / "weights.safetensors").read_bytes()).hexdigest()
    assert config == {"name": "sr-test", "version": 1, "task": "superres", "architecture": ARCH,
                      "weights": "weights.safetensors", "weights_dtype": "float16",
                      "weights_sha256": digest, "scale": 4}
    state = load_file(str(out / "weights.safetensors"))
    assert all(t.dtype == torch.float16 for t in state.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["note"] == "cpu, reduced size" and metrics["device"] == "cpu"
    assert metrics["weights_bytes"] == (out / "weights.safetensors").stat().st_size
    provenance = json.loads((out / "provenance.json").read_text())
    assert set(provenance) == {"data", "command", "git_sha", "git_modified", "created",
                              "device", "torch"}
    assert isinstance(provenance["git_modified"], list)
    assert provenance["data"] == [{"path": str(tmp_path / "data.bin"),
                                   "sha256": hashlib.sha256(b"prepared").hexdigest()}]
    assert provenance["git_sha"] == "uncommitted" or len(provenance["git_sha"]) == 40
    assert provenance["torch"] == torch.__version__
    update_metrics(out, {"heldout": {"y_psnr": 30.0}})
    assert json.loads((out / "metrics.json").read_text())["heldout"] == {"y_psnr": 30.0}


def test_round_trip_gives_the_same_outputs(tmp_path: Path) -> None:
    module, out = _export(tmp_path)
    loaded, config = load_exported(out)
    assert config["architecture"] == ARCH
    x = torch.rand(2, 3, 12, 12)
    module.eval()
    with torch.no_grad():
        # fp16 weights: outputs agree to fp16 rounding of the weights
        assert torch.allclose(module(x), loaded(x), atol=2e-3)


def test_services_loader_reads_the_artifact(tmp_path: Path) -> None:
    artifacts = pytest.importorskip("services.common.artifacts")
    _, out = _export(tmp_path)
    artifact = artifacts.load_artifact(out.parent, "sr-test", torch.device("cpu"))
    assert artifact.task == "superres" and artifact.tag == "sr-test@1"
    with torch.no_grad():
        assert artifact.module(torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)


def test_services_refuse_an_artifact_with_non_finite_weights(tmp_path: Path) -> None:
    """A diverged run's weights (written by hand here: the export refuses them) would
    answer every request with a black image: the service does not start on them."""
    from safetensors.torch import save_file

    artifacts = pytest.importorskip("services.common.artifacts")
    _, out = _export(tmp_path)
    weights = out / "weights.safetensors"
    state = load_file(str(weights))
    first = sorted(state)[0]
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(weights))
    _name_the_weights(out)
    with pytest.raises(ValueError, match=rf"1 weight tensors hold NaN or infinite values "
                                         rf"\({first}\); the training run diverged"):
        artifacts.load_artifact(out.parent, "sr-test", torch.device("cpu"))


def _name_the_weights(out: Path) -> None:
    """config.json's weights_sha256 set to the weights file there now."""
    config = json.loads((out / "config.json").read_text())
    config["weights_sha256"] = hashlib.sha256((out / "weights.safetensors").read_bytes()
                                              ).hexdigest()
    (out / "config.json").write_text(json.dumps(config))


def test_config_json_names_the_weights_by_their_digest(tmp_path: Path) -> None:
    _, out = _export(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["weights_sha256"] == hashlib.sha256(
        (out / "weights.safetensors").read_bytes()).hexdigest()


def test_services_refuse_weights_their_config_does_not_name(tmp_path: Path) -> None:
    """An export cut short after the new weights but before config.json (written last)
    leaves weights the old config does not name: the service refuses to start on them
    rather than serve them as the old version. Artifacts without a digest still load."""
    artifacts = pytest.importorskip("services.common.artifacts")
    module, out = _export(tmp_path)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.01)
    from safetensors.torch import save_file

    save_file(fp16_state_dict(module), str(out / "weights.safetensors"))
    with pytest.raises(ValueError, match=r"weights.safetensors is not the weights file .*"
                                         r"config.json names .*an export was cut short"):
        artifacts.load_artifact(out.parent, "sr-test", torch.device("cpu"))
    with pytest.raises(ValueError, match=r"an export was cut short"):  # evaluation, --init-from
        load_exported(out)
    config = json.loads((out / "config.json").read_text())
    del config["weights_sha256"]  # as written before the digest was recorded
    (out / "config.json").write_text(json.dumps(config))
    assert artifacts.load_artifact(out.parent, "sr-test", torch.device("cpu")).version == 1


def test_every_committed_artifact_names_its_weights() -> None:
    from services.common import artifacts

    configs = sorted((REPO / "models").glob("[!.]*/config.json"))
    assert configs, f"no committed model artifact under {REPO / 'models'}"
    for config_path in configs:
        config = json.loads(config_path.read_text())
        assert "weights_sha256" in config, config_path
        artifacts.check_weights_digest(config_path.parent / config["weights"], config)


def test_a_mismatched_state_dict_is_refused(tmp_path: Path) -> None:
    module = nets.build(ARCH)
    with pytest.raises(RuntimeError):
        export_artifact(tmp_path / "bad", name="bad", task="superres",
                        architecture={**ARCH, "width": 4}, module=module, metrics={},
                        data=[], command="pytest", device="cpu")
    assert not (tmp_path / "bad").exists()


def test_git_sha_outside_a_checkout_comes_from_the_sender(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the tree without .git (a GPU machine's) records the sha its sender set."""
    from training.export import git_sha

    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("PERCEPT_GIT_SHA", raising=False)
    assert git_sha(tmp_path) == "uncommitted"
    monkeypatch.setenv("PERCEPT_GIT_SHA", "0123456789abcdef" * 2 + "01234567")
    assert git_sha(tmp_path) == "0123456789abcdef" * 2 + "01234567"
    monkeypatch.setenv("PERCEPT_GIT_SHA", "not a sha")
    assert git_sha(tmp_path) == "uncommitted"


def test_exporting_again_over_an_artifact_bumps_its_version(tmp_path: Path) -> None:
    _, out = _export(tmp_path)
    _export(tmp_path)  # retrained in place: served under a new tag
    assert json.loads((out / "config.json").read_text())["version"] == 2
    other = tmp_path / "models" / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"name": "not-sr-test", "version": 7}))
    module = nets.build(ARCH)
    export_artifact(other, name="sr-test", task="superres", architecture=ARCH, module=module,
                    metrics={}, data=[], command="pytest", device="cpu")
    assert json.loads((other / "config.json").read_text())["version"] == 1  # another name
    export_artifact(other, name="sr-test", task="superres", architecture=ARCH, module=module,
                    metrics={}, data=[], command="pytest", device="cpu", version=5)
    assert json.loads((other / "config.json").read_text())["version"] == 5  # as asked


def test_an_artifact_folder_with_an_interrupted_write_can_be_exported_into_again(
        tmp_path: Path) -> None:
    """A write cut short leaves `*.partial` files: the folder is still the artifact's,
    and another export replaces it; anything else in it is refused."""
    from training.export import check_output_folder

    _, out = _export(tmp_path)
    (out / "metrics.json.partial").write_text("{")
    assert check_output_folder(out, "sr-test").startswith("sr-test@2, replacing version 1")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds other files \(1: notes.txt\)"):
        check_output_folder(out, "sr-test")


def test_the_same_weights_export_to_the_same_bytes(tmp_path: Path) -> None:
    """The weights' digest identifies them: three exports of one module agree (safetensors
    wrote several metadata entries in a random order, which changed the digest)."""
    digests = set()
    for attempt in range(3):
        (tmp_path / str(attempt)).mkdir()
        _, out = _export(tmp_path / str(attempt))
        digests.add(json.loads((out / "config.json").read_text())["weights_sha256"])
    assert len(digests) == 1


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _export_again(out: Path, pictures: dict[str, Path] | None = None) -> None:
    torch.manual_seed(1)
    export_artifact(out, name="sr-test", task="superres", architecture=ARCH,
                    module=nets.build(ARCH), metrics={"steps": 2}, data=[],
                    command="pytest again", device="cpu", pictures=pictures)


@pytest.mark.parametrize("stop_in", ["weights", "metrics.json", "config.json", "swap"])
def test_an_export_stopped_at_any_point_leaves_the_artifact_there_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_in: str) -> None:
    """Ctrl-C (KeyboardInterrupt) in the middle of replacing version 1: version 1 is still
    served, file for file, and nothing of the stopped export is left about."""
    import training.export as export
    from services.common.artifacts import list_artifacts, load_artifact

    _, out = _export(tmp_path)
    before = _files(out)

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    if stop_in == "weights":
        monkeypatch.setattr(export, "save_file", stop)
    elif stop_in == "swap":
        monkeypatch.setattr(export, "_exchange", stop)
    else:
        write_json = export._write_json
        monkeypatch.setattr(export, "_write_json", lambda path, payload: (
            stop() if path.name == stop_in else write_json(path, payload)))
    with pytest.raises(KeyboardInterrupt):
        _export_again(out)
    assert _files(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["sr-test"]
    assert load_artifact(out.parent, "sr-test", torch.device("cpu")).version == 1
    assert list_artifacts(out.parent, "superres") == ["sr-test"]


@pytest.mark.parametrize("can_swap", [True, False])
def test_a_new_version_replaces_every_file_and_keeps_hidden_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, can_swap: bool) -> None:
    """The folder swapped in one step (Linux), or the files copied in config.json last
    where it cannot be: either way the new version's files, its pictures, no stale
    picture of the old one, the folder's mode and its hidden files."""
    import training.export as export
    from services.common.artifacts import load_artifact

    if not can_swap:
        monkeypatch.setattr(export, "_exchange", lambda first, second: False)
    _, out = _export(tmp_path)
    (out / "samples.png").write_bytes(b"old samples")
    (out / ".gitattributes").write_text("*.safetensors binary\n")
    out.chmod(0o750)
    loss = tmp_path / "loss.png"
    loss.write_bytes(b"new loss plot")
    _export_again(out, pictures={"loss.png": loss})
    assert sorted(_files(out)) == [".gitattributes", "config.json", "loss.png",
                                   "metrics.json", "provenance.json", "weights.safetensors"]
    assert (out / "loss.png").read_bytes() == b"new loss plot"
    assert (out / ".gitattributes").read_text() == "*.safetensors binary\n"
    assert out.stat().st_mode & 0o777 == 0o750
    artifact = load_artifact(out.parent, "sr-test", torch.device("cpu"))
    assert artifact.version == 2
    assert json.loads((out / "provenance.json").read_text())["command"] == "pytest again"
    assert sorted(p.name for p in out.parent.iterdir()) == ["sr-test"]


def test_an_export_through_a_link_replaces_the_folder_it_names(tmp_path: Path) -> None:
    _, out = _export(tmp_path)
    link = tmp_path / "linked"
    link.symlink_to(out, target_is_directory=True)
    _export_again(link)
    assert link.is_symlink() and link.resolve() == out.resolve()
    assert json.loads((out / "config.json").read_text())["version"] == 2


def test_what_a_killed_export_left_is_cleared_and_never_listed(tmp_path: Path) -> None:
    """kill -9 during an export leaves its hidden staging folder beside the artifact:
    services do not take it for a model, and the next export removes it."""
    from services.common.artifacts import list_artifacts

    _, out = _export(tmp_path)
    left = out.parent / ".sr-test.export-k1ll3d"
    left.mkdir()
    (left / "config.json").write_text((out / "config.json").read_text())
    assert list_artifacts(out.parent, "superres") == ["sr-test"]
    _export_again(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["sr-test"]


def test_an_artifact_folder_whose_parent_cannot_be_written_is_exported_into_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume mounted at the artifact folder under a read-only root: the export is
    staged inside the folder and renamed into place, config.json last."""
    import tempfile

    _, out = _export(tmp_path)
    real_mkdtemp = tempfile.mkdtemp

    def read_only_parent(*args: object, dir: Path, **kwargs: object) -> str:
        if Path(dir) == out.parent:
            raise PermissionError(30, "Read-only file system", str(dir))
        return real_mkdtemp(*args, dir=dir, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(tempfile, "mkdtemp", read_only_parent)
    _export_again(out)
    assert json.loads((out / "config.json").read_text())["version"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json",
                                                     "provenance.json", "weights.safetensors"]
    from services.common.artifacts import load_artifact

    assert load_artifact(out.parent, "sr-test", torch.device("cpu")).version == 2


def test_a_running_export_s_staging_folder_is_left_alone(tmp_path: Path) -> None:
    """Two exports to one folder at once: the second clears only what a dead process left."""
    import os

    _, out = _export(tmp_path)
    running = out.parent / f".sr-test.export-{os.getppid()}-abc"  # a live process's
    dead = out.parent / ".sr-test.export-999999999-abc"
    for folder in (running, dead):
        folder.mkdir()
    _export_again(out)
    assert running.is_dir() and not dead.exists()
