"""`percept eval style` with inputs a user gets wrong: other models or photos never overwrite
the README grid, missing or unreadable photos and model files are one-line errors naming
the file (exit 2), and a model is measured only against the style image it was trained on
(the sha256 in its config.json)."""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
