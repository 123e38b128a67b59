"""The search service with the Embedding service in another server (``--embed-target``, as
the Kubernetes deployment runs them), over real gRPC: batches of large photos, bad images in
a batch, and an embedding service that is busy decoding."""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from percept.v1 import search_pb2, search_pb2_grpc
from services import client
from services.common.errors import RETRY_PUSHBACK_KEY, ServiceError
from services.common.server import RunningServer, start_in_thread
from services.search.embedder import IMAGE_FRAMING_BYTES, MESSAGE_OVERHEAD_BYTES, RemoteEmbedder
from tests.conftest import pixel_budget_full, server_config
from tests.fixtures.tcp_proxy import TcpProxy
from tests.search.conftest import add, add_requests

MESSAGE_MB = 4
BUDGET_MPIXELS = 25


@pytest.fixture(scope="module")
def embed_server() -> Iterator[RunningServer]:
    """Clients may ping every second (the keepalive test's embedder does)."""
    running = start_in_thread(server_config("embed", max_message_mb=MESSAGE_MB,
                                            max_inflight_mpixels=BUDGET_MPIXELS,
                                            min_client_ping_seconds=1.0), timeout=900)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def search_server(embed_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[RunningServer]:
    running = start_in_thread(server_config(
        "search", data_dir=tmp_path_factory.mktemp("remote"), embed_target=embed_server.target,
        max_message_mb=MESSAGE_MB), timeout=900)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(search_server: RunningServer) -> search_pb2_grpc.ImageSearchStub:
    return search_pb2_grpc.ImageSearchStub(client.connect(search_server.target))


def noisy_pngs(count: int) -> list[bytes]:
    """``count`` distinct 400 x 400 PNGs of noise, 0.46 MiB each (noise does not compress):
    each fits a 4 MiB message, 16 of them do not."""
    rng = np.random.default_rng(5)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (400, 400, 3), np.uint8)).save(
            buffer, "PNG", compress_level=1)
        images.append(buffer.getvalue())
    return images


def test_a_batch_of_photos_larger_than_one_message_is_added(
        stub: search_pb2_grpc.ImageSearchStub) -> None:
    """16 images of 0.46 MiB (one AddImages batch, 7.4 MiB) under a 4 MiB message limit:
    each image fits a message, so the batch must reach the embedding service in parts."""
    images = noisy_pngs(17)
    assert all(len(i) < MESSAGE_MB * 2**20 // 4 for i in images)
    assert sum(len(i) for i in images[:16]) > MESSAGE_MB * 2**20
    added, rejected = add(stub, add_requests(images, prefix="large"))
    assert not rejected and sorted(added) == sorted(f"large-{i}" for i in range(17))
    hit = stub.SearchByImage(search_pb2.SearchByImageRequest(image=images[3], k=1),
                             timeout=60).hits[0]
    assert hit.id == "large-3" and hit.score > 0.99


def test_a_bad_image_inside_a_batch_is_rejected_alone(
        stub: search_pb2_grpc.ImageSearchStub, variants: list[bytes]) -> None:
    """A truncated image (its header reads, its pixels do not) is a rejection of its own;
    the rest of its batch is added."""
    truncated = variants[10][: len(variants[10]) // 2]
    over_cap = io.BytesIO()
    Image.new("RGB", (9000, 8000)).save(over_cap, "PNG", compress_level=1)  # 72 MP > 64 MP
    requests = add_requests(variants[:6], prefix="batch")
    requests.insert(2, search_pb2.AddImageRequest(id="batch-truncated", image=truncated))
    requests.insert(5, search_pb2.AddImageRequest(id="batch-big", image=over_cap.getvalue()))
    added, rejected = add(stub, requests)
    assert sorted(added) == sorted(f"batch-{i}" for i in range(6))
    reasons = {r.id: (r.code, r.reason) for r in rejected}
    assert set(reasons) == {"batch-truncated", "batch-big"}
    assert reasons["batch-truncated"][0] == "INVALID_ARGUMENT"
    assert reasons["batch-truncated"][1].startswith("truncated image:")
    assert reasons["batch-big"] == ("INVALID_ARGUMENT", "image has 9000 x 8000 = 72000000 "
                                                        "pixels, over the cap of 64000000")


def test_search_by_a_bad_image_names_the_problem(stub: search_pb2_grpc.ImageSearchStub,
                                                 variants: list[bytes]) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.SearchByImage(search_pb2.SearchByImageRequest(image=variants[0][:500]), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.value.details() or "").startswith("truncated image:")
    status = rpc_status.from_call(error.value)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert [d.Unpack(bad) for d in status.details].count(True) == 1
    # the field of a SearchByImage request, not of the EmbedImages call search made
    assert [v.field for v in bad.field_violations] == ["image"]


def test_a_text_too_long_for_the_encoder_is_named_as_the_request_field(
        stub: search_pb2_grpc.ImageSearchStub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.SearchByText(search_pb2.SearchByTextRequest(text="x1 " * 300), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "602 word pieces long" in error.value.details()
    status = rpc_status.from_call(error.value)  # type: ignore[arg-type]
    bad = error_details_pb2.BadRequest()
    assert status is not None and any(d.Unpack(bad) for d in status.details)
    assert [v.field for v in bad.field_violations] == ["text"]


def test_a_bad_image_in_a_later_part_is_named_by_its_place_in_the_whole_batch(
        embed_server: RunningServer, variants: list[bytes]) -> None:
    """Images sent to the embedding service in several calls: the field at fault is the
    bad image's index among all of them, as the in-process embedder names it."""
    images = [variants[0], variants[1], variants[2][:len(variants[2]) * 3 // 4]]

    async def embed() -> ServiceError:
        # room for one image a call: three EmbedImages calls, the bad image alone in the last
        embedder = RemoteEmbedder(embed_server.target, max_message_bytes=max(
            len(i) for i in images) + MESSAGE_OVERHEAD_BYTES + IMAGE_FRAMING_BYTES)
        assert [len(part) for part in embedder._parts(images)] == [1, 1, 1], \
            [len(i) for i in images]
        try:
            with pytest.raises(ServiceError) as error:
                await embedder.embed_images(images, timeout=60)
            return error.value
        finally:
            await embedder.close()

    error = asyncio.run(embed())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "IMAGE_TRUNCATED"
    assert error.field == "images[2]"


def test_a_large_query_the_embedding_service_is_too_busy_for_is_refused_as_busy(
        stub: search_pb2_grpc.ImageSearchStub, search_server: RunningServer,
        embed_server: RunningServer, variants: list[bytes]) -> None:
    """The embed server's busy answer (its pixel budget full but for 10 MP, a 20 MP query)
    reaches the search client as RESOURCE_EXHAUSTED with the retry trailer."""
    pixels = np.zeros((4000, 5000, 3), np.uint8)
    pixels[..., 1] = np.arange(5000) % 256
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    large = buffer.getvalue()

    def query() -> tuple[str, str, str | None]:
        try:
            stub.SearchByImage(search_pb2.SearchByImageRequest(image=large, k=1), timeout=120)
            return "OK", "", None
        except grpc.RpcError as error:
            trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
            return error.code().name, error.details() or "", trailers.get(RETRY_PUSHBACK_KEY)

    with pixel_budget_full(embed_server, leave=10_000_000):
        code, details, pushback = query()
    assert code == "RESOURCE_EXHAUSTED", details
    assert "--max-inflight-mpixels" in details and pushback is not None, details
    assert query()[0] == "OK"
    stub.SearchByImage(search_pb2.SearchByImageRequest(image=variants[0], k=1), timeout=60)
    assert client.health_status(client.connect(search_server.target),
                                "percept.v1.ImageSearch") == "SERVING"
    assert Path(search_server.server.config.data_dir).is_dir()


def test_search_waits_for_an_embedding_service_that_is_not_up_yet() -> None:
    """In a cluster, search may start before any embedding pod is ready. First a port that
    takes connections and never answers (a call waiting for it ends DEADLINE_EXCEEDED, as
    behind a headless Service that publishes no address yet), then nothing (UNAVAILABLE),
    then a real embedding server on that port: start() waits through all of it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    async def scenario() -> int:
        embedder = RemoteEmbedder(f"127.0.0.1:{port}", timeout=1.0)  # on this loop
        waiting = asyncio.ensure_future(embedder.start(wait_seconds=300))
        await asyncio.sleep(3.0)  # three 1 s calls have timed out against the silent port
        assert not waiting.done()
        listener.close()
        running = await asyncio.to_thread(start_in_thread, server_config("embed", port=port),
                                          timeout=900)
        try:
            await asyncio.wait_for(waiting, 120)
        finally:
            running.stop()
            await embedder.close()
        return embedder.dimension

    assert asyncio.run(scenario()) == 384


def test_search_gives_up_on_an_embedding_service_that_never_answers() -> None:
    """After its wait, start() fails with the last status and how long it waited."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = f"127.0.0.1:{listener.getsockname()[1]}"

        async def scenario() -> None:
            embedder = RemoteEmbedder(target, timeout=0.5)
            try:
                await embedder.start(wait_seconds=2.0)
            finally:
                await embedder.close()

        with pytest.raises(ServiceError, match=r"DEADLINE_EXCEEDED.*\(waited 2 s for it\)"
                           ) as raised:
            asyncio.run(scenario())
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_text_search_while_embed_is_down_is_unavailable_at_once(tmp_path: Path) -> None:
    """The caller hears UNAVAILABLE naming the embedding service, not a DEADLINE_EXCEEDED
    after its whole deadline; and when the service is back, search reaches it again
    within seconds (a short reconnect backoff), with no restart of its own."""
    embed = start_in_thread(server_config("embed"), timeout=900)
    port = int(embed.target.rsplit(":", 1)[1])
    search = start_in_thread(server_config("search", data_dir=tmp_path / "search",
                                           embed_target=embed.target), timeout=900)
    try:
        stub = search_pb2_grpc.ImageSearchStub(client.connect(search.target))
        query = search_pb2.SearchByTextRequest(text="a cat", k=1)
        stub.SearchByText(query, timeout=60)  # empty index: no hits, but an answer
        embed.stop()
        with pytest.raises(grpc.RpcError) as raised:
            stub.SearchByText(query, timeout=60)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"embedding service at {embed.target}" in raised.value.details()
        embed = start_in_thread(server_config("embed", port=port), timeout=900)
        deadline = time.monotonic() + 60
        while True:
            try:
                stub.SearchByText(query, timeout=60)
                break
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() < deadline, "search did not reach embed again"
                time.sleep(0.5)
    finally:
        search.stop()
        embed.stop()


def _code_and_reason(call: Callable[[], object]) -> tuple[str, str | None]:
    try:
        call()
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        info = error_details_pb2.ErrorInfo()
        reasons = [info.reason for d in (status.details if status else []) if d.Unpack(info)]
        return error.code().name, (reasons[0] if reasons else None)  # type: ignore[attr-defined]
    return "OK", None


def test_search_over_an_index_it_has_serves_its_reads_before_the_embedding_service_is_up(
        embed_server: RunningServer, variants: list[bytes], tmp_path: Path) -> None:
    """A search pod restarted while the embedding pods still load: its index says which
    space it holds, so it is up in seconds and answers GetImages, ListImages and Stats; the
    calls that embed answer UNAVAILABLE until an embedding server answers on its target,
    and are served from then on (it waited up to 9 minutes, reads and all, and a slow
    embedding rollout had kubelet restart it)."""
    from tests.conftest import free_port

    data = tmp_path / "index"
    first = start_in_thread(server_config("search", data_dir=data,
                                          embed_target=embed_server.target), timeout=300)
    try:
        added, _ = add(search_pb2_grpc.ImageSearchStub(client.connect(first.target)),
                       add_requests(variants[:3], prefix="kept"))
    finally:
        first.stop()
    assert sorted(added) == ["kept-0", "kept-1", "kept-2"]

    port = free_port()  # nothing listens there yet
    search = start_in_thread(server_config("search", data_dir=data,
                                           embed_target=f"127.0.0.1:{port}"), timeout=120)
    embed = None
    try:
        channel = client.connect(search.target)
        stub = search_pb2_grpc.ImageSearchStub(channel)
        assert client.health_status(channel, "percept.v1.ImageSearch") == "SERVING"
        found = stub.GetImages(search_pb2.GetImagesRequest(ids=["kept-1"]), timeout=30)
        assert [i.id for i in found.images] == ["kept-1"]
        assert stub.Stats(search_pb2.StatsRequest(), timeout=30).count == 3
        by_text = search_pb2.SearchByTextRequest(text="a photo", k=3)
        assert _code_and_reason(lambda: stub.SearchByText(by_text, timeout=30)) == (
            "UNAVAILABLE", "EMBEDDING_SERVICE_UNAVAILABLE")
        assert _code_and_reason(lambda: add(stub, add_requests(variants[3:4]))) == (
            "UNAVAILABLE", "EMBEDDING_SERVICE_UNAVAILABLE")
        from prometheus_client import REGISTRY  # the pod is Ready: this says it refuses

        assert REGISTRY.get_sample_value("percept_search_embedding_served") == 0

        embed = start_in_thread(server_config("embed", port=port), timeout=900)
        deadline = time.monotonic() + 120
        while _code_and_reason(lambda: stub.SearchByText(by_text, timeout=30))[0] != "OK":
            assert time.monotonic() < deadline, "search never took up the embedding service"
            time.sleep(0.5)
        hits = stub.SearchByImage(search_pb2.SearchByImageRequest(image=variants[2], k=1),
                                  timeout=60).hits
        assert hits[0].id == "kept-2"
        assert REGISTRY.get_sample_value("percept_search_embedding_served") == 1
    finally:
        search.stop()
        if embed is not None:
            embed.stop()


def test_an_embedding_service_of_another_space_is_refused_until_it_is_put_right(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index's space is checked when the embedding service answers: another space
    (another model, method or vectors) refuses the calls that embed, with why, and search
    asks again, with a backoff, until the service is put right; an answer that is an error
    is asked again too."""
    from services.common.errors import FailedPrecondition
    from services.search.service import ImageSearchService
    from services.search.store import ImageStore

    class Answers(RemoteEmbedder):
        def __init__(self, probe: np.ndarray, failures: int = 0) -> None:  # no channel
            self.dimension, self.probes, self.failures = len(probe), probe[None], failures
            self.identity, self.verdicts = ("space", "model"), {}

        async def start(self, wait_seconds: float = 0.0) -> None:
            if self.failures:  # an answer that is an error
                self.failures -= 1
                raise ServiceError("embedding service: INTERNAL: boom",
                                   code=grpc.StatusCode.INTERNAL)

    rng = np.random.default_rng(0)
    made_with, other = (rng.standard_normal(8).astype(np.float32) for _ in range(2))
    ImageStore(tmp_path / "images.sqlite3", 8, made_with).close()
    service = ImageSearchService(server_config("search", data_dir=tmp_path,
                                               embed_target="127.0.0.1:1"))
    service.store = ImageStore(tmp_path / "images.sqlite3", 8)
    service.embedder = Answers(other, failures=1)
    service.embedding_problem = service._not_answered_yet
    monkeypatch.setattr("services.search.service.VERIFY_RETRY_SECONDS", 0.01)

    async def until(condition: Callable[[], bool]) -> None:
        for _ in range(1000):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("never")

    async def run() -> None:
        verifier = asyncio.ensure_future(service._verify_space())

        def refused_for_another_space() -> bool:
            problem = service.embedding_problem
            return problem is not None and problem().reason == "EMBEDDING_SPACE_MISMATCH"

        await until(refused_for_another_space)
        with pytest.raises(FailedPrecondition, match="another embedding space"):
            service._embedding()
        assert not verifier.done()  # it asks again
        service.embedder = Answers(made_with)  # the service is put right
        await until(lambda: service.embedding_problem is None)
        assert service._embedding() is service.embedder
        await asyncio.wait_for(verifier, 5)  # and then it is done

    asyncio.run(run())
    service.store.close()


def test_which_records_let_search_start_before_the_embedding_service(tmp_path: Path) -> None:
    """A record that knows its dimension (with its space's probe, or from before the probe
    was kept: the first embedder met gives it) lets search start at once; none at all
    waits for the space; a file that is no database fails at once, whatever embed does."""
    import sqlite3

    from services.search.store import ImageStore, recorded_dimension

    assert recorded_dimension(tmp_path / "none.sqlite3") is None
    ImageStore(tmp_path / "with-probe.sqlite3", 8, np.ones(8, np.float32)).close()
    assert recorded_dimension(tmp_path / "with-probe.sqlite3") == 8
    ImageStore(tmp_path / "old.sqlite3", 8).close()  # no probe kept
    assert recorded_dimension(tmp_path / "old.sqlite3") == 8
    (tmp_path / "junk.sqlite3").write_bytes(b"not a database at all" * 100)
    with pytest.raises(sqlite3.DatabaseError):
        recorded_dimension(tmp_path / "junk.sqlite3")


def _answered(call: Callable[[], object], seconds: float = 60.0) -> tuple[str, str | None]:
    """The code and reason of ``call`` once the embedding server that was just started on
    search's target answers it (search's channel reconnects within a few seconds)."""
    deadline = time.monotonic() + seconds
    while True:
        answer = _code_and_reason(call)
        if answer[1] != "EMBEDDING_SERVICE_UNAVAILABLE" or time.monotonic() > deadline:
            return answer
        time.sleep(0.3)


def test_an_embedding_rollout_to_another_space_mid_life_is_refused_per_answer(
        variants: list[bytes], tmp_path: Path) -> None:
    """The embedding pods behind search's target are replaced while search runs (a rollout
    to another DeViSE map or --word-vectors file): the answers of a model search has not
    met are judged by the probe image first. Image vectors of another model are refused
    (FAILED_PRECONDITION, EMBEDDING_SPACE_MISMATCH, naming it), text in the same space is
    still served; text of another space is refused; a rollback is served again at once."""
    import json
    import shutil

    from prometheus_client import REGISTRY

    from services.embed.wordnet import NounVocabulary
    from tests.conftest import REPO, free_port
    from tests.embed.test_service_word_vectors import write_glove

    port = free_port()
    running: list[RunningServer] = []

    def embed_on_port(**overrides: object) -> None:
        """Replaces the embedding server on search's target (a rollout)."""
        while running:
            running.pop().stop()
        running.append(start_in_thread(server_config("embed", port=port, **overrides),
                                       timeout=900))

    # the committed models: ConSE by default
    embed_on_port()
    search = start_in_thread(server_config("search", data_dir=tmp_path / "index",
                                           embed_target=f"127.0.0.1:{port}"), timeout=300)
    stub = search_pb2_grpc.ImageSearchStub(client.connect(search.target))
    by_image = search_pb2.SearchByImageRequest(image=variants[1], k=1)
    by_text = search_pb2.SearchByTextRequest(text="a photo", k=3)
    refusals = "percept_search_space_refusals_total"
    try:
        added, _ = add(stub, add_requests(variants[:3], prefix="kept"))
        assert sorted(added) == ["kept-0", "kept-1", "kept-2"]
        before = REGISTRY.get_sample_value(refusals) or 0.0

        # rolled out: the DeViSE map made the default, in the same text space
        devise_default = tmp_path / "devise-default"
        shutil.copytree(REPO / "models" / "devise-minilm", devise_default / "devise-minilm")
        config_path = devise_default / "devise-minilm" / "config.json"
        config = json.loads(config_path.read_text())
        assert config["default_method"] == "conse"
        config_path.write_text(json.dumps({**config, "default_method": "devise"}))
        embed_on_port(models_dir=devise_default)
        assert _answered(lambda: stub.SearchByImage(by_image, timeout=30)) == (
            "FAILED_PRECONDITION", "EMBEDDING_SPACE_MISMATCH")
        with pytest.raises(grpc.RpcError) as refused:
            stub.SearchByImage(by_image, timeout=30)
        assert "'devise-minilm@1'" in refused.value.details()
        assert "another embedding space" in refused.value.details()
        assert _code_and_reason(lambda: add(stub, add_requests(variants[3:4]))) == (
            "FAILED_PRECONDITION", "EMBEDDING_SPACE_MISMATCH")  # the index is not mixed
        assert _code_and_reason(lambda: stub.SearchByText(by_text, timeout=30)) == ("OK", None)
        assert (REGISTRY.get_sample_value(refusals) or 0.0) >= before + 3

        # another text space: a word-vector file
        vectors = write_glove(tmp_path / "glove.tiny.txt", NounVocabulary.from_file())
        (tmp_path / "no-models").mkdir()
        embed_on_port(word_vectors=str(vectors), models_dir=tmp_path / "no-models")
        in_the_file = search_pb2.SearchByTextRequest(text="golden retriever", k=3)
        assert _answered(lambda: stub.SearchByText(in_the_file, timeout=30)) == (
            "FAILED_PRECONDITION", "EMBEDDING_SPACE_MISMATCH")
        with pytest.raises(grpc.RpcError) as refused:
            stub.SearchByText(in_the_file, timeout=30)
        assert "word-vectors:glove.tiny.txt@" in refused.value.details()

        # rolled back: the model the index was made with, judged good at start
        embed_on_port()
        assert _answered(lambda: stub.SearchByImage(by_image, timeout=30)) == ("OK", None)
        assert stub.SearchByImage(by_image, timeout=30).hits[0].id == "kept-1"
        assert stub.Stats(search_pb2.StatsRequest(), timeout=30).count == 3
    finally:
        search.stop()
        while running:
            running.pop().stop()


def test_each_call_waits_for_a_new_models_check_within_its_own_deadline() -> None:
    """Calls that meet a model search has not judged share one check, run within the
    embedder's own limit: a call with little time left ends DEADLINE_EXCEEDED alone, and
    the others get the verdict."""
    from services.common.errors import DeadlineExceeded, FailedPrecondition

    class SlowCheck(RemoteEmbedder):
        async def _judge_identity(self, identity: tuple[str, str], timeout: float
                                  ) -> str | None:
            assert timeout == self.timeout  # not the first caller's time left
            await asyncio.sleep(0.3)
            self.verdicts[identity] = "another map"
            return "another map"

    async def run() -> None:
        embedder = SlowCheck("127.0.0.1:1", timeout=30.0)
        embedder.judge = lambda probe: None
        new = ("space", "devise-other@2")
        short = asyncio.ensure_future(embedder._check_identity(new, 0.05))
        long = asyncio.ensure_future(embedder._check_identity(new, 5.0))
        with pytest.raises(DeadlineExceeded, match="still checking"):
            await short
        with pytest.raises(FailedPrecondition, match="'devise-other@2'"):
            await long
        assert embedder._judging == {}
        await embedder.close()

    asyncio.run(run())


@pytest.mark.parametrize("keepalive, deadline", [(1.0, 15.0), (0.0, 8.0)])
def test_an_embedding_server_that_vanished_is_noticed_by_the_keepalive(
        embed_server: RunningServer, keepalive: float, deadline: float) -> None:
    """The connection stops passing bytes, as when the embedding pod's node is lost:
    nothing answers and nothing closes. With pings after a second of quiet, a call on it
    fails UNAVAILABLE within seconds (well before its 15 s deadline) and the next goes over
    a new connection; without them (gRPC's default), the call waits out its deadline."""
    proxy = TcpProxy(embed_server.port)

    async def scenario() -> tuple[grpc.StatusCode | None, float, int]:
        embedder = RemoteEmbedder(proxy.target, timeout=deadline, keepalive_seconds=keepalive)
        try:
            await embedder.start(wait_seconds=60)
            proxy.freeze()
            started = time.monotonic()
            with pytest.raises(ServiceError) as failed:
                await embedder.embed_text("a cat", timeout=deadline)
            took = time.monotonic() - started
            if failed.value.code != grpc.StatusCode.UNAVAILABLE:
                return failed.value.code, took, 0
            until = time.monotonic() + 10  # round-robin connects again by itself
            while proxy.connections < 2 and time.monotonic() < until:
                await asyncio.sleep(0.05)
            vector = await embedder.embed_text("a cat", timeout=30.0)  # over it
            return failed.value.code, took, len(vector)
        finally:
            await embedder.close()
            proxy.close()

    code, took, dimension = asyncio.run(scenario())
    if keepalive:
        assert code == grpc.StatusCode.UNAVAILABLE and took < 10, (code, took)  # about 1.4 s
        assert dimension > 0 and proxy.connections == 2
    else:
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and took >= deadline - 0.5, (code,
                                                                                   took)


def test_an_idle_connection_to_a_vanished_embedding_server_is_replaced_before_it_is_needed(
        embed_server: RunningServer) -> None:
    """The keepalive pings a connection with no call in progress too: one that stopped
    passing bytes while search sat idle is closed within seconds and round-robin opens
    another, so the next call goes straight over it. A client that pinged only during
    calls would keep the dead connection until a call met it."""
    proxy = TcpProxy(embed_server.port)

    async def scenario() -> tuple[int, int]:
        embedder = RemoteEmbedder(proxy.target, timeout=15.0, keepalive_seconds=1.0)
        try:
            await embedder.start(wait_seconds=60)
            await asyncio.sleep(2)  # the pings about start()'s calls are answered by now
            proxy.freeze()
            until = time.monotonic() + 10
            while proxy.connections < 2 and time.monotonic() < until:
                await asyncio.sleep(0.05)
            replaced_while_idle = proxy.connections
            vector = await embedder.embed_text("a cat", timeout=15.0)
            return replaced_while_idle, len(vector)
        finally:
            await embedder.close()
            proxy.close()

    replaced_while_idle, dimension = asyncio.run(scenario())
    assert replaced_while_idle == 2 and dimension > 0
