"""Where the search service gets its vectors: the Embedding service, over gRPC when it runs
separately (``--embed-target``), or in-process (``percept serve all``)."""

from __future__ import annotations

import abc
import asyncio
import functools
import io
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from percept.v1 import embed_pb2, embed_pb2_grpc
from services.common.errors import (
    RETRY_PUSHBACK_KEY,
    STATUS_DETAILS_KEY,
    Busy,
    InvalidArgument,
    ServiceError,
    Unavailable,
)

if TYPE_CHECKING:  # a search process with a remote embedder never imports torch
    from services.embed.service import EmbeddingService

#: Room kept in an EmbedImages request for its other fields and framing, and per image
#: (a protobuf tag and length).
MESSAGE_OVERHEAD_BYTES = 4096
IMAGE_FRAMING_BYTES = 16


@functools.cache
def probe_image() -> bytes:
    """A fixed synthetic picture (colour ramps and a checkerboard, 96 px PNG) whose vector
    identifies the embedding space: the vectors of an index can only be compared with the
    space they were made in (another --word-vectors file, another DeViSE map or method
    makes other ones, of the same dimension). An image, not a text: every space embeds
    images, while a word-vector space may lack any given word."""
    ramp = np.linspace(0, 255, 96, dtype=np.float32)
    checker = ((np.arange(96)[:, None] // 12 + np.arange(96)[None, :] // 12) % 2) * 255.0
    rgb = np.dstack([np.broadcast_to(ramp[None, :], (96, 96)),
                     np.broadcast_to(ramp[:, None], (96, 96)), checker]).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


class Embedder(abc.ABC):
    """Where vectors come from. ``start`` leaves ``dimension`` and ``probe`` (the vector of
    :func:`probe_image`) set."""

    dimension: int = 0
    probe: np.ndarray

    async def start(self) -> None:
        self._set_probe((await self.embed_images([probe_image()]))[0])

    def _set_probe(self, vector: np.ndarray) -> None:
        self.probe = np.asarray(vector, dtype=np.float32)
        self.dimension = int(self.probe.shape[0])

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @abc.abstractmethod
    async def embed_images(self, images: Sequence[bytes], timeout: float | None = None
                           ) -> list[np.ndarray]:
        """Unit vectors of encoded images, within ``timeout`` seconds (None: no limit but
        the embedder's own)."""

    @abc.abstractmethod
    async def embed_text(self, text: str, timeout: float | None = None) -> np.ndarray: ...


class InProcessEmbedder(Embedder):
    """Calls an EmbeddingService hosted by this process."""

    def __init__(self, service: EmbeddingService, own: bool = False) -> None:
        self.service = service
        self.own = own

    async def start(self) -> None:
        if self.own:
            await self.service.load()
        await super().start()

    async def close(self) -> None:
        if self.own:
            await self.service.close()

    async def embed_images(self, images: Sequence[bytes], timeout: float | None = None
                           ) -> list[np.ndarray]:
        return await self.service.embed_images(images, timeout=timeout)

    async def embed_text(self, text: str, timeout: float | None = None) -> np.ndarray:
        return (await self.service.embed_texts([text], timeout))[0]


#: How long search waits at start for the Embedding service: within its pod's start-up
#: probe (120 x 5 s, deploy/k8s/base/search.yaml), less a minute for its own loading.
START_WAIT_SECONDS = 540.0
#: What a call that waits for an embedding server ends with while none is up.
_NOT_UP_YET = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def _details_of(error: grpc.aio.AioRpcError) -> tuple[str | None, str | None]:
    """The ErrorInfo reason and the BadRequest field of an answer's google.rpc details."""
    reason = field = None
    for key, value in error.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None, None
        for detail in status.details:
            info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason = info.reason or None
            elif detail.Unpack(bad) and bad.field_violations:
                field = bad.field_violations[0].field or None
    return reason, field


def _field_in_call(field: str | None, offset: int, count: int) -> str | None:
    """The field of an EmbedImages part's ``images[i]`` among the ``count`` images the
    caller passed, as the in-process embedder names it: "image" when it passed one (a
    SearchByImage request's field), else ``images[offset + i]``."""
    numbered = re.fullmatch(r"images\[(\d+)\]", field or "")
    if numbered is None:
        return field
    return "image" if count == 1 else f"images[{offset + int(numbered.group(1))}]"


class RemoteEmbedder(Embedder):
    """Calls the Embedding service at ``target`` (round-robin over a headless Service)."""

    def __init__(self, target: str, timeout: float = 120.0,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.target = target
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.lb_policy_name", "round_robin"),
            # after an outage, reconnect within seconds of the service coming back, not
            # after gRPC's default backoff of up to two minutes
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000)])
        self.stub = embed_pb2_grpc.EmbeddingStub(self.channel)

    def _error(self, error: grpc.aio.AioRpcError) -> ServiceError:
        """The embedding service's error as search answers it, with its reason and field
        (google.rpc details) passed on."""
        reason, field = _details_of(error)
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(error.details() or "invalid argument", reason=reason,
                                   field=field)
        pushback = dict(error.trailing_metadata() or ()).get(RETRY_PUSHBACK_KEY)
        if (error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and pushback is not None
                and pushback.isdigit()):
            # the embedding service is busy: so is search, and the client may retry
            return Busy(f"embedding service at {self.target}: {error.details()}",
                        retry_after_ms=int(pushback), reason=reason)
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"embedding service at {self.target}: UNAVAILABLE: "
                               f"{error.details()}", reason="EMBEDDING_SERVICE_UNAVAILABLE")
        return ServiceError(f"embedding service at {self.target}: {error.code().name}: "
                            f"{error.details()}", code=error.code(), reason=reason)

    async def start(self, wait_seconds: float = START_WAIT_SECONDS) -> None:
        """Waits (up to ``wait_seconds``) until the Embedding service answers, then reads
        its dimension and probe vector: in a cluster it may still be loading when search
        starts. While no embedding server is up, a call that waits for one ends
        UNAVAILABLE or, where a headless Service publishes no address yet,
        DEADLINE_EXCEEDED: both are waited through; any other answer is an error at once."""
        deadline = time.monotonic() + wait_seconds
        while True:
            remaining = deadline - time.monotonic()
            try:
                vectors = await self._embed_part([probe_image()],
                                                 max(1.0, min(self.timeout, remaining)),
                                                 wait_for_ready=True)
                break
            except ServiceError as error:
                if error.code not in _NOT_UP_YET:
                    raise
                if time.monotonic() > deadline:
                    raise ServiceError(f"{error} (waited {wait_seconds:.0f} s for it)",
                                       code=error.code) from error
                await asyncio.sleep(1.0)
        self._set_probe(vectors[0])

    async def close(self) -> None:
        await self.channel.close()

    def _call_timeout(self, timeout: float | None) -> float:
        """The caller's time left, within this embedder's own limit."""
        return self.timeout if timeout is None else max(0.001, min(self.timeout, timeout))

    async def embed_text(self, text: str, timeout: float | None = None) -> np.ndarray:
        """Fails at once (UNAVAILABLE) while the Embedding service is down, rather than
        waiting for it until the deadline: the caller hears why."""
        try:
            response = await self.stub.EmbedText(embed_pb2.EmbedTextRequest(texts=[text]),
                                                 timeout=self._call_timeout(timeout))
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error
        return np.asarray(response.embeddings[0].values, dtype=np.float32)

    async def _embed_part(self, images: Sequence[bytes], timeout: float,
                          wait_for_ready: bool = False) -> list[np.ndarray]:
        try:
            response = await self.stub.EmbedImages(
                embed_pb2.EmbedImagesRequest(images=list(images)), timeout=timeout,
                wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error
        return [np.asarray(v.values, dtype=np.float32) for v in response.embeddings]

    def _parts(self, images: Sequence[bytes]) -> list[Sequence[bytes]]:
        """``images`` in consecutive parts that each fit one message (an image alone may
        not: the embedding service then says so)."""
        room = self.max_message_bytes - MESSAGE_OVERHEAD_BYTES
        parts: list[Sequence[bytes]] = []
        start, size = 0, 0
        for end, image in enumerate(images):
            cost = len(image) + IMAGE_FRAMING_BYTES
            if end > start and size + cost > room:
                parts.append(images[start:end])
                start, size = end, 0
            size += cost
        if start < len(images):
            parts.append(images[start:])
        return parts

    async def embed_images(self, images: Sequence[bytes], timeout: float | None = None
                           ) -> list[np.ndarray]:
        """One EmbedImages call per part of ``images`` that fits a message: a batch of
        photos may be larger than one message although each of them fits. All of them
        within ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        vectors: list[np.ndarray] = []
        for part in self._parts(images):
            left = None if end is None else end - time.monotonic()
            try:
                vectors += await self._embed_part(part, self._call_timeout(left))
            except InvalidArgument as error:
                error.field = _field_in_call(error.field, len(vectors), len(images))
                raise
        return vectors
