"""The one server bootstrap every percept service runs on.

Lifecycle of a server process:

1. bind the gRPC port (grpc.aio; TLS with ``--tls-cert``: services/common/tls.py) with
   the message-size limits, the metrics interceptor, ``grpc.health.v1`` and server
   reflection; with ``--health-port``, ``grpc.health.v1`` alone in plaintext there too
   (the kubelet's gRPC probes speak no TLS); start the Prometheus ``/metrics`` port;
2. report NOT_SERVING while each service loads its models and runs a warm-up inference;
3. report SERVING;
4. on SIGTERM or SIGINT: report NOT_SERVING at once, stop taking new RPCs, let in-flight
   RPCs finish within ``--drain-seconds`` (those still running a moment before it ends are
   answered UNAVAILABLE, SERVER_DRAINING), and exit 0.

At most ``--max-concurrent-rpcs`` calls to the model services run at once
(:class:`WorkCalls`); one more is answered busy before its request message is read.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import gc
import importlib
import inspect
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from percept.v1 import server_pb2, server_pb2_grpc
from services.common import allocator
from services.common.authorization import Authorization, parse_rules, served_methods
from services.common.batching import (
    DEFAULT_PUSHBACK_MS,
    MAX_PUSHBACK_MS,
    MIN_PUSHBACK_MS,
    MicroBatcher,
    running_mean,
)
from services.common.config import (
    INFRASTRUCTURE_CALLS,
    ServerConfig,
    bare_host,
    listen_address,
)
from services.common.connection_options import server_options
from services.common.cpus import available_cpus
from services.common.errors import (
    STATUS_DETAILS_KEY,
    Busy,
    ServiceError,
    StartupError,
    status_details,
)
from services.common.fair_share import FairShares, client_of, shown
from services.common.logs import configure_logging
from services.common.malformed import MalformedRequests
from services.common.metrics import (
    BUILD_INFO,
    INFRASTRUCTURE_SERVICES,
    REJECTED,
    CallWithoutRequest,
    MetricsInterceptor,
    MetricsServers,
    build_revision,
    current_call,
    publish_models,
    ran_out_of_time,
    start_metrics_server,
    start_series,
    withdraw_models,
)
from services.common.request_ids import current_request_id, with_request_id
from services.common.rpc import (
    FAILED_CALL_LINES,
    log_failed_call,
    log_held_lines,
    log_held_lines_every,
)
from services.common.server_info import SERVICE_NAME as SERVER_INFO
from services.common.server_info import ServerInfoServicer, percept_version
from services.common.stall_watch import StallWatch
from services.common.tls import ServerCredentials, ServerTlsFiles, TlsError, refresh_every

log = logging.getLogger("percept.server")


class ServiceModule(abc.ABC):
    """One gRPC service hosted by the common server core."""

    #: short name, as in ``percept serve NAME``
    name: str = ""
    #: fully-qualified gRPC service name, as reported by health and reflection
    full_name: str = ""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        #: the other modules hosted by the same process (set by PerceptServer)
        self.siblings: list[ServiceModule] = []

    @abc.abstractmethod
    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Registers the servicer on ``server``."""

    async def load(self) -> None:  # noqa: B027 - optional hook
        """Loads models and starts batchers; blocking work belongs in a thread."""

    async def warmup(self) -> None:  # noqa: B027 - optional hook
        """Runs one representative inference so the first request is not slow."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Releases resources after the server stopped."""

    def model_infos(self) -> list[server_pb2.ModelInfo]:
        """The models this service serves, once loaded (percept.v1.ServerInfo)."""
        return []

    def batchers(self) -> list[MicroBatcher[Any, Any]]:
        """The batchers its calls wait on, once loaded: one whose batch stalls (a hung
        GPU) turns its health NOT_SERVING (:class:`StallWatch`)."""
        return []


# Service name -> "module:class"; imported lazily so one service never loads another's code.
SERVICE_CLASSES = {
    "superres": "services.superres.service:SuperResolutionService",
    "style": "services.style.service:StyleTransferService",
    "embed": "services.embed.service:EmbeddingService",
    "search": "services.search.service:ImageSearchService",
}


def build_modules(config: ServerConfig) -> list[ServiceModule]:
    modules = []
    for name in config.services:
        module_path, _, class_name = SERVICE_CLASSES[name].partition(":")
        cls = getattr(importlib.import_module(module_path), class_name)
        modules.append(cls(config))
    return modules


#: Method-name prefixes of the infrastructure services (health, reflection).
_INFRASTRUCTURE = tuple(f"/{name}" for name in INFRASTRUCTURE_SERVICES)


class ReadinessGate(grpc.aio.ServerInterceptor):
    """Answers UNAVAILABLE to service RPCs until the models are loaded and warm (health and
    reflection always pass), so an early client retries instead of meeting half-loaded
    state."""

    def __init__(self) -> None:
        self.ready = False
        self.reason = ("the server is still loading its models; retry when grpc.health.v1 "
                       "reports SERVING")
        self.error_reason = "SERVER_LOADING"  # google.rpc.ErrorInfo

    def close(self) -> None:
        """Refuses new service RPCs from now on (the drain)."""
        self.ready = False
        self.reason = "the server is shutting down; retry on another replica"
        self.error_reason = "SERVER_DRAINING"

    async def intercept_service(self, continuation: Any,
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or self.ready or method.startswith(_INFRASTRUCTURE):
            return handler

        reason, error_reason = self.reason, self.error_reason
        details = ((STATUS_DETAILS_KEY, status_details(
            grpc.StatusCode.UNAVAILABLE, reason, error_reason)),)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            # a refusal the client is told to retry, before any work: DEBUG, like busy
            log_failed_call(method, grpc.StatusCode.UNAVAILABLE, reason, reason=error_reason,
                            retryable=True)
            await context.abort(grpc.StatusCode.UNAVAILABLE, reason,
                                with_request_id(context, details))

        for kind, factory in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                              ("unary_stream", grpc.unary_stream_rpc_method_handler),
                              ("stream_unary", grpc.stream_unary_rpc_method_handler),
                              ("stream_stream", grpc.stream_stream_rpc_method_handler)):
            if getattr(handler, kind):
                return factory(refuse, request_deserializer=handler.request_deserializer,
                               response_serializer=handler.response_serializer)
        return handler


class InfrastructureStreams(grpc.aio.ServerInterceptor):
    """Ends the long-lived infrastructure streams (health Watch, server reflection) once
    the drain starts, so that none holds a graceful stop open for its whole grace period:
    a Watch stream first gets a moment to send its NOT_SERVING, a reflection stream waiting
    for its client's next request ends at once. Work RPCs are left alone."""

    #: How long a Watch stream has to send its last status once the drain starts (seconds).
    LAST_WORD_SECONDS = 0.5

    def __init__(self) -> None:
        self._draining: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._draining is None:  # made on the server's loop
            self._draining = asyncio.Event()
        return self._draining

    def drain(self) -> None:
        self._event().set()

    async def intercept_service(self, continuation: Any,
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_INFRASTRUCTURE):
            return handler
        if handler.unary_stream is not None:  # Watch: a coroutine that writes its stream
            watch = handler.unary_stream

            async def until_drained(request: Any, context: grpc.aio.ServicerContext) -> None:
                streaming = asyncio.ensure_future(watch(request, context))
                draining = asyncio.ensure_future(self._event().wait())
                try:
                    await asyncio.wait({streaming, draining},
                                       return_when=asyncio.FIRST_COMPLETED)
                    if not streaming.done():
                        await asyncio.wait({streaming}, timeout=self.LAST_WORD_SECONDS)
                    if streaming.done() and not streaming.cancelled():
                        streaming.result()  # its own error, if it ended in one
                finally:
                    for task in (streaming, draining):
                        task.cancel()

            return grpc.unary_stream_rpc_method_handler(
                until_drained, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:  # reflection: answers request by request
            answer = handler.stream_stream

            def requests_until_drained(requests: Any) -> Any:
                async def generate() -> Any:
                    iterator = requests.__aiter__()
                    draining = asyncio.ensure_future(self._event().wait())
                    following: asyncio.Future[Any] | None = None
                    try:
                        while True:
                            following = asyncio.ensure_future(iterator.__anext__())
                            await asyncio.wait({following, draining},
                                               return_when=asyncio.FIRST_COMPLETED)
                            if not following.done():
                                return  # draining
                            try:
                                request = following.result()
                            except StopAsyncIteration:
                                return
                            following = None
                            yield request
                    finally:  # also when the client cancels: leave no task behind
                        draining.cancel()
                        if following is not None and not following.done():
                            following.cancel()
                        elif following is not None and not following.cancelled():
                            following.exception()  # retrieved, so asyncio logs nothing
                return generate()

            async def reflection(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                async for response in answer(requests_until_drained(requests), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                reflection, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


#: A request message of this many bytes or more marks its call as large: once no large
#: call is in progress any more, the memory freed goes back to the kernel
#: (:func:`release_free_memory`; under --retain-memory only).
LARGE_REQUEST_BYTES = 16 << 20
#: How long before the drain's grace ends the calls still running are answered
#: UNAVAILABLE (seconds; at most half the grace), so that their answers, with the request
#: id and the reason, go out before gRPC cancels whatever is left.
DRAIN_ANSWER_SECONDS = 1.0
#: The least time between two releases of free memory (seconds): glibc holds its lock
#: while it trims (20-100 ms for a few GB here), and every thread that allocates waits, so
#: a steady run of large requests pays for it at most this often.
RELEASE_INTERVAL_SECONDS = 10.0


@dataclass(eq=False)
class _WorkCall:
    """One model-service call in progress."""

    task: asyncio.Task[Any] | None  # the task its handler runs in
    context: grpc.aio.ServicerContext
    started: float
    large: bool = False  # a request message of LARGE_REQUEST_BYTES or more came
    method: str = ""  # gRPC's full path of its method
    request_id: str | None = None
    cut_off: bool = False  # answered by the drain (WorkCalls.end_all), which logged it
    client: str | None = None  # who made it, where the calls are shared (fair_share.py)


_current_call: contextvars.ContextVar[_WorkCall | None] = contextvars.ContextVar(
    "percept_work_call", default=None)


async def _only_request(requests: Any) -> Any:
    """The request of a call whose method takes one message, read from its stream. The
    stream is closed once read: gRPC's reader is a generator that keeps the message it
    last gave, in a reference cycle with the reader, which only the garbage collector
    would free (a 60 MiB request held until it ran)."""
    stream = requests.__aiter__()
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        raise CallWithoutRequest from None
    finally:
        await stream.aclose()


def _clear_frames(aborted: grpc.aio.AbortError) -> None:
    """Lets go of what an answer already sent (``aborted``) holds on to: the locals of the
    finished frames its own traceback went through (this call's, in this task), the
    traceback of each refusal it was raised for (a ServiceError raised for this request,
    which nothing else awaits), and those errors themselves. gRPC keeps the abort's
    exception with the call, and the frames hold the call, the request and what was made
    of it (the image's bytes), in reference cycles that only a full garbage collection
    frees: 30 refused 60 MiB requests left 3.5 GB to it.

    Only this task's frames are cleared: a chained error that came from elsewhere (a
    failed batch, handed to every caller of the batch through a future) has the batcher's
    suspended loop in its traceback, and clearing a suspended coroutine's frame closes the
    coroutine (Python 3.11/3.12): the model would never answer again."""
    traceback.clear_frames(aborted.__traceback__)  # the running ones are left alone
    error: BaseException | None = aborted.__context__
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ServiceError):  # this request's own refusal
            error.__traceback__ = None
        error = error.__context__
    aborted.__context__ = None
    aborted.__traceback__ = None


def release_free_memory() -> None:
    """Frees the young garbage in reference cycles (cheap: a full collection took 0.3 s
    with every model loaded), then gives the heap's free pages back to the kernel
    (:func:`services.common.allocator.release_free_memory`)."""
    started = time.perf_counter()
    collected = gc.collect(1)
    allocator.release_free_memory()
    log.info("released free memory after large requests", extra={
        "collected_objects": collected, "seconds": round(time.perf_counter() - started, 3)})


class WorkCalls(grpc.aio.ServerInterceptor):
    """The calls to the model services in progress (not health, reflection or ServerInfo).

    - **A limit.** At most ``limit`` run at once; one more is answered busy
      (RESOURCE_EXHAUSTED, QUEUE_FULL, with the ``grpc-retry-pushback-ms`` trailer and the
      request id) *before its request message is read*: a method that takes one message
      is served as one that takes a stream of them, which the handler reads itself once
      the call is admitted. So the request bytes a process holds are bounded by the limit
      times the message cap (60 concurrent 60 MiB requests took a server from 1.3 to
      6.5 GB), while each service's own queue answers busy as before below the limit.
    - **The drain.** :meth:`end_all` answers the calls still running UNAVAILABLE
      (SERVER_DRAINING, with their request ids) and cancels their handlers, a moment
      before the grace ends; gRPC's own stop would cancel them with a bare
      "Cancelling all calls" and no trailers.
    - **Memory.** Once the last call whose request message was large ends,
      ``release_memory`` runs in a thread (:data:`LARGE_REQUEST_BYTES`).
    - **Fair shares** (``fair_share``): the clients share the limit
      (services/common/fair_share.py); a client at its share while others want calls is
      answered busy too.
    """

    def __init__(self, limit: int, release_memory: Callable[[], object] | None = None,
                 fair_share: bool = False) -> None:
        self.limit = limit
        self.shares = FairShares(limit) if fair_share else None
        self._calls: set[_WorkCall] = set()
        self._hold_seconds: float | None = None  # running mean of how long a call runs
        self._large_in_progress = 0
        self._release_memory = release_memory
        self._releasing: asyncio.Task[None] | None = None
        self._release_again = False
        self._released_at: float | None = None  # loop time of the last release

    @property
    def in_progress(self) -> int:
        return len(self._calls)

    @property
    def retry_after_ms(self) -> int:
        """A busy answer's pushback: about when the next call in progress ends."""
        if self._hold_seconds is None:
            return DEFAULT_PUSHBACK_MS
        per_call = self._hold_seconds / max(1, len(self._calls)) * 1e3
        return int(min(MAX_PUSHBACK_MS, max(MIN_PUSHBACK_MS, round(per_call))))

    async def _enter(self, context: grpc.aio.ServicerContext, method: str) -> _WorkCall:
        client = client_of(context) if self.shares is not None else None
        busy = None
        if len(self._calls) >= self.limit:
            REJECTED.labels("server-calls").inc()
            busy = Busy(f"the server is handling its limit of {self.limit} concurrent calls "
                        "(--max-concurrent-rpcs); retry after the pushback",
                        self.retry_after_ms)
        elif self.shares is not None and client is not None:
            over = self.shares.over_share(client)
            if over is not None:
                REJECTED.labels("client-share").inc()
                busy = Busy(f"this client ({shown(client)}) has {over.held} of the server's "
                            f"{self.limit} concurrent calls in progress, its share while "
                            f"{over.clients} clients call (--fair-share); retry after the "
                            "pushback", self.retry_after_ms)
        if busy is not None:
            if self.shares is not None and client is not None:
                self.shares.refused(client, busy.retry_after_ms / 1000)
            log_failed_call(method, busy.code, busy.message, reason=busy.reason,
                            retryable=True)
            await context.abort(busy.code, busy.message,
                                with_request_id(context, busy.trailing_metadata))
        call = _WorkCall(asyncio.current_task(), context, time.monotonic(), method=method,
                         request_id=current_request_id.get(), client=client)
        queued_as = current_call.get()  # its items' turns in the batchers' queues
        if queued_as is not None:
            queued_as.client = client
        self._calls.add(call)
        if self.shares is not None and client is not None:
            self.shares.enter(client)
        _current_call.set(call)  # for the deserializer, which runs in this task
        return call

    def _leave(self, call: _WorkCall) -> None:
        self._calls.discard(call)
        if self.shares is not None and call.client is not None:
            self.shares.leave(call.client)
        call.task = None  # the task's context holds the call: a cycle until a full collection
        self._hold_seconds = running_mean(self._hold_seconds, time.monotonic() - call.started)
        if call.large:
            self._large_in_progress -= 1
            if self._large_in_progress == 0:
                self._release()

    def _measured(self, parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
        """``parse`` (None: the bytes as they are), marking the call of a large message."""

        def deserialize(data: bytes) -> Any:
            if len(data) >= LARGE_REQUEST_BYTES:
                call = _current_call.get()
                if call is not None and not call.large:
                    call.large = True
                    self._large_in_progress += 1
            return data if parse is None else parse(data)

        return deserialize

    def _release(self) -> None:
        """Has ``release_memory`` run in a thread soon (:meth:`_release_when_due`)."""
        if self._release_memory is None:
            return
        if self._releasing is None or self._releasing.done():
            # in a context of its own: the task is no call's (its lines carry no request id)
            self._releasing = asyncio.get_running_loop().create_task(
                self._release_when_due(), context=contextvars.Context())
        else:
            self._release_again = True

    async def _release_when_due(self) -> None:
        """Runs ``release_memory`` once :data:`RELEASE_INTERVAL_SECONDS` have passed since
        it last ran, unless a large call is in progress by then (its end asks again); once
        more if a large call ended while it ran."""
        assert self._release_memory is not None
        loop = asyncio.get_running_loop()
        while True:
            if self._released_at is not None:
                await asyncio.sleep(self._released_at + RELEASE_INTERVAL_SECONDS - loop.time())
            if self._large_in_progress:
                return
            self._release_again = False
            try:
                await loop.run_in_executor(None, self._release_memory)
            except Exception as error:
                log.warning("releasing free memory failed: %s", error)
            self._released_at = loop.time()
            if not self._release_again:
                return

    def close(self) -> None:
        """Cancels a release still to come (the server stopped)."""
        if self._releasing is not None:
            self._releasing.cancel()

    async def end_all(self, message: str) -> list[str | None]:
        """Answers every call still running UNAVAILABLE with ``message`` (reason
        SERVER_DRAINING, and its request id) and cancels its handler; returns their
        request ids. Each call answered gets its WARNING line (``rpc.log_failed_call``):
        at most ``limit`` of them."""
        calls = [call for call in self._calls if not call.context.done()]
        details = ((STATUS_DETAILS_KEY, status_details(
            grpc.StatusCode.UNAVAILABLE, message, "SERVER_DRAINING")),)

        async def end(call: _WorkCall) -> None:
            call.cut_off = True  # its handler's cancellation is not logged as one
            try:
                await call.context.abort(grpc.StatusCode.UNAVAILABLE, message,
                                         with_request_id(call.context, details))
            except grpc.aio.AbortError:  # the answer went out
                log_failed_call(call.method, grpc.StatusCode.UNAVAILABLE, message,
                                reason="SERVER_DRAINING", level=logging.WARNING,
                                request_id=call.request_id, every_one=True)
            except Exception as error:  # it ended meanwhile, or its client is gone
                log.debug("could not answer a call at the drain's end: %r", error,
                          extra={"request_id": call.request_id})
            if call.task is not None:
                call.task.cancel()  # its work stops; the answer stands

        await asyncio.gather(*(end(call) for call in calls))
        return [call.request_id for call in calls]

    async def intercept_service(self, continuation: Any,
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_INFRASTRUCTURE):
            return handler
        parse = self._measured(handler.request_deserializer)
        serialize = handler.response_serializer
        method = handler_call_details.method

        def admitted(context: grpc.aio.ServicerContext
                     ) -> contextlib.AbstractAsyncContextManager[_WorkCall]:
            return self._admitted(context, method)

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                async with admitted(context):
                    return await unary(await _only_request(requests), context)

            return grpc.stream_unary_rpc_method_handler(
                unary_unary, request_deserializer=parse, response_serializer=serialize)
        if handler.stream_unary is not None:
            collect = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                async with admitted(context):
                    return await collect(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, request_deserializer=parse, response_serializer=serialize)
        one_request = handler.unary_stream is not None
        streaming = handler.unary_stream or handler.stream_stream
        if inspect.isasyncgenfunction(streaming):
            async def stream_response(requests: Any, context: grpc.aio.ServicerContext
                                      ) -> Any:
                async with admitted(context):
                    request = await _only_request(requests) if one_request else requests
                    async for response in streaming(request, context):
                        yield response

            return grpc.stream_stream_rpc_method_handler(
                stream_response, request_deserializer=parse, response_serializer=serialize)

        async def written(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            # a coroutine that writes its stream with context.write()
            async with admitted(context):
                request = await _only_request(requests) if one_request else requests
                return await streaming(request, context)

        return grpc.stream_stream_rpc_method_handler(
            written, request_deserializer=parse, response_serializer=serialize)

    @contextlib.asynccontextmanager
    async def _admitted(self, context: grpc.aio.ServicerContext, method: str
                        ) -> AsyncIterator[_WorkCall]:
        """The call admitted (:meth:`_enter`: or answered busy) for the block, and let go
        after it; an answer sent by abort has the frames it went through cleared. A call
        that gRPC cancels (its client went, or its deadline passed) gets its log line
        here (:func:`_log_ended`)."""
        call = await self._enter(context, method)
        try:
            yield call
        except grpc.aio.AbortError as aborted:
            _clear_frames(aborted)
            raise
        except (asyncio.CancelledError, GeneratorExit) as ended:
            if not call.cut_off:
                _log_ended(call, ended)
            raise
        finally:
            self._leave(call)


def _log_ended(call: _WorkCall, ended: BaseException) -> None:
    """The line of a call whose handler gRPC cancelled: DEADLINE_EXCEEDED (INFO) when its
    deadline had passed (the caller's timer fires a moment before the server's, as the
    metrics tell them apart), else CANCELLED (DEBUG: its client hung up); DEBUG too for
    a call that ended before its request message came (:class:`CallWithoutRequest`)."""
    if isinstance(ended, CallWithoutRequest):
        log_failed_call(call.method, None, "the call ended before its request message came "
                        "(its client went, or gRPC refused a message over --max-message-mb)",
                        request_id=call.request_id)
        return
    remaining = call.context.time_remaining()
    code = (grpc.StatusCode.DEADLINE_EXCEEDED if ran_out_of_time(remaining)
            else grpc.StatusCode.CANCELLED)
    log_failed_call(call.method, code, request_id=call.request_id)


#: The most request ids a line that sums up calls names (the drain's).
MAX_NAMED_IDS = 20


def named_ids(request_ids: Sequence[str | None], limit: int = MAX_NAMED_IDS) -> str:
    """``request_ids`` for a log line, the first ``limit`` only: "a, b and 3 more"."""
    named = ", ".join(str(request_id) for request_id in request_ids[:limit])
    more = len(request_ids) - limit
    return f"{named} and {more} more" if more > 0 else named


def drain_message(grace: float, cause: str | None = None) -> str:
    """The status message of a call the drain's grace ran out on."""
    return (f"the server is shutting down{f' ({cause})' if cause else ''}; the call did not "
            f"finish within the {grace:g} s drain grace (--drain-seconds): retry")


def _bind(server: grpc.aio.Server, host: str, port: int, flag: str,
          credentials: grpc.ServerCredentials | None = None) -> int:
    """Adds the port (TLS with ``credentials``) to ``server``; returns the bound port, or
    StartupError naming ``flag`` when it cannot be had."""
    address = listen_address(host, port)
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:  # grpcio: "Failed to bind ...; set GRPC_VERBOSITY=debug ..."
        bound = 0
    if not bound:
        raise StartupError(f"could not listen on {address}: the port is in use (another "
                           f"server?) or not allowed here; choose another with {flag}")
    return int(bound)


class PerceptServer:
    """A grpc.aio server hosting one or more ServiceModules."""

    def __init__(self, modules: Sequence[ServiceModule], config: ServerConfig) -> None:
        self.modules = list(modules)
        for module in self.modules:
            module.siblings = [m for m in self.modules if m is not module]
        self.config = config
        self.port: int | None = None
        self.health_port: int | None = None
        self.ready = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._health_server: grpc.aio.Server | None = None
        self.tls: ServerCredentials | None = None
        self._tls_refresh: asyncio.Task[None] | None = None
        self._held_lines: asyncio.Task[None] | None = None
        self._health = health.aio.HealthServicer()
        self._streams = InfrastructureStreams()
        self._metrics_http: MetricsServers | None = None
        self._interceptor = MetricsInterceptor()
        self._gate = ReadinessGate()
        self._work = WorkCalls(config.max_concurrent_rpcs,
                               release_free_memory if allocator.retaining() else None,
                               fair_share=config.fair_share)
        self._stall_watch: asyncio.Task[None] | None = None
        self._models: list[server_pb2.ModelInfo] = []  # what percept_model_info shows

    @property
    def service_names(self) -> list[str]:
        return [m.full_name for m in self.modules]

    async def _set_health(self, status: int) -> None:
        for name in ["", *self.service_names]:
            await self._health.set(name, status)

    async def _stop_server(self, server: grpc.aio.Server, grace: float,
                           cause: str | None) -> None:
        """gRPC's stop with ``grace``; the work calls still running
        :data:`DRAIN_ANSWER_SECONDS` before it ends (at once for no grace) are answered."""
        answer_at = grace - min(DRAIN_ANSWER_SECONDS, grace / 2)
        stopping: asyncio.Future[None] | None = None
        if answer_at > 0:
            stopping = asyncio.ensure_future(server.stop(grace))
            await asyncio.wait({stopping}, timeout=answer_at)
        if stopping is None or not stopping.done():
            ended = await self._work.end_all(drain_message(grace, cause))
            if ended:
                log.warning("drain grace ending: calls still running answered UNAVAILABLE",
                            extra={"calls": len(ended), "request_ids": named_ids(ended),
                                   "grace_seconds": grace})
        await (stopping if stopping is not None else server.stop(grace))

    async def start(self, freeze_gc: bool = False) -> int:
        """Binds and starts serving; loads and warms the models; returns the bound port.
        ``freeze_gc`` (the server process, not a test's): moves what exists by then out of
        the cycle collector's way (gc.freeze), before the first work call."""
        config = self.config
        options = server_options(config)  # message limits, connection age, keepalive
        # metrics outermost, so that every call is counted, a malformed or a refused one
        # too; gRPC's own limit refuses (RESOURCE_EXHAUSTED "Concurrent RPC limit
        # exceeded!") only past the work calls' limit and the infrastructure's share
        # who may call what (--tls-authorize) is settled before a work call's slot is
        # taken or its request read
        authorization = ([Authorization(parse_rules(config.tls_authorize))]
                         if config.tls_authorize else [])
        for rules in authorization:
            served = served_methods([*self.service_names, SERVER_INFO, health.SERVICE_NAME,
                                     reflection.SERVICE_NAME])
            for problem in rules.problems(served):
                log.warning("--tls-authorize: %s", problem, extra={"rules": config.tls_authorize})
        server = grpc.aio.server(
            options=options, interceptors=[self._interceptor, *authorization, self._work,
                                           MalformedRequests(), self._gate, self._streams],
            maximum_concurrent_rpcs=config.max_concurrent_rpcs + INFRASTRUCTURE_CALLS)
        for module in self.modules:
            module.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server_pb2_grpc.add_ServerInfoServicer_to_server(
            ServerInfoServicer(self.modules, config, lambda: self._gate.ready), server)
        reflection.enable_server_reflection(
            [*self.service_names, SERVER_INFO, health.SERVICE_NAME, reflection.SERVICE_NAME],
            server)
        credentials = None
        if config.tls_cert:
            try:
                self.tls = ServerCredentials(ServerTlsFiles(
                    config.tls_cert, config.tls_key, config.tls_client_ca))
            except TlsError as error:
                raise StartupError(f"cannot serve TLS: {error}") from error
            credentials = self.tls.credentials()
        self.port = _bind(server, config.host, config.port, "--port", credentials)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        BUILD_INFO.labels(percept_version(), build_revision()).set(1)
        FAILED_CALL_LINES.configure(config.failed_call_log_limit)
        self._held_lines = asyncio.get_running_loop().create_task(log_held_lines_every())
        if self.tls is not None:
            self._tls_refresh = asyncio.get_running_loop().create_task(
                refresh_every(self.tls))
        if config.health_port:
            try:
                await self._start_health_port(config)
            except StartupError:
                await self._stop_started(None)
                raise
        if config.metrics_port:
            try:
                self._metrics_http = start_metrics_server(config.metrics_port,
                                                          bare_host(config.host))
            except OSError as error:
                await self._stop_started(None)
                raise StartupError(
                    f"could not serve /metrics on port {config.metrics_port}: {error.strerror}"
                    " (another percept server? its default comes from the service, not from"
                    " --port): pass --metrics-port P, or --metrics-port 0 to turn /metrics "
                    "off") from error
        log.info("listening; loading models", extra={
            "port": self.port, "tls": ("mutual" if config.tls_client_ca else "on")
            if config.tls_cert else "off", "health_port": self.health_port,
            "metrics_port": config.metrics_port, "services": self.service_names,
            **({"tls_authorize": config.tls_authorize} if config.tls_authorize else {})})
        started = time.perf_counter()
        for module in self.modules:
            await module.load()
            if config.warmup:
                await module.warmup()
        if freeze_gc:
            # the models' hundreds of thousands of objects live as long as the process: set
            # apart from the cycle collector (before any work call), a full collection,
            # which frees what failed and dropped calls leave in cycles, runs often and
            # costs little
            gc.collect()
            gc.freeze()
        self._gate.ready = True
        self._models = [info for module in self.modules for info in module.model_infos()]
        publish_models(self._models)
        start_series(served_methods(self.service_names),
                     ["server-calls", *(["client-share"] if config.fair_share else [])])
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if config.stall_seconds:
            watch = StallWatch(self.modules, config.stall_seconds, self._health.set)
            self._stall_watch = asyncio.get_running_loop().create_task(watch.run())
        self.ready.set()
        log.info("serving", extra={"port": self.port,
                                   "load_seconds": round(time.perf_counter() - started, 2)})
        return self.port

    async def _start_health_port(self, config: ServerConfig) -> None:
        """``grpc.health.v1`` alone, in plaintext, on ``--health-port``: the same statuses
        as the main port's, for probes that speak no TLS (the kubelet's)."""
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024),
                                          ("grpc.so_reuseport", 0)],
                                 maximum_concurrent_rpcs=INFRASTRUCTURE_CALLS)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.health_port = _bind(server, config.host, config.health_port, "--health-port")
        await server.start()
        self._health_server = server

    async def _stop_started(self, grace: float | None) -> None:
        """Stops the gRPC servers started so far (a start-up that failed half-way)."""
        for task in (self._tls_refresh, self._held_lines):
            if task is not None:
                task.cancel()
        for server in (self._server, self._health_server):
            if server is not None:
                await server.stop(grace)
        self._server = self._health_server = None

    async def stop(self, grace: float | None = None, cause: str | None = None) -> None:
        """NOT_SERVING at once, then drain in-flight RPCs for up to ``grace`` seconds;
        ``cause`` (the signal) is named to the calls the grace runs out on.

        Health watchers are told NOT_SERVING, and their streams and reflection streams end
        (:class:`InfrastructureStreams`). The gRPC server then stops at once (once:
        concurrent stop() calls are unsafe in grpc.aio): its GOAWAY tells every client to
        send new calls elsewhere, so a round-robin client moves them to the other replicas
        instead of meeting UNAVAILABLE here, and gRPC retries a call that crossed the GOAWAY
        on another connection by itself. The calls in flight run on until they finish or
        the grace period is about to end: then those still running are answered
        UNAVAILABLE (SERVER_DRAINING, with their request ids; :meth:`WorkCalls.end_all`)."""
        grace = self.config.drain_seconds if grace is None else grace
        for task in (self._stall_watch, self._tls_refresh):
            if task is not None:
                task.cancel()
        await self._health.enter_graceful_shutdown()
        self._streams.drain()
        self._gate.close()  # a call that slips in before the stop below is refused
        log.info("draining", extra={"grace_seconds": grace,
                                    "in_flight": self._interceptor.active_work})
        if self._server is not None:
            await self._stop_server(self._server, grace, cause)
        if self._health_server is not None:  # the probes saw NOT_SERVING until now
            await self._health_server.stop(None)
        self._work.close()
        withdraw_models(self._models)
        self._models = []  # a second stop withdraws nothing more
        for module in self.modules:
            await module.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        if self._held_lines is not None:
            self._held_lines.cancel()
            log_held_lines(everything=True)  # a flood's count is told before the end
        log.info("stopped")


async def serve(config: ServerConfig) -> int:
    """Runs a server until SIGTERM/SIGINT; returns the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []  # the signals' names, for the calls the drain cuts off

    def stop_on(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_on, sig)
    server = PerceptServer(build_modules(config), config)
    start = asyncio.create_task(server.start(freeze_gc=True))
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if start in done and start.exception() is not None:
        failure = start.exception()
        # a cause the message names in full (a port in use) needs no traceback
        log.error("start-up failed: %s", failure,
                  exc_info=None if isinstance(failure, StartupError) else failure)
        await server.stop(grace=0)
        return 1
    await stopper
    if not start.done():
        start.cancel()
    await server.stop(cause=received[0] if received else None)
    return 0


def run_server(config: ServerConfig) -> int:
    """The body of ``percept serve``."""
    configure_logging(config.log_format, config.log_level)
    # one compute thread per CPU the quota allows, for torch and FAISS (OpenMP) alike; set
    # before either is imported, and only here: a search process that embeds remotely
    # never imports torch
    os.environ.setdefault("OMP_NUM_THREADS", str(available_cpus()))
    log.info("cpu threads", extra={"omp_num_threads": os.environ["OMP_NUM_THREADS"]})
    return asyncio.run(serve(config))


@dataclass
class RunningServer:
    """A server started in a background thread (tests, benchmarks, notebooks)."""

    server: PerceptServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    @property
    def target(self) -> str:
        """Where a client on this machine reaches it: loopback for a wildcard address."""
        host = bare_host(self.server.config.host)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return listen_address(host, self.port)

    def stop(self, grace: float = 0.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def start_in_thread(config: ServerConfig, modules: Sequence[ServiceModule] | None = None,
                    timeout: float = 120.0) -> RunningServer:
    """Starts a server on its own event loop thread and waits until it is SERVING."""
    loop = asyncio.new_event_loop()
    server = PerceptServer(modules if modules is not None else build_modules(config), config)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name=f"percept-{config.service}", daemon=True)
    thread.start()
    started.wait()
    running = RunningServer(server=server, loop=loop, thread=thread)
    starting = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        starting.result(timeout)
    except BaseException:  # what started is stopped, and the loop's thread ends
        starting.cancel()
        running.stop()
        raise
    return running
