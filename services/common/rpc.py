"""Helpers shared by every servicer: error mapping, the failed calls' log lines, and
deadlines.

Each failed call gets one log line (but for floods, below; logger ``percept.rpc``, message
``call failed``), with
the call's ``request_id``, its ``method``, the status ``code``, the ErrorInfo ``reason``,
the request ``field`` at fault where there is one, and the status message as ``detail``
(cut to :data:`MAX_LOGGED_DETAIL_BYTES`: it may quote what the client sent). Its level
follows what the failure says of the server, and how many such calls a flood can make:

- DEBUG: refusals a retry is meant to cure, sent before any work is done (busy answers
  with the retry trailer: ``QUEUE_FULL``, ``PIXEL_BUDGET_FULL``, the
  ``--max-concurrent-rpcs`` limit; the readiness gate's ``SERVER_LOADING`` and
  ``SERVER_DRAINING``), and calls their client cancelled. They come by the thousand a
  second under overload, and the metrics count them (``percept_requests_total``,
  ``percept_rejected_total``).
- INFO: the other refusals: a bad request (INVALID_ARGUMENT, malformed bytes included,
  NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE, UNIMPLEMENTED...), DEADLINE_EXCEEDED, a
  result too large, a dependency UNAVAILABLE.
- WARNING: a call the drain's grace ran out on (UNAVAILABLE, ``SERVER_DRAINING``; at most
  ``--max-concurrent-rpcs`` of them, with one more line naming their ids).
- ERROR: INTERNAL (a bug: ``unhandled error``, with its traceback), UNKNOWN, DATA_LOSS.

A successful call writes no line at INFO or above.

A flood of one kind of failure below ERROR (the same method, code and reason) writes the
first ``--failed-call-log-limit`` lines (20) of each 10 s, and then one line, ``failed
calls not logged``, at the highest level held back, with the kind, how many ``calls``,
the ``seconds`` from its window's opening to the count, and the held calls'
``request_ids`` (the first 20) (:class:`services.common.line_budget.LineBudget`, one per
process); the metrics count every call. ERROR lines, faults of the server's own, are all
written, as are the drain's."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from services.common.errors import (
    STATUS_DETAILS_KEY,
    ServiceError,
    fit_status_message,
    status_details,
)
from services.common.line_budget import Held, LineBudget
from services.common.request_ids import current_request_id, with_request_id

log = logging.getLogger("percept.rpc")
Self = TypeVar("Self")

#: The most bytes of a failed call's status message its log line keeps (as a status
#: message is measured, percent-encoded; the message may quote what the client sent).
MAX_LOGGED_DETAIL_BYTES = 300
#: The codes of a failure on the server's side: ERROR.
_SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                            grpc.StatusCode.DATA_LOSS})


#: Lines of one kind of failed call each window (``--failed-call-log-limit``; the server
#: sets it): the first so many are written, the rest counted.
DEFAULT_FAILED_CALL_LINES = 20
FAILED_CALL_WINDOW_SECONDS = 10.0
FAILED_CALL_LINES = LineBudget(DEFAULT_FAILED_CALL_LINES, FAILED_CALL_WINDOW_SECONDS)


def _log_held(held: Held) -> None:
    """The line that counts a kind's held-back lines, written outside any call (it would
    carry the request id of the call that happens to tell it), with the held calls' own
    ids, the first 20."""
    assert isinstance(held.kind, tuple)
    method, code, reason = held.kind
    extra: dict[str, Any] = {"method": method, "calls": held.lines,
                             "seconds": round(held.seconds, 1)}
    if code:
        extra["code"] = code
    if reason:
        extra["reason"] = reason
    if held.notes:
        more = held.lines - len(held.notes)
        extra["request_ids"] = ", ".join(held.notes) + (f" and {more} more" if more > 0
                                                       else "")
    contextvars.Context().run(log.log, held.level, "failed calls not logged", extra=extra)


def log_held_lines(everything: bool = False) -> None:
    """One line for each kind of failed call whose lines were held back in a window that
    has ended (every window, with ``everything``: the server stops)."""
    for held in FAILED_CALL_LINES.ended(everything):
        _log_held(held)


async def log_held_lines_every(seconds: float = FAILED_CALL_WINDOW_SECONDS) -> None:
    """:func:`log_held_lines` every ``seconds`` until cancelled (the server runs it)."""
    while True:
        await asyncio.sleep(seconds)
        log_held_lines()


def _admitted(method: str, code: str | None, reason: str | None, level: int,
              request_id: str | None) -> bool:
    """Whether a failed call's line is written (the budget of its kind; ERROR lines, a
    fault of the server's own, always are); first tells the lines of that kind held back
    in the window that ended before it."""
    if level >= logging.ERROR:
        return True
    admitted, held = FAILED_CALL_LINES.admit((method, code, reason), level, request_id)
    if held is not None:
        _log_held(held)
    return admitted


def failure_level(code: grpc.StatusCode | None, *, retryable: bool = False) -> int:
    """The level of a failed call's line (see the module's docstring): ``retryable`` is a
    refusal a retry is meant to cure, sent before any work (a busy answer)."""
    if retryable or code in (None, grpc.StatusCode.CANCELLED):
        return logging.DEBUG
    if code in _SERVER_FAULTS:
        return logging.ERROR
    return logging.INFO


def log_failed_call(method: str, code: grpc.StatusCode | None, message: str | None = None,
                    *, reason: str | None = None, field: str | None = None,
                    retryable: bool = False, level: int | None = None,
                    request_id: str | None = None, every_one: bool = False) -> None:
    """Writes the one log line of a failed call (see the module's docstring). ``method``:
    its name, or gRPC's full path (``/percept.v1.StyleTransfer/Stylize``: its last part is
    kept); ``request_id``: the call's, where this runs outside its task (the drain);
    ``every_one``: not held back by the flood budget (the drain's, at most
    ``--max-concurrent-rpcs`` once)."""
    if level is None:
        level = failure_level(code, retryable=retryable)
    if not log.isEnabledFor(level):  # cheap under a flood of busy answers
        return
    name = method.rpartition("/")[2]
    if request_id is None:
        request_id = current_request_id.get()
    if not every_one and not _admitted(name, code.name if code is not None else None,
                                       reason, level, request_id):
        return
    extra: dict[str, Any] = {"method": name}
    if request_id is not None:
        extra["request_id"] = request_id
    if code is not None:
        extra["code"] = code.name
    if reason:
        extra["reason"] = reason
    if field:
        extra["field"] = field
    if message:
        extra["detail"] = fit_status_message(message, MAX_LOGGED_DETAIL_BYTES)
    log.log(level, "call failed", extra=extra)


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext, method: str
                     ) -> None:
    """Called in an ``except`` block: a ServiceError becomes its status and message (and
    its log line, :func:`log_failed_call`); an abort already under way goes on; anything
    else is logged with its traceback and answered INTERNAL, without leaking internals."""
    if isinstance(error, (grpc.aio.AbortError, grpc.aio.UsageError)):
        raise error
    if isinstance(error, ServiceError):
        log_failed_call(method, error.code, error.message, reason=error.reason,
                        field=error.field, retryable=error.retry_after_ms is not None)
        await context.abort(error.code, error.message,
                            with_request_id(context, error.trailing_metadata))
    else:
        request_id = current_request_id.get()
        # a bug: every one is written, with its traceback (its client is told to look)
        log.exception("unhandled error", extra={
            "method": method, "code": "INTERNAL", "reason": "INTERNAL",
            **({"request_id": request_id} if request_id is not None else {})})
        message = "internal error; see the server log" + (
            f" (request id {request_id})" if request_id else "")
        details = status_details(grpc.StatusCode.INTERNAL, message, "INTERNAL")
        await context.abort(grpc.StatusCode.INTERNAL, message,
                            with_request_id(context, ((STATUS_DETAILS_KEY, details),)))


def unary_errors(method: Callable[[Self, Any, grpc.aio.ServicerContext], Awaitable[Any]]
                 ) -> Callable[[Self, Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """Turns a raised ServiceError into ``context.abort(code, message)``; logs other errors
    and answers INTERNAL without leaking internals."""

    @functools.wraps(method)
    async def wrapper(self: Self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as error:
            await _abort_for(error, context, method.__name__)

    return wrapper


def stream_errors(method: Callable[[Self, Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
                  ) -> Callable[[Self, Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    """The streaming-response counterpart of :func:`unary_errors`."""

    @functools.wraps(method)
    async def wrapper(self: Self, request: Any,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in method(self, request, context):
                yield response
        except Exception as error:
            await _abort_for(error, context, method.__name__)

    return wrapper


def time_remaining(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds until the client's deadline, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None else max(0.0, remaining)
