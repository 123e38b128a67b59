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
    (["--style", FIRST, "--strength", "1.5"],
     "INVALID_ARGUMENT: strength must be 0..1, got 1.5"),
])
def test_stylize_errors_print_the_status_and_exit_1(style_server: RunningServer, cat_png: Path,
                                                    tmp_path: Path, args: list[str],
                                                    expected: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never.png"
    code = main(["stylize", str(cat_png), str(out), *args, "--target", style_server.target])
    assert code == 1 and not out.exists()
    assert capsys.readouterr().err.strip() == expected
