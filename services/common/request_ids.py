"""Request ids: each call's id, from the caller's ``x-request-id`` header (the name Envoy,
nginx and most tracing set ups use) or made here, sent back in the call's trailing
metadata and stamped on every log line written while the call runs, so that a client's
report ("request 3f2a... failed") finds the server's lines."""

from __future__ import annotations

import contextvars
import logging
import uuid
from typing import Any

import grpc

REQUEST_ID_KEY = "x-request-id"
#: The longest id taken from a caller (a longer one is replaced by one made here).
MAX_REQUEST_ID_CHARS = 128

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "percept_request_id", default=None)


def _usable(value: Any) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= MAX_REQUEST_ID_CHARS
            and value.isprintable())


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's id, or a new one (16 hex digits)."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and _usable(value):
            return str(value)
    return uuid.uuid4().hex[:16]


def begin_request(context: grpc.aio.ServicerContext) -> str:
    """Gives the call its id: in its trailing metadata, and for the log lines of the task
    (and of the threads it starts with asyncio.to_thread, which copy the context)."""
    request_id = request_id_of(context)
    context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
    current_request_id.set(request_id)
    return request_id


def with_request_id(context: grpc.aio.ServicerContext,
                    metadata: tuple[tuple[str, str | bytes], ...]
                    ) -> tuple[tuple[str, str | bytes], ...]:
    """``metadata`` for an abort, with the call's id kept (an abort's metadata replaces
    what was set before)."""
    kept = tuple((k, v) for k, v in (context.trailing_metadata() or ()) if k == REQUEST_ID_KEY)
    return kept + tuple(metadata)


class RequestIdFilter(logging.Filter):
    """Stamps ``request_id`` on the records written while a call runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True
