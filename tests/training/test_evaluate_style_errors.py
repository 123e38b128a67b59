"""`percept eval style` with inputs a user gets wrong: other models or photos never overwrite
the README grid, missing or unreadable photos and model files are one-line errors naming
the file (exit 2), a model is measured only against the style image it was trained on
(the sha256 in its config.json), a model whose output is NaN is an error, not a clean
score, and numbers and paths that would fail late are refused before anything loads."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from training import cli_style, evaluate_style
from training.assets import sha256_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
SOURCE_MODEL = REPO / "models" / "style-the-scream"
README_GRID = REPO / "docs" / "images" / "style_grid.png"
#: The files of an artifact the evaluation reads.
ARTIFACT_FILES = ("config.json", "weights.safetensors", "provenance.json")


def _image(path: Path, size: tuple[int, int] = (96, 80), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """A copy of a committed style artifact (what the evaluation reads of it)."""
    if not (SOURCE_MODEL / "config.json").is_file():
        pytest.skip(f"{SOURCE_MODEL} is not committed")
    folder = tmp_path / "style-copy"
    folder.mkdir()
    for name in ARTIFACT_FILES:
        shutil.copy(SOURCE_MODEL / name, folder / name)
    return folder


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    return _image(tmp_path / "photo.png")


@pytest.fixture
def readme_grid_kept() -> Iterator[None]:
    """Fails if the tracked README grid changes, and puts it back if it did."""
    before = README_GRID.read_bytes() if README_GRID.is_file() else None
    yield
    after = README_GRID.read_bytes() if README_GRID.is_file() else None
    if after != before:
        if before is not None:
            README_GRID.write_bytes(before)
        pytest.fail(f"{README_GRID} was overwritten")


def _eval(tmp_path: Path, *args: str) -> int:
    return cli_style.main(["eval", *args, "--size", "64", "--device", "cpu",
                           "--out", str(tmp_path / "out")])


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line the command printed to stderr."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _parse(*args: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_style.register_eval(parser.add_subparsers(dest="command"))
    return parser.parse_args(["style", *args])


def test_the_default_grid_is_the_readme_s_only_for_the_default_models_and_photos(
        tmp_path: Path, model: Path, photo: Path, readme_grid_kept: None) -> None:
    """With --models the grid lands in --out beside metrics.json, not on the tracked
    docs/images/style_grid.png; '' skips it and an explicit path is honoured."""
    out = tmp_path / "out"
    assert _eval(tmp_path, "--models", str(model), "--photos", str(photo),
                 "--grid-cell", "32", "--grid-photos", "1") == 0
    assert (out / "metrics.json").is_file()
    with Image.open(out / "style_grid.png") as grid:
        assert grid.width > 2 * 32  # the photo and the style, at least
    assert evaluate_style.grid_path(_parse()) == README_GRID
    for flags in (["--models", str(model)], ["--photos", str(photo)]):
        assert evaluate_style.grid_path(_parse(*flags, "--out", str(out))) \
            == out / "style_grid.png"
    assert evaluate_style.grid_path(_parse("--models", str(model), "--grid", "")) is None
    assert evaluate_style.grid_path(_parse("--grid", str(tmp_path / "g.png"))) \
        == tmp_path / "g.png"


def test_photos_that_are_missing_or_unreadable_are_errors_naming_them(
        tmp_path: Path, model: Path, photo: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fall-back to scikit-image's photos for a path the user gave."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG")
    truncated = tmp_path / "truncated.png"
    data = _image(tmp_path / "whole.png", (256, 256), seed=1).read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    for photos in ([str(tmp_path / "no" / "such" / "dir")], [str(empty)],
                   [str(photo), str(garbage)], [str(truncated)]):
        assert _eval(tmp_path, "--models", str(model), "--photos", *photos,
                     "--grid", "") == 2, photos
        assert photos[-1] in _error(capsys)
    assert not (tmp_path / "out").exists()

    # the default folder: scikit-image's photos only when it is absent
    pytest.importorskip("skimage")
    monkeypatch.setattr(evaluate_style, "HELDOUT_PHOTOS", tmp_path / "absent")
    assert [name for name, _ in evaluate_style.load_photos(None)] \
        == ["skimage-chelsea", "skimage-coffee"]
    monkeypatch.setattr(evaluate_style, "HELDOUT_PHOTOS", empty)
    with pytest.raises(ValueError, match="holds no images"):
        evaluate_style.load_photos(None)


def test_a_model_is_measured_against_the_style_image_its_config_records(
        tmp_path: Path, model: Path, photo: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A model trained with --style-image under a bundled style's name (here the-scream's)
    is not measured against the bundled painting: without its image the command asks for
    --style-image; given it (among others), it is matched by sha256."""
    tiny = _image(tmp_path / "tiny.png", (40, 40), seed=2)
    config = json.loads((model / "config.json").read_text())
    config["style"]["sha256"] = sha256_of(tiny)
    (model / "config.json").write_text(json.dumps(config))
    common = ["--models", str(model), "--photos", str(photo), "--grid", ""]
    assert _eval(tmp_path, *common) == 2
    message = _error(capsys)
    assert str(model) in message and "--style-image PATH" in message
    assert not (tmp_path / "out").exists()

    assert _eval(tmp_path, *common, "--style-image", str(photo), str(tiny)) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    (entry,) = report["models"].values()
    assert entry["style_image"] == str(tiny)

    assert _eval(tmp_path, *common, "--style-image", str(tmp_path / "gone.png")) == 2
    assert "gone.png" in _error(capsys)

    # the file provenance.json names is found without --style-image
    provenance = json.loads((model / "provenance.json").read_text())
    for entry in provenance["data"]:
        if entry["kind"] == "style image":
            entry["path"] = str(tiny)
    (model / "provenance.json").write_text(json.dumps(provenance))
    assert evaluate_style.load_style_model(model).find_style_image() == tiny


def test_a_model_that_is_not_a_style_model_is_refused_up_front(
        tmp_path: Path, photo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    superres = REPO / "models" / "superres-psnr"
    if not (superres / "config.json").is_file():
        pytest.skip(f"{superres} is not committed")
    assert _eval(tmp_path, "--models", str(superres), "--photos", str(photo),
                 "--grid", "") == 2
    assert f"{superres} is not a style model (task: superres)" in _error(capsys)


def test_broken_model_files_are_one_line_errors_naming_the_file(
        tmp_path: Path, model: Path, photo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A corrupt weights file, a width that does not fit the weights, a config.json that is
    not JSON, and none at all: exit 2, no traceback, the file named."""
    def broken(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(model, folder)
        return folder

    corrupt = broken("corrupt")
    (corrupt / "weights.safetensors").write_bytes(b"xx")
    narrow = broken("narrow")
    config = json.loads((narrow / "config.json").read_text())
    config["architecture"]["width"] //= 2
    (narrow / "config.json").write_text(json.dumps(config))
    invalid = broken("invalid")
    (invalid / "config.json").write_text('{"task": "style", ')
    missing = broken("missing")
    (missing / "config.json").unlink()
    cases = {corrupt: (corrupt / "weights.safetensors", "safetensors"),
             narrow: (narrow / "weights.safetensors", "size mismatch"),
             invalid: (invalid / "config.json", "not valid JSON"),
             missing: (missing / "config.json", "not an exported model folder")}
    for folder, (named, reason) in cases.items():
        assert _eval(tmp_path, "--models", str(model), str(folder), "--photos", str(photo),
                     "--grid", "") == 2, folder
        message = _error(capsys)
        assert str(named) in message and reason in message, message
    assert not (tmp_path / "out").exists()


def test_a_model_whose_output_is_nan_is_an_error_naming_it_and_the_photo(
        tmp_path: Path, model: Path, photo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """NaN weights make a NaN output, which to_image would draw black and the measures
    would score as clean (Nyquist 0): exit 2 before metrics.json is written."""
    weights = load_file(model / "weights.safetensors")
    first = next(iter(weights))
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, model / "weights.safetensors")
    config = json.loads((model / "config.json").read_text())  # as an export would name them
    config["weights_sha256"] = sha256_of(model / "weights.safetensors")
    (model / "config.json").write_text(json.dumps(config))
    assert _eval(tmp_path, "--models", str(model), "--photos", str(photo), "--grid", "") == 2
    message = _error(capsys)
    assert str(model) in message and "photo photo" in message and "not finite" in message, \
        message
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_numbers_and_paths_that_would_fail_late_are_refused_before_any_model_loads(
        tmp_path: Path, model: Path, photo: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each was a traceback, an OOM kill, an error after metrics.json was written, or a
    header-only grid: now exit 2, one line naming the flag and what it takes, nothing
    loaded or written."""
    def no_loading(*args: object, **kwargs: object) -> None:
        pytest.fail("a model was loaded before the flags were checked")

    monkeypatch.setattr(evaluate_style, "load_style_model", no_loading)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    zoom = ["--zoom", str(tmp_path / "zoom.png")]
    size = "--size must be a multiple of 4 from 16 to 4096 px"
    cell = "--grid-cell must be a multiple of 4 from 16 to 1024 px"
    crop = "--zoom-crop must be 8..64 px (at most --size)"
    cases: list[tuple[list[str], str]] = [
        *[(["--size", value], size) for value in ("0", "-5", "3", "5", "8", "66", "100000")],
        *[(["--grid-cell", value], cell) for value in ("0", "-10", "8", "161", "100000")],
        *[(["--grid-photos", value], "--grid-photos must be at least 1 (--grid '' writes no "
           "grid)") for value in ("0", "-1")],
        *[([*zoom, "--zoom-crop", value], crop) for value in ("1000", "4", "0")],
        (zoom, f"{crop}, got 96"),  # the default crop is larger than --size 64
        (["--threads", "-1"], "--threads must be >= 0, got -1"),
        (["--grid", str(a_file / "grid.png")], f"{a_file} is a file, not a folder"),
        (["--grid", str(tmp_path)], f"--grid {tmp_path} is a folder, not a file"),
        (["--out", str(a_file / "out")], f"--out {a_file / 'out'}: {a_file} is a file, not "
                                         "a folder"),
        (["--zoom", str(a_file / "z.png"), "--zoom-crop", "32"],
         f"--zoom {a_file / 'z.png'}: {a_file} is a file, not a folder"),
    ]
    if Path("/proc/self").is_dir():  # Linux: /proc refuses new files, even to root
        cases.append((["--grid", "/proc/x.png"], "--grid /proc/x.png cannot be written"))
    out = tmp_path / "out"
    for flags, expected in cases:
        assert cli_style.main(["eval", "--models", str(model), "--photos", str(photo),
                               "--size", "64", "--device", "cpu", "--out", str(out),
                               *flags]) == 2, flags
        message = _error(capsys)
        assert expected in message, (flags, message)
    assert not out.exists()
    assert not (tmp_path / "zoom.png").exists()


def test_the_smallest_sizes_allowed_are_measured(
        tmp_path: Path, model: Path, photo: Path) -> None:
    """--size 16, --grid-cell 16 and --zoom-crop 8 (the minimums) run to the end, and the
    --size help says what the code does: both sides cropped to multiples of 4."""
    grid, zoom = tmp_path / "grid.png", tmp_path / "zoom.png"
    assert cli_style.main(["eval", "--models", str(model), "--photos", str(photo),
                           "--size", "16", "--grid-cell", "16", "--grid-photos", "1",
                           "--grid", str(grid), "--zoom", str(zoom), "--zoom-crop", "8",
                           "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["size"] == 16
    assert grid.is_file() and zoom.is_file()
    assert evaluate_style.resize_short_side(np.zeros((30, 47, 3), np.uint8), 18).shape \
        == (16, 28, 3)
    parser = argparse.ArgumentParser()
    cli_style.add_eval_arguments(parser)
    (size_help,) = [a.help for a in parser._actions if a.dest == "size"]
    assert size_help is not None and "multiples of 4" in size_help and "even" not in size_help
