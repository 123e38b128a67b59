"""``percept train devise`` on inputs that cannot work: ``--steps 0`` (which exported an
untrained map), photos that cannot be decoded (a traceback after the models loaded) and a
damaged feature cache (an error naming no file). Real photos, real files cut short."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from training import cli_devise
from training.devise_features import compute_features

#: Input checks run before the word space, the backbone or any feature loads.
UP_FRONT_SECONDS = 5.0


def jpeg(path: Path, name: str = "chelsea", side: int = 128) -> Path:
    image = Image.fromarray(getattr(data, name)())
    image.thumbnail((side, side))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    return path


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    jpeg(folder / "chelsea.jpg")
    jpeg(folder / "coffee.jpg", "coffee")
    return folder


def damage(path: Path, how: str) -> None:
    """``path`` (a JPEG of real photo data) made undecodable in one way."""
    if how == "not an image":
        path.write_bytes(b"these bytes are no image at all\n" * 20)
    elif how == "truncated body":  # the header is whole: only the decode fails
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])
    elif how == "truncated png":
        Image.open(path).save(path.with_suffix(".png"))
        raw = path.with_suffix(".png").read_bytes()
        path.unlink()
        path.with_suffix(".png").write_bytes(raw[:len(raw) // 2])
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["not an image", "truncated body", "truncated png"])
@pytest.mark.parametrize("where", ["--photos", "--val-photos", "--images"])
def test_an_undecodable_photo_is_a_one_line_error_before_anything_loads(
        photos: Path, tmp_path: Path, where: str, how: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    val = tmp_path / "val"
    jpeg(val / "astronaut.jpg", "astronaut")
    tree = tmp_path / "tree"
    jpeg(tree / "tabby" / "chelsea.jpg")
    jpeg(tree / "n07920052" / "coffee.jpg", "coffee")
    broken = {"--photos": photos / "coffee.jpg", "--val-photos": val / "astronaut.jpg",
              "--images": tree / "n07920052" / "coffee.jpg"}[where]
    damage(broken, how)
    if how == "truncated png":
        broken = broken.with_suffix(".png")
    out, run = tmp_path / "out", tmp_path / "run"
    args = ["train", "--photos", str(photos), "--val-photos", str(val), "--out", str(out),
            "--run-dir", str(run), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--threads", "1", "--quiet", "--steps", "2", "--crops-per-image", "2"]
    if where == "--images":
        args += ["--images", str(tree)]
    started = time.perf_counter()
    assert cli_devise.main(args) == 2
    assert time.perf_counter() - started < UP_FRONT_SECONDS
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {where}: ") and str(broken) in lines[0], err
    assert ("cannot read image" if how == "not an image" else "cannot decode image") \
        in lines[0]
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_a_photo_damaged_after_the_checks_still_names_the_file(
        photos: Path, tmp_path: Path) -> None:
    """The crop renderer itself reports a decode failure as a usage error naming the file,
    not a PIL traceback (e.g. a file rewritten while the run was loading)."""
    from training.devise_features import ImageReadError

    files = sorted(photos.iterdir())
    damage(files[1], "truncated body")
    with pytest.raises(ImageReadError, match=rf"cannot decode image {files[1]}: .*truncated"):
        compute_features(files, crops_per_image=2, size=64, cache_dir=None, progress=False)
    damage(files[0], "not an image")
    with pytest.raises(ImageReadError, match=rf"cannot read image {files[0]}"):
        compute_features(files, crops_per_image=2, size=64, cache_dir=None, progress=False)


@pytest.mark.parametrize("which, how", [("logits", "truncated"), ("features", "truncated"),
                                        ("features", "not an array"),
                                        ("logits", "wrong shape"), ("features", "missing")])
def test_a_damaged_feature_cache_is_a_miss_that_warns_and_recomputes(
        photos: Path, tmp_path: Path, which: str, how: str, one_torch_thread: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(photos.iterdir())
    first = compute_features(files, crops_per_image=2, size=64, cache_dir=tmp_path,
                             progress=False)
    target = first.folder / f"{which}.npy"
    if how == "truncated":
        raw = target.read_bytes()
        target.write_bytes(raw[:len(raw) // 3] if which == "features" else raw[:40])
    elif how == "not an array":
        target.write_text("no numpy array here\n")
    elif how == "wrong shape":
        np.save(target, np.zeros((3, 1000), dtype=np.float32))
    else:
        target.unlink()
    capsys.readouterr()
    again = compute_features(files, crops_per_image=2, size=64, cache_dir=tmp_path,
                             progress=False)
    np.testing.assert_array_equal(again.features, first.features)
    np.testing.assert_array_equal(again.logits, first.logits)
    err = capsys.readouterr().err
    assert "warning:" in err and str(target) in err and "computing" in err, err
    # the recomputed arrays were written back: the next run reads them without a word
    compute_features(files, crops_per_image=2, size=64, cache_dir=tmp_path, progress=False)
    assert capsys.readouterr().err == ""


def test_zero_steps_are_refused_before_anything_loads(
        photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--steps 0`` exported the initial map (random weights under --init random) as a
    servable model."""
    out, run = tmp_path / "out", tmp_path / "run"
    for init in ("classifier", "random"):
        started = time.perf_counter()
        assert cli_devise.main(["train", "--steps", "0", "--init", init, "--photos",
                                str(photos), "--val-photos", "", "--out", str(out),
                                "--run-dir", str(run), "--quiet"]) == 2
        assert time.perf_counter() - started < UP_FRONT_SECONDS
        assert capsys.readouterr().err.strip() == "error: --steps must be >= 1, got 0"
        assert not out.exists() and not run.exists()


def test_the_help_states_the_range_of_steps_and_the_resume_flags() -> None:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    train = cli_devise.register_train(subparsers)
    helps = {action.dest: action.help or "" for action in train._actions}
    assert "at least 1" in helps["steps"] and "default: 600" in helps["steps"]
    assert "0: only at the end" in helps["checkpoint_every"]
    assert "default: 100" in helps["checkpoint_every"]
    assert "continue from RUN_DIR/checkpoint.pt" in helps["resume"]
    assert "--resume when RUN_DIR holds a checkpoint" in helps["resume_if_present"]
