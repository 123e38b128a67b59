"""The ImageSearch service over real gRPC with the real embedding model in-process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from percept.v1 import search_pb2, search_pb2_grpc
from services import client
from services.common.server import RunningServer, start_in_thread
from tests.conftest import encode, server_config
from tests.search.conftest import add, add_requests, photo_variants


@pytest.fixture(scope="module")
def search_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("search")
    running = start_in_thread(server_config("search", data_dir=data_dir, max_message_mb=4),
                              timeout=900)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(search_server: RunningServer) -> search_pb2_grpc.ImageSearchStub:
    return search_pb2_grpc.ImageSearchStub(client.connect(search_server.target))


def count(stub: search_pb2_grpc.ImageSearchStub) -> int:
    return stub.Stats(search_pb2.StatsRequest(), timeout=30).count


def test_words_find_the_right_photos(stub: search_pb2_grpc.ImageSearchStub,
                                     photo: np.ndarray, style_photo: np.ndarray) -> None:
    from skimage import data

    photos = {"cat": photo, "coffee": np.asarray(data.coffee()),
              "astronaut": np.asarray(data.astronaut()), "rocket": np.asarray(data.rocket())}
    added, rejected = add(stub, [search_pb2.AddImageRequest(id=f"words-{n}", uri=f"{n}.png",
                                                             image=encode(p))
                                 for n, p in photos.items()])
    assert sorted(added) == sorted(f"words-{n}" for n in photos) and not rejected
    for query, expected in [("a cat", "words-cat"), ("a cup of coffee", "words-coffee"),
                            ("a rocket launch", "words-rocket")]:
        hits = stub.SearchByText(search_pb2.SearchByTextRequest(text=query, k=3), timeout=60).hits
        assert hits[0].id == expected, (query, [(h.id, h.score) for h in hits])
        assert hits[0].uri.endswith(".png") and -1 <= hits[0].score <= 1
    by_image = stub.SearchByImage(search_pb2.SearchByImageRequest(image=encode(photo), k=1),
                                  timeout=60)
    assert by_image.hits[0].id == "words-cat" and by_image.hits[0].score > 0.99


def test_a_bad_image_in_a_stream_is_rejected_and_the_rest_added(
        stub: search_pb2_grpc.ImageSearchStub, variants: list[bytes]) -> None:
    requests = add_requests(variants[:5], prefix="mixed")
    requests.insert(2, search_pb2.AddImageRequest(id="mixed-bad", uri="x", image=b"junk"))
    requests.insert(4, search_pb2.AddImageRequest(id="", uri="y", image=variants[0]))
    added, rejected = add(stub, requests)
    assert sorted(added) == sorted(f"mixed-{i}" for i in range(5))
    reasons = {r.id: (r.code, r.reason) for r in rejected}
    assert reasons["mixed-bad"] == ("INVALID_ARGUMENT", "not a decodable image (PNG, JPEG, "
                                                     "WebP, GIF, BMP or TIFF)")
    assert reasons[""] == ("INVALID_ARGUMENT", "id is empty")


def test_an_id_sent_twice_is_answered_for_each_copy_and_the_last_added_is_stored(
        stub: search_pb2_grpc.ImageSearchStub, variants: list[bytes]) -> None:
    image, other = variants[46], variants[47]  # used by no other test
    added, rejected = add(stub, [
        search_pb2.AddImageRequest(id="twice", uri="good", image=image),
        search_pb2.AddImageRequest(id="twice", uri="broken", image=b"junk"),
        search_pb2.AddImageRequest(id="twice-ok", uri="first", image=other),
        search_pb2.AddImageRequest(id="twice-ok", uri="second", image=other)])
    assert sorted(added) == ["twice", "twice-ok"]
    assert [(r.id, r.code) for r in rejected] == [("twice", "INVALID_ARGUMENT")]
    for query, image_id, uri in ((image, "twice", "good"), (other, "twice-ok", "second")):
        hits = stub.SearchByImage(search_pb2.SearchByImageRequest(image=query, k=1000),
                                  timeout=60).hits
        assert [h.uri for h in hits if h.id == image_id] == [uri]


def test_min_score_keeps_only_the_hits_at_or_above_it(
        stub: search_pb2_grpc.ImageSearchStub) -> None:
    """The same image as a query scores 1 against itself; a floor of 0.999 keeps it and
    drops the rest, and an unknown word's faint nearest images fall under a real floor."""
    image, other = photo_variants(2, seed=99)  # crops no other test adds
    add(stub, [search_pb2.AddImageRequest(id="floor", uri="floor", image=image),
               search_pb2.AddImageRequest(id="floor-other", uri="floor-other", image=other)])
    every = stub.SearchByImage(search_pb2.SearchByImageRequest(image=image, k=20),
                               timeout=60).hits
    assert len(every) > 1 and every[0].id == "floor"
    floored = stub.SearchByImage(search_pb2.SearchByImageRequest(
        image=image, k=20, min_score=0.999), timeout=60).hits
    assert [hit.id for hit in floored] == ["floor"]
    unknown = stub.SearchByText(search_pb2.SearchByTextRequest(
        text="xqzvbnmrt", k=20, min_score=0.5), timeout=60).hits
    assert list(unknown) == []


def test_replace_and_delete(stub: search_pb2_grpc.ImageSearchStub, variants: list[bytes]) -> None:
    before = count(stub)
    first, second = variants[44], variants[45]  # used by no other test
    add(stub, [search_pb2.AddImageRequest(id="swap", uri="first", image=first)])
    add(stub, [search_pb2.AddImageRequest(id="swap", uri="second", image=second)])
    assert count(stub) == before + 1
    hit = stub.SearchByImage(search_pb2.SearchByImageRequest(image=second, k=1),
                             timeout=60).hits[0]
    assert (hit.id, hit.uri) == ("swap", "second")
    response = stub.DeleteImages(search_pb2.DeleteImagesRequest(  # an id named twice: once
        ids=["swap", "never-added", "swap", "never-added"]), timeout=30)
    assert response.deleted == 1 and list(response.missing) == ["never-added"]
    assert count(stub) == before
    hits = stub.SearchByImage(search_pb2.SearchByImageRequest(image=second, k=50),
                              timeout=60).hits
    assert "swap" not in {h.id for h in hits}


def test_concurrent_adds_and_searches(stub: search_pb2_grpc.ImageSearchStub,
                                      variants: list[bytes]) -> None:
    before = count(stub)
    errors: list[BaseException] = []
    searches = []
    adding = threading.Event()

    def searcher() -> None:
        while adding.is_set():
            try:
                searches.append(stub.SearchByText(search_pb2.SearchByTextRequest(text="a cat"),
                                                  timeout=60))
            except BaseException as error:
                errors.append(error)
                return

    adding.set()
    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        added, _ = add(stub, add_requests(variants[:32], prefix="conc"))
    finally:
        adding.clear()
        for thread in threads:
            thread.join(60)
    assert not errors
    assert len(added) == 32 and count(stub) == before + 32
    assert len(searches) > 0
    # every answer given while the index changed is a sound one: at most k (10) hits, each
    # once, best first, each a stored image with the uri it was added with (nothing is
    # deleted meanwhile)
    found: dict[str, str] = {}
    for response in searches:
        ids, scores = [h.id for h in response.hits], [h.score for h in response.hits]
        assert len(ids) <= 10 and len(set(ids)) == len(ids), ids
        assert scores == sorted(scores, reverse=True) and all(-1 <= x <= 1 for x in scores)
        found.update((h.id, h.uri) for h in response.hits)
    assert found
    stored = stub.GetImages(search_pb2.GetImagesRequest(ids=list(found)), timeout=30)
    assert not stored.missing and {e.id: e.uri for e in stored.images} == found
    # and what was added meanwhile is searchable: each image finds itself
    for i in (0, 13, 31):
        hits = stub.SearchByImage(search_pb2.SearchByImageRequest(image=variants[i], k=5),
                                  timeout=60).hits
        mine = [h for h in hits if h.id == f"conc-{i}"]
        assert mine and mine[0].score > 0.99 and mine[0].uri == f"file:///conc/{i}.png", \
            [(h.id, h.score) for h in hits]


@pytest.mark.parametrize("call, code, message", [
    (lambda s: s.SearchByText(search_pb2.SearchByTextRequest(text="  "), timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "text is empty"),
    (lambda s: s.SearchByText(search_pb2.SearchByTextRequest(text="\u200b"), timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "text is empty (nothing but spaces or invisible"),
    # the length first: whether a text shows anything is read character by character
    (lambda s: s.SearchByText(search_pb2.SearchByTextRequest(text="\u200b" * 5000),
                              timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "text has 5000 characters, over the limit of 1000"),
    (lambda s: s.SearchByText(search_pb2.SearchByTextRequest(text="x", k=5000), timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "k must be 1..1000"),
    (lambda s: s.SearchByText(search_pb2.SearchByTextRequest(text="x1 " * 300), timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "text is 602 word pieces long, over the text encoder's "
                                       "window of 256"),
    (lambda s: s.SearchByImage(search_pb2.SearchByImageRequest(image=b"junk"), timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "not a decodable image"),
    (lambda s: s.SearchByText(search_pb2.SearchByTextRequest(text="x", min_score=1.5),
                              timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "min_score must be -1..1 (a cosine), got 1.5"),
    (lambda s: s.SearchByImage(search_pb2.SearchByImageRequest(image=b"junk",
                                                               min_score=float("nan")),
                               timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "min_score must be -1..1"),
    (lambda s: s.DeleteImages(search_pb2.DeleteImagesRequest(ids=["x"] * 10_001), timeout=30),
     grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 10000"),
    (lambda s: list(s.AddImages(iter([search_pb2.AddImageRequest(
        id="big", image=b"\0" * (5 * 1024 * 1024))]), timeout=30)),
     grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
])
def test_bad_inputs(stub: search_pb2_grpc.ImageSearchStub, search_server: RunningServer,
                    call: object, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call(stub)  # type: ignore[operator]
    assert error.value.code() == code and message in (error.value.details() or "")
    assert client.health_status(client.connect(search_server.target),
                                "percept.v1.ImageSearch") == "SERVING"


def test_stats(stub: search_pb2_grpc.ImageSearchStub, search_server: RunningServer,
               variants: list[bytes]) -> None:
    # its own image: under pytest-xdist this test may run on a worker where no other test
    # of this module added any
    added, _ = add(stub, [search_pb2.AddImageRequest(id="stats", uri="s", image=variants[46])])
    assert added == ["stats"]
    stats = stub.Stats(search_pb2.StatsRequest(), timeout=30)
    assert stats.dimension == 384 and stats.index_type == "flat"
    assert stats.count > 0 and stats.disk_bytes > 0
    data_dir = Path(search_server.server.config.data_dir)
    assert (data_dir / "images.sqlite3").is_file()


def _search_module(server: RunningServer):  # type: ignore[no-untyped-def]
    return next(m for m in server.server.modules if m.name == "search")


def test_a_stream_that_pauses_has_what_it_sent_acknowledged(
        stub: search_pb2_grpc.ImageSearchStub, search_server: RunningServer) -> None:
    """A producer that stops sending without ending its stream (a slow crawler, one that
    never half-closes) still gets its items stored and acknowledged: a batch is embedded
    after ADD_IDLE_SECONDS without a new item, and the stream holds no image bytes."""
    images = photo_variants(3, seed=11)
    hold, ended = threading.Event(), threading.Event()

    def items() -> Iterator[search_pb2.AddImageRequest]:
        yield from add_requests(images, prefix="paused")
        hold.wait(120)
        ended.set()

    call = stub.AddImages(items(), timeout=180)
    try:
        ack = next(call)
        assert not ended.is_set()  # it came while the stream stayed open
        assert sorted(ack.added) == [f"paused-{i}" for i in range(3)] and not ack.rejected
        assert _search_module(search_server).buffered_bytes == 0
    finally:
        hold.set()
    assert list(call) == []  # the stream then ends with nothing left to acknowledge


def test_a_batch_is_embedded_once_its_images_reach_the_byte_bound(
        stub: search_pb2_grpc.ImageSearchStub, search_server: RunningServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Large images: a batch is embedded once its images take ADD_BATCH_BYTES, before it
    has ADD_BATCH items, so a stream of 60 MB images holds one or two, not sixteen."""
    from services.search import service

    monkeypatch.setattr(service, "ADD_BATCH_BYTES", 1)  # every image fills a batch
    acks = list(stub.AddImages(iter(add_requests(photo_variants(3, seed=12), prefix="bytes")),
                               timeout=180))
    assert [list(ack.added) for ack in acks] == [["bytes-0"], ["bytes-1"], ["bytes-2"]]
    assert _search_module(search_server).buffered_bytes == 0


def test_a_cancelled_stream_gives_back_the_bytes_it_held(
        stub: search_pb2_grpc.ImageSearchStub, search_server: RunningServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from services.search import service

    monkeypatch.setattr(service, "ADD_IDLE_SECONDS", 600.0)  # the batch waits for more
    images = photo_variants(2, seed=13)
    module = _search_module(search_server)
    hold = threading.Event()

    def items() -> Iterator[search_pb2.AddImageRequest]:
        yield from add_requests(images, prefix="held")
        hold.wait(120)

    call = stub.AddImages(items(), timeout=180)
    try:
        for _ in range(1000):
            if module.buffered_bytes == sum(map(len, images)):
                break
            time.sleep(0.01)
        assert module.buffered_bytes == sum(map(len, images))
    finally:
        call.cancel()
        hold.set()
    for _ in range(1000):
        if module.buffered_bytes == 0:
            break
        time.sleep(0.01)
    assert module.buffered_bytes == 0
    assert {h.id for h in stub.SearchByImage(search_pb2.SearchByImageRequest(
        image=images[0], k=5), timeout=60).hits}.isdisjoint({"held-0", "held-1"})


def test_the_indexed_images_can_be_listed_a_page_at_a_time_and_looked_up(
        stub: search_pb2_grpc.ImageSearchStub) -> None:
    import time

    images = photo_variants(5, seed=14)
    added, _ = add(stub, add_requests(images, prefix="listed"))
    assert len(added) == 5
    pages, token = [], ""
    while True:
        page = stub.ListImages(search_pb2.ListImagesRequest(page_size=2, page_token=token,
                                                            prefix="listed-"), timeout=30)
        pages.append([entry.id for entry in page.images])
        token = page.next_page_token
        if not token:
            break
    assert pages == [["listed-0", "listed-1"], ["listed-2", "listed-3"], ["listed-4"]]
    everything = stub.ListImages(search_pb2.ListImagesRequest(page_size=1000), timeout=30)
    ids = [entry.id for entry in everything.images]
    assert ids == sorted(ids) and set(added) <= set(ids) and not everything.next_page_token
    assert len(ids) == count(stub)

    found = stub.GetImages(search_pb2.GetImagesRequest(
        ids=["listed-3", "never-added", "listed-0", "listed-3"]), timeout=30)
    assert [entry.id for entry in found.images] == ["listed-3", "listed-0"]
    assert list(found.missing) == ["never-added"]
    assert found.images[0].uri == "file:///listed/3.png"
    assert 0 <= time.time() - found.images[0].added.ToSeconds() < 600


@pytest.mark.parametrize("request_fields, message", [
    ({"page_size": 1001}, "page_size must be 0..1000, got 1001"),
    ({"page_size": -1}, "page_size must be 0..1000, got -1"),
    ({"page_token": "not-a-token"}, "is not one this service made"),
    ({"page_token": "YWZ0ZXI"}, "is not one this service made"),  # cut short
    ({"prefix": "p" * 257}, "prefix has 257 characters, over 256"),
])
def test_bad_list_requests(stub: search_pb2_grpc.ImageSearchStub,
                           request_fields: dict[str, object], message: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ListImages(search_pb2.ListImagesRequest(**request_fields), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


@pytest.mark.parametrize("ids, message", [
    ([], "ids is empty: send 1 to 10000"), (["x"] * 10_001, "10001 ids is over the limit")])
def test_bad_get_requests(stub: search_pb2_grpc.ImageSearchStub, ids: list[str],
                          message: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.GetImages(search_pb2.GetImagesRequest(ids=ids), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_long_uris_cannot_make_a_reply_too_large_to_send(
        stub: search_pb2_grpc.ImageSearchStub, search_server: RunningServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A uri over 4096 characters is refused; pages of ListImages end where one more entry
    would be over the message limit (the next page has the rest), and a GetImages or
    search reply over it is RESULT_TOO_LARGE, not gRPC's bare refusal."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from services.search import service

    images = photo_variants(4, seed=15)
    requests = [search_pb2.AddImageRequest(id=f"long-{i}", uri="u" * 4000 + str(i), image=image)
                for i, image in enumerate(images)]
    requests.append(search_pb2.AddImageRequest(id="long-too", uri="u" * 4097, image=images[0]))
    added, rejected = add(stub, requests)
    assert sorted(added) == [f"long-{i}" for i in range(4)]
    assert [(r.id, r.reason) for r in rejected] == [
        ("long-too", "uri has 4097 characters, over 4096")]
    # leave room for about two entries of 4 kB in a reply
    limit = search_server.server.config.max_message_bytes
    monkeypatch.setattr(service, "REPLY_OVERHEAD_BYTES", limit - 9000)
    pages, token = [], ""
    while True:
        page = stub.ListImages(search_pb2.ListImagesRequest(prefix="long-", page_token=token),
                               timeout=30)
        pages.append([entry.id for entry in page.images])
        token = page.next_page_token
        if not token:
            break
    assert pages == [["long-0", "long-1"], ["long-2", "long-3"]]
    with pytest.raises(grpc.RpcError) as error:
        stub.GetImages(search_pb2.GetImagesRequest(ids=[f"long-{i}" for i in range(4)]),
                       timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over this server's message limit" in error.value.details()
    status = rpc_status.from_call(error.value)  # type: ignore[arg-type]
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    assert info.reason == "RESULT_TOO_LARGE"
    with pytest.raises(grpc.RpcError) as error:  # search.proto's SearchByImage says so too
        stub.SearchByImage(search_pb2.SearchByImageRequest(image=images[0], k=1000),
                           timeout=60)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ask for fewer hits (k)" in error.value.details()
    status = rpc_status.from_call(error.value)  # type: ignore[arg-type]
    assert status is not None and status.details[0].Unpack(info)
    assert info.reason == "RESULT_TOO_LARGE"


def test_a_page_token_continues_only_the_listing_it_came_from(
        stub: search_pb2_grpc.ImageSearchStub) -> None:
    add(stub, add_requests(photo_variants(2, seed=16), prefix="token"))
    first = stub.ListImages(search_pb2.ListImagesRequest(prefix="token-", page_size=1),
                            timeout=30)
    assert first.next_page_token
    with pytest.raises(grpc.RpcError) as error:
        stub.ListImages(search_pb2.ListImagesRequest(prefix="other-", page_size=1,
                                                     page_token=first.next_page_token),
                        timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "continues a listing of prefix 'token-', not 'other-'" in error.value.details()


def _token(text: str | bytes) -> str:
    """A page token as this service encodes one, around ``text``."""
    import base64

    return base64.urlsafe_b64encode(text if isinstance(text, bytes) else text.encode()).decode()


@pytest.mark.parametrize("token", [
    _token("after:" + "[" * 100_000),  # nested past json's recursion limit, and huge
    _token("after:" + "[" * 2_000),  # nested past it, within the size bound
    _token('after:["",' + "[" * 2_000 + "]" * 2_000 + "]"),
    _token('after:[5,"a"]'),  # a prefix that is no string
    _token('after:[null,"a"]'),
    _token('after:["",5]'),  # an id that is no string
    _token('after:"ab"'),  # a string, not a pair
    _token('after:["a"]'), _token('after:["", "a", "b"]'), _token('after:{"a": "b"}'),
    _token('after:["", ""]'),  # no id is empty
    _token('after:["", "\\ud800"]'),  # a lone surrogate: no id can hold one
    _token('after:["x", "a"]'),  # a listing of "x" never ends a page on "a"
    _token('after: ["", "a"]'),  # not as this service writes it
    _token('before:["", "a"]'), _token('["", "a"]'), _token("after:"),
    _token(b"after:\xff\xfe"),  # not UTF-8
    _token(np.random.default_rng(0).bytes(64)),  # random bytes
    "not-a-token", "YWZ0ZXI", "@@@@", "YWZ0ZXI6WyIiLCAiYSJd\n", "é",  # not base64 of this
    "A" * 3_000_000,  # huge
])
def test_a_page_token_this_service_did_not_make_is_refused_as_such(
        stub: search_pb2_grpc.ImageSearchStub, search_server: RunningServer,
        token: str) -> None:
    """Whatever a client sends as page_token, a token this service did not make is
    INVALID_ARGUMENT naming page_token, never INTERNAL, and the server serves on."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with pytest.raises(grpc.RpcError) as error:
        stub.ListImages(search_pb2.ListImagesRequest(page_token=token), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert "is not one this service made" in error.value.details()
    assert len(error.value.details()) < 400  # the token is not echoed whole
    status = rpc_status.from_call(error.value)  # type: ignore[arg-type]
    bad = error_details_pb2.BadRequest()
    assert status is not None and any(d.Unpack(bad) for d in status.details)
    assert [v.field for v in bad.field_violations] == ["page_token"]
    stub.ListImages(search_pb2.ListImagesRequest(page_size=1), timeout=30)
    assert client.health_status(client.connect(search_server.target),
                                "percept.v1.ImageSearch") == "SERVING"


def test_page_tokens_of_ids_of_every_kind_continue_their_listing(
        stub: search_pb2_grpc.ImageSearchStub) -> None:
    """Ids of quotes, backslashes, control and astral characters, and of the longest
    length, round-trip through the tokens made after them."""
    image = photo_variants(1, seed=18)[0]
    ids = ["odd-\"q\\", "odd-\x00\x1f", "odd-\U0001f600" * 51, "odd-" + "\U0001f600" * 252,
           "odd-é\u2028"]
    assert sorted(add(stub, [search_pb2.AddImageRequest(id=i, image=image)
                             for i in ids])[0]) == sorted(ids)
    listed, token = [], ""
    while True:
        page = stub.ListImages(search_pb2.ListImagesRequest(page_size=1, page_token=token,
                                                            prefix="odd-"), timeout=30)
        listed += [entry.id for entry in page.images]
        token = page.next_page_token
        if not token:
            break
    assert listed == sorted(ids)


def test_an_image_searched_by_itself_scores_at_most_1_and_passes_a_floor_of_1(
        stub: search_pb2_grpc.ImageSearchStub) -> None:
    """Hit.score is a cosine, -1..1: float32 rounding would make an image stored score
    1.0000001 (or 0.99999994) against itself; it scores 1, so min_score 1 finds exact
    duplicates."""
    images = photo_variants(12, seed=19)
    added, _ = add(stub, add_requests(images, prefix="self"))
    assert len(added) == 12
    for i, image in enumerate(images):
        hits = stub.SearchByImage(search_pb2.SearchByImageRequest(image=image, k=3),
                                  timeout=60).hits
        assert hits[0].id == f"self-{i}" and hits[0].score == 1.0, [(h.id, h.score) for h in hits]
        assert all(-1.0 <= h.score <= 1.0 for h in hits)
        floored = stub.SearchByImage(search_pb2.SearchByImageRequest(
            image=image, k=3, min_score=1.0), timeout=60).hits
        assert [(h.id, h.score) for h in floored] == [(f"self-{i}", 1.0)]


def test_a_busy_server_answers_delete_images_queue_full_with_the_retry_trailer(
        stub: search_pb2_grpc.ImageSearchStub, search_server: RunningServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DeleteImages' RESOURCE_EXHAUSTED is not only DATA_DIR_FULL: at the server's
    concurrency limit it is QUEUE_FULL, with the retry trailer (search.proto says the
    reason tells them apart)."""
    import time

    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from tests.conftest import is_pushback

    work = search_server.server._work
    monkeypatch.setattr(work, "limit", 1)
    hold = threading.Event()

    def nothing_yet() -> Iterator[search_pb2.AddImageRequest]:
        hold.wait(60)
        yield from ()

    held = stub.AddImages(nothing_yet(), timeout=120)  # the one call the limit allows
    try:
        for _ in range(1000):
            if work.in_progress == 1:
                break
            time.sleep(0.01)
        assert work.in_progress == 1
        with pytest.raises(grpc.RpcError) as error:
            stub.DeleteImages(search_pb2.DeleteImagesRequest(ids=["never-added"]), timeout=30)
    finally:
        hold.set()
        assert list(held) == []
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert is_pushback(dict(error.value.trailing_metadata())["grpc-retry-pushback-ms"])
    status = rpc_status.from_call(error.value)  # type: ignore[arg-type]
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    assert info.reason == "QUEUE_FULL"
