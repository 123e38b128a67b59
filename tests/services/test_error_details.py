"""The rich error model (google.rpc.Status in the grpc-status-details-bin trailer), read as
a client in any language reads it (here with grpc_status.rpc_status, Python's reader): an
ErrorInfo reason to branch on, a RetryInfo on busy answers only, and a BadRequest naming
the request field at fault. Over real gRPC, against the committed models."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from percept.v1 import embed_pb2, embed_pb2_grpc, style_pb2, superres_pb2
from services import client
from services.common.server import RunningServer
from tests.conftest import REPO, encode, is_pushback, pixel_budget_full


def _details(error: grpc.RpcError) -> dict[str, object]:
    """The ErrorInfo, RetryInfo and BadRequest of a failed call, by name."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin trailer"
    assert status.code == error.code().value[0] and status.message == error.details()
    found: dict[str, object] = {}
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo,
                     error_details_pb2.BadRequest):
            message = kind()
            if detail.Unpack(message):
                found[kind.__name__] = message
    return found


def _call_error(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    return error.value


def test_a_bad_image_names_its_field_and_why(all_server: RunningServer) -> None:
    channel = client.connect(all_server.target)
    error = _call_error(lambda: client.upscale(channel, b"junk"))
    details = _details(error)
    info = details["ErrorInfo"]
    assert (info.reason, info.domain) == ("IMAGE_UNDECODABLE", "percept.v1")  # type: ignore[attr-defined]
    assert [v.field for v in details["BadRequest"].field_violations] == ["image"]  # type: ignore[attr-defined]
    assert "RetryInfo" not in details  # sending it again will not help


def test_the_bad_image_of_a_batch_is_named_by_its_index(all_server: RunningServer,
                                                        small_photo: np.ndarray) -> None:
    stub = embed_pb2_grpc.EmbeddingStub(client.connect(all_server.target))
    error = _call_error(lambda: stub.EmbedImages(embed_pb2.EmbedImagesRequest(
        images=[encode(small_photo), encode(small_photo)[:200]]), timeout=60))
    details = _details(error)
    assert details["ErrorInfo"].reason == "IMAGE_TRUNCATED"  # type: ignore[attr-defined]
    assert [v.field for v in details["BadRequest"].field_violations] == ["images[1]"]  # type: ignore[attr-defined]


def test_an_unknown_style_lists_the_available_ones(all_server: RunningServer,
                                                   small_photo: np.ndarray) -> None:
    channel = client.connect(all_server.target)
    error = _call_error(lambda: client.stylize(channel, style_pb2.StylizeRequest(
        image=encode(small_photo), style="starry-nite")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    info = _details(error)["ErrorInfo"]
    assert info.reason == "STYLE_NOT_FOUND"  # type: ignore[attr-defined]
    available = info.metadata["available"].split(",")  # type: ignore[attr-defined]
    assert available == sorted(s.name for s in client.list_styles(channel))


def test_a_busy_answer_says_so_and_when_to_retry(all_server: RunningServer,
                                                 small_photo: np.ndarray) -> None:
    channel = client.connect(all_server.target)
    with pixel_budget_full(all_server):
        error = _call_error(lambda: client.upscale(channel, encode(small_photo)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = _details(error)
    assert details["ErrorInfo"].reason == "PIXEL_BUDGET_FULL"  # type: ignore[attr-defined]
    trailers = dict(error.trailing_metadata())  # type: ignore[attr-defined]
    assert is_pushback(trailers["grpc-retry-pushback-ms"]) and "x-request-id" in trailers
    delay = details["RetryInfo"].retry_delay.ToMilliseconds()  # type: ignore[attr-defined]
    assert delay == int(trailers["grpc-retry-pushback-ms"])  # the same advice, both ways


def test_a_result_too_large_is_not_worth_a_retry() -> None:
    from services.common.errors import STATUS_DETAILS_KEY, ResourceExhausted
    from services.common.images import encode_image

    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    with pytest.raises(ResourceExhausted) as error:
        encode_image(noise, max_reply_bytes=10_000)
    assert error.value.reason == "RESULT_TOO_LARGE" and error.value.retry_after_ms is None
    assert [key for key, _ in error.value.trailing_metadata] == [STATUS_DETAILS_KEY]


def test_a_request_that_does_not_parse_is_malformed(all_server: RunningServer) -> None:
    with grpc.insecure_channel(all_server.target) as channel:
        call = channel.unary_unary("/percept.v1.SuperResolution/Upscale",
                                   request_serializer=lambda data: data,
                                   response_deserializer=superres_pb2.UpscaleResponse.FromString)
        error = _call_error(lambda: call(b"\xff\xff\xff\xff", timeout=30))
    assert _details(error)["ErrorInfo"].reason == "MALFORMED_REQUEST"  # type: ignore[attr-defined]


def test_a_batch_of_one_names_images_0_and_gatys_options_name_their_field(
        all_server: RunningServer) -> None:
    stub = embed_pb2_grpc.EmbeddingStub(client.connect(all_server.target))
    error = _call_error(lambda: stub.EmbedImages(
        embed_pb2.EmbedImagesRequest(images=[b"junk"]), timeout=60))
    assert [v.field for v in _details(error)["BadRequest"].field_violations] == ["images[0]"]  # type: ignore[attr-defined]
    for fields, field in [({"style_layer_weights": {"nolayer": 1.0}}, "style_layer_weights"),
                          ({"max_size": 16}, "max_size"),
                          ({"content_weight": -1.0}, "content_weight")]:
        request = style_pb2.StylizeWithImageRequest(content_image=b"x", style_image=b"x",
                                                    **fields)  # type: ignore[arg-type]
        error = _call_error(lambda request=request: client.stylize_with_image(
            client.connect(all_server.target), request, timeout=60))
        assert [v.field for v in _details(error)["BadRequest"].field_violations] == [field]  # type: ignore[attr-defined]


def test_every_reason_the_services_give_is_documented_in_the_proto() -> None:
    """Clients branch on ErrorInfo reasons: each one named in the services' code (a
    ``reason=`` argument, or a class's ``reason``/``default_reason``) is in image.proto's
    list, so none is met without documentation. The base class of the data directory's
    problems is never raised itself."""
    pattern = re.compile(r"""\b(?:default_)?reason\s*=\s*["']([A-Z][A-Z0-9_]+)["']""")
    given = {match for path in (REPO / "services").rglob("*.py")
             for match in pattern.findall(path.read_text())}
    assert {"QUEUE_FULL", "DATA_DIR_RECORD_MOVED", "STYLE_NOT_FOUND"} <= given  # found
    documented = (REPO / "protos/percept/v1/image.proto").read_text()
    assert sorted(r for r in given - {"DATA_DIR_PROBLEM"} if r not in documented) == []
