"""Loading versioned model artifacts from ``models/<name>/`` (format: docs/architecture.md).

Services load artifacts by name; the architecture is data (``config.json``), built with
``training.nets.build``, and the weights are a safetensors state_dict (fp16 on disk).

An artifact that cannot be served as it is stops the start with an :class:`ArtifactError`
naming its folder, what is wrong and what to do (logged without a traceback): a
``config.json`` that does not parse or holds fields of the wrong type, weights that are
not the file it names by SHA-256, that another model wrote (the name, task and
architecture each export records in the file), that do not fit the architecture, or
that hold NaN. A folder whose ``config.json`` names no ``task`` is not an artifact: it is
skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from services.common.errors import StartupError
from training import nets

log = logging.getLogger("percept.artifacts")

#: What the operator of a server does about a broken artifact.
ARTIFACT_ADVICE = ("restore the artifact, export it again, or move its folder out of "
                   "--models-dir")


class ArtifactError(StartupError, ValueError):
    """An artifact that cannot be served as it is; the message names its folder (a
    ValueError too: callers outside a server catch it as one)."""


@dataclass(frozen=True)
class Artifact:
    """A loaded model artifact."""

    name: str
    version: int
    task: str
    config: dict[str, Any]
    module: nn.Module
    path: Path

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"


#: What a model or style name may hold: letters, digits, '.', '_' and '-' (a client gives
#: it in requests and on a command line, and terminals print it).
NAME_PATTERN = re.compile(r"[\w.-]+")


def _refused(path: Path, problem: str) -> ArtifactError:
    return ArtifactError(f"{path}: {problem}; {ARTIFACT_ADVICE}")


def invalid_field(artifact: Path, problem: str) -> ArtifactError:
    """The refusal of an artifact whose config.json holds ``problem``."""
    return _refused(artifact / "config.json", problem)


def check_artifact_name(name: str, where: Path, what: str) -> None:
    """ArtifactError unless ``name`` (``what``: "folder name", "style name") is one a
    client can give and a terminal print as it is."""
    if not NAME_PATTERN.fullmatch(name):
        raise _refused(where, f"the {what} {name!r} may hold only letters, digits, '.', '_' "
                              "and '-'")


def _parsed_config(config_path: Path) -> dict[str, Any]:
    """The JSON object in ``config_path``; ArtifactError when it is unreadable, not JSON
    or not an object."""
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _refused(config_path, f"unreadable ({type(error).__name__}: {error})") from error
    if not isinstance(config, dict):
        raise _refused(config_path, f"holds a JSON {type(config).__name__}, not an object")
    return config


#: The fields every config.json has, and the type each must be.
REQUIRED_FIELDS: dict[str, type] = {"name": str, "version": int, "task": str,
                                    "architecture": dict}


def read_config(path: Path) -> dict[str, Any]:
    """``path/config.json``, checked: ArtifactError when it is missing or unreadable, or a
    required field is missing or of the wrong type (a version is a whole number from 1)."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise _refused(config_path, "missing")
    config = _parsed_config(config_path)
    for key, kind in REQUIRED_FIELDS.items():
        if key not in config:
            raise _refused(config_path, f"missing key {key!r}")
        value = config[key]
        if not isinstance(value, kind) or isinstance(value, bool) or value in ("", {}):
            raise _refused(config_path, f"{key!r} is {value!r}: it must be a non-empty "
                                        f"{kind.__name__}")
    if config["version"] < 1:
        raise _refused(config_path, f"'version' is {config['version']}: versions count from 1")
    if not isinstance(config["architecture"].get("type"), str):
        raise _refused(config_path, "'architecture' names no 'type'")
    weights = config.get("weights", "weights.safetensors")
    if not isinstance(weights, str) or Path(weights).name != weights or weights in ("", "..",
                                                                                  "."):
        raise _refused(config_path, f"'weights' is {weights!r}: it must name a file in the "
                                    "artifact's own folder")
    return config


def list_artifacts(models_dir: Path, task: str) -> list[str]:
    """Names of the artifacts under ``models_dir`` whose config.json has ``task``.
    ArtifactError when ``models_dir`` is not a folder (an unmounted volume, a typo) or a
    config.json there cannot be read; a folder whose config.json names no task is not an
    artifact, and is skipped with a warning."""
    if not models_dir.is_dir():
        raise ArtifactError(f"--models-dir {models_dir} is not a folder (a volume not mounted, "
                            "or a typo): pass the folder that holds the model artifacts")
    names = []
    for child in sorted(models_dir.iterdir()):
        if child.name.startswith("."):  # an export in progress (training/export.py)
            continue
        config_path = child / "config.json"
        if not config_path.is_file():
            continue
        found = _parsed_config(config_path).get("task")
        if found is None:
            log.warning("not a model artifact: its config.json names no task; skipped",
                        extra={"folder": str(child)})
        elif found == task:
            check_artifact_name(child.name, child, "folder name")
            names.append(child.name)
    return names


def check_weights_digest(weights: Path, config: dict[str, Any]) -> None:
    """ArtifactError when the weights file is not the one config.json names by its SHA-256
    (``weights_sha256``, written last by an export): an export cut short between the two,
    or a file changed by hand. Artifacts from before the digest was recorded pass, with a
    warning."""
    expected = config.get("weights_sha256")
    if expected is None:
        log.warning("weights not verified: config.json records no weights_sha256 (an "
                    "artifact exported before it was recorded); export it again to have it "
                    "checked", extra={"artifact": str(weights.parent)})
        return
    digest = hashlib.sha256()
    with weights.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ArtifactError(
            f"{weights} is not the weights file {weights.parent / 'config.json'} names "
            f"(SHA-256 {digest.hexdigest()[:12]}..., expected {str(expected)[:12]}...): an "
            "export was cut short, or the file was changed; export the model again, or "
            "restore the artifact")


def exported_identity(weights: Path) -> dict[str, Any]:
    """The name, task and architecture the export wrote into the weights file's metadata
    (one ``percept`` JSON entry; older files kept each as its own entry); empty for a file
    without them."""
    with safe_open(str(weights), "pt") as file:
        metadata = file.metadata() or {}
    if "percept" in metadata:
        recorded: dict[str, Any] = json.loads(metadata["percept"])
        return recorded
    identity: dict[str, Any] = {key: metadata[key] for key in ("name", "task")
                                if key in metadata}
    if "architecture" in metadata:
        identity["architecture"] = json.loads(metadata["architecture"])
    return identity


def check_exported_identity(weights: Path, config: dict[str, Any]) -> None:
    """ArtifactError where the weights were exported as another model than config.json
    describes: another artifact's file copied in (the same architecture, another style),
    or an architecture edited in config.json that the weights were not trained with."""
    try:
        recorded = exported_identity(weights)
    except (json.JSONDecodeError, TypeError) as error:
        raise _refused(weights, f"its metadata is not an export's ({error})") from error
    differing = [f"{key} {config[key]!r} in config.json, {recorded[key]!r} in the weights"
                 for key in ("name", "task", "architecture")
                 if key in recorded and recorded[key] != config[key]]
    if differing:
        raise _refused(weights, "was exported as another model: " + "; ".join(differing))


def load_artifact(models_dir: Path, name: str, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> Artifact:
    """Builds the artifact's module, loads its weights strictly and moves it to device;
    ArtifactError, naming the artifact, for anything that stops it being served as it
    is."""
    path = models_dir / name
    config = read_config(path)
    try:
        module = nets.build(config["architecture"])
    except (KeyError, TypeError, ValueError) as error:
        raise _refused(path / "config.json", f"its architecture {config['architecture']} "
                                             f"cannot be built ({error})") from error
    weights = path / config.get("weights", "weights.safetensors")
    if not weights.is_file():
        raise _refused(weights, "missing")
    check_weights_digest(weights, config)
    try:
        check_exported_identity(weights, config)
        state = load_file(str(weights), device="cpu")
    except ArtifactError:
        raise
    except Exception as error:  # safetensors raises its own types for a damaged file
        raise _refused(weights, f"not a readable safetensors file ({type(error).__name__}: "
                                f"{error})") from error
    broken = [key for key, value in state.items()
              if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if broken:  # it would answer every request with a black image
        raise ArtifactError(
            f"{weights}: {len(broken)} weight tensors hold NaN or infinite values "
            f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}); the training "
            "run diverged: retrain it, or remove the artifact")
    try:
        module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[:3]
        raise _refused(weights, "does not fit the architecture config.json gives ("
                                + " ".join(line.strip() for line in first) + ")") from error
    module.eval().requires_grad_(False)
    module.to(device=device, dtype=dtype)
    return Artifact(name=config["name"], version=config["version"], task=config["task"],
                    config=config, module=module, path=path)
