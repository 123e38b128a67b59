"""``percept train devise`` / ``percept eval devise`` flags and outputs: paths refused before
anything loads, a diverged run that exits 1 and exports nothing, and reports that never
replace a file they did not write. Real photos, a real tiny GloVe file, real short runs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from services.embed.wordnet import imagenet_wnids, load_vocabulary
from training import cli_devise
from training.loop import TrainingDiverged
from training.nets.devise import DeViSEMap
from training.train_devise import TrainSettings, train_map

#: Path checks run before the word space, the backbone or any feature loads.
UP_FRONT_SECONDS = 5.0


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("devise-cli") / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        image = Image.fromarray(getattr(data, name)())
        image.thumbnail((128, 128))
        image.save(folder / f"{name}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def glove(photos: Path) -> Path:
    """A GloVe file with a seeded 8-d vector for every ImageNet class's first lemma."""
    vocab = load_vocabulary()
    words = list(dict.fromkeys(vocab[w].lemmas[0] for w in imagenet_wnids()))
    rng = np.random.default_rng(0)
    path = photos.parent / "glove.tiny.8d.txt"
    path.write_text("".join(f"{w} {' '.join(f'{x:.5f}' for x in rng.standard_normal(8))}\n"
                            for w in words))
    return path


def train(photos: Path, out: Path, run_dir: Path, *flags: str) -> int:
    return cli_devise.main(["train", "--photos", str(photos), "--val-photos", "",
                            "--crops-per-image", "2", "--steps", "3", "--batch-size", "4",
                            "--negatives", "4", "--cache-dir", str(run_dir.parent / "cache"),
                            "--out", str(out), "--run-dir", str(run_dir), "--device", "cpu",
                            "--threads", "1", "--quiet", *flags])


@pytest.mark.parametrize("where, message", [
    ("out", "--run-dir {out} is the artifact folder --out {out}"),  # crashed after export
    ("photos", "--run-dir {photos}/runs is inside --photos {photos}"),  # loss.png = a photo
])
def test_a_run_dir_in_the_artifact_or_the_photos_is_refused_before_anything_loads(
        photos: Path, tmp_path: Path, where: str, message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    run_dir = out if where == "out" else photos / "runs"
    started = time.perf_counter()
    assert train(photos, out, run_dir) == 2
    assert time.perf_counter() - started < UP_FRONT_SECONDS
    assert message.format(out=out, photos=photos) in capsys.readouterr().err
    assert not out.exists() and not (photos / "runs").exists()
    assert sorted(p.name for p in photos.iterdir()) == ["chelsea.jpg", "coffee.jpg"]


@pytest.mark.parametrize("flags, message", [
    (["--val-photos", "{tmp}/no-val"], "{tmp}/no-val not found"),  # was after the features
    (["--word-vectors", "{tmp}/no.txt"], "word-vector file not found: {tmp}/no.txt"),
    (["--images", "{tmp}/no-tree"], "--images {tmp}/no-tree: not a directory"),
])
def test_missing_inputs_are_refused_before_anything_loads(
        photos: Path, tmp_path: Path, flags: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    out, run_dir = tmp_path / "out", tmp_path / "run"
    started = time.perf_counter()
    assert train(photos, out, run_dir, *(f.format(tmp=tmp_path) for f in flags)) == 2
    assert time.perf_counter() - started < UP_FRONT_SECONDS
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not out.exists() and not run_dir.exists()  # the run dir was made, left empty


@pytest.mark.parametrize("kind", ["the same folder", "a copy under another name"])
def test_validation_photos_that_are_trained_on_are_refused(
        photos: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    val = photos
    if kind != "the same folder":
        val = tmp_path / "val"
        val.mkdir()
        (val / "kitten.jpg").write_bytes((photos / "chelsea.jpg").read_bytes())
    out, run_dir = tmp_path / "out", tmp_path / "run"
    args = ["train", "--photos", str(photos), "--val-photos", str(val), "--out", str(out),
            "--run-dir", str(run_dir), "--device", "cpu", "--quiet"]
    assert cli_devise.main(args) == 2
    assert "validation photos must be held out" in capsys.readouterr().err
    assert not out.exists()


def test_a_vectors_dir_that_is_a_file_is_refused_before_anything_loads(
        photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert train(photos, tmp_path / "out", tmp_path / "run", "--vectors-dir",
                 str(blocker)) == 2
    assert f"--vectors-dir {blocker}: {blocker} is a file, not a folder" in \
        capsys.readouterr().err


def test_a_diverged_run_exits_1_and_exports_nothing(photos: Path, glove: Path, tmp_path: Path,
                                                    one_torch_thread: None,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A huge --lr: weights beyond float16 (was exit 2, a usage error), or an Adam step
    beyond float32 (was a traceback)."""
    for lr in ("1e30", "1e38"):
        out = tmp_path / f"out-{lr}"
        assert train(photos, out, tmp_path / f"run-{lr}", "--word-vectors", str(glove),
                     "--lr", lr) == 1
        err = capsys.readouterr().err
        assert "error: " in err and "Traceback" not in err
        assert not out.exists()
    out = tmp_path / "out-ok"  # the same run at a sane rate exports
    assert train(photos, out, tmp_path / "run-ok", "--word-vectors", str(glove)) == 0
    assert {"config.json", "metrics.json", "provenance.json"} <= {p.name for p in out.iterdir()}


def test_a_non_finite_loss_stops_the_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(8, 16, generator=generator)
    label_vectors = torch.nn.functional.normalize(torch.randn(20, 4, generator=generator), dim=1)
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        train_map(DeViSEMap(16, 4), features, torch.arange(8), label_vectors, torch.arange(20),
                  TrainSettings(steps=200, batch_size=4, negatives=4, lr=1e37), progress=False)


@pytest.mark.parametrize("kind", ["folder", "artifact metrics", "not json"])
def test_eval_never_writes_over_what_is_not_its_report(tmp_path: Path, kind: str,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    """--out a folder crashed after the evaluation; an artifact's metrics.json was replaced."""
    out = tmp_path / "metrics.json"
    if kind == "folder":
        out.mkdir()
    else:
        out.write_text(json.dumps({"steps": 600, "loss_last": 0.1})
                       if kind == "artifact metrics" else "not a report")
    before = out.read_text() if out.is_file() else None
    started = time.perf_counter()
    assert cli_devise.main(["eval", "--out", str(out), "--show", "0"]) == 2
    assert time.perf_counter() - started < UP_FRONT_SECONDS
    err = capsys.readouterr().err
    assert f"--out {out}" in err and "Traceback" not in err
    assert (out.read_text() if out.is_file() else None) == before


@pytest.mark.parametrize("argv, message", [
    (["train", "--top-t", "1001"], "--top-t must be <= 1000 (the ImageNet classes), got 1001"),
    (["eval", "--top-t", "1001"], "--top-t must be <= 1000 (the ImageNet classes), got 1001"),
    (["eval", "--photos", "{tmp}"], "--photos {tmp}: labels.json not found"),
    (["eval", "--model", "{tmp}"], "--model {tmp}: no config.json there (not an artifact)"),
])
def test_more_bad_flags_are_refused_up_front(tmp_path: Path, argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    extra = (["--out", str(out / "m.json")] if argv[0] == "eval" else
             ["--out", str(out), "--run-dir", str(tmp_path / "run")])
    assert cli_devise.main([*(a.format(tmp=tmp_path) for a in argv), *extra]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message.format(tmp=tmp_path)}"
    assert not out.exists()
