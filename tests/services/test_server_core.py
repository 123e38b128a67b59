"""The common server core through real gRPC servers on loopback."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import REGISTRY

from percept.v1 import style_pb2, style_pb2_grpc
from services import client
from services.common.server import (
    RunningServer,
    ServiceModule,
    StartupError,
    start_in_thread,
)
from tests.conftest import (
    REPO,
    check_a_hung_up_header_read_holds_its_slot,
    encode,
    is_pushback,
    server_config,
)
from tests.fixtures import bad_images

SERVICES = ["percept.v1.SuperResolution", "percept.v1.StyleTransfer", "percept.v1.Embedding",
            "percept.v1.ImageSearch"]


def gatys_request(content: bytes, style: bytes, **fields: object
                  ) -> style_pb2.StylizeWithImageRequest:
    values: dict[str, object] = dict(content_image=content, style_image=style, iterations=1,
                                     max_size=32)
    values.update(fields)
    return style_pb2.StylizeWithImageRequest(**values)  # type: ignore[arg-type]


def health(target: str, service: str = "") -> str:
    return client.health_status(client.connect(target), service)


def test_health_reports_every_service_serving(all_server: RunningServer) -> None:
    for name in ["", *SERVICES]:
        assert health(all_server.target, name) == "SERVING"


def test_health_of_an_unknown_service_is_not_found(all_server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as error:
        health(all_server.target, "percept.v1.Nope")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(all_server: RunningServer) -> None:
    database = ProtoReflectionDescriptorDatabase(client.connect(all_server.target))
    services = set(database.get_services())
    assert set(SERVICES) <= services
    assert "grpc.health.v1.Health" in services
    assert "percept.v1.ServerInfo" in services


def test_server_info_names_every_model_and_the_limits(all_server: RunningServer) -> None:
    """What a client would otherwise learn from error messages: the models each service
    serves (as requests and responses name them, which one is the default) and the limits
    its requests are checked against."""
    import json

    from services.common.config import SERVICE_FULL_NAMES

    info = client.server_info(client.connect(all_server.target))
    config = all_server.server.config
    assert info.ready and sorted(info.services) == sorted(SERVICE_FULL_NAMES)
    models = {(m.service, m.name): m for m in info.models}
    superres = {n for s, n in models if s == "percept.v1.SuperResolution"}
    assert superres == {"superres-perceptual", "superres-psnr", "superres-mse"}
    assert [n for (s, n), m in models.items() if m.is_default
            and s == "percept.v1.SuperResolution"] == ["superres-perceptual"]
    styles = {n for s, n in models if s == "percept.v1.StyleTransfer"}
    assert styles == {s.name for s in client.list_styles(client.connect(all_server.target))}
    conse = models.pop(("percept.v1.Embedding", "conse-efficientnet-lite0-top10"))
    assert (conse.artifact, conse.version, conse.is_default) == (
        "conse-efficientnet-lite0-top10@1", 1, True)  # no folder: ConSE has no artifact
    for (service, name), model in models.items():
        folder = REPO / "models" / (name if service != "percept.v1.StyleTransfer"
                                    else f"style-{name}")
        version = json.loads((folder / "config.json").read_text())["version"]
        assert (model.version, model.artifact) == (version, f"{folder.name}@{version}")
    assert ("percept.v1.Embedding", "devise-minilm") in models
    assert (info.limits.max_message_bytes, info.limits.max_pixels, info.limits.max_queue,
            info.limits.max_batch) == (config.max_message_bytes, config.max_pixels,
                                       config.max_queue, config.max_batch)
    assert info.limits.max_inflight_pixels == config.max_inflight_mpixels * 1_000_000
    assert info.limits.max_concurrent_rpcs == config.max_concurrent_rpcs
    assert info.limits.fair_share is config.fair_share is True  # the default
    assert info.limits.min_client_ping_ms == 10_000  # --min-client-ping-seconds' default
    assert info.version  # the package version


class GatedModule(ServiceModule):
    """A service whose model load waits for the test to open a gate."""

    name = "gated"
    full_name = "test.Gated"

    def __init__(self, gate: asyncio.Event) -> None:
        super().__init__(server_config("all"))
        self.gate = gate

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pass

    async def load(self) -> None:
        await self.gate.wait()


def test_health_is_not_serving_until_loaded_then_serving_then_not_serving_on_drain() -> None:
    import threading

    from services.common.server import PerceptServer

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    gate = asyncio.Event()
    server = PerceptServer([GatedModule(gate)], server_config("all"))
    starting = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        target = None
        for _ in range(200):
            if server.port:
                target = f"127.0.0.1:{server.port}"
                break
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0.01), loop).result()
        assert target is not None
        channel = client.connect(target)
        for _ in range(100):  # the port is bound slightly before health is set
            try:
                status = client.health_status(channel, "test.Gated")
                break
            except grpc.RpcError:
                asyncio.run_coroutine_threadsafe(asyncio.sleep(0.02), loop).result()
        assert status == "NOT_SERVING"
        assert client.health_status(channel, "") == "NOT_SERVING"
        loading = client.server_info(channel)  # answered while the models load
        assert (list(loading.services), loading.ready, list(loading.models)) == (
            ["test.Gated"], False, [])
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="test.Gated"), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        loop.call_soon_threadsafe(gate.set)
        starting.result(10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert client.server_info(channel).ready
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopping.result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@pytest.mark.parametrize("make, message", [
    (lambda p: b"", "empty content image"),
    (lambda p: b"GIF89a not really", "not a decodable content image"),
    (lambda p: b"\xff\xd8\xff\xe0" + b"\x00" * 64, "not a decodable|truncated|corrupt"),
    (bad_images.truncated_jpeg, "truncated content image|corrupt"),
    (bad_images.truncated_png, "truncated content image|corrupt"),
    (lambda p: bad_images.png_bomb(), "over the cap"),
    (lambda p: bad_images.over_pixel_cap(64_000_000), "over the cap of 64000000"),
])
def test_bad_images_get_invalid_argument_and_the_server_stays_healthy(
        all_server: RunningServer, photo: np.ndarray, style_photo: np.ndarray,
        make: object, message: str) -> None:
    stub = style_pb2_grpc.StyleTransferStub(client.connect(all_server.target))
    request = gatys_request(make(photo), encode(style_photo))  # type: ignore[operator]
    with pytest.raises(grpc.RpcError) as error:
        list(stub.StylizeWithImage(request, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details() and __import__("re").search(message, error.value.details())
    assert health(all_server.target, "percept.v1.StyleTransfer") == "SERVING"


@pytest.mark.parametrize("make, has_alpha", [
    (bad_images.cmyk_jpeg, False), (bad_images.grey16_png, False),
    (bad_images.palette_png_with_transparency, True), (bad_images.grey_png, False),
    (bad_images.rgba_png, True), (bad_images.animated_gif, False), (bad_images.webp, False),
])
def test_unusual_but_valid_images_are_converted_and_served(
        all_server: RunningServer, small_photo: np.ndarray, style_photo: np.ndarray,
        make: object, has_alpha: bool) -> None:
    from services.common.images import decode_image

    result = client.stylize_with_image(client.connect(all_server.target), gatys_request(
        make(small_photo), encode(style_photo)), timeout=60)  # type: ignore[operator]
    decoded = decode_image(result.image, max_pixels=10**7)
    assert (decoded.width, decoded.height) == (32, 21)  # 96x64 scaled to a 32 px longest side
    assert (decoded.alpha is not None) == has_alpha


@pytest.mark.parametrize("fields, message", [
    ({"iterations": 5000}, "iterations must be 1..2000"),
    ({"max_size": 4096}, "max_size must be 32..1024"),
    ({"style_layer_weights": {"relu9_9": 1.0}}, "relu9_9"),
    ({"style_weight": -1.0}, "style_weight"),
    ({"style_image": b""}, "empty style image"),
    ({"mask": b"nope"}, "not a decodable mask"),
    ({"output_format": 99}, "unknown output_format 99"),
    ({"style_image": encode(np.zeros((1, 1, 3), np.uint8))},
     "style image is 1x1 px at the working size (longest side 32; the style image no larger "
     "than the content); the VGG layers used need at least 16 px on each side"),
    ({"style_image": encode(np.zeros((8, 200, 3), np.uint8))},
     "style image is 32x1 px at the working size"),
    ({"content_image": encode(np.zeros((5, 200, 3), np.uint8))},
     "content image is 32x1 px at the working size"),
])
def test_bad_options_get_invalid_argument(all_server: RunningServer, small_photo: np.ndarray,
                                          style_photo: np.ndarray, fields: dict[str, object],
                                          message: str) -> None:
    """Refused before the optimisation starts: not one progress message is streamed."""
    request = gatys_request(encode(small_photo), encode(style_photo))
    for name, value in fields.items():
        if name == "style_layer_weights":
            request.style_layer_weights.update(value)  # type: ignore[arg-type]
        else:
            setattr(request, name, value)
    streamed = []
    with pytest.raises(grpc.RpcError) as error:
        for message_seen in (style_pb2_grpc.StyleTransferStub(client.connect(all_server.target))
                             .StylizeWithImage(request, timeout=30)):
            streamed.append(message_seen)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert streamed == []


def test_a_super_resolution_server_without_models_does_not_start(tmp_path: Path) -> None:
    """It could only answer every Upscale UNIMPLEMENTED, while its health said SERVING:
    a pod whose models volume came up empty would be sent traffic."""
    with pytest.raises(StartupError, match=r"^no super-resolution artifact under "
                                           r"--models-dir .*: this server would answer every "
                                           r"Upscale UNIMPLEMENTED"):
        start_in_thread(server_config("superres", models_dir=tmp_path))


def test_metrics_endpoint_counts_requests_by_status(all_server: RunningServer,
                                                    small_photo: np.ndarray) -> None:
    channel = client.connect(all_server.target)
    stub = style_pb2_grpc.StyleTransferStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.StylizeWithImage(gatys_request(b"junk", b"junk"), timeout=120))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client.upscale(channel, encode(small_photo))  # a batch, whatever ran before this test
    port = all_server.server.config.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert ('percept_requests_total{grpc_code="INVALID_ARGUMENT",grpc_method="StylizeWithImage",'
            'grpc_service="percept.v1.StyleTransfer"}') in text
    for family in ("percept_request_seconds_bucket", "percept_queue_depth",
                   "percept_batch_size_bucket", "percept_batch_seconds_bucket",
                   "percept_inflight_requests"):
        assert family in text


@pytest.fixture()
def single_slot_style_server() -> Iterator[RunningServer]:
    """A style server whose optimiser queue holds one request: easy to overload."""
    running = start_in_thread(server_config("style", max_optimisations=1))
    yield running
    running.stop()


def _start_long_optimisation(target: str, content: bytes, style: bytes) -> grpc.Future:
    stub = style_pb2_grpc.StyleTransferStub(client.connect(target))
    call = stub.StylizeWithImage(gatys_request(content, style, iterations=2000, max_size=64,
                                               progress_every=1), timeout=120)
    first = next(call)
    assert first.HasField("progress")  # it is running
    return call


def test_overload_gives_resource_exhausted_at_once(single_slot_style_server: RunningServer,
                                                   small_photo: np.ndarray,
                                                   style_photo: np.ndarray) -> None:
    import time

    target = single_slot_style_server.target
    content, style = encode(small_photo), encode(style_photo)
    running = _start_long_optimisation(target, content, style)
    try:
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as error:
            client.stylize_with_image(client.connect(target), gatys_request(content, style),
                                      timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in error.value.details()
        assert time.perf_counter() - started < 2.0
        # refused before its images are decoded: undecodable ones get the same answer
        with pytest.raises(grpc.RpcError) as error:
            client.stylize_with_image(client.connect(target),
                                      gatys_request(b"not an image", style), timeout=30)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert is_pushback(dict(error.value.trailing_metadata())["grpc-retry-pushback-ms"])
        assert "x-request-id" in dict(error.value.trailing_metadata())  # kept beside it
    finally:
        running.cancel()
    # the cancelled optimisation stops and the server serves again
    for _ in range(50):
        try:
            client.stylize_with_image(client.connect(target), gatys_request(content, style),
                                      timeout=30)
            break
        except grpc.RpcError as retry:
            assert retry.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(0.1)
    else:
        pytest.fail("the server did not recover after the long request was cancelled")


def test_expired_deadline_gives_deadline_exceeded_and_skips_compute(
        small_photo: np.ndarray, style_photo: np.ndarray) -> None:
    import time

    running_server = start_in_thread(server_config("style", max_optimisations=2))
    try:
        target = running_server.target
        module = running_server.server.modules[0]
        content, style = encode(small_photo), encode(style_photo)
        labels = {"queue": "style-optimise"}
        dropped_before = sum(REGISTRY.get_sample_value("percept_dropped_total",
                                                       {**labels, "reason": r}) or 0.0
                             for r in ("deadline", "cancelled"))
        status = {"grpc_code": "DEADLINE_EXCEEDED", "grpc_method": "StylizeWithImage",
                  "grpc_service": "percept.v1.StyleTransfer"}
        counted_before = REGISTRY.get_sample_value("percept_requests_total", status) or 0.0
        running = _start_long_optimisation(target, content, style)
        with pytest.raises(grpc.RpcError) as error:
            client.stylize_with_image(client.connect(target), gatys_request(content, style),
                                      timeout=0.5)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        running.cancel()
        for _ in range(100):
            dropped = sum(REGISTRY.get_sample_value("percept_dropped_total",
                                                    {**labels, "reason": r}) or 0.0
                          for r in ("deadline", "cancelled"))
            if dropped > dropped_before:
                break
            time.sleep(0.05)
        assert dropped == dropped_before + 1
        for _ in range(200):  # the long request's batch ends once it sees the cancel
            if module.optimiser.batches_run:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        assert module.optimiser.batches_run == 1  # only the long request was computed
        assert module.optimiser.depth == 0
        # the server counts the expiry as what the caller saw, not as a cancellation
        assert REGISTRY.get_sample_value("percept_requests_total", status) == counted_before + 1
    finally:
        running_server.stop()


def test_messages_over_the_size_limit_are_resource_exhausted(small_photo: np.ndarray) -> None:
    running = start_in_thread(server_config("style", max_message_mb=1))
    try:
        request = gatys_request(b"\x00" * (2 * 1024 * 1024), encode(small_photo))
        with pytest.raises(grpc.RpcError) as error:
            list(style_pb2_grpc.StyleTransferStub(client.connect(running.target))
                 .StylizeWithImage(request, timeout=30))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert health(running.target, "percept.v1.StyleTransfer") == "SERVING"
    finally:
        running.stop()


@pytest.mark.parametrize("rpc", ["Stylize", "Upscale", "LabelImage"])
def test_image_headers_are_read_off_the_event_loop(
        all_server: RunningServer, small_photo: np.ndarray, monkeypatch: pytest.MonkeyPatch,
        rpc: str) -> None:
    """Reading a header walks every chunk before the pixels: a crafted PNG (millions of
    empty chunks) or JPEG (a 48 MiB comment) takes seconds, which on the event loop would
    stall every call of the process, health checks included."""
    import threading

    import services.common.image_model
    import services.embed.service
    from percept.v1 import embed_pb2, embed_pb2_grpc, style_pb2

    threads: list[str] = []
    for module in (services.common.image_model, services.embed.service):
        real = module.probe_size

        def recording(data: bytes, *args: object, real: object = real) -> tuple[int, int]:
            threads.append(threading.current_thread().name)
            return real(data, *args)  # type: ignore[operator]

        monkeypatch.setattr(module, "probe_size", recording)
    channel = client.connect(all_server.target)
    image = encode(small_photo)
    if rpc == "Stylize":
        client.stylize(channel, style_pb2.StylizeRequest(image=image, style="starry-night"))
    elif rpc == "Upscale":
        client.upscale(channel, image)
    else:
        embed_pb2_grpc.EmbeddingStub(channel).LabelImage(
            embed_pb2.LabelImageRequest(image=image, k=1), timeout=60)
    assert threads, "the header was not read through probe_size"
    assert all_server.thread.name not in threads, threads


def test_a_hung_up_optimisation_keeps_its_place_while_its_images_decode(
        small_photo: np.ndarray, style_photo: np.ndarray) -> None:
    """StylizeWithImage with --max-optimisations 1: a client that gives up while its
    content image (one whose header takes seconds to read) is decoding does not free its
    place for the next request until that decode has ended."""
    running = start_in_thread(server_config("style", max_optimisations=1), timeout=600)
    channel = client.connect(running.target)
    try:
        check_a_hung_up_header_read_holds_its_slot(
            lambda content, timeout: client.stylize_with_image(
                channel, gatys_request(content, encode(style_photo)), timeout=timeout),
            encode(small_photo[::-1]), encode(small_photo))
    finally:
        channel.close()
        running.stop()


class _EndedContext:
    """What the metrics read of a call's context once its handler ended."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    def code(self) -> None:
        return None


@pytest.mark.parametrize("remaining, counted", [
    (-0.5, "DEADLINE_EXCEEDED"), (0.0, "DEADLINE_EXCEEDED"),
    (0.03, "DEADLINE_EXCEEDED"),  # the caller's timer fired a moment before the server's
    (2.0, "CANCELLED"), (None, "CANCELLED")])
def test_a_cancelled_handler_is_counted_by_the_time_its_caller_had_left(
        remaining: float | None, counted: str) -> None:
    from services.common.metrics import _status_name

    assert _status_name(_EndedContext(remaining), asyncio.CancelledError()) == counted  # type: ignore[arg-type]
    # a streaming handler's generator is closed instead (the client dropped the stream
    # while the server sent): a hang-up too, not UNKNOWN, the server error an alert counts
    assert _status_name(_EndedContext(remaining), GeneratorExit()) == counted  # type: ignore[arg-type]
    assert _status_name(_EndedContext(remaining), None) == "OK"  # type: ignore[arg-type]


def test_an_answer_to_a_call_that_already_ended_is_one_warning_line() -> None:
    """gRPC's own error, with a traceback, for an answer sent after the call's deadline
    passed (a race any client with tight deadlines causes): one warning line naming the
    method, dropped below the configured level like any other."""
    import io
    import logging

    from services.common.logs import GRPC_SERVER_LOGGER, configure_logging

    def late_answer() -> str:
        stream = io.StringIO()
        configure_logging("text", level, stream)
        try:
            raise RuntimeError("Failed \"execute_batch\"")
        except RuntimeError:
            # as gRPC logs it: the method formatted into the message already
            method = "/percept.v1.StyleTransfer/Stylize"
            logging.getLogger(GRPC_SERVER_LOGGER).exception(
                f"ExecuteBatchError raised in core by servicer method [{method}]")
        return stream.getvalue()

    level = "warning"
    printed = late_answer()
    assert printed.count("\n") == 1 and "Traceback" not in printed, printed
    assert " warning grpc._cython.cygrpc: an answer could not be sent (mostly: the call had " \
        "ended, its deadline passed or its client went): /percept.v1.StyleTransfer/Stylize" \
        in printed
    level = "error"
    assert late_answer() == ""
    configure_logging("text", "info", io.StringIO())  # once more: still one filter
    assert len(logging.getLogger(GRPC_SERVER_LOGGER).filters) == 1


def test_each_call_answers_with_its_request_id(all_server: RunningServer) -> None:
    """The caller's x-request-id comes back in the trailers, of a success and of an error
    alike (with a busy answer's retry trailer kept); a call without one gets one made."""
    stub = style_pb2_grpc.StyleTransferStub(client.connect(all_server.target))
    _, call = stub.ListStyles.with_call(style_pb2.ListStylesRequest(), timeout=30,
                                        metadata=[("x-request-id", "client-7f3a")])
    assert ("x-request-id", "client-7f3a") in call.trailing_metadata()
    _, call = stub.ListStyles.with_call(style_pb2.ListStylesRequest(), timeout=30)
    made = dict(call.trailing_metadata())["x-request-id"]
    assert len(made) == 16 and int(made, 16) >= 0
    _, call = stub.ListStyles.with_call(style_pb2.ListStylesRequest(), timeout=30,
                                        metadata=[("x-request-id", "x" * 500)])
    assert dict(call.trailing_metadata())["x-request-id"] != "x" * 500  # too long: replaced
    with pytest.raises(grpc.RpcError) as error:
        stub.Stylize(style_pb2.StylizeRequest(image=b"junk", style="starry-night"), timeout=30,
                     metadata=[("x-request-id", "client-bad-image")])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-request-id", "client-bad-image") in error.value.trailing_metadata()


def test_a_busy_answer_keeps_its_retry_trailer_beside_the_request_id() -> None:
    from services.common.request_ids import REQUEST_ID_KEY, with_request_id

    class Context:
        def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
            return ((REQUEST_ID_KEY, "r1"), ("other", "dropped"))

    assert with_request_id(Context(), (("grpc-retry-pushback-ms", "100"),)) == (  # type: ignore[arg-type]
        (REQUEST_ID_KEY, "r1"), ("grpc-retry-pushback-ms", "100"))


def test_log_lines_written_during_a_call_carry_its_request_id() -> None:
    import io
    import json
    import logging

    from services.common.logs import configure_logging
    from services.common.request_ids import current_request_id

    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("json", "info", stream)
        token = current_request_id.set("call-42")
        logging.getLogger("percept.test").info("inside a call")
        current_request_id.reset(token)
        logging.getLogger("percept.test").info("between calls")
    finally:
        root.handlers[:], root.level = handlers, level
    inside, between = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["request_id"] == "call-42" and "request_id" not in between


def test_a_finished_call_leaves_no_cycle_behind(all_server: RunningServer) -> None:
    """Each work call's record sat in its own task's context while pointing at the task: a
    cycle (task, context, call) per call that only a full collection freed, and a soak
    measured those rare (one per 14,000 calls). Answered calls, good and bad, now leave
    none of them for the collector."""
    import gc

    from services.common.server import _WorkCall

    channel = client.connect(all_server.target)
    image = encode(np.random.default_rng(0).integers(0, 255, (24, 24, 3), np.uint8))
    client.upscale(channel, image, timeout=60)  # warm
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(10):
            client.upscale(channel, image, timeout=60)
            with pytest.raises(grpc.RpcError):
                client.upscale(channel, b"not an image", timeout=60)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, _WorkCall)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        channel.close()
    assert left == []
