"""Exceptions that carry a gRPC status, and the one place that maps them to an abort.

Each answer also carries the rich error model of google.rpc (the ``grpc-status-details-bin``
trailer, which grpc-go's ``status.FromError``, grpc-java's ``StatusProto.fromThrowable`` and
Python's ``grpc_status.rpc_status.from_call`` read): an ErrorInfo whose ``reason`` a
client can branch on without parsing the message (``QUEUE_FULL``: retry; ``RESULT_TOO_LARGE``:
do not), a RetryInfo on a busy answer, and a BadRequest naming the request field at fault."""

from __future__ import annotations

import re

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

#: ErrorInfo.domain of every percept error.
ERROR_DOMAIN = "percept.v1"
#: The trailer of the google.rpc.Status with the details.
STATUS_DETAILS_KEY = "grpc-status-details-bin"

#: The most bytes a status message may take on the wire (gRPC percent-encodes it into the
#: ``grpc-message`` trailer; clients refuse metadata over 8 KiB by default, so a longer
#: message would turn the precise status into RESOURCE_EXHAUSTED on the client). The
#: details trailer carries the message again, base64-encoded (4/3 as many bytes): the two,
#: with the rest of the trailers, stay under 8 KiB.
MAX_MESSAGE_WIRE_BYTES = 2048
#: The longest description of a BadRequest field violation (characters).
MAX_VIOLATION_CHARS = 200


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


def status_details(code: grpc.StatusCode, message: str, reason: str, *,
                   field: str | None = None, retry_after_ms: int | None = None,
                   metadata: dict[str, str] | None = None) -> bytes:
    """The serialised google.rpc.Status of an answer: ErrorInfo, and RetryInfo and
    BadRequest where they apply."""
    details = [error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN,
                                           metadata=metadata or {})]
    if retry_after_ms is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(retry_after_ms)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if field is not None:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field=field, description=message[:MAX_VIOLATION_CHARS])]))
    packed = []
    for detail in details:
        item = any_pb2.Any()
        item.Pack(detail)
        packed.append(item)
    return status_pb2.Status(code=code.value[0], message=message,
                             details=packed).SerializeToString()


#: What an image is called in messages -> its field in the request (BadRequest).
_IMAGE_FIELDS = {"image": "image", "mask": "mask", "content image": "content_image",
                 "style image": "style_image"}


def field_of(what: str) -> str:
    """The request field of an image named ``what`` in a message: "image 3" is
    ``images[3]`` (EmbedImages), "content image" ``content_image``."""
    numbered = re.fullmatch(r"image (\d+)", what)
    return f"images[{numbered.group(1)}]" if numbered else _IMAGE_FIELDS.get(what, what)


class ServiceError(Exception):
    """An error to report to the client with a precise status code and message, and a
    machine-readable ``reason`` (google.rpc.ErrorInfo); ``field`` names the request field
    at fault (google.rpc.BadRequest)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: The ErrorInfo reason of the class, where it says more than the status code's name.
    default_reason: str | None = None

    def __init__(self, message: str, code: grpc.StatusCode | None = None, *,
                 reason: str | None = None, field: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.reason = reason or self.default_reason or self.code.name
        self.field = field
        self.metadata = metadata

    @property
    def message(self) -> str:
        """The status message, cut to what a client accepts in a trailer."""
        return fit_status_message(str(self))

    @property
    def retry_after_ms(self) -> int | None:
        """How long a client should wait before it retries; None: a retry will not help."""
        return None

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """Sent with the status: the google.rpc.Status details (and, for Busy, gRPC's
        retry pushback)."""
        return ((STATUS_DETAILS_KEY, status_details(
            self.code, self.message, self.reason, field=self.field,
            retry_after_ms=self.retry_after_ms, metadata=self.metadata)),)


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

    default_reason = "QUEUE_FULL"

    def __init__(self, message: str, retry_after_ms: int = 100, *,
                 reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self._retry_after_ms = retry_after_ms

    @property
    def retry_after_ms(self) -> int:
        return self._retry_after_ms

    @property
    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return ((RETRY_PUSHBACK_KEY, str(self.retry_after_ms)), *super().trailing_metadata)


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NO_MODEL_INSTALLED"


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class StartupError(RuntimeError):
    """A start-up failure whose message says all there is to know (a port in use, a broken
    model artifact): it is logged without a traceback."""
