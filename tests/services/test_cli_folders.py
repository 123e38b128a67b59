"""Folder runs of `percept stylize --style` and `percept upscale` against real servers:
every image of a folder, broken files reported and skipped, a busy server retried, a run
that cannot succeed stopped, Ctrl-C leaving only whole files, and bad folders refused."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from percept.v1 import image_pb2, style_pb2
from services import client, folder_runs
from services.cli import main
from services.common.images import decode_image
from services.common.server import RunningServer, start_in_thread
from tests.conftest import REPO, encode, free_port, server_config
from tests.fixtures.bad_images import truncated_jpeg
from tests.style.committed import FIRST, needs_styles

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture()
def photos(tmp_path: Path, small_photo: np.ndarray) -> Path:
    """Three good photos (one in a subfolder), a truncated JPEG, a text file and a hidden
    file: only images are read, and the broken one is reported."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(encode(small_photo))
    (folder / "b.JPG").write_bytes(encode(small_photo[:, ::-1], "JPEG"))
    (folder / "sub" / "c.webp").write_bytes(encode(small_photo[::-1], "WEBP", lossless=True))
    (folder / "broken.jpg").write_bytes(truncated_jpeg(small_photo))
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(encode(small_photo))
    return folder


@needs_styles
def test_stylize_a_folder(style_server: RunningServer, photos: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["stylize", str(photos), str(out), "--style", FIRST, "--strength", "0.7",
                 "--recursive", "--jobs", "3", "--format", "jpg", "--target",
                 style_server.target])
    captured = capsys.readouterr()
    assert code == 1  # one file failed
    assert captured.out.strip() == f"stylised 3 of 4 images into {out} (1 failed)"
    assert (f"warning: skipped {photos / 'broken.jpg'}: INVALID_ARGUMENT: truncated image"
            in captured.err)
    assert _tree(out) == ["a.jpg", "b.jpg", "sub", "sub/c.jpg"]
    for path in out.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"
    # Each file is what one Stylize call with the same options returns.
    request = style_pb2.StylizeRequest(image=(photos / "a.png").read_bytes(), style=FIRST,
                                       strength=0.7,
                                       output_format=image_pb2.IMAGE_FORMAT_JPEG)
    expected = client.stylize(client.connect(style_server.target), request).image
    assert (out / "a.jpg").read_bytes() == expected

    # --skip-existing resumes: nothing is sent again for the outputs already there.
    (out / "b.jpg").unlink()
    code = main(["stylize", str(photos), str(out), "--style", FIRST, "--strength", "0.7",
                 "--recursive", "--format", "jpg", "--skip-existing", "--quiet", "--target",
                 style_server.target])
    assert code == 1
    assert capsys.readouterr().out.strip() == (
        f"stylised 1 of 4 images into {out} (1 failed, 2 already there)")
    assert _tree(out) == ["a.jpg", "b.jpg", "sub", "sub/c.jpg"]


@needs_styles
def test_without_recursive_only_the_top_folder_is_read(style_server: RunningServer,
                                                       photos: Path, tmp_path: Path) -> None:
    (photos / "broken.jpg").unlink()
    out = tmp_path / "flat"
    assert main(["stylize", str(photos), str(out), "--style", FIRST, "--preserve-color",
                 "--quiet", "--target", style_server.target]) == 0
    assert _tree(out) == ["a.png", "b.png"]


@needs_styles
def test_a_status_that_would_fail_every_file_stops_the_run(
        style_server: RunningServer, photos: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    code = main(["stylize", str(photos), str(out), "--style", "no-such-style", "--quiet",
                 "--target", style_server.target])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("NOT_FOUND: unknown style 'no-such-style'")
    assert err.count("NOT_FOUND") == 1
    assert not out.exists()  # the folders it made, left empty, are removed


@pytest.fixture(scope="module")
def busy_style_server() -> Iterator[RunningServer]:
    """A style server that takes one request at a time (--max-queue 1)."""
    running = start_in_thread(server_config("style", max_queue=1), timeout=600)
    yield running
    running.stop()


@needs_styles
def test_a_busy_server_is_retried_with_backoff(busy_style_server: RunningServer,
                                               small_photo: np.ndarray, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.png").write_bytes(encode(np.roll(small_photo, i, axis=1)))
    channel = client.connect(busy_style_server.target)
    codes: collections.Counter[str] = collections.Counter()

    def stylize(image: bytes) -> bytes:
        try:
            return client.stylize(channel, style_pb2.StylizeRequest(image=image,
                                                                    style=FIRST)).image
        except grpc.RpcError as error:
            codes[error.code().name] += 1
            raise

    jobs = folder_runs.plan_folder(folder, tmp_path / "out", "png", recursive=False)
    report = folder_runs.run_folder(jobs, stylize, workers=8, skip_existing=False, quiet=True,
                                    desc="stylize")
    assert report.written == 8 and not report.failures
    assert codes["RESOURCE_EXHAUSTED"] > 0 and set(codes) == {"RESOURCE_EXHAUSTED"}
    for job in jobs:
        assert decode_image(job.target.read_bytes(), max_pixels=10**8).rgb.shape == \
            small_photo.shape


@needs_styles
def test_ctrl_c_stops_the_run_and_leaves_only_whole_files(style_server: RunningServer,
                                                          photo: np.ndarray,
                                                          tmp_path: Path) -> None:
    folder, out = tmp_path / "big", tmp_path / "out"
    folder.mkdir()
    large = np.asarray(Image.fromarray(photo).resize((1200, 800)))
    for i in range(40):
        (folder / f"{i:02d}.png").write_bytes(encode(large))
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "stylize", str(folder), str(out), "--style",
         FIRST, "--jobs", "2", "--quiet", "--target", style_server.target],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and any(out.glob("*.png"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()
    written = _tree(out)
    assert 0 < len(written) < 40 and all(name.endswith(".png") for name in written)
    for name in written:  # whole files only: every one decodes
        assert decode_image((out / name).read_bytes(), max_pixels=10**8).rgb.shape == \
            large.shape


def test_upscale_a_folder(all_server: RunningServer, photos: Path, tmp_path: Path,
                          small_photo: np.ndarray, capsys: pytest.CaptureFixture[str]) -> None:
    (photos / "broken.jpg").unlink()
    out = tmp_path / "big"
    assert main(["upscale", str(photos), str(out), "--recursive", "--format", "webp",
                 "--quiet", "--target", all_server.target]) == 0
    assert capsys.readouterr().out.strip() == f"upscaled 3 of 3 images into {out}"
    assert _tree(out) == ["a.webp", "b.webp", "sub", "sub/c.webp"]
    height, width = small_photo.shape[:2]
    with Image.open(out / "sub" / "c.webp") as image:
        assert image.format == "WEBP" and image.size == (4 * width, 4 * height)


def _unreachable() -> str:
    return f"127.0.0.1:{free_port()}"


def test_bad_folder_runs_are_refused_before_anything_is_sent(
        photos: Path, tmp_path: Path, small_photo: np.ndarray,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "empty").mkdir()
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "x.png").write_bytes(encode(small_photo))
    (clash / "x.jpg").write_bytes(encode(small_photo, "JPEG"))
    cases = [
        ([str(photos), str(tmp_path / "a-file")], "the output must be one too"),
        ([str(photos), str(tmp_path / "out.png")], "the output must be one too, not"),
        ([str(photos), str(photos)], "the outputs would mix with the inputs"),
        ([str(photos), str(photos / "sub" / "out"), "--recursive"],
         "the outputs would mix with the inputs"),
        ([str(tmp_path / "empty"), str(tmp_path / "o")], "no images in"),
        ([str(clash), str(tmp_path / "o")], "would both be written to"),
        ([str(photos), str(tmp_path / "o"), "--jobs", "0"], "--jobs must be from 1 to 64"),
        ([str(photos / "a.png"), str(tmp_path / "o.png"), "--jobs", "2", "--recursive"],
         "--recursive, --jobs apply only when IN is a folder"),
        ([str(photos / "a.png"), str(tmp_path / "o.png"), "--format", "jpg"],
         "--format applies only when IN is a folder"),
    ]
    for args, message in cases:
        code = main(["stylize", *args, "--style", "x", "--target", _unreachable()])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err)  # never UNAVAILABLE: not sent
    code = main(["stylize", str(photos), str(tmp_path / "o"), "--style-image",
                 str(photos / "a.png"), "--target", _unreachable()])
    assert code == 2 and "a folder input needs --style NAME" in capsys.readouterr().err
    code = main(["upscale", str(photos), str(tmp_path / "a-file"), "--target", _unreachable()])
    assert code == 2 and "the output must be one too" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "clash", "empty", "in"]
