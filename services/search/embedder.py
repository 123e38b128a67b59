"""Where the search service gets its vectors: the Embedding service, over gRPC when it runs
separately (``--embed-target``), or in-process (``percept serve all``)."""

from __future__ import annotations

import abc
import asyncio
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter

from percept.v1 import embed_pb2, embed_pb2_grpc
from services.common.channels import RenewingChannel
from services.common.connection_options import CLIENT_KEEPALIVE_SECONDS, client_keepalive_options
from services.common.errors import (
    RETRY_PUSHBACK_KEY,
    STATUS_DETAILS_KEY,
    Busy,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from services.common.tls import EMBED_FLAGS, ClientTls, connection_hint
from services.search.probes import probe_images

if TYPE_CHECKING:  # a search process with a remote embedder never imports torch
    from services.embed.service import EmbeddingService

_log = logging.getLogger("percept.search")

#: Here, not in services/common/metrics.py: only a process that hosts search exports it.
SPACE_REFUSALS = Counter("percept_search_space_refusals_total",
                         "search: answers of the embedding service refused because their "
                         "vectors are not in the index's space (an embedding pod rolled "
                         "out with another DeViSE map or --word-vectors file)")

#: Room kept in an EmbedImages request for its other fields and framing, and per image
#: (a protobuf tag and length).
MESSAGE_OVERHEAD_BYTES = 4096
IMAGE_FRAMING_BYTES = 16


def _text_field(field: str | None) -> str | None:
    """The field of an EmbedText error about its one text, as search's request names it."""
    return "text" if field == "texts[0]" else field


class Embedder(abc.ABC):
    """Where vectors come from. ``start`` leaves ``dimension`` and ``probes`` (the vectors
    of :func:`probe_images`, one row each) set."""

    dimension: int = 0
    probes: np.ndarray

    async def start(self) -> None:
        self._set_probes(await self.embed_images(probe_images()))

    def _set_probes(self, vectors: Sequence[np.ndarray]) -> None:
        self.probes = np.stack([np.asarray(v, dtype=np.float32) for v in vectors])
        self.dimension = int(self.probes.shape[1])

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
        try:
            return (await self.service.embed_texts([text], timeout))[0]
        except InvalidArgument as error:
            error.field = _text_field(error.field)
            raise


#: How long search waits at start for the Embedding service: within its pod's start-up
#: probe (120 x 5 s, deploy/k8s/base/search.yaml), less a minute for its own loading.
START_WAIT_SECONDS = 540.0
#: What a call that waits for an embedding server ends with while none is up.
_NOT_UP_YET = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
#: Probe calls that look for an embedding pod answering with a model search has not judged
#: yet. Round-robin takes each Ready pod in turn, so this many reach every one of up to as
#: many pods (the gpu overlay's HPA allows 8).
IDENTITY_PROBES = 8

#: What an EmbedImages answer says made its vectors: (space, model), for example
#: ("sentence-transformers/all-MiniLM-L6-v2", "devise-minilm@1").
Identity = tuple[str, str]


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


def log_verdict(target: str, identity: Identity, verdict: str | None) -> None:
    """Says what search concluded of an embedding model it met (one line per model)."""
    if verdict is None:
        _log.info("the embedding service answers with a model whose vectors are in the "
                  "index's space", extra={"embed_target": target, "space": identity[0],
                                          "model": identity[1]})
    else:
        _log.error("the embedding service answers with a model whose vectors are not in "
                   "the index's space: its answers are refused", extra={
                       "embed_target": target, "space": identity[0], "model": identity[1],
                       "why": verdict})


class RemoteEmbedder(Embedder):
    """Calls the Embedding service at ``target`` (round-robin over a headless Service)."""

    def __init__(self, target: str, timeout: float = 120.0,
                 max_message_bytes: int = 64 * 1024 * 1024, tls: ClientTls | None = None,
                 keepalive_seconds: float = CLIENT_KEEPALIVE_SECONDS) -> None:
        self.target = target
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        #: plaintext, or TLS whose files are read again when they change (TlsError: the
        #: files cannot be used)
        self.channels = RenewingChannel(target, [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.lb_policy_name", "round_robin"),
            # after an outage, reconnect within seconds of the service coming back, not
            # after gRPC's default backoff of up to two minutes
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
            # a pod that vanished (nothing answers, nothing closes) is noticed by its quiet
            *client_keepalive_options(keepalive_seconds)], tls or ClientTls(), EMBED_FLAGS,
            close_grace=timeout)
        self._stub = embed_pb2_grpc.EmbeddingStub(self.channels.channel)
        self._stub_channel = self.channels.channel
        #: what made the probe vectors of the latest start() (its answer's space and model)
        self.identity: Identity = ("", "")
        #: search's verdict on each (space, model) the embedding service has answered
        #: with: None where its vectors can be searched with the index's, else why not.
        #: The embedding pods behind one target may change mid-life (a rollout to another
        #: DeViSE map or --word-vectors file): an answer from one not judged yet is judged
        #: by its probe vectors before its vectors are used.
        self.verdicts: dict[Identity, str | None] = {}
        #: judges probe vectors (None: they agree with the index's); set by search once
        #: its index is open. Until then answers are not checked.
        self.judge: Callable[[np.ndarray], str | None] | None = None
        self._judging: dict[Identity, asyncio.Future[str | None]] = {}

    @property
    def channel(self) -> grpc.aio.Channel:
        return self.channels.channel

    @property
    def stub(self) -> embed_pb2_grpc.EmbeddingStub:
        """The stub for the next call (over a new channel once the TLS files changed)."""
        channel = self.channels.current()
        if channel is not self._stub_channel:
            self._stub, self._stub_channel = embed_pb2_grpc.EmbeddingStub(channel), channel
        return self._stub

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
        its dimension and probe vectors: in a cluster it may still be loading when search
        starts. While no embedding server is up, a call that waits for one ends
        UNAVAILABLE or, where a headless Service publishes no address yet,
        DEADLINE_EXCEEDED: both are waited through; any other answer is an error at once."""
        deadline = time.monotonic() + wait_seconds
        # the wait below meets only its deadline; a health check fails at once with
        # gRPC's reason: a TLS setting that is wrong is said before the wait, not after
        hint = await self._tls_hint()
        while True:
            remaining = deadline - time.monotonic()
            try:
                response = await self._call_embed_images(
                    probe_images(), max(1.0, min(self.timeout, remaining)),
                    wait_for_ready=True)
                break
            except ServiceError as error:
                if error.code not in _NOT_UP_YET:
                    raise
                if not hint:
                    hint = await self._tls_hint()
                if time.monotonic() > deadline:
                    raise ServiceError(f"{error} (waited {wait_seconds:.0f} s for it"
                                       + (f"; {hint}" if hint else "") + ")",
                                       code=error.code) from error
                await asyncio.sleep(1.0)
        self.identity = (response.space, response.model)
        self._set_probes([np.asarray(v.values, dtype=np.float32) for v in response.embeddings])

    async def _tls_hint(self) -> str:
        """Where TLS is on and a health check fails on a TLS setting, what to change
        (also logged, as a WARNING); "" otherwise."""
        if not self.channels.tls.enabled:
            return ""
        try:
            await health_pb2_grpc.HealthStub(self.channels.current()).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as error:
            hint = connection_hint(error.details() or "", self.channels.tls, EMBED_FLAGS)
            if hint:
                _log.warning("the embedding service refuses the TLS connection; waiting "
                             "for it all the same", extra={
                                 "embed_target": self.target, "hint": hint,
                                 "error": error.details()})
            return hint
        return ""

    async def close(self) -> None:
        for judging in list(self._judging.values()):
            judging.cancel()
        await self.channels.close()

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
            problem = self._error(error)
            if isinstance(problem, InvalidArgument):
                problem.field = _text_field(problem.field)
            raise problem from error
        self._check_text_space(response.space)
        return np.asarray(response.embeddings[0].values, dtype=np.float32)

    async def _call_embed_images(self, images: Sequence[bytes], timeout: float,
                                 wait_for_ready: bool = False
                                 ) -> embed_pb2.EmbedImagesResponse:
        try:
            response: embed_pb2.EmbedImagesResponse = await self.stub.EmbedImages(
                embed_pb2.EmbedImagesRequest(images=list(images)), timeout=timeout,
                wait_for_ready=wait_for_ready)
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error
        return response

    async def _embed_part(self, images: Sequence[bytes], timeout: float) -> list[np.ndarray]:
        end = time.monotonic() + timeout
        response = await self._call_embed_images(images, timeout)
        await self._check_identity((response.space, response.model),
                                   max(0.001, end - time.monotonic()))
        return [np.asarray(v.values, dtype=np.float32) for v in response.embeddings]

    # -- is an answer in the index's space? ----------------------------------------------
    def _refuse(self, why: str) -> FailedPrecondition:
        SPACE_REFUSALS.inc()
        return FailedPrecondition(f"the embedding service at {self.target} {why}",
                                  reason="EMBEDDING_SPACE_MISMATCH")

    def _check_text_space(self, space: str) -> None:
        """Text vectors depend on the space alone: they compare with the index's image
        vectors when they are of the space of an answer judged good."""
        good = {known for (known, _), verdict in self.verdicts.items() if verdict is None}
        if self.judge is not None and good and space not in good:
            raise self._refuse(f"now embeds text in {space!r}, and this index holds "
                               f"vectors of {' or '.join(sorted(good))!r}: they cannot be "
                               "compared (another --word-vectors file was rolled out?)")

    async def _check_identity(self, identity: Identity, timeout: float) -> None:
        """Refuses an answer whose (space, model) search has judged another space than the
        index's, judging it first if it is new."""
        if self.judge is None:
            return
        if identity not in self.verdicts:
            judging = self._judging.get(identity)
            if judging is None:  # one probe search for any number of calls that wait,
                # within the embedder's own limit, not the first caller's time left
                judging = asyncio.ensure_future(self._judge_identity(identity, self.timeout))
                self._judging[identity] = judging
                judging.add_done_callback(self._judged)
            try:  # each caller waits as long as its own deadline allows
                await asyncio.wait_for(asyncio.shield(judging), timeout)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"the embedding service at {self.target} answered with {identity[1]!r} "
                    f"in {identity[0]!r}, which search is still checking against its index; "
                    "retry") from None
        verdict = self.verdicts[identity]
        if verdict is not None:
            raise self._refuse(f"now answers with {identity[1]!r} in {identity[0]!r}, "
                               f"whose vectors are not this index's: {verdict}")

    def _judged(self, judging: asyncio.Future[str | None]) -> None:
        """Forgets a finished check (its verdict, if it reached one, is in verdicts); its
        error was each waiter's to hear, and with none left it is not logged again."""
        self._judging = {i: f for i, f in self._judging.items() if f is not judging}
        if not judging.cancelled():
            judging.exception()  # marks it retrieved

    async def _judge_identity(self, identity: Identity, timeout: float) -> str | None:
        """Asks for the probe images' vectors until an embedding pod that answers with
        ``identity`` gives them (at most IDENTITY_PROBES calls), and judges them."""
        assert self.judge is not None
        end = time.monotonic() + timeout
        for _ in range(IDENTITY_PROBES):
            left = end - time.monotonic()
            if left <= 0:
                break
            response = await self._call_embed_images(probe_images(), left)
            if (response.space, response.model) == identity:
                probes = np.stack([np.asarray(v.values, dtype=np.float32)
                                   for v in response.embeddings])
                verdict = await asyncio.to_thread(self.judge, probes)
                self.verdicts[identity] = verdict
                log_verdict(self.target, identity, verdict)
                return verdict
        raise Unavailable(f"the embedding service at {self.target} answered with "
                          f"{identity[1]!r} in {identity[0]!r}, which search has not checked "
                          f"against its index yet, and {IDENTITY_PROBES} probe calls met "
                          "none that answers so; retry", reason="EMBEDDING_SERVICE_UNAVAILABLE")

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
