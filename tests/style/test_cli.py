"""`percept styles` and `percept stylize --style` against a real style server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from percept.v1 import style_pb2
from services import client
from services.cli import main
from services.common.images import decode_image
from services.common.server import RunningServer
from tests.conftest import encode
from tests.style.committed import EACH_STYLE, FIRST, NAMES, STYLES, needs_styles

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def cat_png(tmp_path: Path, photo: np.ndarray) -> Path:
    path = tmp_path / "cat.png"
    path.write_bytes(encode(photo))
    return path


@needs_styles
def test_styles_prints_every_committed_style(style_server: RunningServer,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["styles", "--target", style_server.target]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(NAMES)
    for line, name in zip(lines, NAMES, strict=True):
        config = STYLES[name]
        assert line.split()[0] == name
        assert line.endswith(f"{config['style']['title']} (v{config['version']})")


@needs_styles
def test_styles_json(style_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["styles", "--json", "--target", style_server.target]) == 0
    styles = json.loads(capsys.readouterr().out)["styles"]
    assert [s["name"] for s in styles] == NAMES
    assert all(set(s) == {"name", "title", "version"} for s in styles)


@pytest.mark.parametrize("style", EACH_STYLE)
def test_stylize_with_a_fixed_style_writes_the_output(style_server: RunningServer,
                                                      cat_png: Path, photo: np.ndarray,
                                                      tmp_path: Path, style: str,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    out = tmp_path / "out" / "cat-styled.png"
    code = main(["stylize", str(cat_png), str(out), "--style", style, "--preserve-color",
                 "--strength", "0.8", "--target", style_server.target])
    assert code == 0
    config = STYLES[style]
    height, width = photo.shape[:2]
    assert capsys.readouterr().out.strip() == (
        f"{out}: {width}x{height} ({config['name']}@{config['version']})")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (width, height)
    # The flags reached the server: the file is what the same request over gRPC returns.
    request = style_pb2.StylizeRequest(image=cat_png.read_bytes(), style=style,
                                       preserve_color=True, strength=0.8)
    expected = client.stylize(client.connect(style_server.target), request)
    written = decode_image(out.read_bytes(), max_pixels=10**8).rgb
    assert np.array_equal(written, decode_image(expected.image, max_pixels=10**8).rgb)
    assert np.abs(written.astype(int) - photo).mean() > 5  # restyled, colours kept


@needs_styles
def test_stylize_output_format_follows_the_extension(style_server: RunningServer,
                                                     cat_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "cat.jpg"
    assert main(["stylize", str(cat_png), str(out), "--style", FIRST,
                 "--target", style_server.target]) == 0
    with Image.open(out) as image:
        assert image.format == "JPEG"


@needs_styles
def test_stylize_with_a_mask(style_server: RunningServer, cat_png: Path, photo: np.ndarray,
                             tmp_path: Path) -> None:
    height, width = photo.shape[:2]
    mask = np.zeros((height, width), np.uint8)
    mask[:, : width // 2] = 255
    mask_path = tmp_path / "mask.png"
    mask_path.write_bytes(encode(mask))
    out = tmp_path / "masked.png"
    assert main(["stylize", str(cat_png), str(out), "--style", FIRST, "--mask", str(mask_path),
                 "--target", style_server.target]) == 0
    written = decode_image(out.read_bytes(), max_pixels=10**8).rgb
    assert np.abs(written[:, width // 2:].astype(int) - photo[:, width // 2:]).max() <= 1
    assert np.abs(written[:, : width // 2].astype(int) - photo[:, : width // 2]).mean() > 12


@needs_styles
@pytest.mark.parametrize("args, expected", [
    (["--style", "van-gogh"], "NOT_FOUND: unknown style 'van-gogh'; available: "
                              + ", ".join(NAMES)),
])
def test_stylize_errors_print_the_status_and_exit_1(style_server: RunningServer, cat_png: Path,
                                                    tmp_path: Path, args: list[str],
                                                    expected: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never.png"
    code = main(["stylize", str(cat_png), str(out), *args, "--target", style_server.target])
    assert code == 1 and not out.exists()
    assert capsys.readouterr().err.strip() == expected


def _unreachable() -> str:
    from tests.conftest import free_port

    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("args, message", [
    (["--style", "x", "--iterations", "5", "--seed", "1"],
     "--iterations, --seed do not apply to --style"),
    (["--style-image", "s.png", "--strength", "0.5"], "--strength does not apply to --style-image"),
    (["--style", "x", "--strength", "1.5"], "--strength must be 0..1, got 1.5"),
    (["--style", "x", "--timeout", "0"],
     "--timeout must be a positive number of seconds up to 1e+06, got 0"),
    (["--style", "x", "--timeout", "inf"],
     "--timeout must be a positive number of seconds up to 1e+06, got inf"),
])
def test_stylize_refuses_options_it_would_ignore(cat_png: Path, tmp_path: Path, args: list[str],
                                                 message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before anything is sent: the target does not even exist."""
    out = tmp_path / "o.png"
    assert main(["stylize", str(cat_png), str(out), *args, "--target", _unreachable()]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not out.exists()


def test_stylize_refuses_bad_outputs_and_an_empty_mask_before_sending(
        cat_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = _unreachable()
    (tmp_path / "a-file").write_bytes(b"")
    (tmp_path / "empty-mask.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    cases = [
        (str(tmp_path / "out.bmp"), [], "cannot tell the output format from"),
        (str(tmp_path / "no-extension"), [], "end it in .png, .jpg, .jpeg, .webp"),
        (str(tmp_path / "folder.png"), [], "it is a folder"),
        (str(tmp_path / "a-file" / "o.png"), [],
         f"cannot write {tmp_path / 'a-file' / 'o.png'}: {tmp_path / 'a-file'} is a file, "
         "not a folder"),
        (str(tmp_path / "a-file" / "deeper" / "o.png"), [], f"{tmp_path / 'a-file'} is a file"),
        (str(tmp_path / "o.png"), ["--mask", str(tmp_path / "empty-mask.png")],
         "is an empty file"),
    ]
    for output, extra, message in cases:
        code = main(["stylize", str(cat_png), output, "--style", "x", *extra, "--target", target])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (output, err)  # never UNAVAILABLE: not sent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "cat.png", "empty-mask.png",
                                                          "folder.png"]
    assert not any((tmp_path / "folder.png").iterdir())


@needs_styles
def test_stylize_timeout_reaches_the_server_and_leaves_nothing_behind(
        style_server: RunningServer, cat_png: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "late.png"
    code = main(["stylize", str(cat_png), str(out), "--style", FIRST, "--timeout", "0.0001",
                 "--target", style_server.target])
    assert code == 1 and capsys.readouterr().err.startswith("DEADLINE_EXCEEDED")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]  # no partial file
    # nor the folders it made for the output
    code = main(["stylize", str(cat_png), str(tmp_path / "new" / "sub" / "late.png"),
                 "--style", FIRST, "--timeout", "0.0001", "--target", style_server.target])
    assert code == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]


@needs_styles
def test_stylize_can_replace_its_input(style_server: RunningServer, cat_png: Path,
                                       photo: np.ndarray, tmp_path: Path) -> None:
    cat_png.chmod(0o640)
    assert main(["stylize", str(cat_png), str(cat_png), "--style", FIRST,
                 "--target", style_server.target]) == 0
    written = decode_image(cat_png.read_bytes(), max_pixels=10**8).rgb
    assert written.shape == photo.shape and np.abs(written.astype(int) - photo).mean() > 5
    assert cat_png.stat().st_mode & 0o777 == 0o640  # the replaced file's mode is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]
    # an output that is a symbolic link is written through, the link kept
    link = tmp_path / "link.png"
    link.symlink_to(cat_png)
    assert main(["stylize", str(link), str(link), "--style", FIRST, "--strength", "0",
                 "--target", style_server.target]) == 0
    assert link.is_symlink() and link.resolve() == cat_png.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png", "link.png"]


@needs_styles
def test_a_closed_pipe_ends_quietly(style_server: RunningServer) -> None:
    """`percept styles | head -c 1`: no BrokenPipeError traceback."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "services.cli", "styles",
                                "--target", style_server.target],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader goes away before the first line is printed
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and "Traceback" not in stderr, stderr
