"""Tiny real end-to-end runs: prepare -> train (checkpoint, resume) -> export -> evaluate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from training import cli_superres
from training.assets import VGG19_WEIGHTS
from training.data.arrays import load_prepared
from training.data.prepare import prepare
from training.image_batches import to_tensor
from training.loop import lr_factor
from training.sr_data import Degradation, PairSampler, degrade, gaussian_blur

TINY = ["--width", "8", "--blocks", "1", "--crop", "24", "--batch-size", "2", "--threads", "2",
        "--val-items", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sr")
    photos = root / "photos"
    photos.mkdir()
    Image.fromarray(skdata.astronaut()).save(photos / "astronaut.jpg", quality=92)
    Image.fromarray(skdata.coffee()).save(photos / "coffee.png")
    prepare(sorted(photos.iterdir()), root / "arrays", sizes=[32, 8], crops_per_image=3,
            seed=0, workers=1, progress=False)
    return root / "arrays"


def test_sampler_keeps_pairs_exact(prepared: Path) -> None:
    sampler = PairSampler(load_prepared(prepared), crop=16, seed=0)
    lr, hr = sampler.sample(4, detail=2)
    assert lr.shape == (4, 4, 4, 3) and hr.shape == (4, 16, 16, 3)
    for low, high in zip(lr, hr, strict=True):
        expected = np.asarray(Image.fromarray(np.ascontiguousarray(high)).resize(
            (4, 4), Image.Resampling.BICUBIC))
        # crops of an exact 32->8 pair: the 16->4 reduction of the crop agrees closely
        assert np.abs(expected.astype(int) - low.astype(int)).mean() < 12


def test_degradations(prepared: Path) -> None:
    sampler = PairSampler(load_prepared(prepared), crop=16, seed=0)
    lr, hr = sampler.sample(4)
    hr_t = to_tensor(hr, torch.device("cpu"))
    rng = np.random.default_rng(0)
    plain = degrade(lr, hr_t, Degradation(), rng)
    assert torch.equal(plain, to_tensor(lr, torch.device("cpu")))
    noisy = degrade(lr, hr_t, Degradation(noise=0.1, jpeg=30, prob=1.0), rng)
    assert noisy.shape == plain.shape and not torch.equal(noisy, plain)
    blurred = gaussian_blur(hr_t, torch.tensor([0.0, 2.0, 0.0, 2.0]))
    assert torch.allclose(blurred[0], hr_t[0], atol=1e-6)
    assert float(blurred[1].diff(dim=-1).abs().mean()) < float(hr_t[1].diff(dim=-1).abs().mean())
    low = degrade(lr, hr_t, Degradation(blur=1.5, prob=1.0), rng)
    assert low.shape == plain.shape


def test_lr_schedule_warms_up_then_decays() -> None:
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10) < 0.05


def test_train_resume_export_and_evaluate(prepared: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out, run = tmp_path / "models" / "sr-tiny", tmp_path / "run"
    args = ["train", "--data", str(prepared), "--out", str(out), "--run-dir", str(run), *TINY,
            "--checkpoint-every", "2", "--sample-every", "2"]
    assert cli_superres.main([*args, "--steps", "3"]) == 0
    assert (run / "checkpoint.pt").is_file() and (run / "samples.png").is_file()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    # a new run would overwrite the checkpoint; a resume may not change the loss
    saved = (run / "checkpoint.pt").read_bytes()
    assert cli_superres.main([*args, "--steps", "5"]) == 2
    assert "holds an earlier run: pass --resume" in capsys.readouterr().err
    assert cli_superres.main([*args, "--steps", "5", "--resume", "--lr", "0.5"]) == 2
    assert "with other settings: --lr 0.001 -> 0.5" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == saved
    assert cli_superres.main([*args, "--steps", "5", "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["note"] == (
        "trained on cpu at changed sizes: width 8 (default: 32), blocks 1 (default: 5), "
        "crop 24 (default: 96), batch size 2 (default: 16), steps 5 (default: 2000)")
    assert metrics["device"] == "cpu" and metrics["final_loss_window"] == 5
    assert (out / "loss.png").is_file() and (out / "samples.png").is_file()
    provenance = json.loads((out / "provenance.json").read_text())
    assert any(d.get("kind") == "source photo" for d in provenance["data"])
    assert "--resume" in provenance["command"]
    # the run it continued is named too (the refused attempts never saved a checkpoint)
    assert len(provenance["earlier_commands"]) == 1
    assert "--steps 3" in provenance["earlier_commands"][0]
    assert "--resume" not in provenance["earlier_commands"][0]
    # a resume that gives only where the run is: the data, the sizes and the losses are
    # the run's own (named), not the defaults, which --resume would refuse
    assert cli_superres.main(["train", "--out", str(out), "--run-dir", str(run), "--quiet",
                              "--steps", "6", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming {run / 'checkpoint.pt'} with the flags it was started with: " in printed
    assert "--crop 24" in printed and f"--data {prepared}" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and "width 8 (default: 32), blocks 1" in metrics["note"]

    heldout = tmp_path / "heldout"
    heldout.mkdir()
    Image.fromarray(skdata.chelsea()).save(heldout / "chelsea.png")
    eval_out = tmp_path / "eval"
    figure = tmp_path / "figure.png"
    assert cli_superres.main(["eval", "--photos", str(heldout), "--models", str(out),
                              "--hr-size", "64", "--resize-to", "128", "--out", str(eval_out),
                              "--figure", str(figure), "--update-metrics",
                              "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| bicubic |" in table and "| sr-tiny |" in table and "| lanczos |" in table
    report = json.loads((eval_out / "metrics.json").read_text())
    assert report["tiles"] == 4 and set(report["summary"]) == {"bicubic", "lanczos", "sr-tiny"}
    assert (eval_out / "comparison.png").is_file() and figure.is_file()
    assert "heldout" in json.loads((out / "metrics.json").read_text())


def test_an_out_holding_another_artifact_is_refused_before_training(
        prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / "superres-perceptual"
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"name": "superres-perceptual", "version": 2}))
    assert cli_superres.main(["train", "--data", str(prepared), "--out", str(out), "--name",
                              "sr-mine", "--run-dir", str(tmp_path / "run"), *TINY,
                              "--steps", "1"]) == 2
    assert ("holds the artifact 'superres-perceptual', and the export of sr-mine would "
            "replace it") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--threads", "-1"], "--threads must be >= 0, got -1"),
    (["--lr", "-1"], "--lr must be > 0, got -1"),
    (["--lr", "0"], "--lr must be > 0, got 0"),  # trained nothing and exported it
    (["--seed", "-1"], "--seed must be 0..4294967295, got -1"),  # NumPy's message, at step 1
    (["--seed", str(2**64)], "--seed must be 0..4294967295"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--val-items", "0"], "--val-items must be >= 1, got 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0, got -1"),
    (["--max-minutes", "-1"], "--max-minutes must be >= 0, got -1"),
    (["--crop", "0"], "--crop must be >= 16, got 0"),
    (["--crop", "18"], "--crop must be a multiple of 4 (the low-res input is crop/4), got 18"),
    (["--jpeg", "101"], "--jpeg must be at most 95"),
    (["--jpeg", "96"], "--jpeg must be at most 95"),  # "low >= high" at step 1
    (["--degrade-prob", "1.5"], "--degrade-prob must be at most 1, got 1.5"),
    (["--warmup", "50", "--steps", "3"], "--warmup 50 is longer than the run (--steps 3)"),
    (["--pixel-weight", "0"], "every loss weight is 0"),
    (["--init-from", "/nonexistent"], "--init-from /nonexistent: no exported artifact there"),
    (["--name", "../evil"], "the artifact name '../evil' (--name, or the --out folder's name)"),
    (["--time-schedule"], "--time-schedule anneals by the clock: it needs --max-minutes"),
])
def test_bad_numbers_are_refused_before_anything_loads(
        tmp_path: Path, flags: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The data folder does not even exist: the flag is refused first, exit 2."""
    assert cli_superres.main(["train", "--data", str(tmp_path / "no-data"), "--out",
                              str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"),
                              *TINY, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


@pytest.mark.skipif(not VGG19_WEIGHTS.path.is_file(), reason="VGG19 weights not fetched")
def test_perceptual_loss_trains(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "sr-perceptual"
    assert cli_superres.main(["train", "--data", str(prepared), "--out", str(out),
                              "--run-dir", str(tmp_path / "run"), *TINY, "--steps", "2",
                              "--pixel-weight", "0.1", "--perceptual-weight", "1e-5",
                              "--tv-weight", "0.1", "--sample-every", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final_loss"]) == {"total", "pixel", "perceptual", "tv", "l1_vs_bicubic"}


def test_the_grid_term_spares_the_target_and_penalises_a_checkerboard() -> None:
    """--grid-weight: zero for an output with no more of a lattice than the target (the
    photo itself, or a blurred copy), positive for one with a period-2 or period-4
    pattern added, and its gradient takes the pattern out."""
    from training.train_superres import LossWeights, SuperResLoss

    criterion = SuperResLoss(LossWeights(pixel=0.0, grid=1.0), torch.device("cpu"))
    photo = np.array(Image.fromarray(skdata.astronaut()).resize((64, 64)))
    target = to_tensor(photo[None], torch.device("cpu"))
    assert criterion(target.clone(), target)[1] == {"grid": 0.0}
    assert criterion(torch.nn.functional.avg_pool2d(target, 3, 1, 1), target)[1]["grid"] == 0
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    for period in (2, 4):
        lattice = (((rows // (period // 2)) + (cols // (period // 2))) % 2).float() - 0.5
        output = (target + 0.04 * lattice).requires_grad_()
        total, terms = criterion(output, target)
        assert terms["grid"] > 0.2, (period, terms)
        total.backward()
        assert output.grad is not None
        stepped = criterion((output - 0.5 * output.grad).detach(), target)[1]["grid"]
        assert stepped < terms["grid"], (period, stepped, terms)


def test_a_run_with_the_grid_term_records_it(prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "sr-grid"
    assert cli_superres.main(["train", "--data", str(prepared), "--out", str(out),
                              "--run-dir", str(tmp_path / "run"), *TINY, "--steps", "2",
                              "--grid-weight", "0.5", "--sample-every", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_weights"]["grid"] == 0.5
    assert set(metrics["final_loss"]) == {"total", "pixel", "grid", "l1_vs_bicubic"}


def test_missing_data_is_a_clear_error(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_superres.main(["train", "--data", str(tmp_path / "none"), "--out",
                              str(tmp_path / "m"), "--run-dir", str(tmp_path / "r"),
                              *TINY]) == 2
    assert "percept data prepare" in capsys.readouterr().err


def test_a_diverging_run_stops_and_exports_nothing(
        prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "models" / "sr-diverged"
    assert cli_superres.main(["train", "--data", str(prepared), "--out", str(out),
                              "--run-dir", str(tmp_path / "run"), *TINY, "--steps", "8",
                              "--warmup", "1", "--lr", "1e12", "--checkpoint-every", "1"]) == 1
    err = capsys.readouterr().err
    assert "the run diverged, so nothing is exported" in err and "Traceback" not in err, err
    assert not out.exists()
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    if checkpoint.exists():  # only states with finite weights were saved
        state = torch.load(checkpoint, weights_only=False)
        assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    # what the message says to do works (it once said --resume, which may not lower --lr)
    assert "lower --lr or the loss weights, and start again in another --run-dir" in err
    assert "--resume" not in err
    assert cli_superres.main(["train", "--data", str(prepared), "--out", str(out),
                              "--run-dir", str(tmp_path / "run-again"), *TINY, "--steps", "2",
                              "--checkpoint-every", "1"]) == 0


def test_a_resumed_fine_tune_records_the_weights_it_started_from(
        prepared: Path, tmp_path: Path) -> None:
    """--init-from X --out X, resumed: provenance names version 1's weights, which it
    started from (not version 2's, its own earlier export), and the resume needs neither
    --init-from's artifact nor loads it."""
    models = tmp_path / "models"
    common = ["train", "--data", str(prepared), *TINY, "--sample-every", "0"]
    base = models / "sr-base"
    assert cli_superres.main([*common, "--out", str(base), "--run-dir", str(tmp_path / "r0"),
                              "--steps", "1"]) == 0
    started_from = json.loads((base / "config.json").read_text())["weights_sha256"]
    tuned = models / "sr-tuned"
    tune = [*common, "--init-from", str(base), "--out", str(tuned),
            "--run-dir", str(tmp_path / "r1"), "--checkpoint-every", "1"]
    assert cli_superres.main([*tune, "--steps", "2"]) == 0
    shutil.rmtree(base)  # replaced or removed since: the checkpoint holds what it was
    assert cli_superres.main([*tune, "--steps", "3", "--resume"]) == 0
    provenance = json.loads((tuned / "provenance.json").read_text())
    (entry,) = [d for d in provenance["data"] if d.get("kind") == "initial weights"]
    assert entry["sha256"] == started_from and entry["artifact"] == "sr-base@1"
    assert json.loads((tuned / "metrics.json").read_text())["steps"] == 3


def test_ctrl_c_saves_a_checkpoint_and_the_same_run_dir_is_refused_as_out(
        prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import signal
    import subprocess
    import sys
    import time

    from training.assets import REPO_ROOT

    out, run = tmp_path / "models" / "sr-tiny", tmp_path / "run"
    args = ["train", "--data", str(prepared), "--out", str(out), "--run-dir", str(run), *TINY,
            "--checkpoint-every", "0", "--sample-every", "0"]
    assert cli_superres.main([*args[:5], "--run-dir", str(out), *args[7:], "--steps", "1"]) == 2
    assert "--out and --run-dir must be different folders" in capsys.readouterr().err
    process = subprocess.Popen([sys.executable, "-m", "training.cli_superres", *args,
                                "--steps", "100000"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert "[train] exports" in process.stdout.readline()
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    step = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert step > 0 and f"[train] stopped at step {step} of 100000" in err
    assert not out.exists()
    assert cli_superres.main([*args, "--steps", str(step + 1), "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == step + 1


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_stop_request_during_the_export_lets_it_finish(
        prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], signal_name: str) -> None:
    """Ctrl-C or SIGTERM after the last step: the run validates and exports (a bare
    KeyboardInterrupt there once cut the export short and left a broken artifact)."""
    import os
    import signal

    import training.train_superres as trainer
    from training.loop import FINISHED_FIRST, FINISHING

    real_export = trainer.export_artifact

    def export_after_a_signal(*args: object, **kwargs: object) -> Path:
        os.kill(os.getpid(), getattr(signal, signal_name))
        return real_export(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "export_artifact", export_after_a_signal)
    out = tmp_path / "models" / "sr-tiny"
    assert cli_superres.main(["train", "--data", str(prepared), "--out", str(out),
                              "--run-dir", str(tmp_path / "run"), *TINY, "--steps", "1",
                              "--checkpoint-every", "0", "--sample-every", "0"]) == 0
    err = capsys.readouterr().err
    assert FINISHING in err and FINISHED_FIRST in err, err
    assert json.loads((out / "config.json").read_text())["version"] == 1
    assert (out / "loss.png").is_file() and (out / "samples.png").is_file()


def test_a_resume_with_more_steps_keeps_the_warmup(prepared: Path, tmp_path: Path) -> None:
    out, run = tmp_path / "models" / "sr-tiny", tmp_path / "run"
    args = ["train", "--data", str(prepared), "--out", str(out), "--run-dir", str(run), *TINY,
            "--checkpoint-every", "0", "--sample-every", "0"]
    assert cli_superres.main([*args, "--steps", "2"]) == 0  # the default warm-up: 1 step
    # --steps 200 alone would default to 10 warm-up steps: the run keeps its 1
    assert cli_superres.main([*args, "--steps", "3", "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["warmup"] == 1 and metrics["steps"] == 3
    assert cli_superres.main([*args, "--steps", "200", "--resume", "--max-cpu-minutes",
                              "0.0001"]) == 0
    assert json.loads((out / "metrics.json").read_text())["warmup"] == 1


def test_resume_if_present_starts_afresh_then_continues(prepared: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """What a Kubernetes Job runs: its first try starts a run, and a retry (the same
    command) continues the checkpoint the first one left; a changed loss is still refused."""
    out, run = tmp_path / "models" / "sr-tiny", tmp_path / "run"
    args = ["train", "--data", str(prepared), "--out", str(out), "--run-dir", str(run), *TINY,
            "--checkpoint-every", "0", "--sample-every", "0", "--resume-if-present"]
    assert cli_superres.main([*args, "--steps", "2"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert cli_superres.main([*args, "--steps", "3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    assert cli_superres.main([*args, "--steps", "4", "--lr", "0.5"]) == 2
    assert "with other settings: --lr 0.001 -> 0.5" in capsys.readouterr().err


@pytest.mark.parametrize("flag, kind", [("--out", "file"), ("--figure", "folder"),
                                        ("--figure", "under a file")])
def test_eval_refuses_an_output_it_cannot_write_before_measuring(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, kind: str) -> None:
    """Not a traceback after every model ran: exit 2 naming the flag, before any photo is
    read (the photos folder here does not even exist)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = {"file": blocker, "folder": tmp_path, "under a file": blocker / "x.png"}[kind]
    argv = ["eval", "--photos", str(tmp_path / "no-photos"), "--out", str(tmp_path / "eval")]
    argv += [flag, str(path)]
    assert cli_superres.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {flag} {path}" in err and "Traceback" not in err


def test_a_resume_refuses_arrays_prepared_again_under_the_same_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The path alone does not say the data are the same: the checkpoint keeps the
    manifest's digest, and arrays prepared again (another seed, more crops) are refused."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skdata.coffee()).save(photos / "coffee.png")
    arrays = tmp_path / "arrays"
    prepare(sorted(photos.iterdir()), arrays, sizes=[32, 8], crops_per_image=3, seed=0,
            workers=1, progress=False)
    out, run = tmp_path / "models" / "sr-tiny", tmp_path / "run"
    args = ["train", "--data", str(arrays), "--out", str(out), "--run-dir", str(run), *TINY,
            "--checkpoint-every", "0", "--sample-every", "0"]
    assert cli_superres.main([*args, "--steps", "2"]) == 0
    shutil.rmtree(arrays)
    prepare(sorted(photos.iterdir()), arrays, sizes=[32, 8], crops_per_image=4, seed=7,
            workers=1, progress=False)
    assert cli_superres.main([*args, "--steps", "3", "--resume"]) == 2
    assert "on other data" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--hr-size", "0"], "--hr-size must be a multiple of 4, at least 32 px, got 0"),
    (["--resize-to", "100"], "--resize-to 100 is smaller than --hr-size 256"),
    (["--threads", "-1"], "--threads must be >= 0, got -1"),
    (["--models", str(Path(__file__).resolve().parents[2] / "models" / "style-starry-night")],
     "is a style artifact, not a super-resolution one"),
])
def test_eval_refuses_settings_that_cannot_work_before_measuring(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
        message: str) -> None:
    assert cli_superres.main(["eval", "--photos", str(tmp_path), "--out",
                              str(tmp_path / "eval"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_names_a_photo_it_cannot_read(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    assert cli_superres.main(["eval", "--photos", str(photos), "--out",
                              str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert f"error: {photos / 'broken.jpg'}: not a readable image" in err


def test_time_schedule_decays_the_learning_rate_by_the_deadline(prepared: Path,
                                                                 tmp_path: Path) -> None:
    """A run the clock stops (--max-minutes) ends annealed with --time-schedule, and near
    the peak rate without it (the same schedule as the style trainer's)."""
    def final(name: str, *extra: str) -> dict[str, object]:
        out = tmp_path / name
        assert cli_superres.main([
            "train", "--data", str(prepared), "--out", str(out), "--run-dir",
            str(tmp_path / f"run-{name}"), *TINY, "--checkpoint-every", "0",
            "--sample-every", "0", "--steps", "100000", "--warmup", "1", "--lr", "0.001",
            "--max-minutes", "0.03", *extra]) == 0
        metrics: dict[str, object] = json.loads((out / "metrics.json").read_text())
        assert metrics["stopped_early"] is True
        return metrics

    timed = final("timed", "--time-schedule")
    assert timed["time_schedule"] is True and float(timed["final_lr"]) < 1e-4  # type: ignore[arg-type]
    stepped = final("stepped")
    assert stepped["time_schedule"] is False and float(stepped["final_lr"]) > 9e-4  # type: ignore[arg-type]


def test_eval_labels_two_artifacts_of_one_name_apart(tmp_path: Path) -> None:
    """A retrained model beside the committed one shares its name: each keeps its own
    column and summary entry (by version, else by folder) instead of one replacing the
    other; the same folder twice is refused."""
    from training.evaluate_superres import model_labels

    committed = (tmp_path / "models" / "sr", {"name": "sr", "version": 1})
    retrained = (tmp_path / "new" / "sr", {"name": "sr", "version": 2})
    other = (tmp_path / "models" / "sr-mse", {"name": "sr-mse", "version": 1})
    assert model_labels([committed, other]) == ["sr", "sr-mse"]
    assert model_labels([committed, retrained, other]) == ["sr@1", "sr@2", "sr-mse"]
    copy = (tmp_path / "copy" / "sr", {"name": "sr", "version": 1})
    assert model_labels([committed, copy]) == [str(committed[0]), str(copy[0])]
    assert model_labels([(tmp_path / "b", {"name": "bicubic", "version": 1})]) == ["bicubic@1"]
    with pytest.raises(ValueError, match=r"names .* more than once"):
        model_labels([committed, (tmp_path / "models" / ".." / "models" / "sr", {})])
