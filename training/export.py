"""Writing (and, for trainers and evaluation, reading) versioned model artifacts.

The format is docs/architecture.md, "Model artifacts": ``models/<name>/`` holds

- ``config.json``: ``{"name", "version", "task", "architecture": {"type", ...kwargs},
  "weights": "weights.safetensors", "weights_dtype": "float16", "weights_sha256",
  ...task fields}`` (written last);
- ``weights.safetensors``: the state_dict in fp16;
- ``metrics.json``: what the run measured, including its size and device;
- ``provenance.json``: ``{"data": [{"path", "sha256"}...], "command", "git_sha",
  "git_modified" (tracked files that differed from that commit), "created", "device",
  "torch"}``.

Services load artifacts with ``services.common.artifacts.load_artifact``; this module is
trainer code and is never imported by them.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training import nets
from training.assets import REPO_ROOT, sha256_of
from training.command import command_line
from training.files import listed, other_files, write_text_atomically

__all__ = ["command_line", "data_entry", "export_artifact", "fp16_state_dict",
           "git_dirty_paths", "git_sha", "load_exported", "update_metrics"]

WEIGHTS = "weights.safetensors"


def git_sha(repo: Path = REPO_ROOT) -> str:
    """``git rev-parse HEAD``; where git cannot tell (a copy of the tree without ``.git``,
    such as the one a GPU machine trains in), ``$PERCEPT_GIT_SHA`` if the copy's sender set
    it, else ``"uncommitted"``."""
    fallback = os.environ.get("PERCEPT_GIT_SHA", "")
    fallback = fallback if re.fullmatch(r"[0-9a-f]{40}", fallback) else "uncommitted"
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return fallback
    sha = result.stdout.strip()
    return sha if result.returncode == 0 and len(sha) == 40 else fallback


def git_dirty_paths(repo: Path = REPO_ROOT) -> list[str] | None:
    """Tracked files that differ from HEAD (the training code may not be what ``git_sha``
    names), or ``None`` when git cannot tell."""
    try:
        result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=repo, capture_output=True, text=True, timeout=10,
                                check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return sorted(line[3:] for line in result.stdout.splitlines() if line.strip())


def data_entry(path: Path, **extra: Any) -> dict[str, Any]:
    """``{"path", "sha256", ...}`` for provenance, with the path relative to the repo."""
    resolved = path.resolve()
    try:
        shown = str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        shown = str(resolved)
    return {"path": shown, "sha256": sha256_of(resolved), **extra}


def fp16_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict with floating tensors in fp16, contiguous, on the CPU."""
    state = {}
    for key, value in module.state_dict().items():
        tensor = value.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        state[key] = tensor.contiguous()
    return state


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def next_version(out_dir: Path, name: str) -> int:
    """1 for a new artifact; one more than the version in ``out_dir/config.json`` when it
    holds an artifact of the same ``name``."""
    try:
        config = json.loads((out_dir / "config.json").read_text())
        if config.get("name") == name:
            return int(config.get("version", 0)) + 1
    except (OSError, ValueError, TypeError, AttributeError):  # missing, unreadable, odd
        pass
    return 1


class NonFiniteWeights(ValueError):
    """An export refused because weights are NaN or infinite (a diverged run)."""


#: The files an export writes (and a training run copies in): a folder holding anything
#: else is not an artifact folder, and --out refuses it.
ARTIFACT_FILES = frozenset({"config.json", "weights.safetensors", "weights.partial",
                            "metrics.json", "provenance.json", "samples.png", "loss.png"})


#: What an artifact's name may be: a model name in requests, a folder under models/.
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_output_folder(out_dir: Path, name: str, flag: str = "--out") -> str:
    """Before a long run: ValueError when the export to ``out_dir`` is bound to fail (a
    file in the way, a folder that cannot be written) or would replace an artifact of
    another name. Returns what the export will do, for the log: a new artifact, or the
    next version of the one there."""
    from training.data.folders import check_folder_to_make

    if not ARTIFACT_NAME.fullmatch(name):
        raise ValueError(f"the artifact name {name!r} (--name, or the --out folder's name) "
                         "must be letters, digits, '.', '_' and '-', starting with a letter "
                         "or digit: services address a model by it, and it names a folder")
    check_folder_to_make(out_dir, flag)
    config_path = out_dir / "config.json"
    others = other_files(out_dir, lambda name: name in ARTIFACT_FILES
                         or name.endswith(".partial"))
    if others:
        raise ValueError(f"{flag} {out_dir} holds other files ({len(others)}: "
                         f"{listed(others)}), not "
                         f"an artifact: choose a new or empty folder")
    if not config_path.is_file():
        return f"a new artifact {name}@1 in {out_dir}"
    try:
        held = json.loads(config_path.read_text())
        held_name, held_version = held.get("name"), held.get("version")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{flag} {out_dir} holds a config.json that cannot be read ({error}); "
                         f"choose another {flag}, or remove that folder") from error
    if held_name != name:
        raise ValueError(f"{flag} {out_dir} holds the artifact {held_name!r}, and the export "
                         f"of {name} would replace it: choose another {flag}")
    return f"{name}@{next_version(out_dir, name)}, replacing version {held_version} in {out_dir}"


def export_artifact(out_dir: Path, *, name: str, task: str, architecture: Mapping[str, Any],
                    module: nn.Module, metrics: Mapping[str, Any],
                    data: Iterable[Mapping[str, Any]], command: str, device: str,
                    version: int | None = None,
                    config_extra: Mapping[str, Any] | None = None,
                    earlier_commands: Sequence[str] = (),
                    pictures: Mapping[str, Path] | None = None) -> Path:
    """Writes config.json, weights.safetensors (fp16), metrics.json and provenance.json,
    and copies in ``pictures`` (file name -> path: samples.png, loss.png), all at once: an
    export stopped at any moment leaves the artifact that was there whole.

    The weights are checked to load back strictly into ``nets.build(architecture)``
    before anything is written, so a broken artifact never lands on disk. ``version``:
    by default one more than the artifact of the same name already in ``out_dir`` (a
    retrained model is served under a new tag, ``name@version``), else 1.
    ``earlier_commands``: those of the runs a resumed run continued, first first.
    """
    if version is None:
        version = next_version(out_dir, name)
    if "type" not in architecture:
        raise ValueError("architecture needs a 'type' (a training.nets registered name)")
    state = fp16_state_dict(module)
    broken = [key for key, value in state.items()
              if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if broken:
        raise NonFiniteWeights(
            f"not exported: {len(broken)} weight tensors hold NaN or infinite values in "
            f"float16 ({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}); the run "
            "diverged, or its weights outgrow float16's range (65504)")
    probe = nets.build(architecture)
    probe.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir.resolve()  # a link to a folder: the folder is what is replaced
    _clear_stale_exports(target)
    staging = _staging_folder(target)
    try:
        _write_artifact(staging, state, name=name, task=task, architecture=architecture,
                        version=int(version), metrics=metrics, data=data, command=command,
                        device=device, config_extra=config_extra,
                        earlier_commands=earlier_commands)
        for file_name, source in (pictures or {}).items():
            shutil.copyfile(source, staging / file_name)
        _swap_in(staging, target)
    finally:  # the staging folder, or after a swap the replaced artifact
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_artifact(folder: Path, state: Mapping[str, torch.Tensor], *, name: str, task: str,
                    architecture: Mapping[str, Any], version: int, metrics: Mapping[str, Any],
                    data: Iterable[Mapping[str, Any]], command: str, device: str,
                    config_extra: Mapping[str, Any] | None,
                    earlier_commands: Sequence[str]) -> None:
    weights_path = folder / WEIGHTS
    # One metadata entry: safetensors writes several in a random order, so the same
    # weights would hash differently from one export to the next
    save_file(dict(state), str(weights_path), metadata={"percept": json.dumps(
        {"name": name, "task": task, "architecture": dict(architecture)}, sort_keys=True)})
    weights_path.chmod(0o644)  # safetensors writes 0600; services may run as another user
    # config.json names the weights' digest: weights changed after the export (or an
    # export cut short where the folder could not be swapped whole) do not match it, and
    # services refuse that pair (services/common/artifacts.py)
    config: dict[str, Any] = {
        "name": name, "version": version, "task": task,
        "architecture": dict(architecture), "weights": WEIGHTS, "weights_dtype": "float16",
        "weights_sha256": sha256_of(weights_path), **(config_extra or {}),
    }
    sized_metrics = {**metrics, "weights_bytes": weights_path.stat().st_size,
                     "parameters": sum(int(v.numel()) for v in state.values()),
                     "device": metrics.get("device", device)}
    _write_json(folder / "metrics.json", sized_metrics)
    _write_json(folder / "provenance.json", {
        "data": list(data), "command": command,
        **({"earlier_commands": list(earlier_commands)} if earlier_commands else {}),
        "git_sha": git_sha(),
        "git_modified": git_dirty_paths(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device, "torch": torch.__version__,
    })
    _write_json(folder / "config.json", config)


#: renameat2's flag that swaps two paths in one step (Linux 3.15+, glibc 2.28+).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _staging_folder(target: Path) -> Path:
    """A new hidden folder to write the export in: beside ``target``, so that it can be
    swapped in whole; inside it where its parent cannot be written (a volume mounted at
    the artifact folder under a read-only root). Its name carries this process's id."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.export-{os.getpid()}-",
                                     dir=target.parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f".export-{os.getpid()}-", dir=target))


def _clear_stale_exports(target: Path) -> None:
    """Removes the staging folders of exports to ``target`` whose process is gone (killed
    mid-export); those of a live one (an export to the same folder running now) stay."""
    for stale in [*target.parent.glob(f".{target.name}.export-*"), *target.glob(".export-*")]:
        pid = stale.name.rsplit(".export-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill would end the process there: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _fsync(path: Path) -> None:
    """Writes a file's (or, on POSIX, a folder's) data to disk: a swap or a rename must
    not reach the disk before what it puts in place does."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # a folder on Windows
        return
    try:
        os.fsync(descriptor)
    except OSError:  # a file system that cannot (some network ones)
        pass
    finally:
        os.close(descriptor)


def _exchange(first: Path, second: Path) -> bool:
    """Swaps two paths of one file system at once; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without it
        return False
    return renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                     _RENAME_EXCHANGE) == 0


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Puts the finished artifact in ``staging`` at ``out_dir``: in one step where it was
    written beside it (Linux's renameat2 exchange), so that a stop at any moment leaves
    either the old artifact whole or the new one; the old one is then in ``staging``.
    Hidden files in ``out_dir`` are kept. Otherwise (not Linux; a mount point; staged
    inside ``out_dir``) every new file is first put beside the one it replaces and then
    renamed over it, config.json last: only a stop among those renames, microseconds,
    leaves new weights that the old config.json's digest refuses."""
    names = sorted(p.name for p in staging.iterdir() if not p.name.startswith("."))
    for name in names:
        _fsync(staging / name)
    if staging.parent != out_dir:
        for kept in out_dir.iterdir():
            if kept.name.startswith("."):
                if kept.is_dir() and not kept.is_symlink():
                    shutil.copytree(kept, staging / kept.name, symlinks=True)
                else:
                    shutil.copy2(kept, staging / kept.name, follow_symlinks=False)
        staging.chmod(out_dir.stat().st_mode & 0o7777)  # not mkdtemp's 0700
        _fsync(staging)
        if _exchange(staging, out_dir):
            _fsync(out_dir.parent)
            return
    order = [WEIGHTS, *[n for n in names if n not in (WEIGHTS, "config.json")], "config.json"]
    for name in order:
        partial = out_dir / f"{name}.partial"
        shutil.copyfile(staging / name, partial)
        _fsync(partial)
    for name in order:
        (out_dir / f"{name}.partial").replace(out_dir / name)
    for stale in set(ARTIFACT_FILES) - set(names):  # a picture the new export has not
        (out_dir / stale).unlink(missing_ok=True)
    _fsync(out_dir)


def load_exported(path: Path, device: str | torch.device = "cpu",
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """Builds an exported artifact's module (fp32, eval mode) and returns it with its config."""
    config: dict[str, Any] = json.loads((path / "config.json").read_text())
    module = nets.build(config["architecture"])
    weights = path / config.get("weights", WEIGHTS)
    expected = config.get("weights_sha256")
    if expected is not None and sha256_of(weights) != expected:  # as the services refuse it
        raise ValueError(f"{weights} is not the weights file {path / 'config.json'} names "
                         "(weights_sha256): an export was cut short, or the file was "
                         "changed; export the model again, or restore the artifact")
    state = load_file(str(weights), device="cpu")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return module.eval().requires_grad_(False).to(device), config


def update_metrics(path: Path, updates: Mapping[str, Any]) -> None:
    """Merges ``updates`` into an artifact's metrics.json (used by evaluation)."""
    metrics_path = path / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics.update(updates)
    _write_json(metrics_path, metrics)
