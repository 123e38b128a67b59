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


def test_the_local_cluster_keeps_its_search_index_apart(tmp_path: Path) -> None:
    """`make run` indexes its samples: into out/search, not into data/search, where
    `percept serve search` keeps a collection the user indexed."""
    from services.local_cluster import service_command

    command = service_command("search", tmp_path / "out" / "search")
    assert command[command.index("--data-dir") + 1] == str(tmp_path / "out" / "search")
    assert "--data-dir" not in service_command("embed", tmp_path)


def test_the_whole_demo_against_every_service(all_server: RunningServer, tmp_path: Path
                                              ) -> None:
    """Every step runs; the labels come with and without ImageNet's classes; the samples
    are indexed with absolute uris; the overview is in rows, the small input shown at its
    own size beside its upscale."""
    from services import client

    out = tmp_path / "out"
    report = run_demo(out, {name: all_server.target for name in SERVICES},
                      gatys_iterations=1, gatys_size=32)
    assert report.failures == 0 and not any(line.startswith("  skip") for line in report.lines), \
        report.lines
    assert any(line.startswith(f"  ok    label {out / 'samples' / 'cat.png'}: ")
               for line in report.lines)
    assert any(" --zero-shot: " in line for line in report.lines)
    # what the server hosts, once per process: every service, each model with its version
    [info] = [line for line in report.lines if line.startswith("  ok    info ")]
    assert "SuperResolution, StyleTransfer, Embedding, ImageSearch: " in info
    assert "superres-perceptual@" in info and "(default)" in info
    assert any(" images indexed (" in line and " in the index)" in line
               for line in report.lines)
    captions = [caption for caption, _ in report.pictures]
    assert captions[1].startswith("input, ") and captions[2] == "upscaled 4x"
    assert captions[0].startswith("content, labelled: ")  # the label step's top words
    # the hits among the demo's samples, pictured in rank order (the session's shared
    # index also holds other tests' images, which the overview leaves out)
    [searched] = [line for line in report.lines if line.startswith("  ok    index + search")]
    named = [hit.split(" (")[0] for hit in searched.split("hits: ")[1].split(", ")]
    from services.demo import SAMPLES

    samples = set(SAMPLES)
    found = [c for c in captions if c.startswith("search 'cat' #")]
    # the search found the samples (the cat first among them: 0.74 against 0.26 for the
    # next when measured), so the order checks below are not of two empty lists
    assert found and found[0].split(": ")[1].startswith("cat ("), searched
    assert [c.split(": ")[1].split(" (")[0] for c in found] == [n for n in named
                                                                 if n in samples]
    assert [int(c.split("#")[1].split(":")[0]) for c in found] == [
        rank for rank, n in enumerate(named, 1) if n in samples]
    hits = client.search_by_text(client.connect(all_server.target), "a cat", k=50).hits
    cat_hit = next(hit for hit in hits if hit.id == "cat")
    assert cat_hit.uri == str((out / "samples" / "cat.png").resolve())
    with Image.open(out / "demo.png") as sheet:
        assert sheet.height > 2 * 192  # in rows, not one strip
