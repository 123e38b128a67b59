"""What `percept` refuses before sending anything (exit 2, no server needed): numbers the
server would take as "its default" or refuse, input files that are empty or over the
message limit, a command without its subcommand; and --help and --version."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from services.cli import build_parser, main
from tests.conftest import encode

#: Where nothing listens: a command that sent anything would fail UNAVAILABLE (exit 1).
NOWHERE = ["--target", "127.0.0.1:1"]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """A content image, a style image and a mask (bytes the CLI never decodes, but the
    mask: it is checked locally), an empty file and a sparse one of 65 MiB."""
    paths = {name: tmp_path / f"{name}.png" for name in ("content", "style", "mask", "empty",
                                                          "big")}
    paths["content"].write_bytes(b"content bytes")
    paths["style"].write_bytes(b"style bytes")
    paths["mask"].write_bytes(encode(np.full((8, 8), 255, dtype=np.uint8)))
    paths["empty"].write_bytes(b"")
    with open(paths["big"], "wb") as big:
        big.truncate(65 * 2**20)  # sparse: refused from its size, never read
    return paths


@pytest.mark.parametrize("argv, message", [
    (["--style-image", "{style}", "--iterations", "0"],
     "argument --iterations: must be at least 1, got 0"),  # not the server's 300
    (["--style-image", "{style}", "--iterations", "-5"],
     "argument --iterations: must be at least 1, got -5"),
    (["--style-image", "{style}", "--iterations", "99999999999"],
     "argument --iterations: 99999999999 is too large (the server takes at most its "
     "--max-iterations"),
    (["--style-image", "{style}", "--max-size", "0"],
     "argument --max-size: must be 32..1024, got 0"),  # not the server's 256
    (["--style-image", "{style}", "--max-size", "-1"],
     "argument --max-size: must be 32..1024, got -1"),
    (["--style-image", "{style}", "--max-size", "1025"],
     "argument --max-size: must be 32..1024, got 1025"),
    (["--style-image", "{style}", "--seed", "-9223372036854775809"],
     "argument --seed: must be at least -9223372036854775808"),  # an int64, negative too
    (["--style-image", "{style}", "--content-weight", "-1"],
     "argument --content-weight: must be a finite number >= 0, got -1"),
    (["--style-image", "{style}", "--tv-weight", "nan"],
     "argument --tv-weight: must be a finite number >= 0, got nan"),
    (["--style-image", "{style}", "--style-weight", "inf"],
     "argument --style-weight: must be a finite number >= 0, got inf"),
])
def test_stylize_numbers_outside_what_the_server_takes_exit_2(
        files: dict[str, Path], tmp_path: Path, argv: list[str], message: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The proto's "0 means the default" is for an unset field: a 0 given on the command
    line is refused, as `--top 0` is, and so is anything the server would refuse."""
    argv = [arg.format(style=files["style"]) for arg in argv]
    with pytest.raises(SystemExit) as raised:
        main(["stylize", str(files["content"]), str(tmp_path / "o.png"), *argv, *NOWHERE])
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command, top, message", [
    ("label x.png", "101", "101 is too large (the server returns at most 100 labels)"),
    ("search cat", "1001", "1001 is too large (the server returns at most 1000 hits)"),
    ("search cat", "0", "must be at least 1, got 0"),
])
def test_a_top_over_what_the_server_returns_exits_2(command: str, top: str, message: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main([*command.split(), "--top", top, *NOWHERE])
    assert raised.value.code == 2
    assert f"argument --top: {message}" in capsys.readouterr().err


def test_a_negative_layer_weight_exits_2(files: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stylize", str(files["content"]), str(tmp_path / "o.png"), "--style-image",
                 str(files["style"]), "--layer-weight", "relu1_1=-1", *NOWHERE]) == 2
    assert ("error: --layer-weight relu1_1=-1: the weight must be a finite number >= 0"
            in capsys.readouterr().err)


#: Each command with the file {x} in one of the places it sends an image from, and how
#: its message names that file.
IMAGE_PLACES = {
    "upscale": (["upscale", "{x}", "{out}"], "input"),
    "label": (["label", "{x}"], "input"),
    "search --image": (["search", "--image", "{x}"], "input"),
    "stylize --style": (["stylize", "{x}", "{out}", "--style", "starry-night"], "input"),
    "stylize --style --mask": (["stylize", "{content}", "{out}", "--style", "starry-night",
                                "--mask", "{x}"], "mask"),
    "stylize --style-image (content)": (["stylize", "{x}", "{out}", "--style-image",
                                         "{style}"], "content image"),
    "stylize --style-image (style)": (["stylize", "{content}", "{out}", "--style-image",
                                       "{x}"], "style image"),
    "stylize --style-image --mask": (["stylize", "{content}", "{out}", "--style-image",
                                      "{style}", "--mask", "{x}"], "mask"),
}


def _argv(place: str, x: Path, files: dict[str, Path], out: Path) -> list[str]:
    template, _ = IMAGE_PLACES[place]
    return [arg.format(x=x, out=out, content=files["content"], style=files["style"])
            for arg in template]


@pytest.mark.parametrize("place", list(IMAGE_PLACES))
def test_an_input_over_the_message_limit_exits_2_naming_it(
        place: str, files: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Not gRPC's "RESOURCE_EXHAUSTED: CLIENT: Sent message larger than max" (exit 1):
    the CLI sees the problem before sending, so it says which file and exits 2."""
    out = tmp_path / "out.png"
    assert main([*_argv(place, files["big"], files, out), *NOWHERE]) == 2
    what = IMAGE_PLACES[place][1]
    assert capsys.readouterr().err == (f"error: {what} {files['big']} is 65.0 MiB, over the "
                                       "64 MiB a message may carry\n")
    assert not out.exists()


@pytest.mark.parametrize("place", list(IMAGE_PLACES))
def test_an_empty_input_exits_2_naming_it(place: str, files: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_argv(place, files["empty"], files, tmp_path / "o.png"), *NOWHERE]) == 2
    what = IMAGE_PLACES[place][1]
    assert capsys.readouterr().err == f"error: {what} {files['empty']} is an empty file\n"


def test_images_that_one_request_cannot_carry_together_exit_2(
        files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A content and a style image of 40 MiB each fit a message alone, not together."""
    content, style = tmp_path / "c40.png", tmp_path / "s40.png"
    for path in (content, style):
        with open(path, "wb") as file:
            file.truncate(40 * 2**20)
    assert main(["stylize", str(content), str(tmp_path / "o.png"), "--style-image",
                 str(style), *NOWHERE]) == 2
    assert capsys.readouterr().err == (
        f"error: content image {content} (40.0 MiB), style image {style} (40.0 MiB) take "
        "80.0 MiB together, over the 64 MiB a message may carry\n")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`percept --version`: the installed package's version, as servers report it."""
    from services.common.server_info import percept_version

    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0
    assert capsys.readouterr().out == f"percept {percept_version()}\n"
    assert percept_version() != "unknown"


def test_help_speaks_to_users_not_of_modules(capsys: pytest.CaptureFixture[str]) -> None:
    """`percept --help` and the help of the commands cli.py defines name no module."""
    helps = []

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        helps.append((command, parser.format_help()))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if name not in ("train", "eval", "data"):  # the trainers' own CLIs
                        walk(sub, f"{command} {name}")

    walk(build_parser(), "percept")
    assert [command for command, text in helps if "services." in text] == []
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--version" in text and "`make run`" not in text and "``" not in text


def test_cluster_without_a_subcommand_names_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["cluster"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: percept cluster")
    assert "error: give a subcommand: status (readiness and replicas" in err
    assert "cluster_command" not in err


def test_layer_weights_adjust_the_default_layers() -> None:
    """One --layer-weight changes that layer, not the whole set: a request that names
    layers has only those, so the CLI sends the server's defaults along with it."""
    from services.cli import DEFAULT_STYLE_LAYERS, _layer_weights
    from training.perceptual.gatys import GatysOptions

    assert tuple(GatysOptions().style_layer_weights) == DEFAULT_STYLE_LAYERS
    assert set(GatysOptions().style_layer_weights.values()) == {1.0}
    assert _layer_weights([]) == {}  # the server's defaults
    assert _layer_weights(["relu1_1=0.5", "relu3_1=0", "relu3_2=2"]) == {
        "relu1_1": 0.5, "relu2_1": 1.0, "relu3_1": 0.0, "relu4_1": 1.0, "relu5_1": 1.0,
        "relu3_2": 2.0}
