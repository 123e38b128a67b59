"""Bytes that are not the method's protobuf message: INVALID_ARGUMENT naming the message
type, counted in the metrics like any refused call, never gRPC's UNKNOWN with an
exception's class name and an ERROR traceback in the server log; the server keeps serving.
Sent through raw channels (identity serializers), as a buggy or hostile client would."""

from __future__ import annotations

import logging
import time

import grpc
import numpy as np
import pytest

from percept.v1 import search_pb2
from services import client
from services.common.metrics import REQUESTS
from services.common.server import RunningServer
from tests.conftest import encode

#: Not a protobuf message: a field tag of wire type 7 (there is none), then junk.
CORRUPT = b"\xff\xff\xff\xff"
#: A length-delimited field (tag 1, wire type 2) that claims 100 bytes and has 3.
TRUNCATED = b"\x0a\x64abc"


def _count(method: str, code: str) -> float:
    service, _, name = method.strip("/").partition("/")
    return REQUESTS.labels(service, name, code)._value.get()


def _identity(data: bytes) -> bytes:
    return data


@pytest.mark.parametrize("payload", [CORRUPT, TRUNCATED], ids=["corrupt", "truncated"])
@pytest.mark.parametrize("method, message", [
    ("/percept.v1.StyleTransfer/Stylize", "percept.v1.StylizeRequest"),
    ("/percept.v1.SuperResolution/Upscale", "percept.v1.UpscaleRequest"),
    ("/percept.v1.Embedding/LabelImage", "percept.v1.LabelImageRequest"),
    ("/percept.v1.ImageSearch/SearchByText", "percept.v1.SearchByTextRequest"),
    ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
])
def test_a_unary_request_that_does_not_parse_is_invalid_argument(
        all_server: RunningServer, caplog: pytest.LogCaptureFixture, method: str, message: str,
        payload: bytes) -> None:
    before = _count(method, "INVALID_ARGUMENT")
    with grpc.insecure_channel(all_server.target) as channel, \
            caplog.at_level(logging.WARNING):
        call = channel.unary_unary(method, request_serializer=_identity,
                                   response_deserializer=_identity)
        with pytest.raises(grpc.RpcError) as error:
            call(payload, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(
        f"the request is not a valid {message} message ({len(payload)} bytes): ")
    assert "DecodeError" not in error.value.details()
    # the server counts a call as its handler returns, which may be just after the client
    # has its answer
    deadline = time.monotonic() + 5
    while _count(method, "INVALID_ARGUMENT") < before + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _count(method, "INVALID_ARGUMENT") == before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("method", "message"), [
    ("/percept.v1.StyleTransfer/StylizeWithImage", "percept.v1.StylizeWithImageRequest"),
    # Health's Watch writes its stream from a coroutine (context.write): another path
    ("/grpc.health.v1.Health/Watch", "grpc.health.v1.HealthCheckRequest")])
def test_a_server_streaming_request_that_does_not_parse_is_invalid_argument(
        all_server: RunningServer, method: str, message: str) -> None:
    with grpc.insecure_channel(all_server.target) as channel:
        call = channel.unary_stream(method, request_serializer=_identity,
                                    response_deserializer=_identity)
        with pytest.raises(grpc.RpcError) as error:
            list(call(CORRUPT, timeout=30))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert _reason(error.value) == "MALFORMED_REQUEST"


def _reason(error: grpc.RpcError) -> str:
    """The google.rpc.ErrorInfo reason of a failed call's status details."""
    from google.rpc import error_details_pb2, status_pb2

    from services.common.errors import STATUS_DETAILS_KEY

    status = status_pb2.Status.FromString(dict(error.trailing_metadata())[STATUS_DETAILS_KEY])
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


def test_a_streamed_message_that_does_not_parse_ends_the_stream_invalid_argument(
        all_server: RunningServer, small_photo: np.ndarray) -> None:
    """AddImages: the good item before the bad message is answered as usual (stored, and
    acknowledged as at the end of a stream), then the stream ends INVALID_ARGUMENT; what
    came after the bad message is not read; the service goes on serving."""
    image = encode(small_photo)
    good = search_pb2.AddImageRequest(id="before-the-bad-one", image=image)
    after = search_pb2.AddImageRequest(id="after-the-bad-one", image=image)
    with grpc.insecure_channel(all_server.target) as channel:
        call = channel.stream_stream("/percept.v1.ImageSearch/AddImages",
                                     request_serializer=_identity,
                                     response_deserializer=search_pb2.AddImagesAck.FromString)
        acks: list[search_pb2.AddImagesAck] = []
        with pytest.raises(grpc.RpcError) as error:
            for ack in call(iter([good.SerializeToString(), CORRUPT,
                                  after.SerializeToString()]), timeout=60,
                            metadata=[("x-request-id", "malformed-stream")]):
                acks.append(ack)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(
            f"the request is not a valid percept.v1.AddImageRequest message ({len(CORRUPT)} "
            "bytes): ")
        assert _reason(error.value) == "MALFORMED_REQUEST"
        assert ("x-request-id", "malformed-stream") in error.value.trailing_metadata()
        assert [(list(a.added), list(a.rejected)) for a in acks] == [
            (["before-the-bad-one"], [])]
        stored = client.get_images(channel, ["before-the-bad-one", "after-the-bad-one"])
        assert [e.id for e in stored.images] == ["before-the-bad-one"]
        assert list(stored.missing) == ["after-the-bad-one"]
        stats = channel.unary_unary("/percept.v1.ImageSearch/Stats",
                                    request_serializer=_identity,
                                    response_deserializer=search_pb2.StatsResponse.FromString)
        assert stats(b"", timeout=30).dimension > 0  # still serving
        # and still adding: a stream after the broken one is acknowledged as usual
        assert [list(a.added) for a in client.add_images(
            channel, [search_pb2.AddImageRequest(id="after-the-broken-stream", image=image)],
            timeout=60)] == [["after-the-broken-stream"]]
        # the session's index is shared: leave it as it was (the demo searches it)
        assert client.delete_images(
            channel, ["before-the-bad-one", "after-the-broken-stream"]).deleted == 2


def test_a_reflection_stream_message_that_does_not_parse_is_invalid_argument(
        all_server: RunningServer) -> None:
    """A stream whose handler is not one of percept's (server reflection) ends
    INVALID_ARGUMENT too, never UNKNOWN."""
    from grpc_reflection.v1alpha import reflection_pb2

    good = reflection_pb2.ServerReflectionRequest(list_services="")
    with grpc.insecure_channel(all_server.target) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=_identity,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        answers: list[reflection_pb2.ServerReflectionResponse] = []
        with pytest.raises(grpc.RpcError) as error:
            for answer in call(iter([good.SerializeToString(), CORRUPT]), timeout=30):
                answers.append(answer)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grpc.reflection.v1alpha.ServerReflectionRequest" in error.value.details()
    assert _reason(error.value) == "MALFORMED_REQUEST"
    assert len(answers) == 1 and answers[0].list_services_response.service
