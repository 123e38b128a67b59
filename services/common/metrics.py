"""Prometheus metrics for every server, and the interceptor that records them per RPC.

Exposed on ``--metrics-port`` at ``/metrics``:

- ``percept_requests_total{grpc_service, grpc_method, grpc_code}``: finished RPCs by gRPC
  status;
- ``percept_request_seconds{grpc_service, grpc_method}``: latency histogram;
- ``percept_inflight_requests{grpc_service}``;
- ``percept_batch_size{queue}``: micro-batch sizes;
- ``percept_batch_seconds{queue}``: how long each micro-batch ran (the model's forward
  pass and what the batch function does around it); its ``_sum``'s rate is the fraction of
  the time the queue's model was busy (1: never idle);
- ``percept_queue_depth{queue}``: work items waiting or running per model queue (tiles, for
  the image models: one large image counts many);
- ``percept_dropped_total{queue, reason}``: requests dropped before compute (reason
  ``deadline`` or ``cancelled``), each request once per queue however many of its items
  (images, tiles) were dropped (:func:`count_dropped`);
- ``percept_rejected_total{queue}``: requests refused because the queue was full
  (``server-calls``: the process's --max-concurrent-rpcs; ``client-share``: the calling
  client's share of it, --fair-share);
- ``percept_queue_stalled{queue}``: 1 while its batch has run past ``--stall-seconds``;
- ``percept_build_info{version, revision}``: 1, labelled with the running percept's
  version and commit (``$PERCEPT_GIT_SHA``);
- ``percept_model_info{grpc_service, model, version, default}``: 1 for each model the
  server serves, once it has loaded them (ServerInfo's models, for a dashboard or an alert
  on pods of one service that serve different versions).

The search service's own metrics (``percept_search_*``) are defined in its modules
(services/search/), so only a process that hosts search exports them: a superres, style or
embed pod has no ``percept_search_embedding_served`` for an alert to find at 0.

The HTTP server answers ``GET`` and ``HEAD /metrics`` only (404 elsewhere), with
prometheus_client's own handler (gzip and the OpenMetrics format as a scraper asks). It
holds at most :data:`MAX_METRICS_CONNECTIONS` connections at once (one more is answered
503 and closed, without a thread), closes one that sends nothing for
:data:`METRICS_READ_TIMEOUT_SECONDS` and any that is still open after
:data:`METRICS_CONNECTION_SECONDS`: prometheus_client's own server gave every connection a
thread with no timeout, and 4,000 idle ones took 4,021 threads and 165 s of one scrape.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import inspect
import io
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import grpc
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

from percept.v1 import server_pb2
from services.common.request_ids import begin_request

# The RPC labels are grpc_service, grpc_method and grpc_code (go-grpc-prometheus' names),
# not service/method/code: a Prometheus Operator ServiceMonitor sets a target label
# `service` (the Kubernetes Service), which renamed ours to exported_service.
REQUESTS = Counter("percept_requests_total", "Finished RPCs by status code",
                   ["grpc_service", "grpc_method", "grpc_code"])
#: Histogram buckets of durations (seconds): a 1 ms CPU call to a 5 min Gatys run.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 120, 300)
LATENCY = Histogram("percept_request_seconds", "RPC latency in seconds",
                    ["grpc_service", "grpc_method"], buckets=SECONDS_BUCKETS)
INFLIGHT = Gauge("percept_inflight_requests", "RPCs in progress", ["grpc_service"])
BATCH_SIZE = Histogram("percept_batch_size", "Micro-batch sizes", ["queue"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
BATCH_SECONDS = Histogram("percept_batch_seconds", "Time each micro-batch ran, in seconds",
                          ["queue"], buckets=SECONDS_BUCKETS)
QUEUE_DEPTH = Gauge("percept_queue_depth",
                    "Work items waiting or running (tiles, for the image models)", ["queue"])
DROPPED = Counter("percept_dropped_total",
                  "Requests dropped before compute (once per request, however many of its "
                  "images or tiles were dropped), by reason: deadline or cancelled",
                  ["queue", "reason"])
REJECTED = Counter("percept_rejected_total", "Requests refused: queue full", ["queue"])
STALLED = Gauge("percept_queue_stalled",
                "1 while the queue's running batch has run past --stall-seconds (a hung "
                "model or GPU: its service reports NOT_SERVING)", ["queue"])
INFLIGHT_PIXELS = Gauge("percept_inflight_pixels",
                        "Pixels (input plus output) of the image requests held, of "
                        "--max-inflight-mpixels")
REQUEST_SLOTS = Gauge("percept_request_slots_in_use",
                      "Request slots held (reading, decoding, computing or encoding), of "
                      "--max-queue (--max-optimisations for StylizeWithImage)", ["queue"])
TLS_CERTIFICATE_EXPIRY = Gauge(
    "percept_tls_certificate_expiry_timestamp_seconds",
    "When the TLS certificate in use expires (Unix time), by certificate: server (with "
    "--tls-cert), embed-client (search's, with --embed-tls-cert); absent without TLS. "
    "Alert on it minus time()", ["certificate"])

BUILD_INFO = Gauge("percept_build_info",
                   "1, labelled with the running percept's version and the commit it was "
                   "built from (PERCEPT_GIT_SHA, which `make image` sets; unknown without "
                   "it)", ["version", "revision"])
MODEL_INFO = Gauge("percept_model_info",
                   "1 for each model the server serves (its artifact version; default: "
                   "whether requests that name no model get it), once it has loaded them",
                   ["grpc_service", "model", "version", "default"])

#: The status codes whose series every method has from the start, at 0: a series made by
#: its first increment starts at 1, and rate() and increase() never count that first one
#: (an alert on a rare INTERNAL would miss it).
STARTING_CODES = ("OK", "INTERNAL", "UNKNOWN", "DATA_LOSS", "RESOURCE_EXHAUSTED",
                  "DEADLINE_EXCEEDED", "UNAVAILABLE")
#: percept_dropped_total's reasons
DROP_REASONS = ("deadline", "cancelled")


def build_revision() -> str:
    """The commit the running percept was built from: ``$PERCEPT_GIT_SHA``, else unknown."""
    return os.environ.get("PERCEPT_GIT_SHA", "").strip() or "unknown"


def start_series(methods: Iterable[str], queues: Iterable[str]) -> None:
    """Makes, at 0, the series an alert's rate() reads before anything counts in them:
    ``STARTING_CODES`` for each method (``SERVICE/METHOD``), and the rejections of the
    server-wide ``queues`` (server-calls, client-share); each batcher makes its own
    queue's (:func:`start_queue_series`)."""
    for path in methods:
        service, _, method = path.partition("/")
        for code in STARTING_CODES:
            REQUESTS.labels(service, method, code)
    for queue in queues:
        REJECTED.labels(queue)


def start_queue_series(queue: str) -> None:
    """A model queue's rejections, drops and batches, at 0 (:func:`start_series`): a
    rate() over a series that appears only with its first batch misses that batch."""
    REJECTED.labels(queue)
    BATCH_SIZE.labels(queue)
    BATCH_SECONDS.labels(queue)
    for reason in DROP_REASONS:
        DROPPED.labels(queue, reason)


def _model_labels(info: server_pb2.ModelInfo) -> tuple[str, str, str, str]:
    return info.service, info.name, str(info.version), "true" if info.is_default else "false"


#: How many servers of this process publish each percept_model_info series (tests and
#: embedded use run several): the last one to stop takes it out.
_publishers: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
_publishers_lock = threading.Lock()


def publish_models(infos: Iterable[server_pb2.ModelInfo]) -> None:
    """percept_model_info of each model a server has loaded."""
    with _publishers_lock:
        for info in infos:
            labels = _model_labels(info)
            _publishers[labels] += 1
            MODEL_INFO.labels(*labels).set(1)


def withdraw_models(infos: Iterable[server_pb2.ModelInfo]) -> None:
    """Takes a stopping server's models out of percept_model_info (those no other server
    of the process still publishes)."""
    with _publishers_lock:
        for info in infos:
            labels = _model_labels(info)
            _publishers[labels] -= 1
            if _publishers[labels] <= 0:
                del _publishers[labels]
                with contextlib.suppress(KeyError):
                    MODEL_INFO.remove(*labels)


class Call:
    """One RPC, as the batchers see it: the queues that have counted it dropped
    (percept_dropped_total), and who made it (``client``: services.common.fair_share's
    client_of, set where --fair-share is on; the batchers take small requests in turns by
    it)."""

    __slots__ = ("client", "dropped_from")

    def __init__(self) -> None:
        self.dropped_from: set[str] = set()
        self.client: str | None = None


#: The RPC the running code serves: set by MetricsInterceptor as the call begins, and
#: copied into the tasks its handler starts (one per image or tile submitted to a batcher),
#: so that a batcher knows which of its items are one request's.
current_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "percept_call", default=None)


def count_dropped(queue: str, reason: str, call: Call | None) -> None:
    """Counts a request dropped before compute in ``queue``: once per request (``call``),
    however many of its items (images, tiles) are dropped, under the reason of the first
    of them. An item submitted outside any RPC (call None) counts alone."""
    if call is not None:
        if queue in call.dropped_from:
            return
        call.dropped_from.add(queue)
    DROPPED.labels(queue, reason).inc()


_resolve = socket.getaddrinfo  # the name lookup, replaceable in tests


#: The path /metrics is served on; any other is 404.
METRICS_PATH = "/metrics"
#: How long a /metrics connection may stay silent (seconds) before it is closed.
METRICS_READ_TIMEOUT_SECONDS = 5.0
#: The longest a /metrics connection stays open, however slowly it sends (seconds).
METRICS_CONNECTION_SECONDS = 30.0
#: The most /metrics connections served at once (a thread each); one more gets 503.
MAX_METRICS_CONNECTIONS = 16

_BUSY_ANSWER = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                b"Connection: close\r\n\r\ntoo many connections to /metrics; retry\n")

log = logging.getLogger("percept.metrics")


class _MetricsRequests(MetricsHandler):
    """prometheus_client's handler (gzip, OpenMetrics) for ``GET`` and ``HEAD /metrics``
    only, with a read timeout."""

    timeout = METRICS_READ_TIMEOUT_SECONDS  # StreamRequestHandler: the socket's timeout

    def _is_metrics(self) -> bool:
        if urlsplit(self.path).path == METRICS_PATH:
            return True
        body = f"not found: only {METRICS_PATH} is served here\n".encode()
        self.send_response(404)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return False

    def do_GET(self) -> None:
        if self._is_metrics():
            super().do_GET()

    def do_HEAD(self) -> None:
        if not self._is_metrics():
            return
        socket_writer, self.wfile = self.wfile, io.BytesIO()
        try:
            super().do_GET()
            answer = self.wfile.getvalue()  # type: ignore[attr-defined]
        finally:
            self.wfile = socket_writer
        head, end, _ = answer.partition(b"\r\n\r\n")
        self.wfile.write(head + end)


class _MetricsHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most :data:`MAX_METRICS_CONNECTIONS` of them, each closed
    once it has been open for :data:`METRICS_CONNECTION_SECONDS`."""

    daemon_threads = True
    request_queue_size = 64  # listen backlog (socketserver's default is 5)

    def __init__(self, address: tuple[str, int]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.connection_seconds = METRICS_CONNECTION_SECONDS
        self._slots = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)
        self._open: dict[socket.socket, float] = {}  # connection -> when it must be closed
        self._lock = threading.Lock()
        super().__init__(address, _MetricsRequests)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(0)  # a fresh socket's buffer takes it; never wait here
                request.send(_BUSY_ANSWER)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._lock:
            self._open[request] = time.monotonic() + self.connection_seconds
        try:
            super().process_request(request, client_address)  # starts its thread
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: Any) -> None:
        with self._lock:
            if self._open.pop(request, None) is not None:
                self._slots.release()

    def service_actions(self) -> None:
        """Between polls of the accept loop (every 0.5 s): ends the connections open for
        too long (a client sending a byte every few seconds); their threads then end."""
        now = time.monotonic()
        with self._lock:
            expired = [connection for connection, end in self._open.items() if end <= now]
        for connection in expired:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that timed out or was reset: no traceback on stderr."""
        log.debug("metrics connection from %s ended in an error", client_address,
                  exc_info=True)


class MetricsServers:
    """The /metrics HTTP servers of one process, one per address; stopped together."""

    def __init__(self, servers: list[Any]) -> None:
        self.servers = servers

    def shutdown(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


def start_metrics_server(port: int, host: str = "0.0.0.0") -> MetricsServers:
    """Serves /metrics on ``port`` in daemon threads, on every address ``host`` names: a
    name such as ``localhost`` resolves to 127.0.0.1 and ::1, and gRPC listens on both,
    so /metrics does too (it took the first alone, IPv4). An address that cannot be bound
    (no IPv6 in the container) is skipped while another binds; if none does, the first
    error is raised."""
    servers, errors = [], []
    for address in _addresses(host, port):
        try:
            server = _MetricsHTTPServer((address, port))
        except OSError as error:
            errors.append(error)
            continue
        threading.Thread(target=server.serve_forever, name=f"metrics-{address}",
                         daemon=True).start()
        servers.append(server)
    if not servers:
        raise errors[0]
    return MetricsServers(servers)


def _addresses(host: str, port: int) -> list[str]:
    """The distinct addresses ``host`` resolves to for a TCP listener, in resolver order
    (an address literal: itself)."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    found = _resolve(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in found))


def _split_method(full_method: str) -> tuple[str, str]:
    # "/percept.v1.StyleTransfer/Stylize" -> ("percept.v1.StyleTransfer", "Stylize")
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service, method


class CallWithoutRequest(asyncio.CancelledError):
    """Raised where a call that takes one request message ends before the message came:
    its client hung up, or gRPC refused a message over the size limit (and answered the
    call itself). It ends the handler as a cancellation does, and is not counted: gRPC
    never ran a handler for such a call before the server read request messages itself
    (services/common/server.py, WorkCalls)."""


#: A call cancelled this close to its deadline ran out of time: the caller's own timer
#: fires a moment before the server's (the deadline travels as a timeout, and the network
#: delays it), and its RST_STREAM reaches the server as a cancellation.
DEADLINE_SLACK_SECONDS = 0.1


def ran_out_of_time(remaining: float | None) -> bool:
    """Whether a call cancelled with ``remaining`` seconds to its deadline (None: it had
    none) was cancelled by its deadline, not by its client hanging up: within
    DEADLINE_SLACK_SECONDS of it. The one rule the metrics, the batcher's drops and the
    failed calls' log lines tell the two apart by."""
    return remaining is not None and remaining <= DEADLINE_SLACK_SECONDS


def _status_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(error, asyncio.CancelledError | GeneratorExit) and code is None:
        # gRPC cancels the handler both when the caller hangs up and when its deadline
        # passes (a streaming handler's generator is closed instead: GeneratorExit); the
        # time left tells the two apart
        remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
        return "DEADLINE_EXCEEDED" if ran_out_of_time(remaining) else "CANCELLED"
    # a status set before the handler was cancelled (the drain's UNAVAILABLE) stands
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return "UNKNOWN" if error is not None and not isinstance(error, grpc.aio.AbortError) else "OK"


#: The infrastructure services (prefixes of their names): answered while the models load,
#: their calls are not work, and the drain ends their long-lived streams
#: (services/common/server.py, ReadinessGate and InfrastructureStreams).
INFRASTRUCTURE_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.",
                           "percept.v1.ServerInfo")


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by status code and records its latency.

    ``active_work`` counts the in-flight RPCs other than health and reflection streams (the
    drain's log line reports it)."""

    def __init__(self) -> None:
        self.active_work = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        is_work = not service.startswith(INFRASTRUCTURE_SERVICES)

        def begin(context: grpc.aio.ServicerContext) -> float:
            current_call.set(Call())  # the call's task, and the tasks it starts
            INFLIGHT.labels(service).inc()
            if is_work:
                self.active_work += 1
                begin_request(context)
            return time.perf_counter()

        def finish(context: grpc.aio.ServicerContext, started: float,
                   error: BaseException | None) -> None:
            if is_work:
                self.active_work -= 1
            INFLIGHT.labels(service).dec()
            if isinstance(error, CallWithoutRequest):
                return
            REQUESTS.labels(service, method, _status_name(context, error)).inc()
            LATENCY.labels(service, method).observe(time.perf_counter() - started)

        if handler.unary_unary or handler.stream_unary:
            behaviour = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = begin(context)
                error: BaseException | None = None
                try:
                    return await behaviour(request, context)
                except BaseException as caught:
                    error = caught
                    raise
                finally:
                    finish(context, started, error)
                    error = None  # the frame would hold its own traceback (a cycle)

            factory = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                       else grpc.stream_unary_rpc_method_handler)
            return factory(unary_response, request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)

        streaming = handler.unary_stream or handler.stream_stream
        factory = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                   else grpc.stream_stream_rpc_method_handler)

        if not inspect.isasyncgenfunction(streaming):
            # a coroutine handler that streams with context.write() (e.g. health Watch)
            async def written_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = begin(context)
                error: BaseException | None = None
                try:
                    return await streaming(request, context)
                except BaseException as caught:
                    error = caught
                    raise
                finally:
                    finish(context, started, error)
                    error = None

            return factory(written_response, request_deserializer=handler.request_deserializer,
                           response_serializer=handler.response_serializer)

        async def stream_response(request: Any,
                                  context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = begin(context)
            error: BaseException | None = None
            try:
                async for response in streaming(request, context):
                    yield response
            except BaseException as caught:
                error = caught
                raise
            finally:
                finish(context, started, error)
                error = None

        return factory(stream_response, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
