"""`percept` against real servers: finding one without --target, the ids `percept index`
gave looked up from relative paths, notes when nothing is found, the progress bar of an
optimisation, and `styles --json`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.cli import main
from services.common.server import RunningServer, start_in_thread
from tests.conftest import encode, free_port, server_config


@pytest.fixture()
def cat_png(tmp_path: Path, small_photo: np.ndarray) -> Path:
    path = tmp_path / "cat.png"
    path.write_bytes(encode(small_photo))
    return path


@pytest.fixture()
def no_target(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """No --target and no $PERCEPT_TARGET: the ports of a server on this machine (serve
    all's, and the local cluster's per service), each free (nothing listens) until a test
    points one at a server."""
    from services.common import config

    monkeypatch.delenv("PERCEPT_TARGET", raising=False)
    for name in config.SERVICE_PORTS:
        monkeypatch.setitem(config.SERVICE_PORTS, name, free_port())
    yield config.SERVICE_PORTS


@pytest.mark.parametrize("where", ["serve all", "local cluster"])
def test_client_commands_without_a_target_find_serve_all_or_the_local_cluster(
        all_server: RunningServer, no_target: dict[str, int], cat_png: Path, where: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """After `percept serve all` (one port) or `make run` (a port per service), a bare
    command finds the server, as `percept health` does."""
    for service in ("all",) if where == "serve all" else ("style", "embed"):
        no_target[service] = all_server.port
    started = time.monotonic()
    assert main(["styles", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["styles"]
    assert main(["label", str(cat_png), "--top", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["labels"]) == 1
    assert time.monotonic() - started < 30  # labelling on a shared CPU; finding: ms


def test_with_no_server_a_client_command_says_where_it_looked_and_what_to_start(
        no_target: dict[str, int], cat_png: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    for argv, service in [(["styles"], "style"), (["search", "a cat"], "search"),
                          (["upscale", str(cat_png), str(tmp_path / "o.png")], "superres")]:
        started = time.monotonic()
        assert main(argv) == 1
        assert time.monotonic() - started < 5  # refused connections: no wait
        assert capsys.readouterr().err == (
            f"UNAVAILABLE: nothing answers at localhost:{no_target['all']} (percept serve "
            f"all) or localhost:{no_target[service]} (the local cluster's {service} "
            "service): start a server with `make run` (the local cluster) or `percept serve "
            "all`, or give --target HOST:PORT (or $PERCEPT_TARGET)\n")
    assert not (tmp_path / "o.png").exists()


def test_images_finds_what_index_added_by_the_relative_paths_it_was_given(
        all_server: RunningServer, tmp_path: Path, small_photo: np.ndarray,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`percept index imgs` stores absolute paths: `images imgs/a.png` and `--prefix imgs`
    look up those (and a folder's prefix is its images, not imgs2's); an id that is no
    local path is looked up as it is."""
    target = ["--target", all_server.target]
    for folder in ("imgs", "imgs2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(encode(small_photo))
    (tmp_path / "imgs" / "b.png").write_bytes(encode(small_photo[::-1]))
    monkeypatch.chdir(tmp_path)
    assert main(["index", "imgs", "imgs2", "--quiet", *target]) == 0
    capsys.readouterr()
    assert main(["images", "imgs/a.png", "./imgs/../imgs/b.png", "imgs/nope.png", "no-such-id",
                 "--json", *target]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert [image["id"] for image in answer["images"]] == [str(tmp_path / "imgs" / "a.png"),
                                                           str(tmp_path / "imgs" / "b.png")]
    assert answer["missing"] == ["imgs/nope.png", "no-such-id"]  # as given
    assert main(["images", "imgs/a.png", *target]) == 0
    assert capsys.readouterr().out.split("  ")[1].strip() == str(tmp_path / "imgs" / "a.png")
    for prefix in ("imgs", "imgs/", str(tmp_path / "imgs")):
        assert main(["images", "--prefix", prefix, *target]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split("  ")[1] for line in lines] == [str(tmp_path / "imgs" / "a.png"),
                                                           str(tmp_path / "imgs" / "b.png")]


def test_index_skips_an_empty_file(all_server: RunningServer, tmp_path: Path,
                                   small_photo: np.ndarray,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "with-empty"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(small_photo))
    (folder / "empty.png").write_bytes(b"")
    assert main(["index", str(folder), "--quiet", "--target", all_server.target]) == 1
    captured = capsys.readouterr()
    assert "indexed 1 of 2 images; skipped 1" in captured.out
    assert f"warning: skipped {folder / 'empty.png'}: an empty file" in captured.err


@pytest.fixture(scope="module")
def empty_search_server(all_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
                        ) -> Iterator[RunningServer]:
    """A search service with nothing indexed, embedding with the all_server's model."""
    running = start_in_thread(server_config(
        "search", data_dir=tmp_path_factory.mktemp("empty-index"),
        embed_target=all_server.target), timeout=300)
    yield running
    running.stop()


def test_search_and_images_say_when_the_index_is_empty(
        empty_search_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", empty_search_server.target]
    assert main(["images", *target]) == 0
    assert capsys.readouterr().err == "no images in the index\n"
    assert main(["images", "--prefix", "/nowhere/", "--json", *target]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"images": [], "missing": []}
    assert captured.err == "no indexed id starts with /nowhere/\n"
    assert main(["search", "a cat", *target]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "no images in the index (`percept index PATH...` adds them)\n"
    assert main(["search", "a cat", "--json", "--min-score", "0.5", *target]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"hits": []}  # the documented shape, unchanged
    assert captured.err.startswith("no images in the index")


def test_label_says_when_under_and_zero_shot_leave_no_labels(
        all_server: RunningServer, cat_png: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Tabby cat (n02123045) is an ImageNet class with no hyponyms: --zero-shot leaves
    nothing under it."""
    argv = ["label", str(cat_png), "--under", "n02123045", "--target", all_server.target]
    assert main(argv) == 0
    assert capsys.readouterr().out.split()[1] == "n02123045"
    assert main([*argv, "--zero-shot"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("no labels under n02123045 once the ImageNet classes are left "
                            "out (--zero-shot)\n")
    assert main([*argv, "--zero-shot", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"labels": []}
    assert captured.err.startswith("no labels under n02123045")


def test_an_optimisation_shows_its_progress_bar_only_once_it_runs(
        all_server: RunningServer, cat_png: Path, style_photo: np.ndarray, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A refused request prints its status alone, not an empty "0%| | 0/300" bar first."""
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    target = ["--target", all_server.target]
    assert main(["stylize", str(junk), str(tmp_path / "o.png"), "--style-image",
                 str(cat_png), *target]) == 1
    assert capsys.readouterr().err.startswith("INVALID_ARGUMENT: not a decodable content")
    style = tmp_path / "style.png"
    style.write_bytes(encode(style_photo))
    assert main(["stylize", str(cat_png), str(tmp_path / "o.png"), "--style-image",
                 str(style), "--iterations", "10", "--max-size", "32", *target]) == 0
    assert "stylize: 100%" in capsys.readouterr().err


def test_styles_json_gives_versions_as_numbers(all_server: RunningServer,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """As `percept info --json` gives model versions."""
    assert main(["styles", "--json", "--target", all_server.target]) == 0
    styles = json.loads(capsys.readouterr().out)["styles"]
    assert styles and all(isinstance(style["version"], int) for style in styles)


def test_delete_takes_out_what_index_added_by_path_or_by_folder_once_confirmed(
        all_server: RunningServer, tmp_path: Path, small_photo: np.ndarray,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    target = ["--target", all_server.target]
    for folder, name in (("del", "a.png"), ("del", "b.png"), ("del", "c.png"),
                         ("del2", "a.png")):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_bytes(encode(small_photo[:, ::-1] if name == "b.png"
                                                      else small_photo))
    monkeypatch.chdir(tmp_path)
    assert main(["index", "del", "del2", "--quiet", *target]) == 0
    capsys.readouterr()
    # a relative path finds the absolute id; an id indexed nowhere makes it exit 1
    assert main(["delete", "del/a.png", "del/nope.png", *target]) == 1
    said = capsys.readouterr()
    assert said.out == "deleted 1 image\n" and said.err == "not indexed: del/nope.png\n"
    assert main(["images", str(tmp_path / "del" / "a.png"), *target]) == 1
    capsys.readouterr()
    # a folder's prefix: counted, refused without --yes, and del2 is not under del/
    assert main(["delete", "--prefix", "del", *target]) == 2
    assert "this would delete 2 images (" in capsys.readouterr().err
    assert main(["delete", "--prefix", "del", "--yes", *target]) == 0
    assert capsys.readouterr().out == "deleted 2 images\n"
    assert main(["images", "--prefix", "del", *target]) == 0
    assert capsys.readouterr().out == ""
    assert main(["images", "del2/a.png", *target]) == 0
    assert main(["delete", *target]) == 2  # neither ids nor --prefix


def test_delete_finds_files_and_folders_removed_since_they_were_indexed(
        all_server: RunningServer, tmp_path: Path, small_photo: np.ndarray,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """One deletes from the index what is gone from the disk: a removed file's relative
    path still finds its absolute id, and a removed folder's prefix must end with / so
    that `old` never takes `old-backup` with it."""
    import shutil

    target = ["--target", all_server.target]
    for folder in ("old", "old-backup"):
        (tmp_path / folder).mkdir()
        for name in ("a.png", "b.png"):
            (tmp_path / folder / name).write_bytes(encode(small_photo))
    monkeypatch.chdir(tmp_path)
    assert main(["index", "old", "old-backup", "--quiet", *target]) == 0
    (tmp_path / "old" / "a.png").unlink()
    capsys.readouterr()
    assert main(["delete", "old/a.png", *target]) == 0
    assert capsys.readouterr().out == "deleted 1 image\n"
    shutil.rmtree(tmp_path / "old")
    assert main(["delete", "--prefix", "./old", "--yes", *target]) == 2
    assert "end it with / (./old/)" in capsys.readouterr().err
    assert main(["delete", "--prefix", "old", "--yes", *target]) == 1  # a plain id prefix
    assert capsys.readouterr().err == "no indexed id starts with old\n"
    assert main(["delete", "--prefix", "old/", "--yes", *target]) == 0
    assert capsys.readouterr().out == "deleted 1 image\n"
    assert main(["images", "--prefix", "old-backup", *target]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # untouched


def test_search_sheet_pictures_the_hits_that_are_files_here(
        all_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    target = ["--target", all_server.target]
    folder = tmp_path / "sheet"
    folder.mkdir()
    # a pattern of its own (the session's shared index holds other tests' photos): b is
    # a's near twin, so it is among a's first hits
    rng = np.random.default_rng(11)
    pattern = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    for name, image in (("a.png", pattern), ("b.png", np.clip(pattern.astype(int) + 6, 0,
                                                               255).astype(np.uint8))):
        (folder / name).write_bytes(encode(image))
    assert main(["index", str(folder), "--quiet", *target]) == 0
    (folder / "b.png").unlink()  # indexed, but gone from here
    capsys.readouterr()
    out = tmp_path / "hits.jpg"
    assert main(["search", "--image", str(folder / "a.png"), "--top", "3",
                 "--sheet", str(out), *target]) == 0
    said = capsys.readouterr()
    assert f"not on the sheet (no image file here): {folder / 'b.png'}" in said.err
    assert f"sheet: {out} (" in said.err and "hits pictured)" in said.err
    with Image.open(out) as sheet:
        assert sheet.format == "JPEG" and sheet.height >= 192
    assert main(["search", "x", "--sheet", str(tmp_path / "hits.gif"), *target]) == 2
    assert "cannot tell the --sheet format" in capsys.readouterr().err
    # an output that cannot be written is refused before anything is searched
    (tmp_path / "a-file").write_text("x")
    assert main(["search", "x", "--sheet", str(tmp_path / "a-file" / "hits.png"),
                 "--target", "127.0.0.1:1"]) == 2  # no server there: never asked
    assert "is a file, not a folder" in capsys.readouterr().err


def test_a_command_sent_while_the_server_loads_waits_for_it(
        cat_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`percept upscale` and `percept styles` sent to a server still loading its models
    (as right after `make run` or a pod's start) are answered UNAVAILABLE / SERVER_LOADING,
    and ask again until the models are there, instead of failing; once the server is gone,
    the same command fails at once (no server: nothing to wait for)."""
    import asyncio
    import threading

    from services.common.server import build_modules
    from services.retries import UNAVAILABLE_PATIENCE_SECONDS

    config = server_config("superres", port=free_port())
    modules = build_modules(config) + build_modules(server_config("style"))
    loading, gate = threading.Event(), threading.Event()
    load = modules[0].load

    async def gated_load() -> None:
        loading.set()
        await asyncio.to_thread(gate.wait, 120)
        await load()

    modules[0].load = gated_load  # type: ignore[method-assign]
    running: list[RunningServer] = []
    starter = threading.Thread(target=lambda: running.append(start_in_thread(config, modules)))
    starter.start()
    target = f"127.0.0.1:{config.port}"
    out = tmp_path / "up.png"
    exit_codes: list[int] = []
    try:
        assert loading.wait(60)
        commands = [threading.Thread(target=lambda argv=argv: exit_codes.append(main(
            [*argv, "--target", target]))) for argv in (["upscale", str(cat_png), str(out)],
                                                         ["styles", "--json"])]
        for command in commands:
            command.start()
        asked = time.monotonic()
        while not _refused_loading(target) and time.monotonic() - asked < 30:
            time.sleep(0.05)
        time.sleep(1.0)  # the commands have met SERVER_LOADING by now, at least once
        assert all(command.is_alive() for command in commands) and not out.exists()
        gate.set()
        for command in commands:
            command.join(120)
        printed = capsys.readouterr()
        assert exit_codes == [0, 0] and out.stat().st_size > 0, printed.err
        assert "starry-night" in printed.out
    finally:
        gate.set()
        starter.join(120)
        for server in running:
            server.stop()
    started = time.monotonic()
    assert main(["upscale", str(cat_png), str(tmp_path / "again.png"), "--target", target]) == 1
    assert time.monotonic() - started < UNAVAILABLE_PATIENCE_SECONDS / 2
    assert "UNAVAILABLE" in capsys.readouterr().err


def _refused_loading(target: str) -> bool:
    """Whether the server at ``target`` answers a work call UNAVAILABLE / SERVER_LOADING."""
    import grpc

    from services import client
    from services.retries import error_reason

    channel = client.connect(target)
    try:
        client.server_info(channel, timeout=5)
        client.upscale(channel, b"", timeout=5)
    except grpc.RpcError as error:
        return (error.code() == grpc.StatusCode.UNAVAILABLE
                and error_reason(error) == "SERVER_LOADING")
    finally:
        channel.close()
    return False
