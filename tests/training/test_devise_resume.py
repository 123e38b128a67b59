"""``percept train devise`` checkpoints and resumes like the other trainers: a resumed run
ends bit-identical to an uninterrupted one, a resume that would change the run (its flags,
its photos, its word vectors) or that names a broken checkpoint is refused in one line,
Ctrl-C / SIGTERM save a checkpoint and exit 130 / 143, and what the trainer says about the
export is true. Real photos, a real tiny GloVe file, real short runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from services.embed.wordnet import imagenet_wnids, load_vocabulary
from training import cli_devise
from training.assets import REPO_ROOT


def write_glove(path: Path, seed: int = 0, words: list[str] | None = None) -> Path:
    """A GloVe file with a seeded 8-d vector for every ImageNet class's first lemma (or for
    ``words``)."""
    if words is None:
        vocab = load_vocabulary()
        words = list(dict.fromkeys(vocab[w].lemmas[0] for w in imagenet_wnids()))
    rng = np.random.default_rng(seed)
    path.write_text("".join(f"{w} {' '.join(f'{x:.5f}' for x in rng.standard_normal(8))}\n"
                            for w in words))
    return path


def write_photos(folder: Path, names: tuple[str, ...] = ("chelsea", "coffee")) -> Path:
    folder.mkdir(parents=True)
    for name in names:
        image = Image.fromarray(getattr(data, name)())
        image.thumbnail((128, 128))
        image.save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos, a GloVe file and a feature cache the runs of this module share."""
    folder = tmp_path_factory.mktemp("devise-resume")
    write_photos(folder / "photos")
    write_glove(folder / "glove.tiny.8d.txt")
    return folder


def flags(workdir: Path, run: Path, *extra: str, photos: Path | None = None,
          glove: Path | None = None) -> list[str]:
    return ["train", "--photos", str(photos or workdir / "photos"), "--val-photos", "",
            "--word-vectors", str(glove or workdir / "glove.tiny.8d.txt"),
            "--crops-per-image", "2", "--negatives", "4", "--lr", "0.02",
            "--weight-decay", "0.5", "--cache-dir", str(workdir / "cache"),
            "--out", str(run / "out"), "--run-dir", str(run / "run"), "--device", "cpu",
            "--threads", "1", "--quiet", *extra]


def load_checkpoint(run: Path) -> dict[str, Any]:
    state = torch.load(run / "run" / "checkpoint.pt", weights_only=False)
    assert isinstance(state, dict)
    return state


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(
        workdir: Path, tmp_path: Path, one_torch_thread: None) -> None:
    """The resume restores the weights, Adam's moments, the generator of the batches and
    the negatives, the shuffled order and its cursor (4 crops one at a time: the resume
    starts in the second epoch's order, one crop into it), and the initial map
    --weight-decay pulls towards (classifier-initialised here): leaving out the moments,
    the generator or the order changes the weights. The resuming command leaves out a
    flag the run was started with, which it takes from the checkpoint."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli_devise.main(flags(workdir, whole, "--steps", "9", "--batch-size", "1",
                                 "--checkpoint-every", "0")) == 0
    assert cli_devise.main(flags(workdir, split, "--steps", "5", "--batch-size", "1")) == 0
    assert load_checkpoint(split)["step"] == 5 and load_checkpoint(split)["cursor"] == 1
    # the resume leaves --batch-size out: it is the run's 1, not the default, that it takes
    assert cli_devise.main(flags(workdir, split, "--steps", "9", "--resume")) == 0

    a, b = load_checkpoint(whole), load_checkpoint(split)
    assert a["step"] == b["step"] == 9
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert all(torch.equal(x, y) for x, y in zip(a["initial"], b["initial"], strict=True))
    assert not torch.equal(a["model"]["linear.weight"], a["initial"][0])  # it trained
    history = json.loads((whole / "run" / "history.json").read_text())
    assert history == json.loads((split / "run" / "history.json").read_text())
    assert len(history["loss"]) == 9
    config_a = json.loads((whole / "out" / "config.json").read_text())
    config_b = json.loads((split / "out" / "config.json").read_text())
    assert config_a["weights_sha256"] == config_b["weights_sha256"]
    assert config_b["version"] == 2  # the step-5 export was version 1
    assert json.loads((split / "out" / "metrics.json").read_text())["steps"] == 9
    provenance = json.loads((split / "out" / "provenance.json").read_text())
    assert "--resume" in provenance["command"]
    assert len(provenance["earlier_commands"]) == 1
    assert "--resume" not in provenance["earlier_commands"][0]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_resume_is_refused_when_it_would_change_the_run(
        workdir: Path, tmp_path: Path, one_torch_thread: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for source in (workdir / "photos").iterdir():
        (photos / source.name).write_bytes(source.read_bytes())
    glove = tmp_path / "glove.tiny.8d.txt"
    glove.write_bytes((workdir / "glove.tiny.8d.txt").read_bytes())
    run = tmp_path / "r"

    def train(*extra: str) -> int:
        return cli_devise.main(flags(workdir, run, *extra, photos=photos, glove=glove))

    assert train("--steps", "2") == 0
    capsys.readouterr()
    checkpoint = run / "run" / "checkpoint.pt"
    before = checkpoint.read_bytes()

    assert train("--steps", "4") == 2  # a new run would overwrite the checkpoint
    assert "holds an earlier run: pass --resume" in one_line_error(capsys)
    assert train("--steps", "4", "--resume", "--margin", "0.3") == 2
    assert "with other settings: --margin 0.1 -> 0.3" in one_line_error(capsys)
    assert train("--steps", "4", "--resume", "--init", "random") == 2
    assert "--init 'classifier' -> 'random'" in one_line_error(capsys)
    assert train("--steps", "1", "--resume") == 2
    assert "is at step 2, past --steps 1" in one_line_error(capsys)

    # the same flags, other bytes: another photo under the same name
    coffee = photos / "coffee.jpg"
    kept = coffee.read_bytes()
    image = Image.fromarray(data.astronaut())
    image.thumbnail((128, 128))
    image.save(coffee, quality=90)
    assert train("--steps", "4", "--resume") == 2
    message = one_line_error(capsys)
    assert "on other data" in message and "the training images" in message
    coffee.write_bytes(kept)
    # ... and other word vectors in the same file
    glove.write_text(write_glove(tmp_path / "other.txt", seed=5).read_text())
    assert train("--steps", "4", "--resume") == 2
    message = one_line_error(capsys)
    assert "on other data" in message and "the word vectors" in message
    glove.write_bytes((workdir / "glove.tiny.8d.txt").read_bytes())
    assert checkpoint.read_bytes() == before  # nothing above touched it
    assert train("--steps", "4", "--resume") == 0
    assert load_checkpoint(run)["step"] == 4


def test_resume_if_present_starts_afresh_then_continues(
        workdir: Path, tmp_path: Path, one_torch_thread: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """For a Kubernetes Job: its first try starts a run, a retry continues it."""
    run = tmp_path / "r"
    assert cli_devise.main(flags(workdir, run, "--steps", "2", "--resume-if-present")) == 0
    assert "resumed from" not in capsys.readouterr().out
    assert cli_devise.main(flags(workdir, run, "--steps", "4", "--resume-if-present")) == 0
    assert f"[devise] resumed from {run / 'run' / 'checkpoint.pt'} at step 2" in \
        capsys.readouterr().out
    assert load_checkpoint(run)["step"] == 4


@pytest.mark.parametrize("damage", ["truncated", "not a checkpoint", "a weights file"])
def test_a_broken_checkpoint_is_a_one_line_error(
        workdir: Path, tmp_path: Path, damage: str, one_torch_thread: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "r"
    assert cli_devise.main(flags(workdir, run, "--steps", "2")) == 0
    checkpoint = run / "run" / "checkpoint.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[:3000])
    elif damage == "not a checkpoint":
        checkpoint.write_text("hello\n")
    else:
        torch.save({"linear.weight": torch.zeros(2, 2)}, checkpoint)
    capsys.readouterr()
    assert cli_devise.main(flags(workdir, run, "--steps", "4", "--resume")) == 2
    message = one_line_error(capsys)
    assert str(checkpoint) in message
    assert ("not a readable checkpoint" in message if damage != "a weights file"
            else "not a complete training checkpoint" in message)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_the_run_resumes(
        workdir: Path, tmp_path: Path, sig: int, status: int, one_torch_thread: None) -> None:
    assert cli_devise.main(flags(workdir, tmp_path / "warm", "--steps", "1")) == 0  # features
    run = tmp_path / "r"
    args = flags(workdir, run, "--steps", "1000000", "--checkpoint-every", "300",
                 "--init", "random")
    process = subprocess.Popen([sys.executable, "-m", "training.cli_devise", *args],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    checkpoint = run / "run" / "checkpoint.pt"
    try:
        deadline = time.monotonic() + 180
        while not checkpoint.exists() and process.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert checkpoint.exists(), process.communicate(timeout=60)
        first = load_checkpoint(run)["step"]
        assert first > 0 and first % 300 == 0  # --checkpoint-every
        process.send_signal(sig)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == status, err
    step = load_checkpoint(run)["step"]
    assert step >= first and f"[train] stopped at step {step} of 1000000" in err
    assert "Traceback" not in err and "nothing was exported" in err
    assert not (run / "out").exists()
    args[args.index("1000000")] = str(step + 5)
    assert cli_devise.main([*args, "--resume"]) == 0
    assert json.loads((run / "out" / "metrics.json").read_text())["steps"] == step + 5
    assert len(json.loads((run / "run" / "history.json").read_text())["loss"]) == step + 5


def test_the_trainer_says_it_exported_only_after_it_did(
        workdir: Path, tmp_path: Path, one_torch_thread: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A run that fails after the plan is printed (no crop's label has a vector) must not
    have said that it exports."""
    glove = write_glove(tmp_path / "glove.few.txt", words=["volcano", "alp", "seashore"])
    run = tmp_path / "r"
    assert cli_devise.main(flags(workdir, run, "--steps", "2", glove=glove)) == 2
    captured = capsys.readouterr()
    assert "no training crop has a label with a vector" in captured.err
    assert "[devise] exports" not in captured.out and "exported" not in captured.out
    assert "[devise] will export a new artifact" in captured.out
    assert not (run / "out").exists()
    assert cli_devise.main(flags(workdir, run, "--steps", "2")) == 0
    out = capsys.readouterr().out
    assert f"[devise] exported devise-glove-tiny-8d@1 to {run / 'out'}" in out
    metrics = json.loads((run / "out" / "metrics.json").read_text())
    # 2 photos x 2 crops: the batches held 4 crops, not the 128 asked for (the default)
    assert metrics["batch_size"] == 4 and metrics["batch_size_requested"] == 128


def test_an_interrupt_during_the_export_does_not_say_nothing_was_exported(
        workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C as the (all-or-nothing) export finishes: the artifact is there, so the
    trainer must not claim that nothing was exported."""
    from training import train_devise

    real_export = train_devise.export_artifact

    def export_then_interrupt(*args: Any, **kwargs: Any) -> Path:
        real_export(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_devise, "export_artifact", export_then_interrupt)
    run = tmp_path / "r"
    assert cli_devise.main(flags(workdir, run, "--steps", "2")) == 130
    err = capsys.readouterr().err
    assert "nothing was exported" not in err
    assert f"stopped just after the export: {run / 'out'} holds devise-glove-tiny-8d@1" in err, err
    assert (run / "out" / "config.json").is_file()
    # stopped before the new version was swapped in: the old one is there, and says so
    def interrupt_then_export(*args: Any, **kwargs: Any) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_devise, "export_artifact", interrupt_then_export)
    assert cli_devise.main(flags(workdir, tmp_path / "r2", "--steps", "2",
                                 "--out", str(run / "out"))) == 130
    err = capsys.readouterr().err
    assert f"stopped during the export to {run / 'out'}: an export is all or nothing, so " \
           f"{run / 'out'} holds what it held before" in err, err
    assert json.loads((run / "out" / "config.json").read_text())["version"] == 1
    monkeypatch.setattr(train_devise, "export_artifact", export_then_interrupt)
    # a Ctrl-C that stops the run at once before the export still says so
    monkeypatch.setattr(train_devise, "save_loss_plot",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli_devise.main(flags(workdir, run, "--steps", "3", "--resume")) == 130
    assert "nothing was exported" in capsys.readouterr().err


def test_a_first_stop_request_after_training_lets_the_export_finish(
        workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """As in the other trainers (training.loop.StopRequest.finish_first): a real SIGINT
    while the loss plot is drawn, after the last step, is noted and the run exports."""
    from training import train_devise
    from training.loop import FINISHED_FIRST, FINISHING

    real_plot = train_devise.save_loss_plot

    def interrupted_plot(*args: Any, **kwargs: Any) -> Path:
        os.kill(os.getpid(), signal.SIGINT)
        return real_plot(*args, **kwargs)

    monkeypatch.setattr(train_devise, "save_loss_plot", interrupted_plot)
    run = tmp_path / "r"
    assert cli_devise.main(flags(workdir, run, "--steps", "2")) == 0
    err = capsys.readouterr().err
    assert FINISHING in err and FINISHED_FIRST in err and "nothing was exported" not in err
    assert (run / "out" / "config.json").is_file()


def test_an_ambiguous_class_folder_does_not_rename_the_artifact(
        workdir: Path, tmp_path: Path, one_torch_thread: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The loop that reports ambiguous class folders reused the artifact's variable: a
    folder named ``tabby`` exported the map as the artifact ``tabby``."""
    tree = tmp_path / "tree"
    write_photos(tree / "tabby", ("chelsea",))
    write_photos(tree / "n07920052", ("coffee",))
    run = tmp_path / "r"
    assert cli_devise.main([*flags(workdir, run, "--steps", "2"), "--images", str(tree)]) == 0
    assert "[devise] class 'tabby' -> n02123045" in capsys.readouterr().out
    config = json.loads((run / "out" / "config.json").read_text())
    assert config["name"] == "devise-glove-tiny-8d"
