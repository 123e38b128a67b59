"""Loading versioned model artifacts from ``models/<name>/`` (format: docs/architecture.md).

Services load artifacts by name; the architecture is data (``config.json``), built with
``training.nets.build``, and the weights are a safetensors state_dict (fp16 on disk).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from training import nets


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


def read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing")
    config: dict[str, Any] = json.loads(config_path.read_text())
    for key in ("name", "version", "task", "architecture"):
        if key not in config:
            raise ValueError(f"{config_path}: missing key {key!r}")
    return config


def list_artifacts(models_dir: Path, task: str) -> list[str]:
    """Names of the artifacts under ``models_dir`` whose config.json has ``task``."""
    if not models_dir.is_dir():
        return []
    names = []
    for child in sorted(models_dir.iterdir()):
        if child.name.startswith("."):  # an export in progress (training/export.py)
            continue
        config_path = child / "config.json"
        if config_path.is_file():
            try:
                if json.loads(config_path.read_text()).get("task") == task:
                    names.append(child.name)
            except json.JSONDecodeError:
                continue
    return names


def check_weights_digest(weights: Path, config: dict[str, Any]) -> None:
    """ValueError when the weights file is not the one config.json names by its SHA-256
    (``weights_sha256``, written last by an export): an export cut short between the two,
    or a file changed by hand. Artifacts from before the digest was recorded pass."""
    expected = config.get("weights_sha256")
    if expected is None:
        return
    digest = hashlib.sha256()
    with weights.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"{weights} is not the weights file {weights.parent / 'config.json'} "
                         f"names (SHA-256 {digest.hexdigest()[:12]}..., expected "
                         f"{str(expected)[:12]}...): an export was cut short, or the file was "
                         "changed; export the model again, or restore the artifact")


def load_artifact(models_dir: Path, name: str, device: torch.device,
                  dtype: torch.dtype = torch.float32) -> Artifact:
    """Builds the artifact's module, loads its weights strictly and moves it to device."""
    path = models_dir / name
    config = read_config(path)
    module = nets.build(config["architecture"])
    weights = path / config.get("weights", "weights.safetensors")
    check_weights_digest(weights, config)
    state = load_file(str(weights), device="cpu")
    broken = [key for key, value in state.items()
              if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if broken:  # it would answer every request with a black image
        raise ValueError(f"{weights}: {len(broken)} weight tensors hold NaN or infinite "
                         f"values ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''})"
                         "; the training run diverged: retrain it, or remove the artifact")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    module.eval().requires_grad_(False)
    module.to(device=device, dtype=dtype)
    return Artifact(name=config["name"], version=int(config["version"]), task=config["task"],
                    config=config, module=module, path=path)
