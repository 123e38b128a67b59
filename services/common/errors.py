"""Exceptions that carry a gRPC status, and the one place that maps them to an abort."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error to report to the client with a precise status code and message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Sent with the status (none, but for Busy)."""
        return ()


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


#: The trailer of a "busy" answer: milliseconds the client should wait before it retries
#: (gRPC's own name for server pushback, from its retry design, gRFC A6).
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class Busy(ResourceExhausted):
    """RESOURCE_EXHAUSTED because the server is busy (its queue or request slots are full):
    the answer carries the ``grpc-retry-pushback-ms`` trailer, which tells a client that a
    retry may succeed, and when; a message too large is RESOURCE_EXHAUSTED without it."""

    def __init__(self, message: str, retry_after_ms: int = 100) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_PUSHBACK_KEY, str(self.retry_after_ms)),)


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
