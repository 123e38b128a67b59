"""Folder runs of `percept stylize --style` and `percept upscale` against real servers:
every image of a folder, broken files reported and skipped, a busy server retried, a run
that cannot succeed stopped, Ctrl-C leaving only whole files, and bad folders refused."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from percept.v1 import image_pb2, style_pb2, style_pb2_grpc
from services import client, folder_runs
from services.cli import main
from services.common.errors import RETRY_PUSHBACK_KEY
from services.common.images import decode_image
from services.common.server import RunningServer, start_in_thread
from tests.conftest import REPO, encode, free_port, is_pushback, server_config
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
    """A style server that takes one request at a time (--max-queue 1) of at most 1 MB
    (--max-message-mb 1)."""
    running = start_in_thread(server_config("style", max_queue=1, max_message_mb=1),
                              timeout=600)
    yield running
    running.stop()


def _counting_start(channel: grpc.Channel, started: collections.Counter[bytes],
                   answers: list[tuple[str, dict[str, str]]]) -> folder_runs.Start:
    """Starts a Stylize call per file, counting the calls per image and recording each
    answer's status and trailers."""
    def record(future: grpc.Future) -> None:
        answers.append((future.code().name, dict(future.trailing_metadata() or ())))

    def start(image: bytes) -> grpc.Future:
        started[image] += 1
        future = client.stylize_future(channel, style_pb2.StylizeRequest(image=image,
                                                                         style=FIRST))
        future.add_done_callback(record)
        return future
    return start


@needs_styles
def test_a_busy_server_is_retried_with_backoff(busy_style_server: RunningServer,
                                               small_photo: np.ndarray, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(8):
        (folder / f"{i}.png").write_bytes(encode(np.roll(small_photo, i, axis=1)))
    started: collections.Counter[bytes] = collections.Counter()
    answers: list[tuple[str, dict[str, str]]] = []
    jobs = folder_runs.plan_folder(folder, tmp_path / "out", "png", recursive=False).jobs
    report = folder_runs.FolderReport()
    with client.connect(busy_style_server.target) as channel:
        folder_runs.run_folder(jobs, _counting_start(channel, started, answers), report,
                               workers=8, patience=300, skip_existing=False, quiet=True,
                               desc="stylize",
                               check_health=lambda: client.health_future(channel, 5))
    assert report.written == 8 and not report.failures
    refused = [trailers for code, trailers in answers if code != "OK"]
    assert refused and all(code in ("OK", "RESOURCE_EXHAUSTED") for code, _ in answers)
    assert all(is_pushback(t.get("grpc-retry-pushback-ms")) for t in refused)  # "busy: retry"
    assert sum(started.values()) == len(answers) == 8 + len(refused)
    for job in jobs:
        assert decode_image(job.target.read_bytes(), max_pixels=10**8).rgb.shape == \
            small_photo.shape


@needs_styles
def test_a_file_over_the_message_limit_is_tried_once_and_skipped(
        busy_style_server: RunningServer, small_photo: np.ndarray, tmp_path: Path) -> None:
    """Both are RESOURCE_EXHAUSTED; only the busy answer carries the retry trailer."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(small_photo))
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    large = encode(noise)  # 1.4 MB, over the 1 MB cap
    (folder / "b-large.png").write_bytes(large)
    (folder / "c.png").write_bytes(encode(small_photo[::-1]))
    started: collections.Counter[bytes] = collections.Counter()
    jobs = folder_runs.plan_folder(folder, tmp_path / "out", "png", recursive=False).jobs
    report = folder_runs.FolderReport()
    with client.connect(busy_style_server.target) as channel:
        folder_runs.run_folder(jobs, _counting_start(channel, started, []), report,
                               workers=1, patience=300, skip_existing=False, quiet=True,
                               desc="stylize",
                               check_health=lambda: client.health_future(channel, 5))
    assert started[large] == 1 and report.written == 2
    (failure,) = report.failures
    assert failure.startswith(f"{folder / 'b-large.png'}: RESOURCE_EXHAUSTED: ")
    assert "larger than max" in failure and "retried" not in failure


@needs_styles
@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_stops_the_run_and_leaves_only_whole_files(
        style_server: RunningServer, photo: np.ndarray, tmp_path: Path, stop: signal.Signals,
        code: int) -> None:
    folder, out = tmp_path / "big", tmp_path / "out"
    folder.mkdir()
    large = np.asarray(Image.fromarray(photo).resize((600, 400)))
    for i in range(40):
        (folder / f"{i:02d}.png").write_bytes(encode(large))
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "stylize", str(folder), str(out), "--style",
         FIRST, "--jobs", "2", "--quiet", "--target", style_server.target],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and any(out.glob("*.png"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(out.glob("*.png")), "no output within 120 s"
    process.send_signal(stop)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr.decode()
    written = _tree(out)  # no hidden partial files among them
    assert f"of 40 images into {out}; stopped early: --skip-existing resumes" in stdout.decode()
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


@needs_styles
def test_a_run_of_timeouts_goes_on_while_the_server_answers_its_health_check(
        style_server: RunningServer, photos: Path, small_photo: np.ndarray, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--timeout too short for every file: the server is fine (it answers its health check
    after each streak), so every file is tried, and each failure reported."""
    for i in range(4):
        (photos / f"more-{i}.png").write_bytes(encode(small_photo))
    out = tmp_path / "out"
    code = main(["stylize", str(photos), str(out), "--style", FIRST, "--jobs", "1",
                 "--timeout", "0.0001", "--quiet", "--target", style_server.target])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.count("warning: skipped") == 7  # all of them
    assert captured.err.count("DEADLINE_EXCEEDED") >= 6  # the broken one may be decoded first
    assert (f"note: the last {folder_runs.STREAK} files failed in a row, but the server "
            "answers its health check") in captured.err
    assert captured.out.strip() == f"stylised 0 of 7 images into {out} (7 failed)"
    assert not out.exists()


class ScriptedStyle(style_pb2_grpc.StyleTransferServicer):
    """A StyleTransfer server that answers each Stylize by what its image bytes say:
    ``ok-...`` at once, ``internal-...`` INTERNAL, ``busy-...`` busy (RESOURCE_EXHAUSTED
    with the pushback trailer), ``flaky-...`` UNAVAILABLE twice and then ok."""

    def __init__(self) -> None:
        self.calls: collections.Counter[bytes] = collections.Counter()
        self.lock = threading.Lock()

    def Stylize(self, request: style_pb2.StylizeRequest,
                context: grpc.ServicerContext) -> style_pb2.StylizeResponse:
        with self.lock:
            self.calls[request.image] += 1
            calls = self.calls[request.image]
        kind = request.image.split(b"-")[0]
        if kind == b"internal":
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        if kind == b"busy":
            context.set_trailing_metadata(((RETRY_PUSHBACK_KEY, "20"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy; retry with backoff")
        if kind == b"flaky" and calls <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "max connection age")
        return style_pb2.StylizeResponse(image=b"styled:" + request.image)


@dataclass
class Scripted:
    target: str
    style: ScriptedStyle
    health: health.HealthServicer

    def folder(self, root: Path, *names: str) -> Path:
        root.mkdir()
        for name in names:
            (root / f"{name}.png").write_bytes(name.encode())
        return root


@pytest.fixture()
def scripted() -> Iterator[Scripted]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    style, checks = ScriptedStyle(), health.HealthServicer()
    style_pb2_grpc.add_StyleTransferServicer_to_server(style, server)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield Scripted(f"127.0.0.1:{port}", style, checks)
    server.stop(grace=None)


def test_busy_is_retried_until_the_timeout_and_unavailable_for_a_while(
        scripted: Scripted, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = scripted.folder(tmp_path / "in", "busy-1", "flaky-1", "ok-1")
    out = tmp_path / "out"
    # --timeout bounds the unavailable retries too: 2 s leaves flaky-1's two quarter-second
    # waits room on a loaded machine (0.5 s did not, once, where a call took 0.2 s)
    code = main(["stylize", str(folder), str(out), "--style", "x", "--jobs", "1",
                 "--timeout", "2", "--quiet", "--target", scripted.target])
    captured = capsys.readouterr()
    assert code == 1
    assert scripted.style.calls[b"busy-1"] > 2  # retried, then given up after --timeout
    assert (f"warning: skipped {folder / 'busy-1.png'}: RESOURCE_EXHAUSTED: busy; retry with "
            "backoff (retried for ") in captured.err
    assert scripted.style.calls[b"flaky-1"] == 3  # a restart, say: retried until it answers
    assert (out / "flaky-1.png").read_bytes() == b"styled:flaky-1"
    assert captured.out.strip() == f"stylised 2 of 3 images into {out} (1 failed)"


@pytest.mark.parametrize("serving", [True, False])
def test_a_streak_of_server_errors_stops_the_run_only_if_the_health_check_fails(
        scripted: Scripted, tmp_path: Path, serving: bool,
        capsys: pytest.CaptureFixture[str]) -> None:
    folder = scripted.folder(tmp_path / "in", "internal-1", "internal-2", "internal-3",
                             "internal-4", "ok-5")
    if not serving:
        scripted.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    out = tmp_path / "out"
    code = main(["stylize", str(folder), str(out), "--style", "x", "--jobs", "1", "--quiet",
                 "--target", scripted.target])
    captured = capsys.readouterr()
    assert code == 1
    if serving:  # every file tried; the one that can be done is
        assert sum(scripted.style.calls.values()) == 5
        assert (out / "ok-5.png").read_bytes() == b"styled:ok-5"
        assert captured.out.strip() == f"stylised 1 of 5 images into {out} (4 failed)"
    else:
        assert sum(scripted.style.calls.values()) == folder_runs.STREAK
        assert ("stopped: the last 3 files failed in a row (INTERNAL: internal error; see the "
                "server log), and the server does not answer a health check with SERVING"
                ) in captured.err
        assert captured.out.strip() == (f"stylised 0 of 5 images into {out} (3 failed); "
                                        "stopped early: --skip-existing resumes")
        assert not out.exists()


def test_an_unreachable_server_fails_the_run_at_once(photos: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    target = _unreachable()
    started = time.monotonic()
    assert main(["upscale", str(photos), str(tmp_path / "out"), "--target", target]) == 1
    assert capsys.readouterr().err.strip() == f"UNAVAILABLE: cannot connect to {target}"
    assert time.monotonic() - started < 20  # not after the first file's deadline
    assert not (tmp_path / "out").exists()


def test_a_shared_option_that_would_fail_every_file_is_refused_once(
        photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mask.png").write_bytes(b"not an image")
    cases = [(["--strength", "2"], "--strength must be 0..1, got 2.0"),
             (["--strength", "1.0000001"], "--strength must be 0..1, got 1.0000001"),
             (["--strength", "nan"], "--strength must be 0..1, got nan"),
             (["--mask", str(tmp_path / "mask.png")],
              f"not a decodable mask {tmp_path / 'mask.png'} (PNG, JPEG, WebP, GIF, BMP or TIFF)")]
    for args, message in cases:
        code = main(["stylize", str(photos), str(tmp_path / "o"), "--style", "x", *args,
                     "--target", _unreachable()])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err)
    assert not (tmp_path / "o").exists()


def test_outputs_never_overwrite_inputs_or_clash_with_folders(
        tmp_path: Path, small_photo: np.ndarray, capsys: pytest.CaptureFixture[str]) -> None:
    nested = tmp_path / "anc" / "s"
    (nested / "s").mkdir(parents=True)
    (nested / "a.png").write_bytes(encode(small_photo))
    (nested / "s" / "a.png").write_bytes(encode(small_photo[::-1]))
    clash = tmp_path / "clash"
    (clash / "x.png").mkdir(parents=True)  # a folder named like x.jpg's output
    (clash / "x.png" / "c.png").write_bytes(encode(small_photo))
    (clash / "x.jpg").write_bytes(encode(small_photo, "JPEG"))
    linked = tmp_path / "linked"
    (linked / "in").mkdir(parents=True)
    (linked / "in" / "a.png").write_bytes(encode(small_photo))
    (linked / "out").mkdir()
    (linked / "out" / "a.png").symlink_to(linked / "in" / "a.png")
    into = tmp_path / "into"  # a link to a folder of IN, in OUT
    (into / "in" / "sub").mkdir(parents=True)
    (into / "in" / "sub" / "b.jpg").write_bytes(encode(small_photo, "JPEG"))
    (into / "out").mkdir()
    (into / "out" / "sub").symlink_to(into / "in" / "sub", target_is_directory=True)
    cases = [
        # IN inside OUT: anc/s/s/a.png -> anc/s/a.png, an input
        ([str(nested), str(tmp_path / "anc"), "--recursive"], "over the input"),
        ([str(clash), str(tmp_path / "o"), "--recursive"], "needs as a folder"),
        ([str(linked / "in"), str(linked / "out")], "over the input"),  # through a link
        ([str(into / "in"), str(into / "out"), "--recursive"],
         "which a link in"),
        ([str(nested), str(tmp_path / "out.tif")], "the output must be one too, not"),
        ([str(tmp_path / "missing"), str(tmp_path / "o"), "--jobs", "2"],
         "cannot read input"),
    ]
    for args, message in cases:
        code = main(["upscale", *args, "--target", _unreachable()])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (args, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "out.tif").exists()
    assert (nested / "a.png").read_bytes() == encode(small_photo)
    assert sorted(p.name for p in (into / "in" / "sub").iterdir()) == ["b.jpg"]


@needs_styles
def test_links_to_folders_are_followed_once(style_server: RunningServer, photos: Path,
                                            tmp_path: Path) -> None:
    (photos / "broken.jpg").unlink()
    (photos / "sub" / "loop").symlink_to(photos, target_is_directory=True)
    out = tmp_path / "out"
    assert main(["stylize", str(photos), str(out), "--style", FIRST, "--recursive",
                 "--quiet", "--target", style_server.target]) == 0
    assert _tree(out) == ["a.png", "b.png", "sub", "sub/c.png"]


def test_a_streak_of_outputs_that_cannot_be_written_stops_the_run(
        scripted: Scripted, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Names so long that the temporary file beside each output cannot be made (as a full
    disk would fail every write): the run stops after the streak, without a health check."""
    long = "x" * 240  # + ".png" fits a name; ".<name>.png.XXXXXXXX.partial" does not
    folder = scripted.folder(tmp_path / "in", *(f"ok-{i}{long}" for i in range(5)))
    out = tmp_path / "out"
    code = main(["stylize", str(folder), str(out), "--style", "x", "--jobs", "1", "--quiet",
                 "--target", scripted.target])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.count("warning: skipped") == folder_runs.STREAK
    assert "File name too long" in captured.err
    assert f"stopped: the last {folder_runs.STREAK} outputs could not be written" in captured.err
    assert sum(scripted.style.calls.values()) == 0  # found before any request was sent
    assert not out.exists()


def test_a_pipe_among_the_images_is_left_out(photos: Path) -> None:
    """Reading a named pipe would block the run for ever."""
    import os

    os.mkfifo(photos / "zz-pipe.png")
    (photos / "dangling.png").symlink_to(photos / "nowhere.png")
    files, problems = folder_runs.image_files(photos, recursive=False)
    assert [p.name for p in files] == ["a.png", "b.JPG", "broken.jpg", "dangling.png"]
    assert problems == []  # the dangling link is kept, to be reported as unreadable


def test_streaks_of_different_kinds_are_counted_apart(
        scripted: Scripted, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two server errors and one unwritable output are no streak of either kind."""
    folder = scripted.folder(tmp_path / "in", "internal-1", "internal-2", "ok-3" + "x" * 240,
                             "ok-4")
    scripted.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)  # never asked
    out = tmp_path / "out"
    code = main(["stylize", str(folder), str(out), "--style", "x", "--jobs", "1", "--quiet",
                 "--target", scripted.target])
    captured = capsys.readouterr()
    assert code == 1 and "stopped" not in captured.err
    assert captured.out.strip() == f"stylised 1 of 4 images into {out} (3 failed)"


class HangingHealth(health_pb2_grpc.HealthServicer):
    """A health service that answers its first Check (the CLI's probe) and hangs on the
    next until the client gives up on it, noting how many seconds of its deadline were left
    then."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered, self.ended = threading.Event(), threading.Event()
        self.left: list[float] = []

    def Check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        self.calls += 1
        if self.calls > 1:
            def gone() -> None:
                self.left.append(context.time_remaining() or 0.0)
                self.ended.set()
            context.add_callback(gone)
            self.entered.set()
            self.ended.wait(60)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def test_ctrl_c_during_a_streaks_health_check_cancels_it(tmp_path: Path) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    checks = HangingHealth()
    style_pb2_grpc.add_StyleTransferServicer_to_server(ScriptedStyle(), server)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        folder = Scripted("", ScriptedStyle(), health.HealthServicer()).folder(
            tmp_path / "in", "internal-1", "internal-2", "internal-3", "ok-4")
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "stylize", str(folder), str(tmp_path / "out"),
             "--style", "x", "--jobs", "1", "--quiet", "--target", f"127.0.0.1:{port}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert checks.entered.wait(60), "no health check after the streak"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr.decode()
        assert checks.ended.wait(10)
        # cancelled by the stop, well before its 5 s deadline
        assert checks.left[-1] > folder_runs.HEALTH_TIMEOUT_SECONDS - 3, checks.left
        assert "stylised 0 of 4 images" in stdout.decode()
    finally:
        checks.ended.set()
        server.stop(grace=None)
