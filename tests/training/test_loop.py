"""The trainers' shared loop plumbing (training/loop.py): device choice, checkpoints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from training import cli_style
from training.loop import (
    CheckpointError,
    _from_dir,
    changed_settings,
    choose_device,
    read_checkpoint,
    restore_training_state,
    save_checkpoint,
)

ARCHITECTURE = {"type": "tiny", "width": 2}


def _training_state() -> tuple[nn.Module, torch.optim.Optimizer,
                               torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler]:
    model = nn.Conv2d(3, 2, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    return model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=False)


def test_a_checkpoint_round_trips_and_replaces_the_old_one_whole(tmp_path: Path) -> None:
    model, optimizer, scheduler, scaler = _training_state()
    model(torch.rand(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    scheduler.step()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"the previous checkpoint")
    save_checkpoint(path, {"architecture": ARCHITECTURE, "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                           "step": 7})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no .partial left

    fresh, fresh_optimizer, fresh_scheduler, fresh_scaler = _training_state()
    state = read_checkpoint(path, torch.device("cpu"), ARCHITECTURE)
    assert restore_training_state(state, fresh, fresh_optimizer, fresh_scheduler,
                                  fresh_scaler) == 7
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr() == [5e-4]
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1


def test_resuming_without_a_checkpoint_or_from_another_architecture_says_so(
        tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(CheckpointError, match=re.escape(f"--resume but {path} does not exist")):
        read_checkpoint(path, torch.device("cpu"), ARCHITECTURE)
    save_checkpoint(path, {"architecture": {"type": "tiny", "width": 4}})
    with pytest.raises(CheckpointError, match=r"holds .*'width': 4.*, not .*'width': 2"):
        read_checkpoint(path, torch.device("cpu"), ARCHITECTURE)


def test_a_broken_checkpoint_is_refused_with_one_line(tmp_path: Path) -> None:
    model, optimizer, scheduler, scaler = _training_state()
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"architecture": ARCHITECTURE, "model": model.state_dict(),
                           "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                           "step": 3})
    whole = good.read_bytes()
    cases = {"half.pt": whole[: len(whole) // 2], "empty.pt": b"", "text.pt": b"garbage\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=r"is not a readable checkpoint \(truncated"):
            read_checkpoint(tmp_path / name, torch.device("cpu"), ARCHITECTURE)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"not a training checkpoint .*a list"):
        read_checkpoint(tmp_path / "list.pt", torch.device("cpu"), ARCHITECTURE)
    save_checkpoint(tmp_path / "bare.pt", {"architecture": ARCHITECTURE, "step": 3})
    with pytest.raises(CheckpointError,
                       match=r"not a complete training checkpoint \(no model, optimizer, "
                             r"scheduler, scaler\)"):
        read_checkpoint(tmp_path / "bare.pt", torch.device("cpu"), ARCHITECTURE)
    assert read_checkpoint(good, torch.device("cpu"), ARCHITECTURE)["step"] == 3


def test_changed_settings_lists_what_a_resume_would_change() -> None:
    saved = {"lr": 0.002, "size": 64, "steps": 100, "quiet": False, "only_then": 1}
    current = {"lr": 0.5, "size": 64, "steps": 200, "quiet": True, "only_now": 2}
    assert changed_settings(saved, current, may_change={"steps", "quiet"}) == [
        "--lr 0.002 -> 0.5"]
    assert changed_settings(saved, saved, may_change=()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_device_cuda_without_cuda_exits_2_with_a_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert choose_device("auto") == torch.device("cpu")
    with pytest.raises(SystemExit) as exited:
        cli_style.main(["train", "--style", "starry-night", "--device", "cuda",
                        "--out", str(tmp_path / "style-x")])
    assert exited.value.code == 2
    assert "--device cuda, but no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "style-x").exists()


def test_a_resume_runs_its_next_step_at_this_runs_schedule() -> None:
    """The optimiser's saved rate is the old schedule's (a run of 2 steps ends at its 1%);
    resumed with more --steps, the next step takes the new schedule's rate."""
    from training.loop import lr_factor

    model = nn.Conv2d(3, 2, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 2, 1))
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "step": 2,
             "scaler": torch.amp.GradScaler("cuda", enabled=False).state_dict()}
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)  # the end of 2 steps
    model = nn.Conv2d(3, 2, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 200, 1))
    assert restore_training_state(state, model, optimizer, scheduler,
                                  torch.amp.GradScaler("cuda", enabled=False)) == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(2, 200, 1))


def test_a_relative_path_flag_is_named_from_this_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What carry_resumed_flags makes of a path flag recorded in another directory: below
    this one it stays relative, elsewhere it becomes absolute; absolute paths, other
    values and checkpoints that did not record their directory are left as they were."""
    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    started_in = str(tmp_path / "run")
    assert _from_dir("data", started_in) == str(Path("run") / "data")
    assert _from_dir(["data", "/abs"], started_in) == [str(Path("run") / "data"), "/abs"]
    assert _from_dir("../x", started_in) == "x"
    monkeypatch.chdir(tmp_path / "other")
    assert _from_dir("data", started_in) == str(tmp_path / "run" / "data")
    assert _from_dir("data", str(tmp_path / "other")) == "data"  # the same directory
    assert _from_dir("data", None) == "data"
    assert _from_dir(4, started_in) == 4 and _from_dir("/abs/x", started_in) == "/abs/x"
