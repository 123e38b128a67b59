"""`percept images`, `delete`, `search` and `index` with ids a client gave (AddImages takes
any id), against a real server: an id prefix that is no local path deletes what it names,
and ids, uris and file names with control characters are printed escaped (an ESC would
drive the terminal), while --json stays exact."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from percept.v1 import search_pb2
from services import client
from services.cli import main, printable
from services.common.server import RunningServer
from tests.conftest import encode


def _pattern(seed: int) -> bytes:
    """An image of its own: the shared index holds other tests' photos."""
    rng = np.random.default_rng(seed)
    return encode(np.kron(rng.integers(0, 256, (12, 16, 3)),
                          np.ones((8, 8, 1))).astype(np.uint8))


def _add(server: RunningServer, *items: tuple[str, str, bytes]) -> None:
    acks = list(client.add_images(client.connect(server.target), [
        search_pb2.AddImageRequest(id=image_id, uri=uri, image=image)
        for image_id, uri, image in items], timeout=120))
    assert sum(len(ack.added) for ack in acks) == len(items)


@pytest.mark.parametrize("bucket, under, beside", [
    ("s3://bucket-{run}/2026-01", ["/a.png", "/b.png"], "s3://bucket-{run}/2026-02/c.png"),
    ("photo-{run}/che", ["lsea.png", "rry.png"], "photo-{run}/cat.png"),
])
def test_delete_prefix_takes_the_ids_a_client_gave(
        all_server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        bucket: str, under: list[str], beside: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`images --prefix` listed them, and `delete --prefix` refused the same prefix: it
    has a /, so it was taken for a folder gone from here that must end with /."""
    run = uuid.uuid4().hex[:8]
    prefix, beside = bucket.format(run=run), beside.format(run=run)
    ids = [prefix + tail for tail in under]
    _add(all_server, *[(image_id, image_id, _pattern(i)) for i, image_id in enumerate(ids)],
         (beside, beside, _pattern(7)))
    monkeypatch.chdir(tmp_path)  # where no such folder is
    target = ["--target", all_server.target]
    assert main(["images", "--prefix", prefix, *target]) == 0
    assert [line.split("  ")[1] for line in capsys.readouterr().out.splitlines()] == ids
    assert main(["delete", "--prefix", prefix, *target]) == 2  # counted, not confirmed
    assert "this would delete 2 images (" in capsys.readouterr().err
    assert main(["delete", "--prefix", prefix, "--yes", *target]) == 0
    assert capsys.readouterr().out == "deleted 2 images\n"
    assert main(["images", *ids, beside, "--json", *target]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert [image["id"] for image in answer["images"]] == [beside]  # nothing beside it
    assert answer["missing"] == ids
    assert main(["delete", "--prefix", prefix, "--yes", *target]) == 1  # none left
    assert capsys.readouterr().err.startswith(f"no indexed id starts with {prefix} or ")


def test_a_gone_folder_prefix_still_needs_its_slash(
        all_server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The safety rule stands: `gone/sub` names indexed files of a folder removed since
    (and of `gone/sub-backup`), no id starts with the text itself, so it is refused."""
    run = uuid.uuid4().hex[:8]
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / f"gone-{run}"
    _add(all_server, *[(str(folder / name / "a.png"), str(folder / name / "a.png"),
                        _pattern(20 + i)) for i, name in enumerate(["sub", "sub-backup"])])
    target = ["--target", all_server.target]
    assert main(["delete", "--prefix", f"gone-{run}/sub", "--yes", *target]) == 2
    assert f"end it with / (gone-{run}/sub/)" in capsys.readouterr().err
    assert main(["delete", "--prefix", f"gone-{run}/sub/", "--yes", *target]) == 0
    assert capsys.readouterr().out == "deleted 1 image\n"


def test_printable_escapes_what_would_drive_a_terminal() -> None:
    assert printable("\n\r\t\x1b[31mred\x07\x7f\x9b") == "\\n\\r\\t\\x1b[31mred\\x07\\x7f\\x9b"
    assert printable("evil\u202egpj.exe\u2028x\udc80") == "evil\\u202egpj.exe\\u2028x\\udc80"
    assert printable("café 日本 ü/ok.png") == "café 日本 ü/ok.png"  # unchanged


def test_ids_and_uris_with_control_characters_are_printed_escaped(
        all_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = uuid.uuid4().hex[:8]
    image_id = f"ctrl-{run}\n\r\t\x1b[31mred"
    uri = f"x-{run}\x1b]0;title\x07"
    image = _pattern(31)
    _add(all_server, (image_id, uri, image))
    target = ["--target", all_server.target]
    escaped_id = f"ctrl-{run}\\n\\r\\t\\x1b[31mred"
    escaped_uri = f"x-{run}\\x1b]0;title\\x07"

    assert main(["images", "--prefix", f"ctrl-{run}", *target]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"  {escaped_id}  {escaped_uri}\n") and "\x1b" not in out
    assert main(["images", "--prefix", f"ctrl-{run}", "--json", *target]) == 0
    listed = json.loads(capsys.readouterr().out)["images"]
    assert [(i["id"], i["uri"]) for i in listed] == [(image_id, uri)]  # exact

    query = tmp_path / "query.png"
    query.write_bytes(image)
    assert main(["search", "--image", str(query), "--top", "1", *target]) == 0
    out = capsys.readouterr().out
    assert out.endswith(f"  {escaped_uri}\n") and "\x1b" not in out
    assert main(["search", "--image", str(query), "--top", "1", "--json", *target]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["uri"] == uri

    assert main(["delete", "--prefix", f"ctrl-{run}", *target]) == 2
    err = capsys.readouterr().err
    assert escaped_id in err and "\x1b" not in err
    assert main(["delete", image_id, f"{image_id}-nope", *target]) == 1
    said = capsys.readouterr()
    assert said.out == "deleted 1 image\n"
    assert said.err == f"not indexed: {escaped_id}-nope\n"


def test_index_warnings_print_file_names_escaped(
        all_server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    (folder / "bad\x1b[2Jname.png").write_bytes(b"not an image")
    assert main(["index", str(folder), "--quiet", "--target", all_server.target]) == 1
    err = capsys.readouterr().err
    assert "bad\\x1b[2Jname.png" in err and "\x1b" not in err
