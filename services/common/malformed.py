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
INVALID_ARGUMENT.

A large message (:data:`PARSE_IN_THREAD_BYTES`) is parsed in a thread of its own, not on
the event loop that every call of the process (health checks too) waits on: gRPC's
deserializer cannot wait, so it hands the bytes on unparsed and the handler here parses
them before anything else sees the request."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
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

#: Request messages of this many bytes or more are parsed in :data:`_PARSER`'s thread,
#: smaller ones on the event loop. Parsing copies the bytes: 0.6 ms for 4 MiB, 35-50 ms
#: for a 50 MB UpscaleRequest here (about 10 ms with ``--retain-memory``'s warm heap), all
#: of it holding up the loop, so every call of the process, health checks included; 16
#: such messages arriving together held it for 0.6 s, 64 would for seconds. A hop to a
#: thread costs about 0.1 ms, as much as parsing 1 MiB (0.09 ms): below that, inline is
#: cheaper.
PARSE_IN_THREAD_BYTES = 1 << 20

#: One thread parses the large messages, one after another. The parser (protobuf's upb)
#: holds the GIL for the whole of a parse, so a thread does not make a parse take the loop
#: any less; what it gains is that the loop gets the GIL back *between* parses, so a health
#: check waits for one parse at most, not for every one queued. With a thread per parse
#: (asyncio.to_thread's pool) the loop competes with the other parsing threads for the GIL
#: and gained nothing: 16 concurrent 50 MB parses held a loop for 0.6-0.76 s inline and
#: with asyncio.to_thread, against 50-114 ms (about one parse) with this one thread (with
#: --retain-memory: 150-170 ms inline, 260-400 ms with asyncio.to_thread, 9-34 ms here).
_PARSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="percept-parse")


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


class _Unparsed:
    """The bytes of a request message of :data:`PARSE_IN_THREAD_BYTES` or more, and how
    to parse them (as a :class:`Malformed` if they do not parse): :func:`_parsed`."""

    __slots__ = ("data", "parse")

    def __init__(self, data: bytes, parse: Callable[[bytes], Any]) -> None:
        self.data = data
        self.parse = parse


async def _parsed(request: Any) -> Any:
    """The request message: parsed in :data:`_PARSER`'s thread if the deserializer left
    it unparsed, in a copy of the call's context (the request id goes along, as with
    asyncio.to_thread). A call cancelled while its parse waits is not parsed."""
    if not isinstance(request, _Unparsed):
        return request
    data, request.data = request.data, b""  # whoever else holds the marker, not the bytes
    return await asyncio.get_running_loop().run_in_executor(
        _PARSER, contextvars.copy_context().run, request.parse, data)


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString, a classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request"))


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    name = _message_name(deserializer)

    def parse_now(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError, or a message that fails its own checks
            return Malformed(fit_status_message(
                f"the request is not a valid {name} message ({len(data)} bytes): "
                f"{error}"))

    def parse(data: bytes) -> Any:  # on the event loop
        if len(data) >= PARSE_IN_THREAD_BYTES:
            return _Unparsed(data, parse_now)  # to the handler's _parsed
        return parse_now(data)

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
                request = await _parsed(request)
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
                    request = await _parsed(request)
                    if isinstance(request, Malformed):
                        await _refuse(context, request.message, method)
                    async for response in streaming(request, context):
                        yield response

                return grpc.unary_stream_rpc_method_handler(
                    unary_stream, request_deserializer=parse, response_serializer=serialize)

            async def written(request: Any, context: grpc.aio.ServicerContext) -> Any:
                # a coroutine that writes its stream with context.write() (health Watch)
                request = await _parsed(request)
                if isinstance(request, Malformed):
                    await _refuse(context, request.message, method)
                return await streaming(request, context)

            return grpc.unary_stream_rpc_method_handler(
                written, request_deserializer=parse, response_serializer=serialize)

        def checked(requests: Any) -> AsyncIterator[Any]:
            async def generate() -> AsyncIterator[Any]:
                async for unparsed in requests:
                    request = await _parsed(unparsed)
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
