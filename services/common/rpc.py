"""Helpers shared by every servicer: error mapping and deadlines."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from services.common.errors import STATUS_DETAILS_KEY, ServiceError, status_details
from services.common.request_ids import current_request_id, with_request_id

log = logging.getLogger("percept.rpc")
Self = TypeVar("Self")


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext, method: str
                     ) -> None:
    """Called in an ``except`` block: a ServiceError becomes its status and message; an
    abort already under way goes on; anything else is logged with its traceback and
    answered INTERNAL, without leaking internals."""
    if isinstance(error, (grpc.aio.AbortError, grpc.aio.UsageError)):
        raise error
    if isinstance(error, ServiceError):
        await context.abort(error.code, error.message,
                            with_request_id(context, error.trailing_metadata))
    else:
        log.exception("unhandled error", extra={"method": method})
        request_id = current_request_id.get()
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
