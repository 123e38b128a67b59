"""Prometheus metrics for every server, and the interceptor that records them per RPC.

Exposed on ``--metrics-port`` at ``/metrics``:

- ``percept_requests_total{grpc_service, grpc_method, grpc_code}``: finished RPCs by gRPC
  status;
- ``percept_request_seconds{grpc_service, grpc_method}``: latency histogram;
- ``percept_inflight_requests{grpc_service}``;
- ``percept_batch_size{queue}``: micro-batch sizes;
- ``percept_queue_depth{queue}``: work items waiting or running per model queue (tiles, for
  the image models: one large image counts many);
- ``percept_dropped_total{queue, reason}``: work dropped before compute (deadline, cancelled);
- ``percept_rejected_total{queue}``: requests refused because the queue was full;
- ``percept_queue_stalled{queue}``: 1 while its batch has run past ``--stall-seconds``;
- ``percept_search_embedding_served``: 0 while search refuses the calls that embed.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.common.request_ids import begin_request

# The RPC labels are grpc_service, grpc_method and grpc_code (go-grpc-prometheus' names),
# not service/method/code: a Prometheus Operator ServiceMonitor sets a target label
# `service` (the Kubernetes Service), which renamed ours to exported_service.
REQUESTS = Counter("percept_requests_total", "Finished RPCs by status code",
                   ["grpc_service", "grpc_method", "grpc_code"])
LATENCY = Histogram("percept_request_seconds", "RPC latency in seconds",
                    ["grpc_service", "grpc_method"],
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                             10, 30, 60, 120, 300))
INFLIGHT = Gauge("percept_inflight_requests", "RPCs in progress", ["grpc_service"])
BATCH_SIZE = Histogram("percept_batch_size", "Micro-batch sizes", ["queue"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64))
QUEUE_DEPTH = Gauge("percept_queue_depth",
                    "Work items waiting or running (tiles, for the image models)", ["queue"])
DROPPED = Counter("percept_dropped_total", "Requests dropped before compute", ["queue", "reason"])
REJECTED = Counter("percept_rejected_total", "Requests refused: queue full", ["queue"])
EMBEDDING_SERVED = Gauge("percept_search_embedding_served",
                         "search: 1 while the calls that embed are served, 0 while they are "
                         "refused (the embedding service has not answered since start, or "
                         "makes another space than the index's)")
SPACE_REFUSALS = Counter("percept_search_space_refusals_total",
                         "search: answers of the embedding service refused because their "
                         "vectors are not in the index's space (an embedding pod rolled "
                         "out with another DeViSE map or --word-vectors file)")
STALLED = Gauge("percept_queue_stalled",
                "1 while the queue's running batch has run past --stall-seconds (a hung "
                "model or GPU: its service reports NOT_SERVING)", ["queue"])
INFLIGHT_PIXELS = Gauge("percept_inflight_pixels",
                        "Pixels (input plus output) of the image requests held, of "
                        "--max-inflight-mpixels")
REQUEST_SLOTS = Gauge("percept_request_slots_in_use",
                      "Request slots held (reading, decoding, computing or encoding), of "
                      "--max-queue (--max-optimisations for StylizeWithImage)", ["queue"])


_resolve = socket.getaddrinfo  # the name lookup, replaceable in tests


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
            result = start_http_server(port, addr=address)
        except OSError as error:
            errors.append(error)
            continue
        servers.append(result[0] if isinstance(result, tuple) else result)
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


#: A call cancelled this close to its deadline ran out of time: the caller's own timer
#: fires a moment before the server's (the deadline travels as a timeout, and the network
#: delays it), and its RST_STREAM reaches the server as a cancellation.
DEADLINE_SLACK_SECONDS = 0.1


def _status_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        # gRPC cancels the handler both when the caller hangs up and when its deadline
        # passes; the time left tells the two apart
        remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
        return ("DEADLINE_EXCEEDED" if remaining is not None
                and remaining <= DEADLINE_SLACK_SECONDS else "CANCELLED")
    code = context.code() if hasattr(context, "code") else None
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

        return factory(stream_response, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)
