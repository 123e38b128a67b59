"""Client calls retried while the server answers busy, or is briefly unavailable.

A percept server answers busy with RESOURCE_EXHAUSTED and the ``grpc-retry-pushback-ms``
trailer (its queue, or its pixel budget, is full: a retry may succeed). The same status
without that trailer (a message over the size limit) would fail again, so it is not
retried. The first retry waits the server's pushback, later ones twice the last wait (up
to :data:`MAX_BACKOFF_SECONDS`, and never less than the pushback: the server knows how
long its batches take), with jitter so that clients refused together do not come back
together.

A server that is up but not ready answers UNAVAILABLE with the ErrorInfo reason
SERVER_LOADING (its models are still loading) or SERVER_DRAINING (it is shutting down: a
retry reaches another replica, or finds no server and fails at once); every call retries
those too, for up to :data:`UNAVAILABLE_PATIENCE_SECONDS`. SERVER_DRAINING also ends a call
the drain's grace ran out on, whose work may have been done: a caller whose call changes
something that a second try would count differently (a delete) retries SERVER_LOADING
only (``not_ready``).

The same goes for a call whose connection broke after the server had sent its GOAWAY
(:data:`LOST_AFTER_GOAWAY`). A server sends one when it drains, and when a connection is
older than its maximum age (5 minutes: clients then find the pods a scale-up added). gRPC's
server closes the TCP connection as soon as the last call on it has written its answer,
and under load that close can reset the connection before a large answer has reached the
client (a socket closed with bytes not yet read sends a TCP reset, which drops what its send
buffer still holds). With plain grpcio (no percept code) on a loaded 2-core machine, 9 to
22 drains in 150 lost a 4 MB answer so, and none of 150 lost a 200 kB one: the server had
done the work, and the client saw UNAVAILABLE "... Connection reset by peer ... (GOAWAY
received ...)". A call cut off after a GOAWAY for another reason may carry the same words
without its work done: either way the retry, over a new connection, is right for a call
that may run twice.

Other UNAVAILABLE answers (no server at the address, a connection lost without a GOAWAY)
are retried only by callers that ask (``retry_unavailable``: the folder runs, whose server
may restart under them).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection
from typing import TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common.errors import RETRY_PUSHBACK_KEY

T = TypeVar("T")

#: The longest wait between two tries of a busy request (seconds).
MAX_BACKOFF_SECONDS = 1.0
#: How long a request is retried while the server is unavailable (seconds, at most).
UNAVAILABLE_PATIENCE_SECONDS = 60.0
#: The wait before retrying an unavailable server (seconds; it sends no pushback).
UNAVAILABLE_PUSHBACK_SECONDS = 0.25
#: The reason :func:`unavailable_reason` gives a call whose connection broke after the
#: server's GOAWAY (a drain, or a connection's maximum age): gRPC says so in the details.
LOST_AFTER_GOAWAY = "CONNECTION_LOST_AFTER_GOAWAY"
#: What gRPC's client adds to the details of a call failed on a connection after a GOAWAY.
_GOAWAY_MARK = "GOAWAY received"
#: The reasons of an UNAVAILABLE answer worth a retry for every call that may be repeated:
#: a server that is there but not ready (ErrorInfo reasons of services.common.server's
#: readiness gate), and a connection lost after the server's GOAWAY.
NOT_READY_REASONS = frozenset({"SERVER_LOADING", "SERVER_DRAINING", LOST_AFTER_GOAWAY})


def describe(error: grpc.RpcError) -> str:
    """``"CODE: details"``, as the CLI prints a failed call."""
    return f"{error.code().name}: {error.details()}"


class RetriedTooLong(Exception):
    """Still busy (or unavailable) after all the retries allowed."""

    def __init__(self, error: grpc.RpcError, waited: float) -> None:
        super().__init__(f"{describe(error)} (retried for {waited:.0f} s)")
        self.error = error
        self.waited = waited


def pushback_seconds(error: grpc.RpcError) -> float | None:
    """The server's retry pushback when ``error`` is a busy answer; None when it is not (or
    the pushback is negative: gRFC A6's "do not retry")."""
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                milliseconds = int(value)
            except ValueError:
                return None
            return milliseconds / 1000 if milliseconds >= 0 else None
    return None


def error_reason(error: grpc.RpcError) -> str | None:
    """The google.rpc.ErrorInfo reason a percept server gave with ``error`` (None: none,
    as for a failure gRPC itself reports, such as no server at the address)."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError):  # a status that disagrees with the call's
        return None
    info = error_details_pb2.ErrorInfo()
    for detail in status.details if status is not None else ():
        if detail.Unpack(info):
            return str(info.reason)
    return None


def unavailable_reason(error: grpc.RpcError) -> str | None:
    """Why an UNAVAILABLE call failed: the server's ErrorInfo reason;
    :data:`LOST_AFTER_GOAWAY` for a connection that broke after the server's GOAWAY; else
    None (and None for any other status)."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    reason = error_reason(error)
    if reason is None and _GOAWAY_MARK in (error.details() or ""):
        return LOST_AFTER_GOAWAY
    return reason


def retrying(call: Callable[[], T], *, patience: float, retry_unavailable: bool = False,
             wait: Callable[[float], None] = time.sleep,
             progress: Callable[[], int] | None = None,
             not_ready: Collection[str] = NOT_READY_REASONS) -> T:
    """``call()``, tried again while it fails busy (for up to ``patience`` seconds from the
    first such answer), or unavailable (up to a minute of that) where the server gives one
    of the ``not_ready`` reasons or, with ``retry_unavailable``, for any reason. Any other
    failure is raised at once; raises :class:`RetriedTooLong` when the time is up.
    ``wait(seconds)`` sleeps between tries (a caller that can be stopped raises from it).
    ``progress()``, for a call that does part of its work before it fails (a stream): a
    count of what is done; when a try has moved it on, the patience and the backoff start
    again."""
    started: float | None = None
    backoff = 0.0
    done = progress() if progress is not None else 0
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            pushback = pushback_seconds(error)
            limit = patience
            if (pushback is None and error.code() == grpc.StatusCode.UNAVAILABLE
                    and (retry_unavailable or unavailable_reason(error) in not_ready)):
                pushback = UNAVAILABLE_PUSHBACK_SECONDS
                limit = min(limit, UNAVAILABLE_PATIENCE_SECONDS)
            if pushback is None:
                raise
            now = time.monotonic()
            if progress is not None and progress() != done:
                done, started, backoff = progress(), None, 0.0
            started = now if started is None else started
            waited = now - started
            if waited >= limit:
                raise RetriedTooLong(error, waited) from error
            # at least the server's pushback (a Gatys queue asks for seconds); beyond it,
            # doubling waits of up to MAX_BACKOFF_SECONDS
            backoff = max(pushback, min(2 * backoff, MAX_BACKOFF_SECONDS))
            delay = min(backoff * random.uniform(0.75, 1.25), max(limit - waited, 0.0))
        wait(delay)
