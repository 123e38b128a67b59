"""How search reports a failed call to a remote embedding service: a busy one stays
"busy, retry" (RESOURCE_EXHAUSTED with the pushback trailer), other statuses keep theirs."""

from __future__ import annotations

import asyncio

import grpc
from grpc.aio import AioRpcError, Metadata

from services.common.errors import RETRY_PUSHBACK_KEY, Busy
from services.search.embedder import RemoteEmbedder


def _converted(code: grpc.StatusCode, details: str, trailers: Metadata) -> object:
    async def convert() -> object:
        embedder = RemoteEmbedder("127.0.0.1:1")
        try:
            return embedder._error(AioRpcError(code, Metadata(), trailers, details))
        finally:
            await embedder.channel.close()

    return asyncio.run(convert())


def test_a_busy_embedding_service_makes_search_answer_busy_too() -> None:
    error = _converted(grpc.StatusCode.RESOURCE_EXHAUSTED, "embed queue is full",
                       Metadata((RETRY_PUSHBACK_KEY, "250")))
    assert isinstance(error, Busy) and error.trailing_metadata[0] == (RETRY_PUSHBACK_KEY, "250")
    assert error.message == "embedding service at 127.0.0.1:1: embed queue is full"


def test_other_failures_keep_their_status_and_no_retry_trailer() -> None:
    too_large = _converted(grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger than max",
                           Metadata())
    assert not isinstance(too_large, Busy)
    assert RETRY_PUSHBACK_KEY not in dict(too_large.trailing_metadata)  # type: ignore[attr-defined]
    assert too_large.code == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    invalid = _converted(grpc.StatusCode.INVALID_ARGUMENT, "not a decodable image", Metadata())
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_the_embedding_service_s_reason_and_field_are_passed_on() -> None:
    """A client of search sees the google.rpc details the embedding service gave: the
    image it sent is the field at fault, and why."""
    from services.common.errors import STATUS_DETAILS_KEY, InvalidArgument, status_details

    details = status_details(grpc.StatusCode.INVALID_ARGUMENT, "truncated image: ...",
                             "IMAGE_TRUNCATED", field="image")
    error = _converted(grpc.StatusCode.INVALID_ARGUMENT, "truncated image: ...",
                       Metadata((STATUS_DETAILS_KEY, details)))
    assert isinstance(error, InvalidArgument)
    assert (error.reason, error.field) == ("IMAGE_TRUNCATED", "image")
    down = _converted(grpc.StatusCode.UNAVAILABLE, "connection refused", Metadata())
    assert down.reason == "EMBEDDING_SERVICE_UNAVAILABLE"  # type: ignore[attr-defined]
