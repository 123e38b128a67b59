"""The gRPC client used by the CLI, the demo and the tests: one function per RPC."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from percept.v1 import (
    embed_pb2,
    embed_pb2_grpc,
    image_pb2,
    search_pb2,
    search_pb2_grpc,
    server_pb2,
    server_pb2_grpc,
    style_pb2,
    style_pb2_grpc,
    superres_pb2,
    superres_pb2_grpc,
)
from services.common.channels import open_channel
from services.common.config import SERVICE_PORTS
from services.common.tls import ClientTls, connection_hint

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: The largest image file the CLI sends: one request must fit :data:`MAX_MESSAGE_BYTES`,
#: with room for its other fields.
MAX_IMAGE_BYTES = MAX_MESSAGE_BYTES - 8192
#: How long finding a local server waits for a port that is listening to answer a health
#: check (seconds); a port where nothing listens is refused at once.
PROBE_TIMEOUT_SECONDS = 1.0
_EXTENSIONS = {".png": image_pb2.IMAGE_FORMAT_PNG, ".jpg": image_pb2.IMAGE_FORMAT_JPEG,
               ".jpeg": image_pb2.IMAGE_FORMAT_JPEG, ".webp": image_pb2.IMAGE_FORMAT_WEBP}


def default_target(service: str) -> str:
    """``$PERCEPT_TARGET`` if set, else the local cluster's port for ``service``."""
    return os.environ.get("PERCEPT_TARGET") or f"localhost:{SERVICE_PORTS[service]}"


def local_targets(service: str) -> dict[str, str]:
    """Where a server for ``service`` runs on this machine, in the order to try them:
    ``percept serve all``'s port, then the local cluster's (`make run`) port for it, each
    with a description."""
    return {f"localhost:{SERVICE_PORTS['all']}": "percept serve all",
            f"localhost:{SERVICE_PORTS[service]}": f"the local cluster's {service} service"}


def tls_hint(error: grpc.RpcError) -> str:
    """What to change where ``error`` is a TLS handshake that failed (a plaintext client
    of a TLS server, an unknown CA, ...), for :func:`default_tls`; "" otherwise."""
    code = error.code() if hasattr(error, "code") else None
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
        return ""
    details = error.details() if hasattr(error, "details") else ""
    return connection_hint(details or "", default_tls())


def failure_text(error: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call, with :func:`tls_hint` where there is one."""
    code = error.code() if hasattr(error, "code") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    hint = tls_hint(error)
    return f"{name}: {details}" + (f" ({hint})" if hint else "")


def absent(error: grpc.RpcError) -> bool:
    """Whether a failed health check says nothing listens there: UNAVAILABLE, but not a
    TLS handshake that failed (a server is there, spoken to the wrong way)."""
    return error.code() == grpc.StatusCode.UNAVAILABLE and not tls_hint(error)


def listening(channel: grpc.Channel, timeout: float = PROBE_TIMEOUT_SECONDS) -> bool:
    """Whether a server listens on ``channel``: a health check that is not UNAVAILABLE
    (a refused connection fails at once; a server that is slow to answer, has no health
    service, or refuses this client's TLS settings, is there all the same)."""
    try:
        health_status(channel, timeout=timeout)
    except grpc.RpcError as error:
        return not absent(error)
    return True


def find_local_server(service: str, timeout: float = PROBE_TIMEOUT_SECONDS
                      ) -> tuple[str, grpc.Channel] | None:
    """The first of :func:`local_targets` where a server listens, with a channel to it
    (connected: the call that follows does not connect again); None when none does."""
    for target in local_targets(service):
        channel = connect(target)
        if listening(channel, timeout):
            return target, channel
        channel.close()
    return None


#: How :func:`connect` reaches servers when not told (:func:`use_tls`); None: from the
#: environment (``PERCEPT_TLS_*``, :meth:`ClientTls.from_environment`).
_default_tls: ClientTls | None = None


def use_tls(tls: ClientTls | None) -> None:
    """Makes ``tls`` how :func:`connect` reaches servers from now on (the CLI's flags);
    None goes back to the environment's."""
    global _default_tls
    _default_tls = tls


def default_tls() -> ClientTls:
    return _default_tls if _default_tls is not None else ClientTls.from_environment()


def connect(target: str, tls: ClientTls | None = None) -> grpc.Channel:
    """A channel with percept's message-size limits and round-robin balancing (a
    ``dns:///`` target over a headless Kubernetes Service spreads requests over pods):
    plaintext, or TLS as ``tls`` (default: :func:`default_tls`) says; TlsError when its
    files cannot be used."""
    return open_channel(target, [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.lb_policy_name", "round_robin"),
    ], tls if tls is not None else default_tls())


def format_for_path(path: str | Path) -> int:
    """The ImageFormat enum for an output file's extension; ValueError for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(f"cannot tell the output format from {str(path)!r}: end it in "
                         f"{', '.join(_EXTENSIONS)}")
    return _EXTENSIONS[suffix]


def answers(channel: grpc.Channel, timeout: float) -> bool:
    """Whether a server answers on ``channel`` within ``timeout`` seconds (a health check,
    which fails at once when the connection is refused; a server without the health service
    answers too, with UNIMPLEMENTED)."""
    try:
        health_status(channel, timeout=timeout)
    except grpc.RpcError as error:
        return error.code() not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED)
    return True


def health_status(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """The grpc.health.v1 status name of ``service`` ("" = the whole server)."""
    response = health_future(channel, timeout, service).result()
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def health_future(channel: grpc.Channel, timeout: float, service: str = "") -> grpc.Future:
    """A grpc.health.v1 check of ``service`` ("" = the whole server), as a cancellable
    future of its HealthCheckResponse."""
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check.future(health_pb2.HealthCheckRequest(service=service), timeout=timeout)


def _upscale_request(image: bytes, model: str, output_format: int
                     ) -> superres_pb2.UpscaleRequest:
    return superres_pb2.UpscaleRequest(image=image, scale=4, model=model,
                                       output_format=output_format)


def upscale(channel: grpc.Channel, image: bytes, *, model: str = "", output_format: int = 0,
            timeout: float | None = 300) -> superres_pb2.UpscaleResponse:
    stub = superres_pb2_grpc.SuperResolutionStub(channel)
    return stub.Upscale(_upscale_request(image, model, output_format), timeout=timeout)


def upscale_future(channel: grpc.Channel, image: bytes, *, model: str = "",
                   output_format: int = 0, timeout: float | None = 300) -> grpc.Future:
    """:func:`upscale` started, not waited for: its future can be cancelled."""
    stub = superres_pb2_grpc.SuperResolutionStub(channel)
    return stub.Upscale.future(_upscale_request(image, model, output_format), timeout=timeout)


def server_info(channel: grpc.Channel, timeout: float | None = 10
                ) -> server_pb2.GetServerInfoResponse:
    stub = server_pb2_grpc.ServerInfoStub(channel)
    return stub.GetServerInfo(server_pb2.GetServerInfoRequest(), timeout=timeout)


def list_styles(channel: grpc.Channel, timeout: float | None = 30) -> list[style_pb2.StyleInfo]:
    stub = style_pb2_grpc.StyleTransferStub(channel)
    return list(stub.ListStyles(style_pb2.ListStylesRequest(), timeout=timeout).styles)


def stylize(channel: grpc.Channel, request: style_pb2.StylizeRequest,
            timeout: float | None = 300) -> style_pb2.StylizeResponse:
    return style_pb2_grpc.StyleTransferStub(channel).Stylize(request, timeout=timeout)


def stylize_future(channel: grpc.Channel, request: style_pb2.StylizeRequest,
                   timeout: float | None = 300) -> grpc.Future:
    """:func:`stylize` started, not waited for: its future can be cancelled."""
    return style_pb2_grpc.StyleTransferStub(channel).Stylize.future(request, timeout=timeout)


def stylize_with_image(channel: grpc.Channel, request: style_pb2.StylizeWithImageRequest,
                       on_progress: Callable[[style_pb2.StylizeProgress], None] | None = None,
                       timeout: float | None = 3600) -> style_pb2.StylizeResponse:
    """Runs the optimisation, reporting streamed progress; returns the final result."""
    stream = style_pb2_grpc.StyleTransferStub(channel).StylizeWithImage(request, timeout=timeout)
    result = None
    for message in stream:
        if message.HasField("progress") and on_progress is not None:
            on_progress(message.progress)
        elif message.HasField("result"):
            result = message.result
    if result is None:
        raise RuntimeError("the server closed the stream without a result")
    return result


def search_stats(channel: grpc.Channel, timeout: float | None = 10
                 ) -> search_pb2.StatsResponse:
    return search_pb2_grpc.ImageSearchStub(channel).Stats(search_pb2.StatsRequest(),
                                                          timeout=timeout)


def label_image(channel: grpc.Channel, image: bytes, *, k: int = 5, method: int = 0,
                under_wnid: str = "", zero_shot: bool = False, one_per_word: bool = True,
                timeout: float | None = 60) -> embed_pb2.LabelImageResponse:
    stub = embed_pb2_grpc.EmbeddingStub(channel)
    return stub.LabelImage(embed_pb2.LabelImageRequest(
        image=image, k=k, method=method, under_wnid=under_wnid, zero_shot=zero_shot,
        one_per_word=one_per_word), timeout=timeout)


def add_images(channel: grpc.Channel, items: Iterable[search_pb2.AddImageRequest],
               timeout: float | None = None) -> Iterator[search_pb2.AddImagesAck]:
    return search_pb2_grpc.ImageSearchStub(channel).AddImages(iter(items), timeout=timeout)


def search_by_text(channel: grpc.Channel, text: str, k: int = 10,
                   timeout: float | None = 60, min_score: float | None = None
                   ) -> search_pb2.SearchResponse:
    return search_pb2_grpc.ImageSearchStub(channel).SearchByText(
        search_pb2.SearchByTextRequest(text=text, k=k, min_score=min_score), timeout=timeout)


def search_by_image(channel: grpc.Channel, image: bytes, k: int = 10,
                    timeout: float | None = 60, min_score: float | None = None
                    ) -> search_pb2.SearchResponse:
    return search_pb2_grpc.ImageSearchStub(channel).SearchByImage(
        search_pb2.SearchByImageRequest(image=image, k=k, min_score=min_score),
        timeout=timeout)


def get_images(channel: grpc.Channel, ids: Sequence[str], timeout: float | None = 60
               ) -> search_pb2.GetImagesResponse:
    return search_pb2_grpc.ImageSearchStub(channel).GetImages(
        search_pb2.GetImagesRequest(ids=list(ids)), timeout=timeout)


def delete_images(channel: grpc.Channel, ids: Sequence[str], timeout: float | None = 60
                  ) -> search_pb2.DeleteImagesResponse:
    return search_pb2_grpc.ImageSearchStub(channel).DeleteImages(
        search_pb2.DeleteImagesRequest(ids=list(ids)), timeout=timeout)


def list_images(channel: grpc.Channel, prefix: str = "", page_size: int = 1000,
                timeout: float | None = 60) -> Iterator[search_pb2.ImageEntry]:
    """Every stored image (whose id starts with ``prefix``), page by page."""
    stub = search_pb2_grpc.ImageSearchStub(channel)
    token = ""
    while True:
        page = stub.ListImages(search_pb2.ListImagesRequest(
            page_size=page_size, page_token=token, prefix=prefix), timeout=timeout)
        yield from page.images
        token = page.next_page_token
        if not token:
            return
