"""The `make run` demo (services/demo.py) through the real client, against a server that
hosts only the style service: the other steps report UNIMPLEMENTED as skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from services.common.config import SERVICES
from services.common.server import RunningServer
from services.demo import run_demo
from tests.style.committed import FIRST, NAMES, STYLES, needs_styles

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@needs_styles
def test_demo_stylises_the_sample_in_every_installed_style(style_server: RunningServer,
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    out = tmp_path / "out"
    report = run_demo(out, {name: style_server.target for name in SERVICES},
                      gatys_iterations=1, gatys_size=32)
    assert report.failures == 0, report.lines
    with Image.open(out / "samples" / "cat.png") as cat:
        size = cat.size
    for name in NAMES:
        path = out / f"style-{name}.png"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == size
        model = f"{STYLES[name]['name']}@{STYLES[name]['version']}"
        # the folder it wrote to, not a fixed "out/"
        assert (f"  ok    stylize --style {name}: {path} {size[0]}x{size[1]} "
                f"({model})") in report.lines
    with Image.open(out / f"style-{FIRST}-preserve-color.png") as image:
        assert image.size == size
    assert f"  ok    stylize --style {FIRST} --preserve-color: " in capsys.readouterr().out
    assert ("  ok    styles: " + ", ".join(NAMES)) in report.lines
    captions = [caption for caption, _ in report.pictures]
    assert all(name in captions for name in NAMES)
    # The services this server does not host are reported as skipped, not as failures.
    assert any(line.startswith("  skip  upscale: UNIMPLEMENTED") for line in report.lines)
    assert (out / "demo.png").is_file()
