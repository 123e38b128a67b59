"""Damaged, mismatched and foreign model artifacts (services/common/artifacts.py): each is
refused with a message that names its file and what to do, never served wrong and never
skipped without a word. Real committed artifacts, copied and then damaged one way each;
one real `percept serve` start at the end."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from services.common.artifacts import (
    ARTIFACT_ADVICE,
    Artifact,
    ArtifactError,
    list_artifacts,
    load_artifact,
)
from services.common.errors import StartupError
from services.embed.service import devise_methods
from services.style.service import style_name
from tests.conftest import REPO

CPU = torch.device("cpu")
SUPERRES, OTHER_SUPERRES = "superres-psnr", "superres-mse"
STYLE, OTHER_STYLE = "style-starry-night", "style-the-scream"


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    """A models folder holding copies of two super-resolution and two style artifacts."""
    folder = tmp_path / "models"
    for name in (SUPERRES, OTHER_SUPERRES, STYLE, OTHER_STYLE):
        shutil.copytree(REPO / "models" / name, folder / name)
    return folder


def _edit_config(artifact: Path, change: Callable[[dict[str, Any]], object]) -> None:
    config = json.loads((artifact / "config.json").read_text())
    change(config)
    (artifact / "config.json").write_text(json.dumps(config))


def _record_digest(artifact: Path) -> None:
    """config.json's weights_sha256 made to match the weights as they now are (as a
    hand-made artifact would have it)."""
    digest = hashlib.sha256((artifact / "weights.safetensors").read_bytes()).hexdigest()
    _edit_config(artifact, lambda c: c.update(weights_sha256=digest))


def _refusal(models: Path, name: str, task: str = "superres") -> str:
    with pytest.raises(ArtifactError) as refused:
        for found in list_artifacts(models, task):
            if found == name:
                load_artifact(models, found, CPU)
    assert isinstance(refused.value, ValueError)  # as callers outside a server catch it
    return str(refused.value)


@pytest.mark.parametrize("written, problem", [
    (b"{not json", "unreadable (JSONDecodeError: "),
    (b"\xff\xfe{}", "unreadable (UnicodeDecodeError: "),
    (b"[1, 2]", "holds a JSON list, not an object"),
])
def test_a_config_that_does_not_parse_stops_the_start_naming_it(
        models: Path, written: bytes, problem: str) -> None:
    """Every service lists the folder: a broken config.json is not skipped quietly (its
    model would vanish, or another would become the default)."""
    (models / SUPERRES / "config.json").write_bytes(written)
    for task in ("superres", "style", "devise"):
        message = _refusal(models, SUPERRES, task)
        assert message.startswith(f"{models / SUPERRES / 'config.json'}: {problem}")
        assert message.endswith(ARTIFACT_ADVICE)


@pytest.mark.parametrize("change, problem", [
    (lambda c: c.pop("version"), "missing key 'version'"),
    (lambda c: c.update(version="one"), "'version' is 'one': it must be a non-empty int"),
    (lambda c: c.update(version=2.7), "'version' is 2.7: it must be a non-empty int"),
    (lambda c: c.update(version=True), "'version' is True: it must be a non-empty int"),
    (lambda c: c.update(version=0), "'version' is 0: versions count from 1"),
    (lambda c: c.update(name=""), "'name' is '': it must be a non-empty str"),
    (lambda c: c.update(architecture=[1]), "'architecture' is [1]: it must be a non-empty"),
    (lambda c: c["architecture"].pop("type"), "'architecture' names no 'type'"),
    (lambda c: c.update(weights="../superres-mse/weights.safetensors"),
     "'weights' is '../superres-mse/weights.safetensors': it must name a file in the "
     "artifact's own folder"),
    (lambda c: c["architecture"].update(attention=True), "cannot be built ("),
    (lambda c: c["architecture"].update(width="32"), "cannot be built ("),
    (lambda c: c["architecture"].update(type="superres-resnet-v2"), "cannot be built ("),
])
def test_a_config_field_of_the_wrong_kind_is_named(models: Path, change: Callable[..., object],
                                                   problem: str) -> None:
    _edit_config(models / SUPERRES, change)
    message = _refusal(models, SUPERRES)
    assert message.startswith(f"{models / SUPERRES / 'config.json'}: ") and problem in message


def test_a_folder_whose_config_names_no_task_is_skipped_with_a_warning(
        models: Path, caplog: pytest.LogCaptureFixture) -> None:
    (models / "notes").mkdir()
    (models / "notes" / "config.json").write_text('{"hidden_size": 768}')
    with caplog.at_level(logging.WARNING, "percept.artifacts"):
        assert list_artifacts(models, "superres") == [OTHER_SUPERRES, SUPERRES]
    assert [(r.getMessage(), r.folder) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("not a model artifact: its config.json names no task; skipped",
         str(models / "notes"))]


@pytest.mark.parametrize("folder", ["superres best", "superres\x1b[2J", "superres\u202etxt"])
def test_an_artifact_folder_name_a_client_could_not_give_is_refused(
        models: Path, folder: str) -> None:
    (models / SUPERRES).rename(models / folder)
    message = _refusal(models, folder)
    assert f"the folder name {folder!r} may hold only letters, digits" in message


def test_a_models_dir_that_is_not_there_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"--models-dir .*/absent is not a folder \(a "
                                            r"volume not mounted, or a typo\)"):
        list_artifacts(tmp_path / "absent", "superres")


@pytest.mark.parametrize("damage, problem", [
    (lambda data: data[: len(data) // 2], "not a readable safetensors file (SafetensorError"),
    (lambda data: b"", "not a readable safetensors file ("),
    (lambda data: bytes(range(256)) * 64, "not a readable safetensors file ("),
])
def test_damaged_weights_without_a_recorded_digest_name_the_file(
        models: Path, damage: Callable[[bytes], bytes], problem: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """An artifact from before the digest was recorded, damaged: the reader's own error,
    under the file's name; and a warning that nothing was verified."""
    weights = models / SUPERRES / "weights.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    _edit_config(models / SUPERRES, lambda c: c.pop("weights_sha256"))
    with caplog.at_level(logging.WARNING, "percept.artifacts"):
        message = _refusal(models, SUPERRES)
    assert message.startswith(f"{weights}: {problem}"), message
    assert any("weights not verified: config.json records no weights_sha256" in r.getMessage()
               for r in caplog.records)


def test_damaged_weights_with_the_digest_are_refused_by_it(models: Path) -> None:
    weights = models / SUPERRES / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert "is not the weights file" in _refusal(models, SUPERRES)


def test_missing_weights_are_named(models: Path) -> None:
    (models / SUPERRES / "weights.safetensors").unlink()
    assert _refusal(models, SUPERRES).startswith(
        f"{models / SUPERRES / 'weights.safetensors'}: missing")


def test_another_models_weights_copied_in_are_refused_even_with_their_digest(
        models: Path) -> None:
    """The Scream's weights in starry-night's folder (one architecture, two styles), with
    config.json's digest made to match: served, starry-night would paint The Scream. The
    name each export writes into its weights file tells them apart."""
    shutil.copy(models / OTHER_STYLE / "weights.safetensors",
                models / STYLE / "weights.safetensors")
    _record_digest(models / STYLE)
    message = _refusal(models, STYLE, "style")
    assert message.startswith(f"{models / STYLE / 'weights.safetensors'}: was exported as "
                              f"another model: name '{STYLE}' in config.json, "
                              f"'{OTHER_STYLE}' in the weights")


def test_an_architecture_edited_in_config_json_is_refused(models: Path) -> None:
    """Weights from a style network with nearest-neighbour upsampling declared bilinear:
    it would load (the same parameters) and paint another picture."""
    _edit_config(models / STYLE, lambda c: c["architecture"].update(upsample="bilinear"))
    message = _refusal(models, STYLE, "style")
    assert "was exported as another model: architecture {" in message


def test_weights_that_do_not_fit_the_architecture_say_so(models: Path) -> None:
    """A file without the export's metadata (written by hand), of another width: torch's
    mismatch, shortened, under the file's name."""
    weights = models / SUPERRES / "weights.safetensors"
    state = load_file(str(weights))
    state = {k: v[:8] if v.dim() and v.shape[0] == 32 else v for k, v in state.items()}
    save_file(state, str(weights))
    _record_digest(models / SUPERRES)
    message = _refusal(models, SUPERRES)
    assert message.startswith(f"{weights}: does not fit the architecture config.json gives "
                              "(Error(s) in loading state_dict"), message
    assert len(message) < 600


def _style_artifact(config: dict[str, Any], path: Path) -> Artifact:
    return Artifact(name="s", version=1, task="style", config=config, module=nn.Identity(),
                    path=path)


@pytest.mark.parametrize("section, problem", [
    ("starry", "'style' is 'starry': it must be an object whose 'name' is a string"),
    ({"name": 3}, "'style' is {'name': 3}: it must be an object whose 'name' is a string"),
    ({"name": "starry/night"}, "the style name 'starry/night' may hold only letters"),
    ({"name": "starry\nnight"}, "the style name 'starry\\nnight' may hold only letters"),
])
def test_a_style_name_a_client_could_not_ask_for_is_refused(
        tmp_path: Path, section: object, problem: str) -> None:
    with pytest.raises(ArtifactError) as refused:
        style_name(_style_artifact({"style": section}, tmp_path / "style-x"))
    assert str(refused.value).startswith(f"{tmp_path / 'style-x' / 'config.json'}: {problem}")
    assert style_name(_style_artifact({}, tmp_path / "style-x")) == "style-x"


@pytest.mark.parametrize("config, problem", [
    ({"default_method": "DeViSE"}, "'default_method' is 'DeViSE': it must be one of "
                                   "['conse', 'devise']"),
    ({"methods": {"conse": {"top_t": 100000}}}, "'methods.conse.top_t' is 100000: it must "
                                                 "be a whole number from 1 to 1000"),
    ({"methods": {"conse": {"top_t": "ten"}}}, "'methods.conse.top_t' is 'ten'"),
    ({"methods": {"conse": 10}}, "'methods' must be an object whose 'conse' is an object"),
])
def test_devise_method_fields_the_service_cannot_use_are_refused_at_load(
        tmp_path: Path, config: dict[str, Any], problem: str) -> None:
    """Refused at load, naming the file: before, a bad T failed only in the warm-up (not
    naming it), and with --warmup off every default LabelImage answered INTERNAL."""
    artifact = Artifact(name="d", version=1, task="devise", config=config,
                        module=nn.Identity(), path=tmp_path / "devise-x")
    with pytest.raises(ArtifactError) as refused:
        devise_methods(artifact, 1000)
    assert str(refused.value).startswith(f"{tmp_path / 'devise-x' / 'config.json'}: {problem}")
    fine = Artifact(name="d", version=1, task="devise", module=nn.Identity(),
                    path=tmp_path, config={"default_method": "devise",
                                           "methods": {"conse": {"top_t": 5}}})
    assert devise_methods(fine, 1000) == ("devise", 5)


def _serve(models: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "superres", "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", "0", "--log-format", "text", "--warmup", "off",
         "--models-dir", str(models), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_percept_serve_refuses_a_broken_artifact_in_one_line_and_a_wrong_default(
        models: Path) -> None:
    """The server's own words, as an operator reads them: the file, the problem and what
    to do, without a traceback; --default-model naming an artifact of another task says
    that, not that it is missing."""
    result = _serve(models, "--default-model", STYLE)
    assert result.returncode == 1
    assert (f"--default-model '{STYLE}' is not a super-resolution artifact; the "
            f"super-resolution artifacts there: {OTHER_SUPERRES}, {SUPERRES}") in result.stderr
    assert "Traceback" not in result.stderr
    _edit_config(models / SUPERRES, lambda c: c.update(version="one"))
    result = _serve(models)
    assert result.returncode == 1
    assert (f"start-up failed: {models / SUPERRES / 'config.json'}: 'version' is 'one'"
            in result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def _load_superres(models: Path, caplog: pytest.LogCaptureFixture, serve: str = "superres"
                   ) -> tuple[str, list[str]]:
    """The default a super-resolution service loading ``models`` picks, and its warnings
    (in a process started as ``percept serve <serve>``)."""
    import asyncio

    from services.superres.service import SuperResolutionService
    from tests.conftest import server_config

    async def load() -> str:
        service = SuperResolutionService(server_config(serve, models_dir=models))
        await service.load()
        try:
            return service.default
        finally:
            await service.close()

    with caplog.at_level(logging.WARNING, "percept.superres"):
        default = asyncio.run(load())
    return default, [r.getMessage() for r in caplog.records if r.name == "percept.superres"]


def test_a_missing_preferred_default_is_a_warning_and_no_model_at_all_a_refusal(
        models: Path, caplog: pytest.LogCaptureFixture) -> None:
    """superres-perceptual is the default; without it another serves requests that name
    no model, and the log says which; without any, `serve superres` does not start, and
    under `serve all` Upscale is UNIMPLEMENTED while the other services serve."""
    assert _load_superres(models, caplog) == (
        SUPERRES, [f"superres-perceptual is not installed: {SUPERRES} is the default model"])
    caplog.clear()
    for name in (SUPERRES, OTHER_SUPERRES):
        shutil.rmtree(models / name)
    with pytest.raises(StartupError, match="no super-resolution artifact under --models-dir"):
        _load_superres(models, caplog)
    caplog.clear()
    assert _load_superres(models, caplog, serve="all") == ("", [
        "no super-resolution artifacts: every Upscale is answered UNIMPLEMENTED "
        "(NO_MODEL_INSTALLED); the other services serve"])
