"""Exceptions that carry a gRPC status, and the one place that maps them to an abort."""

from __future__ import annotations

import grpc

#: The most bytes a status message may take on the wire (gRPC percent-encodes it into the
#: ``grpc-message`` trailer; clients refuse metadata over 8 KiB by default, so a longer
#: message would turn the precise status into RESOURCE_EXHAUSTED on the client).
MAX_MESSAGE_WIRE_BYTES = 4096


def _wire_bytes(text: str) -> int:
    """The size of ``text`` percent-encoded as gRPC sends a status message."""
    return sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in text.encode())


def fit_status_message(text: str, limit: int = MAX_MESSAGE_WIRE_BYTES) -> str:
    """``text``, cut (and marked) where it would not fit in ``limit`` wire bytes."""
    if _wire_bytes(text) <= limit:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits with the marker
        middle = (low + high + 1) // 2
        if _wire_bytes(text[:middle]) + 40 <= limit:
            low = middle
        else:
            high = middle - 1
    return f"{text[:low]}... ({len(text) - low} characters cut)"


def shown(value: str, limit: int = 80) -> str:
    """``value`` as a client sent it, quoted for a message, its first ``limit`` characters
    only (a 20 000-character style name is not echoed whole)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


class ServiceError(Exception):
    """An error to report to the client with a precise status code and message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        """The status message, cut to what a client accepts in a trailer."""
        return fit_status_message(str(self))

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
