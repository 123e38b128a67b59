"""The fast style trainer: the loss, a few real optimisation steps, the CLI run with export,
resume, and the export -> build round trip."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import encode
from training import cli_style, nets
from training.assets import REPO_ROOT
from training.cli_style import DEFAULT_STYLE_LAYER_WEIGHTS, parse_layer_weight, register_train
from training.export import export_artifact, load_exported

pytest.importorskip("skimage")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _vgg_available() -> bool:
    from training.assets import vgg19_weights_path

    try:
        vgg19_weights_path()
    except FileNotFoundError:
        return False
    return True


needs_vgg = pytest.mark.skipif(not _vgg_available(),
                               reason="VGG19 weights missing: run `make setup`")


def _tiny_photos(count: int, size: int) -> np.ndarray:
    """Real photo crops (scikit-image's astronaut, a training photo)."""
    from skimage import data

    image = Image.fromarray(data.astronaut()).resize((4 * size, 4 * size),
                                                      Image.Resampling.BICUBIC)
    array = np.asarray(image)
    return np.stack([array[i * size:(i + 1) * size, i * size:(i + 1) * size]
                     for i in range(count)])


def _tiny_style(size: int) -> np.ndarray:
    from skimage import data

    return np.asarray(Image.fromarray(data.immunohistochemistry()).resize(
        (size, size), Image.Resampling.BICUBIC))


def _batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255.0


@needs_vgg
def test_three_training_steps_lower_the_loss() -> None:
    from training.train_style import PerceptualStyleLoss

    torch.manual_seed(0)
    content = _batch(_tiny_photos(2, 32))
    criterion = PerceptualStyleLoss(_batch(_tiny_style(48)[None]), torch.device("cpu"),
                                    content_layer="relu2_2",
                                    style_layers=DEFAULT_STYLE_LAYER_WEIGHTS,
                                    content_weight=1.0, style_weight=3e-5, tv_weight=5e4)
    model = nets.build({"type": "johnson-transformer", "width": 4, "blocks": 1})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss() -> float:
        with torch.no_grad():
            return float(criterion(model(content), content)[0])

    before = loss()
    for _ in range(3):
        total, weighted, raw = criterion(model(content), content)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    after = loss()
    assert set(weighted) == {"content", "style", "tv"}
    assert {f"style/{k}" for k in DEFAULT_STYLE_LAYER_WEIGHTS} <= set(raw)
    assert np.isfinite(after) and after < before, (before, after)


def test_tile_consistency_is_zero_without_normalisation_and_trains_the_window() -> None:
    """A net without normalisation paints the same on a window as on the whole crop away
    from the window's edges (the term is 0); an instance-normalised one does not, the
    gradient reaches its weights through the window and not through the whole-crop
    target; crops too small for the window and its margin are refused."""
    from torch import nn

    from training.train_style import tile_consistency

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    content = torch.rand(2, 3, 96, 96)
    plain = nn.Sequential(nn.ReflectionPad2d(2), nn.Conv2d(3, 3, 5))
    with torch.no_grad():
        assert float(tile_consistency(plain, content, plain(content), rng)) < 1e-12

    net = nets.build({"type": "johnson-transformer", "width": 4, "blocks": 1})
    output = net(content)
    term = tile_consistency(net, content, output, rng)
    assert float(term.detach()) > 1e-6
    (through_target,) = torch.autograd.grad(term, output, retain_graph=True,
                                            allow_unused=True)
    assert through_target is None
    term.backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="too small"):
        tile_consistency(net, content[..., :48, :48], output[..., :48, :48], rng)


@needs_vgg
def test_grid_weight_adds_the_grid_term_to_the_total() -> None:
    from training.train_style import PerceptualStyleLoss

    torch.manual_seed(0)
    content = _batch(_tiny_photos(2, 32))
    common = {"content_layer": "relu2_2", "style_layers": DEFAULT_STYLE_LAYER_WEIGHTS,
              "content_weight": 1.0, "style_weight": 3e-5, "tv_weight": 5e4}
    style = _batch(_tiny_style(48)[None])
    plain = PerceptualStyleLoss(style, torch.device("cpu"), **common)
    gridded = PerceptualStyleLoss(style, torch.device("cpu"), **common, grid_weight=1e3)
    rows = torch.arange(32, dtype=torch.float32).view(1, 1, -1, 1)
    output = (content + 0.05 * torch.cos(torch.pi * rows / 2)).clamp(0, 1)
    total_plain, weighted_plain, _ = plain(output, content)
    total, weighted, raw = gridded(output, content)
    assert "grid" not in weighted_plain and raw["grid"] > 0.5
    assert weighted["grid"] == pytest.approx(1e3 * raw["grid"])
    assert float(total) == pytest.approx(float(total_plain) + weighted["grid"], rel=1e-5)
    with pytest.raises(ValueError, match=">= 0"):
        PerceptualStyleLoss(style, torch.device("cpu"), **common, grid_weight=-1.0)


def test_style_layer_weight_flag_parsing() -> None:
    assert parse_layer_weight("relu3_3=0.25") == ("relu3_3", 0.25)
    for bad in ("relu3_3", "relu3_3=x", "=1", "relu3_3=-1", "relu3_3=inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_layer_weight(bad)


def test_bundled_styles_resolve_with_source_and_licence() -> None:
    from training.train_style import bundled_styles, resolve_style

    assert {"starry-night", "the-scream", "stained-tissue"} <= set(bundled_styles())
    tissue = resolve_style("stained-tissue")
    assert tissue.path.is_file() and "scikit-image" in tissue.source
    assert "copyright" in tissue.licence
    with pytest.raises(ValueError, match="unknown style"):
        resolve_style("no-such-style")


def _write_prepared(folder: Path, images: np.ndarray) -> Path:
    """A minimal prepared folder in the `percept data prepare` format."""
    folder.mkdir(parents=True)
    size = images.shape[1]
    np.save(folder / f"images_{size}.npy", images)
    manifest = {"format": "percept-prepared/1", "count": len(images), "sizes": [size],
                "arrays": {str(size): {"file": f"images_{size}.npy",
                                       "shape": list(images.shape), "dtype": "uint8"}},
                "sources": [{"path": "data/photos/train/skimage-astronaut.png",
                             "sha256": "0" * 64}]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register_train(parser.add_subparsers(dest="command"))
    return parser.parse_args(["style", *argv])


@needs_vgg
def test_cli_training_exports_an_artifact_and_resumes(tmp_path: Path) -> None:
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    out, run_dir = tmp_path / "models" / "style-stained-tissue", tmp_path / "run"
    common = ["--style", "stained-tissue", "--data", str(prepared), "--out", str(out),
              "--run-dir", str(run_dir), "--size", "32", "--width", "4", "--blocks", "1",
              "--batch-size", "1", "--style-size", "48", "--device", "cpu", "--quiet",
              "--style-layer-weight", "relu1_2=1", "--style-layer-weight", "relu3_3=0.1",
              "--val-items", "2", "--sample-every", "0", "--checkpoint-every", "1"]
    # through `python -m training.cli_style`, which records the command as given
    assert cli_style.main(["train", *common, "--steps", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "style" and config["name"] == "style-stained-tissue"
    assert config["architecture"] == {"type": "johnson-transformer", "width": 4, "blocks": 1}
    assert config["style"]["name"] == "stained-tissue"
    assert {"title", "source", "licence", "sha256"} <= set(config["style"])
    assert config["loss"]["style_layers"] == {"relu1_2": 1.0, "relu3_3": 0.1}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["device"] == "cpu, reduced size"
    assert {"content", "style"} <= set(metrics["final_loss_unweighted"])
    provenance = json.loads((out / "provenance.json").read_text())
    kinds = {entry["kind"] for entry in provenance["data"]}
    assert {"prepared array", "source photo", "style image", "weights"} <= kinds
    assert provenance["git_sha"]
    assert provenance["command"] == " ".join(["python -m training.cli_style train", *common,
                                              "--steps 2"])
    assert (out / "samples.png").is_file() and (out / "loss.png").is_file()
    state = load_file(str(out / "weights.safetensors"))
    assert all(t.dtype == torch.float16 for t in state.values())

    assert train(_parse([*common, "--steps", "3", "--resume"])) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3
    # as a Kubernetes Job's retry runs it: the checkpoint is there, so it is continued
    assert train(_parse([*common, "--steps", "4", "--resume-if-present"])) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    # the provenance names every run the artifact's training went through, first first
    # (the later two were called in-process here, so their commands are this process's)
    earlier = json.loads((out / "provenance.json").read_text())["earlier_commands"]
    assert len(earlier) == 2 and earlier[0].endswith("--steps 2")


@needs_vgg
def test_time_schedule_decays_the_learning_rate_by_the_deadline(tmp_path: Path) -> None:
    """A run the clock stops (--max-minutes) ends annealed with --time-schedule, and near
    the peak rate without it."""
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    unbounded = ["--style", "stained-tissue", "--data", str(prepared), "--size", "32",
                 "--width", "4", "--blocks", "1", "--batch-size", "1", "--style-size", "48",
                 "--device", "cpu", "--quiet", "--val-items", "1", "--sample-every", "0",
                 "--checkpoint-every", "0", "--steps", "100000", "--warmup", "1",
                 "--lr", "0.001"]
    common = [*unbounded, "--max-minutes", "0.03"]

    def final(name: str, *extra: str) -> dict[str, object]:
        out = tmp_path / name
        assert train(_parse([*common, *extra, "--out", str(out),
                             "--run-dir", str(tmp_path / f"run-{name}")])) == 0
        metrics: dict[str, object] = json.loads((out / "metrics.json").read_text())
        assert metrics["stopped_early"] is True
        return metrics

    from training.train_style import command

    assert command(_parse([*unbounded, "--time-schedule", "--out", str(tmp_path / "x")])) == 2
    timed = final("timed", "--time-schedule")
    assert timed["time_schedule"] is True and float(timed["final_lr"]) < 1e-4  # type: ignore[arg-type]
    stepped = final("stepped")
    assert float(stepped["final_lr"]) > 9e-4  # type: ignore[arg-type]


@needs_vgg
def test_grid_checks_select_the_last_state_under_the_margin(tmp_path: Path) -> None:
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    common = ["--style", "stained-tissue", "--data", str(prepared), "--size", "32",
              "--width", "4", "--blocks", "1", "--batch-size", "1", "--style-size", "48",
              "--device", "cpu", "--quiet", "--val-items", "2", "--sample-every", "0",
              "--checkpoint-every", "0", "--steps", "4", "--grid-check-every", "2"]

    def run(name: str, margin: float) -> dict[str, object]:
        out = tmp_path / name
        assert train(_parse([*common, "--out", str(out), "--run-dir", str(tmp_path / f"run-{name}"),
                             "--grid-margin", str(margin)])) == 0
        metrics: dict[str, object] = json.loads((out / "metrics.json").read_text())
        return metrics

    generous = run("generous", 1e9)
    checks = generous["grid_checks"]
    assert isinstance(checks, list) and [c["step"] for c in checks] == [2, 4]
    assert all(c["passed"] and c["nyquist_ratio"] > 0 and c["quarter_ratio"] > 0
               for c in checks)
    assert generous["selected_step"] == 4
    unchecked = run("unchecked", 0)  # the default: no checks, the final state
    assert unchecked["grid_checks"] == [] and unchecked["selected_step"] == 4
    impossible = run("impossible", 1e-9)  # nothing passes: the final state is exported
    assert impossible["selected_step"] == 4
    assert not any(c["passed"] for c in impossible["grid_checks"])  # type: ignore[attr-defined]


@needs_vgg
def test_a_state_that_paints_a_grid_is_not_exported(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The measure passes at step 2 and fails at step 4: step 2's weights are exported."""
    import training.train_style as train_style

    measured = iter([1.0, 3.0])
    saved: dict[int, dict[str, torch.Tensor]] = {}
    real_check = train_style.grid_artifacts

    def fake_check(model: torch.nn.Module, *args: object) -> dict[str, float]:
        value = next(measured)
        saved[len(saved) + 1] = {k: v.detach().clone().float()
                                 for k, v in model.state_dict().items()}
        real_check(model, *args)  # type: ignore[arg-type]
        return {"nyquist_ratio": 1.0, "quarter_ratio": value}

    monkeypatch.setattr(train_style, "grid_artifacts", fake_check)
    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    out = tmp_path / "out"
    args = _parse(["--style", "stained-tissue", "--data", str(prepared), "--size", "32",
                   "--width", "4", "--blocks", "1", "--batch-size", "1", "--style-size", "48",
                   "--device", "cpu", "--quiet", "--val-items", "2", "--sample-every", "0",
                   "--checkpoint-every", "0", "--steps", "4", "--grid-check-every", "2",
                   "--grid-margin", "1.5", "--out", str(out), "--run-dir", str(tmp_path / "run")])
    assert train_style.train(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected_step"] == 2 and metrics["steps"] == 4
    # the losses of the exported state are the window ending at step 2, not the final one
    history = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["history"]
    assert metrics["selected_loss_window"] == 2
    assert metrics["selected_loss_weighted"]["total"] == pytest.approx(
        sum(history["total"][:2]) / 2)
    assert metrics["final_loss_weighted"]["total"] == pytest.approx(sum(history["total"]) / 4)
    exported = load_file(str(out / "weights.safetensors"))
    for key, value in exported.items():
        torch.testing.assert_close(value.float(), saved[1][key].half().float())
    assert any(not torch.equal(saved[1][k].half(), saved[2][k].half()) for k in exported)
    # the checkpoint is the state the run reached (step 4's weights with step 4's optimiser),
    # not the exported step-2 weights under step 4's counters
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 4
    for key, value in checkpoint["model"].items():
        torch.testing.assert_close(value.float(), saved[2][key])


@needs_vgg
def test_a_stop_request_during_the_grid_check_and_export_lets_them_finish(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C after the last step (here in the final grid check): the run still exports
    its new version whole, with its pictures, and says so."""
    import os
    import signal

    import training.train_style as train_style
    from training.loop import FINISHED_FIRST, FINISHING

    real_check = train_style.grid_artifacts
    checks = 0

    def interrupted_check(*args: object) -> dict[str, float]:
        nonlocal checks
        checks += 1
        if checks == 2:  # the final check, after the loop
            os.kill(os.getpid(), signal.SIGINT)
        return real_check(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(train_style, "grid_artifacts", interrupted_check)
    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    argv = _tiny_run(tmp_path, prepared, "--steps", "3", "--grid-check-every", "2",
                     "--grid-margin", "1e9")
    assert train_style.train(_parse(argv)) == 0
    err = capsys.readouterr().err
    assert FINISHING in err and FINISHED_FIRST in err, err
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "loss.png", "metrics.json", "provenance.json", "samples.png",
        "weights.safetensors"]


@needs_vgg
def test_a_resume_that_narrows_the_grid_margin_judges_every_check_by_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Checks passed under --grid-margin 100 are judged again under a resumed run's 1.2:
    the state kept for step 4 (2.0) no longer passes and is not exported as passing; step
    2 (1.1) passes now, but its weights were not kept, so the last state is exported."""
    import training.train_style as train_style

    measured = iter([1.1, 2.0, 3.0])
    monkeypatch.setattr(train_style, "grid_artifacts", lambda *args: {
        "nyquist_ratio": 1.0, "quarter_ratio": next(measured)})
    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    first = _tiny_run(tmp_path, prepared, "--steps", "4", "--grid-check-every", "2",
                      "--grid-margin", "100")
    assert train_style.train(_parse(first)) == 0
    out = tmp_path / "out"
    assert json.loads((out / "metrics.json").read_text())["selected_step"] == 4
    resumed = _tiny_run(tmp_path, prepared, "--steps", "6", "--grid-check-every", "2",
                        "--grid-margin", "1.2", "--resume")
    assert train_style.train(_parse(resumed)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(c["step"], c["passed"]) for c in metrics["grid_checks"]] == [
        (2, True), (4, False), (6, False)]
    assert metrics["selected_step"] == 6 and metrics["grid_margin"] == 1.2
    assert "none whose weights were kept" in capsys.readouterr().out


@needs_vgg
def test_init_from_fine_tunes_an_exported_artifact(tmp_path: Path) -> None:
    """--init-from starts from an artifact's weights (with a learning rate of 1e-30 they
    come out unchanged in fp16; 0 is refused), records it in metrics.json and provenance,
    keeps its edge_margin unless --edge-margin says otherwise, may switch its upsampling,
    and refuses an artifact of other weight shapes or a run that also resumes."""
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    common = ["--style", "stained-tissue", "--data", str(prepared), "--size", "32",
              "--blocks", "1", "--batch-size", "1", "--style-size", "48", "--device", "cpu",
              "--quiet", "--val-items", "1", "--sample-every", "0", "--checkpoint-every", "0"]
    base = tmp_path / "base"
    assert train(_parse([*common, "--width", "4", "--steps", "2", "--out", str(base),
                         "--edge-margin", "3", "--run-dir", str(tmp_path / "run-base")])) == 0
    tuned = tmp_path / "tuned"
    assert train(_parse([*common, "--width", "4", "--steps", "2", "--lr", "1e-30",
                         "--init-from", str(base), "--out", str(tuned),
                         "--run-dir", str(tmp_path / "run-tuned")])) == 0
    before, after = (load_file(str(p / "weights.safetensors")) for p in (base, tuned))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    metrics = json.loads((tuned / "metrics.json").read_text())
    assert metrics["init_from"] == {"artifact": "style-stained-tissue@1", "steps": 2,
                                    "device": "cpu, reduced size"}
    assert metrics["note"].endswith("; fine-tuned from style-stained-tissue@1 (2 steps on "
                                    "cpu, reduced size), whose weights it started from")
    provenance = json.loads((tuned / "provenance.json").read_text())
    (entry,) = [d for d in provenance["data"] if d["kind"] == "initial weights"]
    assert entry["artifact"] == "style-stained-tissue@1" and len(entry["sha256"]) == 64
    architecture = json.loads((tuned / "config.json").read_text())["architecture"]
    assert architecture == {"type": "johnson-transformer", "width": 4, "blocks": 1,
                            "edge_margin": 3}
    no_margin = tmp_path / "no-margin"
    assert train(_parse([*common, "--width", "4", "--steps", "1", "--init-from", str(base),
                         "--edge-margin", "0", "--out", str(no_margin),
                         "--run-dir", str(tmp_path / "run-no-margin")])) == 0
    assert "edge_margin" not in json.loads((no_margin / "config.json").read_text())[
        "architecture"]
    # The upsampling may change (the weights have the same shapes): the note says so.
    bilinear = tmp_path / "bilinear"
    assert train(_parse([*common, "--width", "4", "--steps", "1", "--init-from", str(base),
                         "--upsample", "bilinear", "--out", str(bilinear),
                         "--run-dir", str(tmp_path / "run-bilinear")])) == 0
    assert json.loads((bilinear / "config.json").read_text())["architecture"][
        "upsample"] == "bilinear"
    metrics = json.loads((bilinear / "metrics.json").read_text())
    assert metrics["init_from"]["upsample"] == "nearest"
    assert metrics["note"].endswith("(nearest upsampling there, bilinear here)")

    with pytest.raises(ValueError, match=r"width.: 4.*not the .*width.: 8"):
        train(_parse([*common, "--width", "8", "--steps", "1", "--init-from", str(base),
                      "--out", str(tmp_path / "wide"), "--run-dir", str(tmp_path / "r3")]))
    with pytest.raises(ValueError, match=r"is a 'superres' artifact \(.*\), not a style "
                                         "network"):
        train(_parse([*common, "--width", "4", "--steps", "1", "--init-from",
                      str(REPO_ROOT / "models" / "superres-psnr"), "--out",
                      str(tmp_path / "sr"), "--run-dir", str(tmp_path / "r5")]))
    with pytest.raises(ValueError, match="not a loadable artifact"):
        train(_parse([*common, "--width", "4", "--steps", "1", "--init-from",
                      str(tmp_path / "nothing"), "--out", str(tmp_path / "none"),
                      "--run-dir", str(tmp_path / "r4")]))
    with pytest.raises(ValueError, match="--resume continues"):
        train(_parse([*common, "--width", "4", "--steps", "1", "--init-from", str(base),
                      "--resume", "--out", str(tmp_path / "both"),
                      "--run-dir", str(tmp_path / "run-base")]))


@needs_vgg
def test_a_run_with_a_tile_weight_records_the_term(tmp_path: Path) -> None:
    """--tile-weight adds the tile-consistency term: it shows in the loss history, in
    metrics.json's weights and in config.json; a negative weight is refused."""
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 64))
    common = ["--style", "stained-tissue", "--data", str(prepared), "--size", "64",
              "--width", "4", "--blocks", "1", "--batch-size", "1", "--style-size", "48",
              "--device", "cpu", "--quiet", "--val-items", "1", "--sample-every", "0",
              "--checkpoint-every", "0", "--steps", "2"]
    out = tmp_path / "tiled"
    assert train(_parse([*common, "--tile-weight", "1e3", "--out", str(out),
                         "--run-dir", str(tmp_path / "run")])) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["loss_weights"]["tile"] == 1e3
    assert metrics["final_loss_unweighted"]["tile"] > 0
    assert metrics["final_loss_weighted"]["tile"] == pytest.approx(
        1e3 * metrics["final_loss_unweighted"]["tile"])
    assert json.loads((out / "config.json").read_text())["loss"]["tile_weight"] == 1e3
    with pytest.raises(ValueError, match="--tile-weight must be >= 0"):
        train(_parse([*common, "--tile-weight", "-1", "--out", str(tmp_path / "bad"),
                      "--run-dir", str(tmp_path / "run-bad")]))


def test_refuses_a_prepared_folder_of_heldout_photos(tmp_path: Path) -> None:
    from training.data.arrays import PreparedDataError
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(2, 40))
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["sources"] = [{"path": "data/photos/heldout/skimage-chelsea.png", "sha256": "0"}]
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    args = _parse(["--style", "stained-tissue", "--data", str(prepared), "--out",
                   str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), "--size", "32",
                   "--steps", "1", "--device", "cpu", "--quiet"])
    with pytest.raises(PreparedDataError, match="held-out"):
        train(args)


def test_export_then_build_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(3)
    architecture = {"type": "johnson-transformer", "width": 4, "blocks": 2}
    model = nets.build(architecture).eval()
    out = export_artifact(tmp_path / "style-test", name="style-test", task="style",
                          architecture=architecture, module=model, metrics={"steps": 0},
                          data=[], command="test", device="cpu",
                          config_extra={"style": {"name": "test", "title": "Test"}})
    config = json.loads((out / "config.json").read_text())
    rebuilt = nets.build(config["architecture"])
    rebuilt.load_state_dict({k: v.float() for k, v in
                             load_file(str(out / config["weights"])).items()})
    loaded, _ = load_exported(out)
    x = torch.rand(1, 3, 27, 35)
    with torch.no_grad():
        reference, again, via_loader = model(x), rebuilt.eval()(x), loaded(x)
    assert torch.allclose(reference, again, atol=2e-2)  # fp16 weights
    assert torch.equal(again, via_loader)


def test_recipe_note_names_what_differs_from_the_paper() -> None:
    from training.cli_style import CPU_RECIPE, GPU_RECIPE
    from training.train_style import _recipe_note

    assert _recipe_note(dict(GPU_RECIPE), GPU_RECIPE["steps"], None) == \
        "trained on a GPU with the paper's sizes"
    note = _recipe_note({**GPU_RECIPE, "width": 16}, 6373, "the clock (--max-minutes)")
    assert "width 16 (paper: 32)" in note and "steps 6373 (paper: 40000)" in note
    assert note.endswith("stopped by the clock (--max-minutes)")
    assert _recipe_note(dict(CPU_RECIPE), 540, None, "a CPU") == (
        "trained on a CPU at changed sizes: size 128 (paper: 256), width 16 (paper: 32), "
        "steps 540 (paper: 40000), batch size 2 (paper: 4)")


# -- refusals: before any work, and never overwriting what a user has -----------------------
def _tiny_run(tmp_path: Path, prepared: Path, *extra: str) -> list[str]:
    return ["--style", "stained-tissue", "--data", str(prepared), "--size", "32",
            "--width", "4", "--blocks", "1", "--batch-size", "1", "--style-size", "48",
            "--device", "cpu", "--quiet", "--val-items", "1", "--sample-every", "0",
            "--checkpoint-every", "1", "--out", str(tmp_path / "out"),
            "--run-dir", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-1"], "--lr must be > 0, got -1"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--lr", "0"], "--lr must be > 0, got 0"),  # trained nothing and exported it
    (["--threads", "-1"], "--threads must be >= 0, got -1"),
    (["--val-items", "0"], "--val-items must be >= 1, got 0"),
    (["--max-minutes", "-1"], "--max-minutes must be >= 0, got -1"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0, got -1"),
    (["--grid-check-every", "0"], "--grid-check-every must be >= 1, got 0"),
    (["--style-size", "0"], "--style-size must be >= 32, got 0"),
    (["--size", "66", "--grid-margin", "1.5"],
     "--grid-margin measures period-4 patterns: --size must be a multiple of 4, got 66"),
    # non-finite loss weights trained an all-NaN model and exported it, exit 0
    (["--content-weight", "nan"], "--content-weight must be >= 0, got nan"),
    (["--style-weight", "inf"], "--style-weight must be >= 0, got inf"),
    (["--tv-weight", "-1"], "--tv-weight must be >= 0, got -1"),
    (["--seed", "-1"], "--seed must be 0..4294967295, got -1"),
    (["--seed", str(2**64)], f"--seed must be 0..4294967295, got {2**64}"),
    # trained on a zero gradient and exported the random net
    (["--content-weight", "0", "--style-weight", "0", "--tv-weight", "0"],
     "every loss weight is 0 (--content-weight, --style-weight, --tv-weight): there is "
     "nothing to train against"),
    # --steps left to its default: the run trained and recorded a warm-up of 1000 of 540
    (["--warmup", "100000"], "--warmup 100000 is longer than the run (STEPS steps, --steps' "
                             "default on cpu): the learning rate would never reach --lr"),
    (["--size", "6"], "--size must be >= 8, got 6"),  # failed at step 1
    (["--edge-margin", "100000"], "--edge-margin must be 0..128 px, got 100000"),  # at export
    (["--steps", "10", "--warmup", "100"],
     "--warmup 100 is longer than the run (--steps 10): the learning rate would never "
     "reach --lr"),
])
def test_bad_flag_values_are_refused_before_anything_loads(
        tmp_path: Path, flags: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The data folder does not even exist: the flag is refused first, exit 2."""
    from training.cli_style import CPU_RECIPE

    argv = ["train", *_tiny_run(tmp_path, tmp_path / "no-data"), *flags]
    assert cli_style.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}".replace("STEPS",
                                                                         str(CPU_RECIPE["steps"]))
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def test_an_output_the_export_would_fail_on_or_replace_is_refused_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(2, 40))
    (tmp_path / "a-file").write_text("")
    other = tmp_path / "models" / "style-the-scream"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"name": "style-the-scream", "version": 3}))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cases = [(tmp_path / "dangling", "dangling is a symbolic link to nothing"),
             (tmp_path / "broken", "holds a config.json that cannot be read"),
             (tmp_path / "a-file" / "out", "a-file is a file, not a folder"),
             (tmp_path / "a-file", "a-file is a file, not a folder"),
             (other, "holds the artifact 'style-the-scream', and the export of "
                     "style-stained-tissue would replace it: choose another --out")]
    for out, message in cases:
        argv = [*_tiny_run(tmp_path, prepared), "--steps", "1", "--out", str(out)]
        with pytest.raises(ValueError, match=re.escape(message)):
            train(_parse(argv))
    assert not (tmp_path / "run").exists()  # refused before the run began
    assert json.loads((other / "config.json").read_text())["version"] == 3


@pytest.mark.parametrize("make, message", [
    (lambda path: path.write_bytes(b"not an image"), "is not a readable image"),
    (lambda path: path.write_bytes(b""), "is not a readable image"),
    (lambda path: path.write_bytes(encode(_tiny_style(64), "JPEG")[:300]),
     "is not a readable image"),
    (lambda path: path.write_bytes(encode(_tiny_style(64)[:20, :20])),
     "is 20x20 px at --style-size 48; its shorter side needs at least 32 px"),
    (lambda path: path.mkdir(), "is a folder; give one image file"),
])
def test_a_bad_style_image_is_one_line_and_exit_2(
        tmp_path: Path, make: Any, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(2, 40))
    style = tmp_path / "style.jpg"
    make(style)
    argv = ["train", *_tiny_run(tmp_path, prepared), "--steps", "1"]
    argv[argv.index("--style"):argv.index("--style") + 2] = ["--style-image", str(style)]
    assert cli_style.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@needs_vgg
def test_a_resume_keeps_its_settings_and_a_new_run_keeps_the_old_checkpoint(
        tmp_path: Path) -> None:
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    common = _tiny_run(tmp_path, prepared)
    assert train(_parse([*common, "--steps", "2"])) == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    saved = checkpoint.read_bytes()
    with pytest.raises(ValueError, match=r"holds an earlier run: pass --resume to continue it"):
        train(_parse([*common, "--steps", "2"]))
    # compared by the values the run used: --lr was left to the CPU default, 2e-3
    with pytest.raises(ValueError, match=r"with other settings: --lr 0\.002 -> 0\.5; "
                                         r"--tv-weight 4000000\.0 -> 0\.0\. Resume with"):
        train(_parse([*common, "--steps", "3", "--resume", "--lr", "0.5", "--tv-weight", "0"]))
    with pytest.raises(ValueError, match=r"with other settings: --batch-size 1 -> 2\."):
        train(_parse([*common, "--steps", "3", "--resume", "--batch-size", "2"]))
    with pytest.raises(ValueError, match=r"is at step 2, past --steps 1: give --steps 2 or"):
        train(_parse([*common, "--steps", "1", "--resume"]))
    assert checkpoint.read_bytes() == saved  # every refusal left the run as it was
    # What may change does: more steps, another checkpoint interval, a time limit; the
    # default lr named explicitly, and the data folder named by a relative path, are the
    # same settings
    relative_data = os.path.relpath(prepared)
    same = [relative_data if arg == str(prepared) else arg for arg in common]
    assert train(_parse([*same, "--steps", "3", "--resume", "--checkpoint-every", "5",
                         "--max-minutes", "10", "--lr", "0.002"])) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 3


@needs_vgg
def test_a_resume_takes_the_flags_left_out_from_the_run_it_continues(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--resume with only the style and the run's folders: the data, the sizes, the width
    and the loss weights the run was started with are carried over and named, not reset
    to their defaults. A flag that is given still counts, even with its default value."""
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    common = _tiny_run(tmp_path, prepared)
    assert train(_parse([*common, "--steps", "1", "--lr", "0.004", "--tv-weight", "0"])) == 0
    capsys.readouterr()
    where = ["--style", "stained-tissue", "--out", str(tmp_path / "out"),
             "--run-dir", str(tmp_path / "run"), "--quiet", "--sample-every", "0"]
    assert train(_parse([*where, "--steps", "2", "--resume"])) == 0
    printed = capsys.readouterr().out
    assert "with the flags it was started with: " in printed
    for carried in (f"--data {prepared}", "--lr 0.004", "--size 32", "--width 4",
                    "--tv-weight 0.0"):
        assert carried in printed, carried
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and state["args"]["lr"] == 0.004 and state["args"]["size"] == 32
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architecture"]["width"] == 4
    # 0.002 is the CPU default, but given: it is compared, and refused
    with pytest.raises(ValueError, match=r"with other settings: --lr 0\.004 -> 0\.002\."):
        train(_parse([*where, "--steps", "3", "--resume", "--lr", "0.002"]))


@needs_vgg
def test_a_run_started_with_relative_paths_resumes_from_another_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--data given relative to where the run started names the same arrays from anywhere:
    given again from elsewhere as an absolute path, it is the same setting, not a changed
    one; left out there, it is carried as the folder it was (not looked for from here)."""
    from training.train_style import train

    started_in, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    prepared = _write_prepared(started_in / "prepared", _tiny_photos(4, 40))
    monkeypatch.chdir(started_in)
    assert train(_parse([*_tiny_run(tmp_path, Path("prepared")), "--steps", "1"])) == 0
    monkeypatch.chdir(elsewhere)
    where = ["--style", "stained-tissue", "--out", str(tmp_path / "out"),
             "--run-dir", str(tmp_path / "run"), "--quiet", "--sample-every", "0"]
    assert train(_parse([*where, "--steps", "2", "--resume", "--data", str(prepared)])) == 0
    monkeypatch.chdir(started_in)
    assert train(_parse([*where, "--steps", "3", "--resume", "--data", "prepared"])) == 0
    capsys.readouterr()
    monkeypatch.chdir(elsewhere)
    assert train(_parse([*where, "--steps", "4", "--resume"])) == 0
    assert f"--data {prepared}" in capsys.readouterr().out
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["args"]["data"] == str(prepared) and state["cwd"] == str(elsewhere)


@needs_vgg
def test_a_fine_tune_resumes_and_keeps_its_origin(tmp_path: Path) -> None:
    """A run started with --init-from resumes without it (the checkpoint holds the
    weights), and its export still records what it was fine-tuned from."""
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    base = [*_tiny_run(tmp_path, prepared), "--steps", "1"]
    base[base.index("--out") + 1] = str(tmp_path / "base")
    base[base.index("--run-dir") + 1] = str(tmp_path / "run-base")
    assert train(_parse(base)) == 0
    common = _tiny_run(tmp_path, prepared)
    assert train(_parse([*common, "--steps", "2", "--init-from", str(tmp_path / "base")])) == 0
    assert train(_parse([*common, "--steps", "3", "--resume"])) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["init_from"]["artifact"] == "style-stained-tissue@1"
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert [d["kind"] for d in provenance["data"]].count("initial weights") == 1


def test_outputs_and_run_folders_that_cannot_work_are_refused_before_anything_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"")
    same = str(tmp_path / "same")
    cases = [
        (["--run-dir", str(tmp_path / "a-file")], "--run-dir", "a-file is a file, not a folder"),
        (["--run-dir", str(tmp_path / "a-file" / "run")], "--run-dir", "a-file is a file"),
        (["--run-dir", str(tmp_path / "dangling")], "--run-dir", "is a symbolic link to nothing"),
        (["--out", str(photos)], "--out", "holds other files (1: holiday.jpg), not an artifact: "
                                          "choose a new or empty folder"),
        (["--out", same, "--run-dir", same], "", "must be different folders"),
    ]
    for flags, _, message in cases:
        argv = ["train", *_tiny_run(tmp_path, tmp_path / "no-data"), "--steps", "1", *flags]
        assert cli_style.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
    assert sorted(p.name for p in photos.iterdir()) == ["holiday.jpg"]
    # --out naming the default run folder (no --run-dir): refused too, not a traceback at
    # the end of the run
    default_run = REPO_ROOT / "runs" / "style-stained-tissue"
    argv = ["train", *_tiny_run(tmp_path, tmp_path / "no-data"), "--steps", "1"]
    at = argv.index("--run-dir")
    del argv[at:at + 2]
    assert cli_style.main([*argv, "--out", str(default_run)]) == 2
    assert f"--out and --run-dir are both {default_run}" in capsys.readouterr().err


def test_a_prepared_folder_with_a_broken_manifest_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text("{}")
    assert cli_style.main(["train", *_tiny_run(tmp_path, prepared), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "is not a prepared-arrays manifest" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # nothing made for a run that never began


@needs_vgg
@pytest.mark.parametrize("flags", [["--style-weight", "1e38", "--content-weight", "1e38"],
                                   ["--lr", "1e10"]])
def test_a_diverging_run_stops_and_exports_nothing(
        tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Both exported an all-NaN model with exit 0 before."""
    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    argv = ["train", *_tiny_run(tmp_path, prepared), "--steps", "6", "--warmup", "1", *flags]
    assert cli_style.main(argv) == 1
    err = capsys.readouterr().err
    assert "the run diverged, so nothing is exported" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    if checkpoint.exists():  # only states with finite weights were saved
        state = torch.load(checkpoint, weights_only=False)
        assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())


def test_an_artifact_with_non_finite_weights_is_never_written(tmp_path: Path) -> None:
    from training.export import NonFiniteWeights

    architecture = {"type": "johnson-transformer", "width": 4, "blocks": 1}
    module = nets.build(architecture)
    with torch.no_grad():
        next(module.parameters()).fill_(1e6)  # finite in fp32, inf in the fp16 export
    with pytest.raises(NonFiniteWeights, match="hold NaN or infinite values in float16"):
        export_artifact(tmp_path / "out", name="style-x", task="style",
                        architecture=architecture, module=module, metrics={}, data=[],
                        command="tests", device="cpu")
    assert not (tmp_path / "out").exists()


@needs_vgg
def test_ctrl_c_saves_a_checkpoint_and_resume_goes_on_from_it(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    common = [*_tiny_run(tmp_path, prepared), "--checkpoint-every", "0", "--threads", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "training.cli_style", "train", *common, "--steps", "100000"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert "[train] exports" in process.stdout.readline()  # the loop is about to start
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    step = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"]
    assert step > 0 and f"[train] stopped at step {step} of 100000" in err
    assert "run the same command with --resume" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # stopped, not finished: nothing exported
    from training.train_style import train

    assert train(_parse([*common, "--steps", str(step + 1), "--resume"])) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == step + 1


@needs_vgg
def test_a_resume_keeps_the_warmup_and_the_clock_of_the_run_it_continues(
        tmp_path: Path) -> None:
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    common = _tiny_run(tmp_path, prepared)
    assert train(_parse([*common, "--steps", "2"])) == 0  # default warm-up: 1 step
    # --steps 60 alone would default to 3 warm-up steps: the run keeps its 1
    assert train(_parse([*common, "--steps", "3", "--resume", "--warmup", "1"])) == 0
    assert train(_parse([*common, "--steps", "60", "--resume", "--max-minutes", "0.001"])) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["warmup"] == 1
    # the 0.06 s budget was spent by the runs before: the resumed one stops at once
    assert metrics["steps"] == 3 and metrics["stopped_early"] is True
    assert metrics["note"].endswith("stopped by the clock (--max-minutes); train on a GPU "
                                    "with the default flags for full quality")


@needs_vgg
def test_a_checkpoint_from_before_the_warmup_was_recorded_still_resumes(
        tmp_path: Path) -> None:
    from training.train_style import train

    prepared = _write_prepared(tmp_path / "prepared", _tiny_photos(4, 40))
    common = _tiny_run(tmp_path, prepared)
    assert train(_parse([*common, "--steps", "2"])) == 0
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    del state["resolved"]["warmup"]  # as written before today
    torch.save(state, checkpoint)
    assert train(_parse([*common, "--steps", "3", "--resume"])) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["steps"] == 3
