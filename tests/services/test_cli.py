"""The `percept` CLI against a real server: outputs, JSON, and error reporting."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from services.cli import main
from services.common.server import RunningServer
from tests.conftest import encode, pixel_budget_full, rejections


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
    assert capsys.readouterr().err.strip() == ("INVALID_ARGUMENT: not a decodable content image "
                                                "(PNG, JPEG, WebP, GIF, BMP or TIFF)")


def test_label_json_has_the_documented_shape(all_server: RunningServer, tmp_path: Path,
                                             photo: np.ndarray,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import json

    path = tmp_path / "cat.jpg"
    path.write_bytes(encode(photo, "JPEG"))
    assert main(["label", str(path), "--top", "3", "--json", "--target", all_server.target]) == 0
    labels = json.loads(capsys.readouterr().out)["labels"]
    assert len(labels) == 3
    for label in labels:
        assert set(label) == {"wnid", "lemmas", "gloss", "score"}
        assert label["wnid"].startswith("n") and len(label["wnid"]) == 9
        assert isinstance(label["lemmas"], list) and isinstance(label["score"], float)


def test_label_gives_different_words_unless_every_sense(
        all_server: RunningServer, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import skimage.data

    path = tmp_path / "astronaut.png"
    path.write_bytes(encode(skimage.data.astronaut()))
    firsts = {}
    for extra in ([], ["--every-sense"]):
        assert main(["label", str(path), "--json", *extra, "--target", all_server.target]) == 0
        labels = json.loads(capsys.readouterr().out)["labels"]
        firsts[bool(extra)] = [label["lemmas"][0].lower() for label in labels]
    assert len(set(firsts[False])) == 5  # bobsled and helmet once each
    assert len(set(firsts[True])) < 5  # every synset: two senses of a word


def test_search_json_has_the_documented_shape(all_server: RunningServer, tmp_path: Path,
                                              photo: np.ndarray,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import json

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.png").write_bytes(encode(photo))
    (folder / "broken.png").write_bytes(b"not an image")
    # the broken file is reported and the exit status says something was left out
    assert main(["index", str(folder), "--quiet", "--target", all_server.target]) == 1
    captured = capsys.readouterr()
    assert "indexed 1 of 2 images; skipped 1" in captured.out
    assert "broken.png" in captured.err and "not a decodable image" in captured.err
    assert main(["search", "a cat", "--top", "1", "--json", "--target", all_server.target]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert set(hits[0]) == {"id", "uri", "score"}


def test_index_names_each_file_once_by_its_absolute_path_and_skips_one_too_large(
        all_server: RunningServer, tmp_path: Path, photo: np.ndarray,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A relative path is indexed with an absolute uri (it must lead to the file from any
    folder); a file named twice is one image; a file over the 64 MiB a message carries is
    skipped with a warning naming it, and the rest are indexed (gRPC would otherwise
    refuse the whole stream)."""
    import json

    folder = tmp_path / "index-me"
    folder.mkdir()
    (folder / "kitten.png").write_bytes(encode(photo))
    with open(folder / "huge.png", "wb") as huge:
        huge.truncate(65 * 2**20)  # sparse: never read
    monkeypatch.chdir(tmp_path)
    argv = ["index", "index-me", "index-me/kitten.png", "--quiet", "--target",
            all_server.target]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "indexed 1 of 2 images; skipped 1" in captured.out
    assert "huge.png: 65.0 MiB, over the 64 MiB a message may carry" in captured.err
    monkeypatch.chdir("/")
    assert main(["search", "--image", str(folder / "kitten.png"), "--top", "10", "--json",
                 "--target", all_server.target]) == 0
    # other tests on this server may have indexed the same pixels under their own paths
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert {"id": str(folder / "kitten.png"), "uri": str(folder / "kitten.png")} in [
        {"id": hit["id"], "uri": hit["uri"]} for hit in hits]


def test_index_of_a_folder_without_images_exits_2(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["index", str(tmp_path), "--target", "127.0.0.1:1"]) == 2
    assert f"error: no images in {tmp_path} (.png" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["label x.png", "search cat"])
@pytest.mark.parametrize("top, message", [("0", "must be at least 1"),
                                          ("99999999999", "99999999999 is too large")])
def test_a_top_that_cannot_be_asked_for_exits_2(command: str, top: str, message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main([*command.split(), "--top", top, "--target", "127.0.0.1:1"])
    assert raised.value.code == 2
    assert f"argument --top: {message}" in capsys.readouterr().err


def _busy_commands(folder: Path, out: Path) -> dict[str, list[str]]:
    return {
        "index": ["index", str(folder)],
        "label": ["label", str(folder / "b.png"), "--json"],
        "search --image": ["search", "--image", str(folder / "b.png"), "--json"],
        "upscale": ["upscale", str(folder / "b.png"), str(out / "b.png")],
        "stylize --style": ["stylize", str(folder / "b.png"), str(out / "s.png"),
                            "--style", "starry-night"],
    }


@pytest.mark.parametrize("command", ["index", "label", "search --image", "upscale",
                                     "stylize --style"])
def test_a_busy_server_is_asked_again_after_its_pushback(
        all_server: RunningServer, tmp_path: Path, photo: np.ndarray, small_photo: np.ndarray,
        capsys: pytest.CaptureFixture[str], command: str) -> None:
    """While the server's pixel budget is full, image requests are answered busy (with the
    retry trailer): the command waits and asks again, rather than failing (`percept index`
    sends again what was not acknowledged)."""
    folder, out = tmp_path / "busy", tmp_path / "out"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(photo))
    (folder / "b.png").write_bytes(encode(small_photo))
    argv = [*_busy_commands(folder, out)[command], "--target", all_server.target]
    if command == "index":
        argv.append("--quiet")
    refused_before = rejections()
    codes: list[int] = []
    run = threading.Thread(target=lambda: codes.append(main(argv)))
    with pixel_budget_full(all_server):
        run.start()
        deadline = time.monotonic() + 60
        while rejections() == refused_before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rejections() > refused_before, "the request was never refused as busy"
    run.join(120)
    captured = capsys.readouterr()
    assert codes == [0], captured.err
    if command == "index":
        assert "indexed 2 of 2 images; skipped 0" in captured.out
        assert main(["search", "--image", str(folder / "b.png"), "--top", "1", "--json",
                     "--target", all_server.target]) == 0
        assert '"uri": "' + str(folder / "b.png") in capsys.readouterr().out


def test_a_server_busy_for_longer_than_the_patience_fails_saying_so(
        all_server: RunningServer, tmp_path: Path, small_photo: np.ndarray,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import services.cli

    monkeypatch.setattr(services.cli, "QUERY_BUSY_PATIENCE_SECONDS", 1.0)
    image = tmp_path / "b.png"
    image.write_bytes(encode(small_photo))
    with pixel_budget_full(all_server):
        code = main(["label", str(image), "--target", all_server.target])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("RESOURCE_EXHAUSTED: the images in progress take"), err
    assert re.search(r"retry with backoff \(retried for \d+ s\)$", err), err


def test_an_index_run_that_stays_busy_still_says_what_it_did(
        all_server: RunningServer, tmp_path: Path, small_photo: np.ndarray,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import services.cli

    monkeypatch.setattr(services.cli, "INDEX_BUSY_PATIENCE_SECONDS", 0.5)
    folder = tmp_path / "stays-busy"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(small_photo))
    with pixel_budget_full(all_server):
        code = main(["index", str(folder), "--quiet", "--target", all_server.target])
    captured = capsys.readouterr()
    assert code == 1
    assert "indexed 0 of 1 images; skipped 0; the run failed" in captured.out
    assert captured.err.strip().startswith("RESOURCE_EXHAUSTED: the images in progress take")
    assert re.search(r"\(retried for \d+ s\)$", captured.err.strip())


@pytest.mark.parametrize("argv, message", [
    ([], "give a TEXT query or --image PATH\n"),
    (["a cat", "--image", "x.png"], "give a TEXT query or --image PATH, not both"),
])
def test_search_needs_one_query(argv: list[str], message: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", *argv]) == 2
    assert message in capsys.readouterr().err


def test_missing_input_file_exits_2(all_server: RunningServer, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["upscale", str(tmp_path / "missing.png"), str(tmp_path / "o.png"),
                 "--target", all_server.target])
    assert code == 2
    assert "cannot read input" in capsys.readouterr().err


def test_upscale_refuses_an_unknown_extension_and_honours_its_timeout(
        all_server: RunningServer, cat_png: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "big.tiff"
    assert main(["upscale", str(cat_png), str(out), "--target", all_server.target]) == 2
    assert "cannot tell the output format from" in capsys.readouterr().err
    assert main(["upscale", str(cat_png), str(tmp_path / "big.png"), "--timeout", "0.0001",
                 "--target", all_server.target]) == 1
    assert capsys.readouterr().err.startswith("DEADLINE_EXCEEDED")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]  # nothing half-written
    assert main(["upscale", str(cat_png), str(tmp_path / "big.webp"),
                 "--target", all_server.target]) == 0
    with Image.open(tmp_path / "big.webp") as image:
        assert image.format == "WEBP"


def test_stylize_needs_exactly_one_style_source(cat_png: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stylize", str(cat_png), str(tmp_path / "o.png")]) == 2
    assert "exactly one of --style" in capsys.readouterr().err


def test_health_command(all_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--target", all_server.target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert main(["health", "--target", all_server.target, "--service",
                 "percept.v1.Embedding"]) == 0
    assert main(["health", "--target", all_server.target, "--service", "percept.v1.Nope"]) == 1
    assert (f"NOT_FOUND: the server at {all_server.target} does not serve 'percept.v1.Nope'"
            in capsys.readouterr().err)


def test_health_without_a_target_checks_serve_all_then_the_local_cluster(
        all_server: RunningServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`make run` starts one process per service (50051..50054), `serve all` one on 50050:
    a bare `percept health` finds whichever runs. Here nothing listens where `all` would,
    and only the superres port answers (the test server, which serves every service)."""
    from services.common import config
    from tests.conftest import free_port

    monkeypatch.delenv("PERCEPT_TARGET", raising=False)
    for name in ("all", "style", "embed", "search"):
        monkeypatch.setitem(config.SERVICE_PORTS, name, free_port())
    monkeypatch.setitem(config.SERVICE_PORTS, "superres", all_server.port)
    assert main(["health", "--service", "percept.v1.SuperResolution"]) == 0
    assert (capsys.readouterr().out.strip()
            == f"percept.v1.SuperResolution at localhost:{all_server.port}: SERVING")
    assert main(["health", "--timeout", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" at ")[0] for line in lines] == list(config.SERVICE_FULL_NAMES)
    assert lines[0].endswith(": SERVING") and "UNAVAILABLE" in lines[1]
    assert main(["health", "--service", "percept.v1.Nope"]) == 2
    assert "is not a service of the local cluster" in capsys.readouterr().err
    monkeypatch.setitem(config.SERVICE_PORTS, "all", all_server.port)  # serve all is up
    assert main(["health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_each_service_module_has_its_full_name_in_the_config() -> None:
    from services.common.config import SERVICE_FULL_NAMES
    from services.common.server import SERVICE_CLASSES

    names = {}
    for short, path in SERVICE_CLASSES.items():
        module, _, cls = path.partition(":")
        names[getattr(__import__(module, fromlist=[cls]), cls).full_name] = short
    assert names == SERVICE_FULL_NAMES


def test_unreachable_server_is_unavailable(tmp_path: Path, cat_png: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import free_port

    code = main(["styles", "--target", f"127.0.0.1:{free_port()}"])
    assert code == 1
    assert capsys.readouterr().err.startswith("UNAVAILABLE: ")


def test_every_argument_of_every_command_has_help() -> None:
    """`percept COMMAND --help` explains each argument: none is listed bare."""
    import argparse

    from services.cli import build_parser

    bare: list[str] = []

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{command} {name}".strip())
            elif not action.help and not isinstance(action, argparse._HelpAction):
                bare.append(f"percept {command} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "")
    assert not bare, f"arguments without help: {bare}"


def test_a_command_sent_to_another_service_says_so(style_server: RunningServer, cat_png: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """gRPC's bare "Method not found!" from a server that hosts another service gets what
    to check: the --target."""
    assert main(["label", str(cat_png), "--target", style_server.target]) == 1
    err = capsys.readouterr().err
    assert err.startswith("UNIMPLEMENTED: Method not found! (the server does not serve this "
                          f"call; is {style_server.target} the embed service's address")


def test_search_min_score(all_server: RunningServer, cat_png: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    """A --min-score no image reaches is a note, not an error; with an empty index the note
    says that instead (this test adds its own image: the shared server's index is empty
    where it runs first)."""
    with pytest.raises(SystemExit) as raised:
        main(["search", "cat", "--min-score", "2", "--target", all_server.target])
    assert raised.value.code == 2
    assert "argument --min-score: must be a cosine, -1..1, got 2" in capsys.readouterr().err
    assert main(["index", str(cat_png), "--target", all_server.target]) == 0
    capsys.readouterr()
    try:
        assert main(["search", "xqzvbnmrt", "--min-score", "0.9", "--target",
                     all_server.target]) == 0
        captured = capsys.readouterr()
        assert captured.out == "" and "no image scores 0.9 or more" in captured.err
    finally:
        cleaned = main(["delete", str(cat_png), "--target", all_server.target])
    assert cleaned == 0


def test_info_command(all_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["info", "--target", all_server.target]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{all_server.target}: percept ") and ", ready" in text
    assert "SuperResolution: superres-perceptual = superres-perceptual@" in text
    assert "(default)" in text and "64 MiB messages, 64,000,000 pixels an image" in text
    assert text.rstrip().endswith("64 calls at once (shared fairly by clients), keepalive "
                                  "pings 10 s apart or more")
    assert main(["info", "--target", all_server.target, "--json"]) == 0
    [server] = json.loads(capsys.readouterr().out)["servers"]
    assert server["target"] == all_server.target and server["ready"] is True
    assert {"service": "percept.v1.StyleTransfer", "name": "starry-night"}.items() <= next(
        m for m in server["models"] if m["name"] == "starry-night").items()
    assert server["limits"]["max_pixels"] == 64_000_000  # a number, not proto JSON's string
    assert server["limits"]["fair_share"] is True
    assert server["limits"]["min_client_ping_ms"] == 10_000
    assert all(isinstance(model["version"], int) for model in server["models"])


def test_info_without_a_server_is_unavailable(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import free_port

    assert main(["info", "--target", f"127.0.0.1:{free_port()}", "--timeout", "2"]) == 1
    assert ": UNAVAILABLE: " in capsys.readouterr().err


def test_images_lists_what_index_added_and_looks_up_ids(
        all_server: RunningServer, tmp_path: Path, photo: np.ndarray, small_photo: np.ndarray,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    folder = tmp_path / "listed"
    folder.mkdir()
    (folder / "one.png").write_bytes(encode(photo))
    (folder / "two.png").write_bytes(encode(small_photo))
    target = ["--target", all_server.target]
    assert main(["index", str(folder), "--quiet", *target]) == 0
    capsys.readouterr()
    assert main(["images", "--prefix", str(folder), *target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[1] for line in lines] == [str(folder / "one.png"),
                                                        str(folder / "two.png")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", lines[0].split("  ")[0])
    assert main(["images", str(folder / "two.png"), str(folder / "nope.png"), "--json",
                 *target]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert [image["id"] for image in answer["images"]] == [str(folder / "two.png")]
    assert answer["missing"] == [str(folder / "nope.png")]
    assert answer["images"][0]["added"].endswith("Z")
    assert main(["images", "x", "--prefix", "y", *target]) == 2



class _Refused(grpc.RpcError):
    """A failure as grpc raises it, whose details hold what a hostile server might send."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return "no such style x\x1b[2J\nOK: done"


def test_what_a_server_says_is_printed_with_control_characters_escaped(
        all_server: RunningServer, cat_png: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A server's message and the model name it answers with are printed with control
    characters escaped: another server (or a message echoing a request) cannot clear the
    screen or forge a line of output."""
    from percept.v1 import superres_pb2
    from services import client

    def refuse(*args: object, **kwargs: object) -> None:
        raise _Refused()

    monkeypatch.setattr(client, "list_styles", refuse)
    assert main(["styles", "--target", all_server.target]) == 1
    err = capsys.readouterr().err
    assert err == "NOT_FOUND: no such style x\\x1b[2J\\nOK: done\n", err
    monkeypatch.setattr(client, "upscale", lambda *a, **k: superres_pb2.UpscaleResponse(
        image=b"png", width=4, height=4, model="m\x1b]0;owned\x07"))
    assert main(["upscale", str(cat_png), str(tmp_path / "o.png"), "--target",
                 all_server.target]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'o.png'}: 4x4 (m\\x1b]0;owned\\x07)\n"
