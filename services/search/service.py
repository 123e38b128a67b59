"""ImageSearch: word -> image and image -> image search over a durable, crash-safe index.

The SQLite record (``store.py``) is the truth; the FAISS index (``vector_index.py``) is
derived and snapshotted atomically. AddImages acknowledges a batch only after its
transaction committed, so an acknowledged id survives ``kill -9`` at any moment.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from prometheus_client import Gauge

from percept.v1 import search_pb2, search_pb2_grpc
from services.common.batching import MicroBatcher
from services.common.config import ServerConfig
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
    shown,
)
from services.common.images import REPLY_OVERHEAD_BYTES, probe_size
from services.common.rpc import stream_errors, time_remaining, unary_errors
from services.common.server import ServiceModule, StartupError
from services.common.texts import is_blank
from services.common.tls import ClientTls, TlsError
from services.search.embedder import Embedder, InProcessEmbedder, RemoteEmbedder
from services.search.store import (
    DataDirFull,
    DataDirProblem,
    Entry,
    ImageStore,
    data_dir_problem,
    probe_data_dir,
    recorded_dimension,
)
from services.search.vector_index import (
    IndexSettings,
    VectorIndex,
    disk_bytes,
    remove_staging,
)

log = logging.getLogger("percept.search")
Reply = TypeVar("Reply", bound=Message)

#: How long search waits at start for the Embedding service when its index already says
#: which space it holds (past it, it serves reads and checks the space once the service
#: answers); a new index waits up to embedder.START_WAIT_SECONDS, as it needs the space.
QUICK_START_WAIT_SECONDS = 10.0
#: How long each wait of that later check lasts before it waits again (it never gives up).
VERIFY_WAIT_SECONDS = 600.0
#: How long it waits before it asks again, after an answer that was an error.
VERIFY_RETRY_SECONDS = 5.0
ADD_BATCH = 16
#: An AddImages stream's batch is also embedded once its images take this many bytes, or
#: once the images that every stream of the process holds take ADD_BUFFER_BYTES, or when
#: no item came for ADD_IDLE_SECONDS: a stream, a slow one or one that never ends holds
#: little memory, and its items are acknowledged soon.
ADD_BATCH_BYTES = 32 * 2**20
ADD_BUFFER_BYTES = 256 * 2**20
ADD_IDLE_SECONDS = 0.5
MAX_ID_CHARS = 256
#: The longest uri an image is added with (a path or URL; hits and listings carry it).
MAX_URI_CHARS = 4096
MAX_TEXT_CHARS = 1000
MAX_K = 1000
DEFAULT_K = 10
MAX_DELETE = 10_000
MAX_GET = 10_000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: What a page token is made of: the last id of the page before, marked so that a token
#: from elsewhere is told apart.
PAGE_TOKEN_PREFIX = "after:"
#: The longest page token this service makes: base64 of PAGE_TOKEN_PREFIX and the JSON
#: of a prefix and an id of MAX_ID_CHARS each, at most 12 characters a code point (one
#: past U+FFFF is two \uXXXX escapes). A longer one is refused before it is decoded.
MAX_PAGE_TOKEN_CHARS = 4 * -(-(len(PAGE_TOKEN_PREFIX) + len('["", ""]')
                               + 2 * 12 * MAX_ID_CHARS) // 3)
SNAPSHOT_EVERY_SECONDS = 30.0
#: The file in the data directory that a search server holds locked (flock) while it runs.
LOCK_FILE = ".lock"
# Search's metrics are defined here and in embedder.py, not in services/common/metrics.py:
# only a process that hosts search imports these modules, so only it exports them (a
# superres pod exported percept_search_embedding_served 0, and an alert on 0 fired there).
INDEX_IMAGES = Gauge("percept_search_index_images",
                     "search: images in the FAISS index (Stats' count is the record's; the two "
                     "differ only while something is wrong)")
EMBEDDING_SERVED = Gauge("percept_search_embedding_served",
                         "search: 1 while the calls that embed are served, 0 while they are "
                         "refused (the embedding service has not answered since start, or "
                         "makes another space than the index's)")


def index_settings(config: ServerConfig) -> IndexSettings:
    """The index settings from the server flags (``--search-*``); the server switches and
    rebuilds the index in a background thread, so neither searches nor writes wait."""
    return IndexSettings(ann_threshold=config.search_ann_threshold, ann=config.search_index,
                         nprobe=config.search_nprobe, ef_search=config.search_ef_search,
                         background=True)


def recover_index(store: ImageStore, snapshots: Path, dimension: int,
                  settings: IndexSettings) -> tuple[VectorIndex, int]:
    """The snapshot caught up from the change log, or a rebuild from the record; and the
    change the snapshot on disk holds (-1: none of this index), so that the next snapshot
    is written once the index holds more than that one. Call it holding the data
    directory's lock: it removes the staging folders of snapshot writes cut short."""
    removed = remove_staging(snapshots)
    if removed:
        log.info("removed what snapshot writes cut short left behind",
                 extra={"removed": removed, "snapshots": str(snapshots)})
    try:
        index, seq = VectorIndex.load_snapshot(snapshots, dimension, settings,
                                               record=store.record_id)
        last = store.last_seq()
        if seq > last:
            raise ValueError(
                f"the snapshot holds the record's changes up to {seq}, but the record's "
                f"last change is {last}: the record was restored from an older copy, or "
                "made anew, after the snapshot was taken")
        pruned = store.pruned_through()
        if seq < pruned:  # a catch-up needs the changes after seq, and some are gone
            raise ValueError(
                f"the snapshot holds the record's changes up to {seq}, but the record's "
                f"change log was pruned through {pruned}: the snapshot is older than the "
                "one the log was pruned for (restored from an older copy, or copied "
                "apart from the record), and the changes in between are gone")
        changed = sorted({image_id for _, image_id, _ in store.changes_since(seq)})
        if changed:
            present = store.get(changed)
            index.remove([i for i in changed if i not in present])
            if present:
                index.put(list(present), np.vstack([r.vector for r in present.values()]))
            log.info("caught up from the change log", extra={"changed": len(changed)})
        count = store.count()
        if len(index) != count:
            raise ValueError(f"the index caught up from the snapshot holds {len(index)} "
                             f"images, the record {count}")
        return index, seq
    except ValueError as problem:
        if store.last_seq() == 0 and not snapshots.exists():  # a new index: nothing lost
            log.info("a new index", extra={"snapshots": str(snapshots)})
        else:
            log.warning("rebuilding the index from the record", extra={"reason": str(problem)})
    seq = store.last_seq()
    ids: list[str] = []
    vectors = np.zeros((store.count(), dimension), dtype=np.float32)
    for record in store.all_records():
        if len(ids) == len(vectors):  # the store is not written during recovery
            raise RuntimeError("the record grew during recovery") from None
        vectors[len(ids)] = record.vector
        ids.append(record.id)
    index = VectorIndex.build(dimension, ids, vectors[:len(ids)], settings)
    try:
        index.save_snapshot(snapshots, seq, record=store.record_id)
    except OSError as error:  # a full disk: the index is whole, only not saved
        log.warning("could not save a snapshot of the rebuilt index; serving it, and the "
                    "next start rebuilds it from the record again",
                    extra={"why": _why(error, snapshots.parent)})
        # a snapshot that disagrees with the record must not be trusted by a later start
        with contextlib.suppress(OSError):
            (snapshots / "CURRENT").unlink(missing_ok=True)
        return index, -1
    prune_changes(store, seq)
    return index, seq


def prune_changes(store: ImageStore, seq: int) -> None:
    """Deletes the change log up to ``seq``, that of a snapshot just saved durably: no
    start needs those changes any more, and the log would grow with every write. Call it
    only after the save returned (a crash before then leaves the log whole). A prune that
    fails costs only disk: its rows stay for the next snapshot's prune, logged here."""
    try:
        pruned = store.prune_changes(seq)
    except (DataDirProblem, sqlite3.Error) as error:
        log.warning("could not prune the change log; the next snapshot prunes it",
                    extra={"why": _why(error, store.data_dir)})
        return
    if pruned:
        log.debug("pruned the change log", extra={"pruned": pruned, "through": seq})


class ImageSearchService(ServiceModule, search_pb2_grpc.ImageSearchServicer):
    name = "search"
    full_name = "percept.v1.ImageSearch"
    #: why the latest write, and the latest snapshot, failed (None: they did not): each
    #: problem is logged once while it lasts
    _write_problem: str | None = None
    _snapshot_problem: str | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        search_pb2_grpc.add_ImageSearchServicer_to_server(self, server)

    # -- lifecycle -----------------------------------------------------------------------
    def _make_embedder(self) -> Embedder:
        config = self.config
        if config.embed_target:
            try:
                tls = ClientTls.of(config.embed_tls_ca, config.embed_tls_cert,
                                   config.embed_tls_key)
                return RemoteEmbedder(config.embed_target, tls=tls,
                                      max_message_bytes=config.max_message_bytes)
            except TlsError as error:
                raise StartupError(f"cannot reach the embedding service over TLS: {error}"
                                   ) from error
        # in-process only: a search process with a remote embedder never imports torch
        from services.embed.service import EmbeddingService

        for sibling in self.siblings:
            if isinstance(sibling, EmbeddingService):
                return InProcessEmbedder(sibling)
        return InProcessEmbedder(EmbeddingService(self.config), own=True)

    def batchers(self) -> list[MicroBatcher[Any, Any]]:
        """An in-process embedding service's: search's calls wait on them too."""
        embedder = getattr(self, "embedder", None)
        return embedder.service.batchers() if isinstance(embedder, InProcessEmbedder) else []

    async def load(self) -> None:
        data_dir = self.config.data_dir
        self._write_problem = self._snapshot_problem = None
        await asyncio.to_thread(_check_data_dir, data_dir)
        self._data_dir_lock = await asyncio.to_thread(_lock_data_dir, data_dir)
        self.embedder = self._make_embedder()
        self.snapshots = data_dir / "snapshots"
        record = data_dir / "images.sqlite3"
        #: why the calls that embed are refused now, if they are (_embedding)
        self.embedding_problem = None
        self._verifier: asyncio.Task[None] | None = None
        dimension = recorded_dimension(record) \
            if isinstance(self.embedder, RemoteEmbedder) else None
        if dimension is None:  # a new record: its space is the embedder's, so wait for it
            await self.embedder.start()
            self.store = _open_store(record, self.embedder.dimension, self.embedder.probes)
            self._judged(None)
        else:
            # An index already made: if the embedding service does not answer soon (an
            # embedding pod may load for minutes after this one is up), or answers in
            # another space, serve the index's reads now and the calls that embed once it
            # answers in the index's space
            answered, _ = await self._ask_embedder(QUICK_START_WAIT_SECONDS)
            self.store = _open_store(record, dimension)
            problem = await self._check_space() if answered else self._not_answered_yet
            if problem is not None:
                if not answered:
                    log.warning("the embedding service does not answer yet: serving the "
                                "index's reads; the calls that embed answer UNAVAILABLE "
                                "until it does",
                                extra={"embed_target": self.config.embed_target})
                self.embedding_problem = problem
                self._verifier = asyncio.get_running_loop().create_task(self._verify_space())
        #: held by each snapshot from its look at the record until it is written: two
        #: never interleave, and close() waits for one under way
        self._snapshot_lock = threading.Lock()
        self.index, self.snapshot_seq = await asyncio.to_thread(self._recover)
        INDEX_IMAGES.set_function(lambda: len(self.index))  # the index a rebuild swaps in too
        self.write_lock = asyncio.Lock()
        self.buffered_bytes = 0  # image bytes that AddImages streams hold, not yet embedded
        self._write_thread_lock = threading.Lock()
        self._snapshotter = asyncio.get_running_loop().create_task(self._snapshot_loop())
        log.info("search loaded", extra={"images": len(self.index), "index": self.index.kind,
                                         "data_dir": str(data_dir)})

    async def _ask_embedder(self, wait_seconds: float) -> tuple[bool, str | None]:
        """Whether the (remote) embedding service answered the probe image within
        ``wait_seconds``, and the error it answered with, if it did answer with one."""
        assert isinstance(self.embedder, RemoteEmbedder)
        try:
            await self.embedder.start(wait_seconds=wait_seconds)
        except ServiceError as error:
            if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return False, None
            return False, str(error)
        return True, None

    def _not_answered_yet(self) -> ServiceError:
        return Unavailable(f"the embedding service at {self.config.embed_target} has not "
                           "answered since this server started: GetImages, ListImages, "
                           "DeleteImages and Stats work; the calls that embed will once it "
                           "answers",
                           reason="EMBEDDING_SERVICE_UNAVAILABLE")

    async def _check_space(self) -> Callable[[], ServiceError] | None:
        """Why the (remote) embedder's space, as its latest start() found it, cannot serve
        this index (None: it can); its verdict is kept for the answers that follow."""
        problem = await asyncio.to_thread(self._space_problem)
        self._judged(None if problem is None else problem().message)
        return problem

    def _judged(self, verdict: str | None) -> None:
        """Keeps the verdict on what the remote embedder answered its latest start() with,
        and from now on has it judge every new model it meets by its probe vectors."""
        if isinstance(self.embedder, RemoteEmbedder):
            self.embedder.verdicts[self.embedder.identity] = verdict
            self.embedder.judge = self._judge_probes

    def _judge_probes(self, probes: np.ndarray) -> str | None:
        try:
            self.store.check_space(int(probes.shape[1]), probes)
        except ValueError as error:
            return str(error)
        return None

    def _space_problem(self) -> Callable[[], ServiceError] | None:
        """Why the embedder's space cannot serve this index (None: it can)."""
        try:
            self.store.check_space(self.embedder.dimension, self.embedder.probes)
        except ValueError as error:
            message = str(error)
            return lambda: FailedPrecondition(message, reason="EMBEDDING_SPACE_MISMATCH")
        return None

    async def _verify_space(self) -> None:
        """Until the embedding service answers in the index's space: asks it, with a
        backoff, logging only when what it answers changes."""
        delay, said = VERIFY_RETRY_SECONDS, None
        while True:
            try:
                answered, answer = await self._ask_embedder(VERIFY_WAIT_SECONDS)
                if answered:
                    problem = await self._check_space()
                    if problem is None:
                        self.embedding_problem = None
                        log.info("the embedding service answers, in the index's space: "
                                 "serving every call")
                        return
                    self.embedding_problem = problem
                    news = problem().message
                elif answer is not None:
                    self.embedding_problem = lambda answer=answer: Unavailable(
                        f"the embedding service at {self.config.embed_target} answered the "
                        f"probe images with {answer}; asking again",
                        reason="EMBEDDING_SERVICE_UNAVAILABLE")
                    news = answer
                else:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as error:  # never die silently
                news = f"{type(error).__name__}: {error}"
            if news != said:
                log.error("the calls that embed are refused: asking the embedding service "
                          "again", extra={"why": news})
                said = news
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    @property
    def embedding_problem(self) -> Callable[[], ServiceError] | None:
        """Makes the error that refuses the calls that embed, while they are refused."""
        return self._problem

    @embedding_problem.setter
    def embedding_problem(self, problem: Callable[[], ServiceError] | None) -> None:
        self._problem = problem
        EMBEDDING_SERVED.set(0 if problem is not None else 1)

    def _embedding(self) -> Embedder:
        """The embedder, for a call that embeds; the error that refuses such calls while
        the embedding service has not answered since start, or makes another space."""
        if self._problem is not None:
            raise self._problem()
        return self.embedder

    def _recover(self) -> tuple[VectorIndex, int]:
        return recover_index(self.store, self.snapshots, self.store.dimension,
                             index_settings(self.config))

    async def snapshot(self) -> None:
        await asyncio.to_thread(self._snapshot)

    def _snapshot(self) -> None:
        with self._snapshot_lock:
            # seq and index state are read together, between two writes: a snapshot never
            # claims a change that its index lacks (the catch-up would then skip it)
            with self._write_thread_lock:
                seq = self.store.last_seq()
                if seq == self.snapshot_seq:
                    return
                state = self.index.capture()
            self.index.save_snapshot(self.snapshots, seq, state, record=self.store.record_id)
            self.snapshot_seq = seq
            prune_changes(self.store, seq)

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_EVERY_SECONDS)
            try:
                await self.snapshot()
            except Exception as error:
                why = _why(error, self.config.data_dir)
                if why != self._snapshot_problem:  # once, not every period it lasts
                    log.error("snapshot failed; the record stays the source of truth, and a "
                              "start catches up from it", extra={"why": why},
                              exc_info=data_dir_problem(error, self.config.data_dir) is None)
                self._snapshot_problem = why
            else:
                if self._snapshot_problem is not None:
                    log.info("snapshots are saved again")
                self._snapshot_problem = None

    async def close(self) -> None:
        if getattr(self, "_verifier", None) is not None:
            assert self._verifier is not None
            self._verifier.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._verifier
        try:
            if hasattr(self, "_snapshotter"):
                # a periodic snapshot under way runs on in its thread: the final one waits
                # for it (_snapshot_lock), then writes what came after it, if anything did
                self._snapshotter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._snapshotter
                try:
                    await self.snapshot()
                except Exception as error:  # the record has every acknowledged change
                    log.warning("the final snapshot failed; the next start catches up from "
                                "the record (the last snapshot and the change log after it)",
                                extra={"why": _why(error, self.config.data_dir)})
        finally:
            try:
                if hasattr(self, "store"):
                    self.store.close()
            finally:
                try:
                    if hasattr(self, "embedder"):
                        await self.embedder.close()
                finally:
                    lock = getattr(self, "_data_dir_lock", None)
                    if lock is not None:  # another server may use the directory now
                        self._data_dir_lock = None
                        os.close(lock)

    # -- writes --------------------------------------------------------------------------
    # The record and the index change together in one worker thread, under a thread lock:
    # a cancelled RPC either never started the change or sees it through, so the index
    # cannot miss a committed change (the next snapshot would record it as included), and
    # two writers cannot apply their changes to the two in different orders.
    def _put(self, entries: list[tuple[str, str, np.ndarray]]) -> None:
        with self._write_thread_lock:
            self.store.put_many(entries)
            self.index.put([i for i, _, _ in entries], np.vstack([v for _, _, v in entries]))

    def _delete(self, ids: list[str]) -> list[str]:
        with self._write_thread_lock:
            missing, _ = self.store.delete_many(ids)
            self.index.remove(ids)
        return missing

    def _refused(self, problem: DataDirProblem, outcome: str) -> ServiceError:
        """The answer to a write that the data directory refused: RESOURCE_EXHAUSTED where
        it is full (a retry helps once space is freed, so without the retry trailer of a
        busy answer), FAILED_PRECONDITION where it is read-only or its record was moved;
        logged once while it lasts."""
        if str(problem) != self._write_problem:
            log.error("writes are refused; reads go on", extra={"why": str(problem)})
            self._write_problem = str(problem)
        if isinstance(problem, DataDirFull):
            return ResourceExhausted(f"{problem}: {outcome}; {problem.advice}, then retry",
                                     reason=problem.reason)
        return FailedPrecondition(f"{problem}: {outcome}; {problem.advice}, then retry "
                                  "(searches and reads go on meanwhile)",
                                  reason=problem.reason)

    def _written(self) -> None:
        """A write was stored: says so, where the one before it was refused."""
        if self._write_problem is not None:
            log.info("writes are stored again")
            self._write_problem = None

    def _check_item(self, item: search_pb2.AddImageRequest) -> None:
        """The id, and the image's header. The image is decoded once, by the embedder
        (within the server's pixel budget), not here as well."""
        if not item.id:
            raise InvalidArgument("id is empty", field="id")
        if len(item.id) > MAX_ID_CHARS:
            raise InvalidArgument(f"id has {len(item.id)} characters, over {MAX_ID_CHARS}",
                                  field="id")
        if len(item.uri) > MAX_URI_CHARS:
            raise InvalidArgument(f"uri has {len(item.uri)} characters, over {MAX_URI_CHARS}",
                                  field="uri")
        probe_size(item.image)

    async def _embed_each(self, items: list[search_pb2.AddImageRequest],
                          rejected: list[search_pb2.Rejection], deadline: float | None
                          ) -> tuple[list[search_pb2.AddImageRequest], list[np.ndarray]]:
        """Embeds ``items`` one by one, after their batch was refused for a bad image:
        each bad image becomes a rejection of its own, the others are kept. All of them
        by the call's ``deadline`` (time.monotonic()), each with the time left."""
        kept, vectors = [], []
        for item in items:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                vectors.append((await self._embedding().embed_images([item.image], left))[0])
                kept.append(item)
            except InvalidArgument as problem:
                rejected.append(search_pb2.Rejection(id=item.id, code=problem.code.name,
                                                     reason=problem.message))
        return kept, vectors

    async def _add_batch(self, items: list[search_pb2.AddImageRequest],
                         rejected: list[search_pb2.Rejection], timeout: float | None
                         ) -> search_pb2.AddImagesAck:
        vectors: list[np.ndarray] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        if items:
            try:
                vectors = await self._embedding().embed_images([i.image for i in items],
                                                               timeout)
            except InvalidArgument:  # an image whose header read but whose pixels did not
                items, vectors = await self._embed_each(items, rejected, deadline)
        latest = {item.id: (item, vector) for item, vector in zip(items, vectors, strict=True)}
        if latest:
            async with self.write_lock:
                entries = [(i, item.uri, vector) for i, (item, vector) in latest.items()]
                try:
                    await asyncio.to_thread(self._put, entries)
                except DataDirProblem as problem:
                    raise self._refused(problem, "the images not acknowledged yet were not "
                                        "stored (those acknowledged were)") from problem
            self._written()
        for rejection in rejected:
            if rejection.id in latest:  # another, good copy of the id in this batch
                rejection.reason += ("; this copy was not stored: another copy of the same "
                                     "id in this batch was, the one acknowledged in added")
        return search_pb2.AddImagesAck(added=list(latest), rejected=rejected)

    @stream_errors
    async def AddImages(self, request_iterator: AsyncIterator[search_pb2.AddImageRequest],
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[search_pb2.AddImagesAck]:
        batch: list[search_pb2.AddImageRequest] = []
        rejected: list[search_pb2.Rejection] = []
        held = 0  # bytes of the images in `batch`, counted in self.buffered_bytes too
        items = request_iterator.__aiter__()

        async def following() -> search_pb2.AddImageRequest:
            return await items.__anext__()

        reading: asyncio.Task[search_pb2.AddImageRequest] | None = None
        ended = False
        broken: ServiceError | None = None  # what ended the stream early
        try:
            while not ended:
                if reading is None:  # never cancelled while the stream goes on
                    reading = asyncio.ensure_future(following())
                done, _ = await asyncio.wait(
                    {reading}, timeout=ADD_IDLE_SECONDS if batch or rejected else None)
                if done:
                    finished, reading = reading, None
                    try:
                        item = finished.result()
                    except StopAsyncIteration:
                        ended = True
                    except ServiceError as problem:
                        # a message that did not parse (services.common.malformed): the
                        # items that came whole before it are stored and acknowledged as
                        # at the end of a stream, then the stream ends with its error
                        ended, broken = True, problem
                    else:
                        try:
                            await asyncio.to_thread(self._check_item, item)
                            batch.append(item)
                            held += len(item.image)
                            self.buffered_bytes += len(item.image)
                        except ServiceError as problem:
                            rejected.append(search_pb2.Rejection(
                                id=item.id, code=problem.code.name, reason=problem.message))
                        if (len(batch) + len(rejected) < ADD_BATCH and held < ADD_BATCH_BYTES
                                and self.buffered_bytes < ADD_BUFFER_BYTES):
                            continue
                # a full batch, a pause with items waiting (a wait times out only then), or
                # the end of the stream
                if batch or rejected:
                    ack = await self._add_batch(batch, rejected, time_remaining(context))
                    self.buffered_bytes -= held
                    batch, rejected, held = [], [], 0
                    yield ack
            if broken is not None:
                raise broken
        finally:  # a cancelled or failed stream gives back what it held
            self.buffered_bytes -= held
            if reading is not None:
                reading.cancel()

    @unary_errors
    async def DeleteImages(self, request: search_pb2.DeleteImagesRequest,
                           context: grpc.aio.ServicerContext) -> search_pb2.DeleteImagesResponse:
        if len(request.ids) > MAX_DELETE:
            raise InvalidArgument(f"{len(request.ids)} ids is over the limit of {MAX_DELETE}",
                                  field="ids")
        ids = list(dict.fromkeys(request.ids))
        async with self.write_lock:
            try:
                missing = await asyncio.to_thread(self._delete, ids)
            except DataDirFull as problem:
                raise self._refused(problem, "nothing was deleted: SQLite needs free space "
                                    "to record a deletion too (and deleting images does not "
                                    "shrink the record's files)") from problem
            except DataDirProblem as problem:
                raise self._refused(problem, "nothing was deleted") from problem
        self._written()
        return search_pb2.DeleteImagesResponse(deleted=len(ids) - len(missing), missing=missing)

    # -- reads ---------------------------------------------------------------------------
    @staticmethod
    def _k(k: int) -> int:
        k = k or DEFAULT_K
        if not 1 <= k <= MAX_K:
            raise InvalidArgument(f"k must be 1..{MAX_K}, got {k}", field="k")
        return k

    @staticmethod
    def _min_score(request: search_pb2.SearchByTextRequest | search_pb2.SearchByImageRequest
                   ) -> float | None:
        if not request.HasField("min_score"):
            return None
        if not -1.0 <= request.min_score <= 1.0:  # NaN fails too
            raise InvalidArgument(f"min_score must be -1..1 (a cosine), got {request.min_score}",
                                  field="min_score")
        return float(request.min_score)

    async def _hits(self, vector: np.ndarray, k: int, min_score: float | None = None
                    ) -> search_pb2.SearchResponse:
        found = (await asyncio.to_thread(self.index.search, vector[None], k))[0]
        # the floor is compared with the scores as answered: -1..1, and 1 for an image
        # searched by itself (vector_index.cosine_score), so min_score 1 finds it
        if min_score is not None:
            found = [(image_id, score) for image_id, score in found if score >= min_score]
        records = await asyncio.to_thread(self.store.get, [i for i, _ in found])
        return self._fits(search_pb2.SearchResponse(hits=[
            search_pb2.Hit(id=i, uri=records[i].uri, score=score)
            for i, score in found if i in records]), "ask for fewer hits (k)")

    def _fits(self, reply: Reply, advice: str) -> Reply:
        """``reply``, or RESOURCE_EXHAUSTED (RESULT_TOO_LARGE) where it would be over the
        message limit (long uris): gRPC would refuse it with no reason a client can read."""
        size = reply.ByteSize()
        if size + REPLY_OVERHEAD_BYTES > self.config.max_message_bytes:
            raise ResourceExhausted(
                f"the reply would take {size / 2**20:.1f} MiB, over this server's message "
                f"limit of {self.config.max_message_bytes / 2**20:.0f} MiB "
                f"(--max-message-mb); {advice}", reason="RESULT_TOO_LARGE")
        return reply

    @unary_errors
    async def SearchByText(self, request: search_pb2.SearchByTextRequest,
                           context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        k, min_score = self._k(request.k), self._min_score(request)
        if len(request.text) > MAX_TEXT_CHARS:  # first: is_blank reads every character
            raise InvalidArgument(f"text has {len(request.text)} characters, over the limit "
                                  f"of {MAX_TEXT_CHARS}", field="text")
        if is_blank(request.text):
            raise InvalidArgument("text is empty (nothing but spaces or invisible characters)"
                                  if request.text else "text is empty", field="text")
        return await self._hits(await self._embedding().embed_text(
            request.text, time_remaining(context)), k, min_score)

    @unary_errors
    async def SearchByImage(self, request: search_pb2.SearchByImageRequest,
                            context: grpc.aio.ServicerContext) -> search_pb2.SearchResponse:
        k, min_score = self._k(request.k), self._min_score(request)
        # the embedder decodes the image (and names what is wrong with it)
        return await self._hits((await self._embedding().embed_images(
            [request.image], time_remaining(context)))[0], k, min_score)

    @unary_errors
    async def GetImages(self, request: search_pb2.GetImagesRequest,
                        context: grpc.aio.ServicerContext) -> search_pb2.GetImagesResponse:
        if not request.ids:
            raise InvalidArgument(f"ids is empty: send 1 to {MAX_GET}", field="ids")
        if len(request.ids) > MAX_GET:
            raise InvalidArgument(f"{len(request.ids)} ids is over the limit of {MAX_GET}",
                                  field="ids")
        ids = list(dict.fromkeys(request.ids))
        found = await asyncio.to_thread(self.store.entries, ids)
        return self._fits(search_pb2.GetImagesResponse(
            images=[_image_entry(found[i]) for i in ids if i in found],
            missing=[i for i in ids if i not in found]), "ask for fewer ids")

    @unary_errors
    async def ListImages(self, request: search_pb2.ListImagesRequest,
                         context: grpc.aio.ServicerContext) -> search_pb2.ListImagesResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be 0..{MAX_PAGE_SIZE}, got {request.page_size}",
                                  field="page_size")
        if len(request.prefix) > MAX_ID_CHARS:
            raise InvalidArgument(f"prefix has {len(request.prefix)} characters, over "
                                  f"{MAX_ID_CHARS}", field="prefix")
        after = _page_token_id(request.page_token, request.prefix)
        entries = await asyncio.to_thread(self.store.page, after, size + 1, request.prefix)
        # a page also ends where one more entry would take it over the message limit
        room = self.config.max_message_bytes - REPLY_OVERHEAD_BYTES
        page: list[search_pb2.ImageEntry] = []
        for entry in entries[:size]:
            listed = _image_entry(entry)
            room -= listed.ByteSize() + 8  # its tag and length
            if room < 0 and page:
                break
            page.append(listed)
        more = len(page) < len(entries)
        return search_pb2.ListImagesResponse(
            images=page,
            next_page_token=_page_token(page[-1].id, request.prefix) if more else "")

    @unary_errors
    async def Stats(self, request: search_pb2.StatsRequest,
                    context: grpc.aio.ServicerContext) -> search_pb2.StatsResponse:
        count = await asyncio.to_thread(self.store.count)
        size = await asyncio.to_thread(disk_bytes, self.config.data_dir)
        return search_pb2.StatsResponse(count=count, index_type=self.index.kind,
                                        dimension=self.store.dimension, disk_bytes=size)


def _why(error: BaseException, data_dir: Path) -> str:
    """What ``error``, met writing under ``data_dir``, says in a log line."""
    problem = data_dir_problem(error, data_dir)
    return str(problem) if problem is not None else f"{type(error).__name__}: {error}"


def _check_data_dir(data_dir: Path) -> None:
    """StartupError unless the search service can write in ``data_dir`` (made if it is
    missing): a read-only one would answer SERVING, then refuse every write. A full one
    only warns: its reads can be served, and writes are answered RESOURCE_EXHAUSTED until
    space is freed."""
    try:
        problem = probe_data_dir(data_dir)
    except OSError as error:  # not a directory, say
        raise StartupError(f"cannot write in the data directory {data_dir} "
                           f"({error.strerror or error}): pass another --data-dir") from error
    if isinstance(problem, DataDirFull):
        log.warning("the data directory is full: serving reads; writes are answered "
                    "RESOURCE_EXHAUSTED until space is freed on its filesystem",
                    extra={"why": str(problem)})
    elif problem is not None:
        raise StartupError(f"{problem}: the search service writes its record and index "
                           f"snapshots there; {problem.advice}, or pass another --data-dir")


def _lock_data_dir(data_dir: Path) -> int | None:
    """Takes the data directory for this server (an exclusive flock on its LOCK_FILE,
    held while the server runs, given back by close() or the process's end, a kill -9
    too): the descriptor that holds it. StartupError where another server holds it: two
    servers on one record would each snapshot an index without the other's images."""
    path = data_dir / LOCK_FILE
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:  # another user's lock file (flock needs no write access)
            fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
    except BlockingIOError as error:  # flock's "held elsewhere" (EWOULDBLOCK)
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = f" (process {int(path.read_text().strip())} took it)"
        raise StartupError(
            f"the data directory {data_dir} is in use: another search server holds it"
            f"{holder}, and two on one record would lose each other's images from the "
            "index; stop that server, or pass another --data-dir") from error
    except OSError as error:
        # a full disk (no room for a new file) or a filesystem without locks: serve, as a
        # full data directory does
        log.warning("cannot lock the data directory: nothing stops another server from "
                    "using it as well", extra={"lock": str(path), "why": _why(error, data_dir)})
        return None
    with contextlib.suppress(OSError):  # who holds it, for that message (not needed)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _open_store(record: Path, dimension: int, probes: np.ndarray | None = None) -> ImageStore:
    """The record at ``record``; StartupError where its data directory is read-only (SQLite
    opens a file it may only read without a word) or too full to make it."""
    try:
        store = ImageStore(record, dimension, probes)
    except (sqlite3.Error, OSError) as error:
        problem = data_dir_problem(error, record.parent)
        if problem is None:
            raise
        raise StartupError(f"cannot open the record {record}: {problem}; {problem.advice}, or pass "
                           "another --data-dir") from error
    problem = store.probe_write()
    if problem is not None:
        store.close()
        raise StartupError(f"cannot write the record {record}: {problem}; the search service "
                           f"writes every added and deleted image there; {problem.advice}, "
                           "or pass another --data-dir")
    return store


def _image_entry(entry: Entry) -> search_pb2.ImageEntry:
    added = timestamp_pb2.Timestamp()
    added.FromNanoseconds(round(entry.added * 1e9))
    return search_pb2.ImageEntry(id=entry.id, uri=entry.uri, added=added)


def _page_token(last_id: str, prefix: str) -> str:
    """Where the next page starts: after ``last_id``, in the listing of ``prefix``."""
    text = PAGE_TOKEN_PREFIX + json.dumps([prefix, last_id])
    return base64.urlsafe_b64encode(text.encode()).decode()


def _page_token_parts(token: str) -> tuple[str, str] | None:
    """The (prefix, last id) that :func:`_page_token` made ``token`` of; None for any
    string it did not make (whatever a client crafts: the size is bounded before decoding,
    and what the token decodes to must make the very same token again)."""
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        return None
    try:
        text = base64.b64decode(token, altchars=b"-_", validate=True).decode()
        if not text.startswith(PAGE_TOKEN_PREFIX):
            return None
        parts = json.loads(text[len(PAGE_TOKEN_PREFIX):])
    except (ValueError, UnicodeError, RecursionError):  # RecursionError: [[[[...
        return None
    if not (isinstance(parts, list) and len(parts) == 2
            and all(isinstance(part, str) for part in parts)):
        return None
    made_for, after = parts
    # a page ends on a stored id (1..MAX_ID_CHARS characters) of the prefix's listing
    if not (0 < len(after) <= MAX_ID_CHARS and after.startswith(made_for)):
        return None
    try:  # no id holds a lone surrogate (JSON can escape one)
        made_for.encode(), after.encode()
    except UnicodeEncodeError:
        return None
    return (made_for, after) if _page_token(after, made_for) == token else None


def _page_token_id(token: str, prefix: str) -> str:
    """The id a page token continues after ("" for no token); the token must be one this
    service made (INVALID_ARGUMENT, never INTERNAL, for any other string), for a listing
    of the same ``prefix``."""
    if not token:
        return ""
    parts = _page_token_parts(token)
    if parts is None:
        raise InvalidArgument(f"page_token {shown(token)} is not one this service made: pass "
                              "the next_page_token of the previous ListImages response",
                              field="page_token")
    made_for, after = parts
    if made_for != prefix:
        raise InvalidArgument(f"page_token continues a listing of prefix {shown(made_for)}, "
                              f"not {shown(prefix)}: keep the prefix across the pages",
                              field="page_token")
    return after
