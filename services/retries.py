"""Client calls retried while the server answers busy, or is briefly unavailable.

A percept server answers busy with RESOURCE_EXHAUSTED and the ``grpc-retry-pushback-ms``
trailer (its queue, or its pixel budget, is full: a retry may succeed). The same status
without that trailer (a message over the size limit) would fail again, so it is not
retried. The first retry waits the server's pushback, later ones twice the last wait (up
to :data:`MAX_BACKOFF_SECONDS`, and never less than the pushback: the server knows how
long its batches take), with jitter so that clients refused together do not come back
together.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from services.common.errors import RETRY_PUSHBACK_KEY

T = TypeVar("T")

#: The longest wait between two tries of a busy request (seconds).
MAX_BACKOFF_SECONDS = 1.0
#: How long a request is retried while the server is unavailable (seconds, at most).
UNAVAILABLE_PATIENCE_SECONDS = 60.0
#: The wait before retrying an unavailable server (seconds; it sends no pushback).
UNAVAILABLE_PUSHBACK_SECONDS = 0.25


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


def retrying(call: Callable[[], T], *, patience: float, retry_unavailable: bool = False,
             wait: Callable[[float], None] = time.sleep,
             progress: Callable[[], int] | None = None) -> T:
    """``call()``, tried again while it fails busy (for up to ``patience`` seconds from the
    first such answer) or, with ``retry_unavailable``, unavailable (up to a minute of
    that). Any other failure is raised at once; raises :class:`RetriedTooLong` when the
    time is up. ``wait(seconds)`` sleeps between tries (a caller that can be stopped raises
    from it). ``progress()``, for a call that does part of its work before it fails (a
    stream): a count of what is done; when a try has moved it on, the patience and the
    backoff start again."""
    started: float | None = None
    backoff = 0.0
    done = progress() if progress is not None else 0
    while True:
        try:
            return call()
        except grpc.RpcError as error:
            pushback = pushback_seconds(error)
            limit = patience
            if (pushback is None and retry_unavailable
                    and error.code() == grpc.StatusCode.UNAVAILABLE):
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
