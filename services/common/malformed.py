"""Requests whose bytes are not the protobuf message the method takes: INVALID_ARGUMENT.

gRPC parses a request before any handler runs, and a parse error there becomes UNKNOWN
with the exception's class name in the message, an ERROR traceback in the log for each
such call (any client can flood it) and no count in the metrics. This interceptor parses
instead with a deserializer that cannot fail: bytes that do not parse arrive at the
handler as a :class:`Malformed` marker, which is answered INVALID_ARGUMENT there, so the
call is an ordinary refused request: counted, and logged as one, at INFO with its request
id (reason ``MALFORMED_REQUEST``; ``rpc.log_failed_call``), without a traceback. In a
request stream, the message that does not parse raises :class:`MalformedMessage` where
the handler reads it, so that the handler can first finish the items that came whole
before it (AddImages stores and acknowledges them); the stream then ends
INVALID_ARGUMENT."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from services.common.errors import (
    STATUS_DETAILS_KEY,
    InvalidArgument,
    fit_status_message,
    status_details,
)
from services.common.request_ids import with_request_id
from services.common.rpc import log_failed_call


class Malformed:
    """Stands for a request message that did not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class MalformedMessage(InvalidArgument):
    """Raised by a request stream where a message did not parse: the handler may finish
    what came before it, then end the call with it (``rpc.stream_errors`` does, and the
    interceptor does for a handler that lets it out)."""

    default_reason = "MALFORMED_REQUEST"


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString, a classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request"))


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    name = _message_name(deserializer)

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError, or a message that fails its own checks
            return Malformed(fit_status_message(
                f"the request is not a valid {name} message ({len(data)} bytes): "
                f"{error}"))

    return parse


async def _refuse(context: grpc.aio.ServicerContext, message: str, method: str) -> None:
    log_failed_call(method, grpc.StatusCode.INVALID_ARGUMENT, message,
                    reason="MALFORMED_REQUEST")
    details = status_details(grpc.StatusCode.INVALID_ARGUMENT, message, "MALFORMED_REQUEST")
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message,
                        with_request_id(context, ((STATUS_DETAILS_KEY, details),)))


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT to a request (or a streamed request message) that does not
    parse as the method's message type, instead of gRPC's UNKNOWN."""

    async def intercept_service(self, continuation: Any,
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = _tolerant(handler.request_deserializer)
        method = handler_call_details.method
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, Malformed):
                    await _refuse(context, request.message, method)
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=parse, response_serializer=serialize)
        if handler.unary_stream is not None:
            streaming = handler.unary_stream
            if inspect.isasyncgenfunction(streaming):
                async def unary_stream(request: Any, context: grpc.aio.ServicerContext
                                       ) -> AsyncIterator[Any]:
                    if isinstance(request, Malformed):
                        await _refuse(context, request.message, method)
                    async for response in streaming(request, context):
                        yield response

                return grpc.unary_stream_rpc_method_handler(
                    unary_stream, request_deserializer=parse, response_serializer=serialize)

            async def written(request: Any, context: grpc.aio.ServicerContext) -> Any:
                # a coroutine that writes its stream with context.write() (health Watch)
                if isinstance(request, Malformed):
                    await _refuse(context, request.message, method)
                return await streaming(request, context)

            return grpc.unary_stream_rpc_method_handler(
                written, request_deserializer=parse, response_serializer=serialize)

        def checked(requests: Any) -> AsyncIterator[Any]:
            async def generate() -> AsyncIterator[Any]:
                async for request in requests:
                    if isinstance(request, Malformed):
                        raise MalformedMessage(request.message)
                    yield request
            return generate()

        if handler.stream_unary is not None:
            collect = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await collect(checked(requests), context)
                except MalformedMessage as error:  # let out by the handler
                    await _refuse(context, error.message, method)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, request_deserializer=parse, response_serializer=serialize)
        both = handler.stream_stream
        if inspect.isasyncgenfunction(both):
            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext
                                    ) -> AsyncIterator[Any]:
                try:
                    async for response in both(checked(requests), context):
                        yield response
                except MalformedMessage as error:  # let out by the handler
                    await _refuse(context, error.message, method)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, request_deserializer=parse, response_serializer=serialize)

        async def stream_written(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await both(checked(requests), context)
            except MalformedMessage as error:  # let out by the handler
                await _refuse(context, error.message, method)

        return grpc.stream_stream_rpc_method_handler(
            stream_written, request_deserializer=parse, response_serializer=serialize)
