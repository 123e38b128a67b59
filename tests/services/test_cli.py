"""The `percept` CLI against a real server: outputs, JSON, and error reporting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.cli import main
from services.common.server import RunningServer
from tests.conftest import encode


@pytest.fixture()
def cat_png(tmp_path: Path, small_photo: np.ndarray) -> Path:
    path = tmp_path / "cat.png"
    path.write_bytes(encode(small_photo))
    return path


def test_stylize_with_a_style_image_writes_the_result(all_server: RunningServer, cat_png: Path,
                                                       style_photo: np.ndarray, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    style = tmp_path / "style.jpg"
    style.write_bytes(encode(style_photo, "JPEG"))
    out = tmp_path / "out" / "result.jpg"
    code = main(["stylize", str(cat_png), str(out), "--style-image", str(style),
                 "--iterations", "3", "--max-size", "48", "--quiet", "--preserve-color",
                 "--layer-weight", "relu1_1=0.5", "--target", all_server.target])
    assert code == 0
    with Image.open(out) as image:
        assert image.format == "JPEG" and image.size == (48, 32)
    assert "48x32 (gatys-vgg19@1)" in capsys.readouterr().out


def test_a_failed_call_prints_status_and_message_and_exits_non_zero(
        all_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png")
    code = main(["stylize", str(junk), str(tmp_path / "o.png"), "--style-image", str(junk),
                 "--quiet", "--target", all_server.target])
    assert code == 1
    assert capsys.readouterr().err.strip() == "INVALID_ARGUMENT: not a decodable content image"


def test_unimplemented_services_are_reported_not_faked(all_server: RunningServer, cat_png: Path,
                                                        tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["label", str(cat_png), "--json", "--target", all_server.target]) == 1
    assert capsys.readouterr().err.startswith("UNIMPLEMENTED: ")


def test_missing_input_file_exits_2(all_server: RunningServer, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["upscale", str(tmp_path / "missing.png"), str(tmp_path / "o.png"),
                 "--target", all_server.target])
    assert code == 2
    assert "cannot read input" in capsys.readouterr().err


def test_stylize_needs_exactly_one_style_source(cat_png: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stylize", str(cat_png), str(tmp_path / "o.png")]) == 2
    assert "exactly one of --style" in capsys.readouterr().err


def test_health_command(all_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--target", all_server.target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_unreachable_server_is_unavailable(tmp_path: Path, cat_png: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import free_port

    code = main(["styles", "--target", f"127.0.0.1:{free_port()}"])
    assert code == 1
    assert capsys.readouterr().err.startswith("UNAVAILABLE: ")
