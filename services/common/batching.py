"""Dynamic micro-batching behind a bounded queue.

Requests submitted with the same ``key`` (a compatible shape, a model name ...) are grouped
into one call of the batch function: the first request of a group waits at most
``max_wait_ms`` for up to ``max_batch - 1`` companions. The items of small requests (an
image of one tile, a request of at most a batch of images) go ahead of those of larger ones
(the tiles of a large image), and the small requests take turns by client (who made the
RPC, where --fair-share is on): one request of each client in turn, whatever its key, a
request's items together (MicroBatcher._turn_of); with shares off, in their order of
arrival. Groups are served by their requests, so a steady stream of one key never holds
back the others. A request that arrives while the batcher is idle (nothing queued, nothing
running) and is still alone when the worker takes it runs at once: no burst is under way,
and waiting would only add its latency (a sequential client's every request; on a GPU,
where a request takes a millisecond or two, waiting for companions made the wait most of
the request). The queue holds at most ``max_queue`` requests (waiting or running); one more
is refused at once with RESOURCE_EXHAUSTED, so memory never grows without bound. A request
whose deadline has passed, or whose caller went away, is dropped before compute, and
counted in ``percept_dropped_total{queue, reason}`` once per RPC, however many of its items
(images, tiles) are dropped (services/common/metrics.py, count_dropped): reason
``deadline`` when it went within DEADLINE_SLACK_SECONDS of its deadline (the client's
RST_STREAM at its deadline reaches the server a moment before the server's own deadline
passes), ``cancelled`` when its caller hung up before.

The batch function runs in a single worker thread per batcher (one model, one stream of
work), off the event loop.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from services.common.errors import Busy, DeadlineExceeded
from services.common.metrics import (
    BATCH_SECONDS,
    BATCH_SIZE,
    QUEUE_DEPTH,
    REJECTED,
    Call,
    count_dropped,
    current_call,
    ran_out_of_time,
    start_queue_series,
)

#: A busy answer's retry pushback (milliseconds): about one batch's time, the time a place
#: in the queue takes to free, within these bounds; the default before any batch ran.
MIN_PUSHBACK_MS, MAX_PUSHBACK_MS, DEFAULT_PUSHBACK_MS = 50, 10_000, 100
#: Weight of the latest batch in the running mean of batch times.
BATCH_TIME_WEIGHT = 0.2

def running_mean(mean: float | None, value: float) -> float:
    """``mean`` moved towards ``value`` by BATCH_TIME_WEIGHT (``value`` when there is none)."""
    return value if mean is None else (1 - BATCH_TIME_WEIGHT) * mean + BATCH_TIME_WEIGHT * value


In = TypeVar("In")
Out = TypeVar("Out")
log = logging.getLogger(__name__)


@dataclass(eq=False)  # compared by identity: items (image tiles, tensors) have no plain ==
class _Pending(Generic[In]):
    item: In
    future: asyncio.Future[Any]
    deadline: float | None  # time.monotonic() seconds
    enqueued: float = field(default_factory=time.monotonic)
    idle_at_arrival: bool = False  # nothing was queued or running when it was submitted
    call: Call | None = None  # the RPC it is part of (its drop is counted once per RPC)
    small: bool = True  # a whole small request (MicroBatcher.submit)
    turn: int = 0  # a small request's turn (MicroBatcher._turn_of): served by (turn, seq)
    seq: int = 0  # its number in arrival order

    def drop_reason(self, now: float) -> str:
        """Why a request whose caller left was dropped: ``deadline`` when it left at (or
        within DEADLINE_SLACK_SECONDS of) its deadline, as gRPC cancels a handler whose
        deadline passed and the client's own timer fires a moment before the server's."""
        remaining = None if self.deadline is None else self.deadline - now
        return "deadline" if ran_out_of_time(remaining) else "cancelled"


#: Batches in a row a batcher takes from small requests while larger ones wait; the next
#: is the larger ones' (their oldest first). Small requests go ahead, but cannot hold the
#: others back for good: under a steady stream of them, larger requests still get a
#: quarter of the batches.
SMALL_TURNS_IN_A_ROW = 3


def _turn_order(pending: _Pending[Any]) -> tuple[int, int]:
    return pending.turn, pending.seq


@dataclass
class _RequestTurn:
    """A request's turn while items of it wait (MicroBatcher._turn_of)."""

    client: Hashable
    turn: int
    in_turn: int = 0  # its items given this turn
    waiting: int = 0  # its small items queued


class _Group(Generic[In]):
    """The requests waiting under one key: those of small requests (``_Pending.small``)
    ahead of the rest; the small ones by their turn (clients' requests in turns, see
    MicroBatcher._turn_of), then arrival; the rest in arrival order (a turn between large
    requests would finish each of them later)."""

    def __init__(self) -> None:
        self.small: list[_Pending[In]] = []  # sorted by _turn_order
        self.rest: deque[_Pending[In]] = deque()

    def __len__(self) -> int:
        return len(self.small) + len(self.rest)

    def __iter__(self) -> Iterator[_Pending[In]]:
        yield from self.small
        yield from self.rest

    def __contains__(self, pending: _Pending[In]) -> bool:
        part = self.small if pending.small else self.rest
        return pending in part  # by identity (eq=False)

    def add(self, pending: _Pending[In]) -> None:
        if pending.small:
            bisect.insort(self.small, pending, key=_turn_order)
        else:
            self.rest.append(pending)

    def remove(self, pending: _Pending[In]) -> None:
        (self.small if pending.small else self.rest).remove(pending)

    def _rest_next(self, rest_first: bool) -> bool:
        return (rest_first and bool(self.rest)) or not self.small

    def head(self, rest_first: bool = False) -> _Pending[In]:
        """The request served next (with ``rest_first``, a larger request's, if any)."""
        return self.rest[0] if self._rest_next(rest_first) else self.small[0]

    def popleft(self, rest_first: bool = False) -> _Pending[In]:
        return self.rest.popleft() if self._rest_next(rest_first) else self.small.pop(0)

    def oldest(self, rest_first: bool = False) -> float:
        """When the request that has waited longest of those served next arrived: a turn
        may serve a newer one first, but the wait for companions counts from this one."""
        if self._rest_next(rest_first):
            return self.rest[0].enqueued
        return min(pending.enqueued for pending in self.small)

    def order(self) -> tuple[int, int, int]:
        """Where the group comes among the groups: one with a small request waiting first,
        by that request's turn, then arrival; then the others by arrival."""
        if self.small:
            return (0, *_turn_order(self.small[0]))
        return (1, 0, self.rest[0].seq)


class MicroBatcher(Generic[In, Out]):
    """Groups concurrent requests into batches for ``process(items) -> results``."""

    def __init__(self, name: str, process: Callable[[Sequence[In]], Sequence[Out]], *,
                 max_batch: int, max_wait_ms: float, max_queue: int,
                 batch_limit: Callable[[Hashable], int] | None = None,
                 stall_seconds: float | None = None) -> None:
        """``batch_limit(key)``, when given, caps the batches of one key below
        ``max_batch`` (say, by the pixels of the shape the key names); at least 1.
        ``stall_seconds``: a batch running longer counts as stalled (:meth:`stalled_for`;
        a hung GPU), None for batches that may take as long as they take."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.name = name
        start_queue_series(name)
        self._process = process
        self.max_batch = max_batch
        self._batch_limit = batch_limit
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._groups: dict[Hashable, _Group[In]] = {}
        self._small_turns = 0  # batches of small requests in a row while larger ones waited
        self._arrivals = itertools.count()
        self._turn_now = 0  # the highest turn of the small requests taken into batches
        self._request_turns: dict[Call, _RequestTurn] = {}  # the requests with items waiting
        self._client_turns: dict[Hashable, list[int]] = {}  # client -> [latest turn, requests]
        self._waiting = 0
        self._running = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self.batches_run = 0
        self.waits_skipped = 0  # batches of a lone request run without waiting
        self.batch_seconds: float | None = None  # running mean of recent batches' times
        self._batch_started: float | None = None  # time.monotonic() of the running batch
        self.stall_seconds = stall_seconds
        self._long_expected = False  # the running batch said it may take long (running_long)

    @property
    def retry_after_ms(self) -> int:
        """How long a request refused as busy should wait before it tries again: about
        the time of one batch, when places in the queue free up (a Gatys optimisation
        takes minutes, a tile of a small net milliseconds). A batch running longer than
        that mean (the first one after start-up has none) counts for as long as it has run."""
        running = (0.0 if self._batch_started is None
                   else time.monotonic() - self._batch_started)
        if self.batch_seconds is None and not running:
            return DEFAULT_PUSHBACK_MS
        seconds = max(self.batch_seconds or 0.0, running)
        return int(min(MAX_PUSHBACK_MS, max(MIN_PUSHBACK_MS, round(seconds * 1e3))))

    def stalled_for(self) -> float | None:
        """How long the running batch has run, where that is past ``stall_seconds`` (and
        the batch did not say it may take long); None otherwise."""
        started = self._batch_started
        if self.stall_seconds is None or started is None or self._long_expected:
            return None
        running = time.monotonic() - started
        return running if running > self.stall_seconds else None

    @contextlib.contextmanager
    def running_long(self) -> Iterator[None]:
        """For the batch function: what it does inside (torch.compile of a new input
        shape, which takes minutes) may run long, and is no stall."""
        self._long_expected = True
        try:
            yield
        finally:
            self._long_expected = False
            if self._batch_started is not None:  # the rest of the batch counts from here
                self._batch_started = time.monotonic()

    @property
    def depth(self) -> int:
        """Requests waiting plus requests in the running batch."""
        return self._waiting + self._running

    def start(self) -> None:
        if self._worker is None:
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(),
                                                                  name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for group in self._groups.values():
            for pending in group:
                if not pending.future.done():
                    pending.future.cancel()
        self._groups.clear()
        self._request_turns.clear()
        self._client_turns.clear()
        self._waiting = 0
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: In, *, key: Hashable = None,
                     timeout: float | None = None, small: bool = True) -> Out:
        """Queues ``item`` and waits for its result. ``small``: the item is a whole
        small request (an image of one tile; a request of at most a batch of images);
        such items are served before the queued items of larger requests (the tiles of a
        large image), so a 64 px upscale does not wait for every tile of the 512 px ones
        queued before it (9.5-11.4 s behind 16 of them on a 2-core CPU; 0.7 s now, the
        batch that was running). Larger requests keep their order among
        themselves (a round of turns between them would finish each of them later), and
        get every fourth batch while small ones stream (SMALL_TURNS_IN_A_ROW).

        Raises Busy (RESOURCE_EXHAUSTED) at once when the queue is full, DeadlineExceeded when the
        deadline (``timeout`` seconds from now) passes before the item is computed."""
        if self._worker is None:
            self.start()
        if self.depth >= self.max_queue:
            REJECTED.labels(self.name).inc()
            raise Busy(
                f"{self.name} queue is full ({self.max_queue} requests); retry with backoff",
                retry_after_ms=self.retry_after_ms)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        call = current_call.get()
        pending = _Pending(item=item, future=loop.create_future(), deadline=deadline,
                           idle_at_arrival=self.depth == 0, call=call, small=small,
                           turn=self._turn_of(call) if small else 0,
                           seq=next(self._arrivals))
        self._groups.setdefault(key, _Group()).add(pending)
        self._waiting += 1
        QUEUE_DEPTH.labels(self.name).set(self.depth)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.future.cancel()
            self._withdraw(key, pending)
            raise

    def _turn_of(self, call: Call | None) -> int:
        """The turn of a small item of ``call``'s request. Clients take turns, as in
        start-time fair queuing: a client's request gets the turn after its previous
        request's, or the current turn (the highest taken into a batch) if that is later;
        a client new, or back after its turns fell behind, starts at the current turn.
        Items are served by turn, then arrival, so a client that queued many requests (a
        batch job) holds another's request back by about one batch for each batch key
        (image size) its earlier-turn requests use, not by all it queued; and a client
        that sends one request at a time keeps its place in the turns, so several of them
        cannot starve a client with two requests waiting. A request's items share its
        turn, up to a batch of them (a request of more takes a turn per batch). The client
        is Call.client (where --fair-share is on; None otherwise: one client, whose
        requests are then served in their order of arrival). An item outside any RPC
        (warm-up) takes the current turn."""
        if call is None:
            return self._turn_now
        request = self._request_turns.get(call)
        if request is None:
            request = self._request_turns[call] = _RequestTurn(call.client,
                                                               self._next_turn(call.client))
        elif request.in_turn >= self.max_batch:  # a batch of its items has this turn
            request.turn, request.in_turn = self._next_turn(call.client, again=True), 0
        request.in_turn += 1
        request.waiting += 1
        return request.turn

    def _next_turn(self, client: Hashable, again: bool = False) -> int:
        """The turn of ``client``'s next request (``again``: of the next batch of items of
        a request it has waiting)."""
        latest = self._client_turns.get(client)
        turn = self._turn_now if latest is None else max(self._turn_now, latest[0] + 1)
        if latest is None:
            self._client_turns[client] = latest = [turn, 0]
        latest[0] = turn
        if not again:
            latest[1] += 1  # its requests waiting
        return turn

    def _forget_idle_clients(self) -> None:
        """Drops the clients with no request waiting whose last turn is behind the current
        one (their next request starts at the current turn either way); once there are
        many clients, those at the current turn too, so that a stream of ever new
        clients keeps no more than a few hundred entries."""
        many = len(self._client_turns) > 4 * self.max_queue
        if not many and len(self._client_turns) <= self.max_queue:
            return
        for client, (turn, waiting) in list(self._client_turns.items()):
            if not waiting and (turn < self._turn_now or (many and turn <= self._turn_now)):
                del self._client_turns[client]

    def _left(self, pending: _Pending[In]) -> None:
        """Forgets a small item that left the queue (taken into a batch, or withdrawn)."""
        request = (self._request_turns.get(pending.call)
                   if pending.small and pending.call is not None else None)
        if request is None:  # not a small item of an RPC (or stop() forgot every turn)
            return
        request.waiting -= 1
        if request.waiting:
            return
        del self._request_turns[pending.call]  # type: ignore[arg-type]
        client = self._client_turns.get(request.client)
        if client is not None:
            client[1] -= 1  # its requests waiting; its last turn is kept

    def _withdraw(self, key: Hashable, pending: _Pending[In]) -> None:
        """Takes a request whose caller left out of the queue at once, so that its place
        is free for the next one (once its batch has started, it is only not answered)."""
        group = self._groups.get(key)
        if group is None or pending not in group:
            return
        group.remove(pending)
        self._left(pending)
        if not group:
            del self._groups[key]
        self._waiting -= 1
        # gRPC cancels a handler when its deadline passes, too
        count_dropped(self.name, pending.drop_reason(time.monotonic()), pending.call)
        QUEUE_DEPTH.labels(self.name).set(self.depth)
        if self._wakeup is not None:  # a worker waiting for companions looks again
            self._wakeup.set()

    def _limit(self, key: Hashable) -> int:
        if self._batch_limit is None:
            return self.max_batch
        return max(1, min(self.max_batch, self._batch_limit(key)))

    def _next(self) -> tuple[Hashable, _Group[In], bool]:
        """The group served next, its key, and whether its larger requests go first: the
        group of the small request whose turn comes first (:meth:`_turn_of`; then the
        earliest to arrive), then the one whose larger request arrived first; but after
        SMALL_TURNS_IN_A_ROW batches of small requests while larger ones waited, the group
        of the oldest larger one, that one first. Groups are served by their requests, not
        by when the group was made: a group that a steady stream keeps from ever emptying
        would otherwise be served again and again while a request of another key (another
        tile shape, another method) waited until its deadline."""
        if self._small_turns >= SMALL_TURNS_IN_A_ROW:
            waiting = [(key, group) for key, group in self._groups.items() if group.rest]
            if waiting:
                key, group = min(waiting, key=lambda item: item[1].rest[0].seq)
                return key, group, True
        key, group = min(self._groups.items(), key=lambda item: item[1].order())
        return key, group, False

    def _take_batch(self) -> list[_Pending[In]]:
        """Pops up to the batch limit of requests of the group served next (:meth:`_next`),
        and counts the turns small requests took in a row while larger ones waited."""
        key, group, rest_first = self._next()
        batch = [group.popleft(rest_first) for _ in range(min(self._limit(key), len(group)))]
        for pending in batch:
            self._left(pending)
            if pending.small:
                self._turn_now = max(self._turn_now, pending.turn)
        self._forget_idle_clients()
        if not group:
            del self._groups[key]
        self._waiting -= len(batch)
        larger_waiting = any(group.rest for group in self._groups.values())
        if not rest_first and larger_waiting and any(p.small for p in batch):
            self._small_turns += 1
        else:
            self._small_turns = 0
        return batch

    def _arrived_alone(self) -> bool:
        """Only one request waits, and it came when nothing was queued or running."""
        if self._waiting != 1:
            return False
        _, group, rest_first = self._next()
        return group.head(rest_first).idle_at_arrival

    async def _wait_for_companions(self) -> None:
        """Lets the oldest group fill up to its batch limit, for at most max_wait from
        its first request's arrival."""
        assert self._wakeup is not None
        key, oldest, rest_first = self._next()
        until = oldest.oldest(rest_first) + self.max_wait
        limit = self._limit(key)
        while len(oldest) < limit and self._groups.get(key) is oldest:  # (all may leave)
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _live(self, batch: list[_Pending[In]]) -> list[_Pending[In]]:
        """Drops requests whose caller left or whose deadline passed."""
        now = time.monotonic()
        live = []
        for pending in batch:
            if pending.future.done():  # the caller left: it hung up, or its deadline passed
                count_dropped(self.name, pending.drop_reason(now), pending.call)
            elif pending.deadline is not None and now >= pending.deadline:
                count_dropped(self.name, "deadline", pending.call)
                pending.future.set_exception(DeadlineExceeded(
                    "deadline exceeded while queued; the request was dropped before compute"))
            else:
                live.append(pending)
        return live

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._groups:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_batch > 1:
                if self._arrived_alone():
                    self.waits_skipped += 1
                else:
                    await self._wait_for_companions()
                if not self._groups:  # every request waiting left meanwhile
                    continue
            batch = self._live(self._take_batch())
            if not batch:
                QUEUE_DEPTH.labels(self.name).set(self.depth)
                continue
            self._running = len(batch)
            BATCH_SIZE.labels(self.name).observe(len(batch))
            started = self._batch_started = time.monotonic()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._process, [p.item for p in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: batch function returned {len(results)} "
                                       f"results for {len(batch)} items")
                for pending, result in zip(batch, results, strict=True):
                    if pending.future.done():
                        continue
                    if isinstance(result, BaseException):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)
            except Exception as error:  # the batch failed: every caller gets the error
                log.exception("batch failed", extra={"queue": self.name, "size": len(batch)})
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
            finally:
                self._batch_started = None
                ran = time.monotonic() - started
                BATCH_SECONDS.labels(self.name).observe(ran)
                self.batch_seconds = running_mean(self.batch_seconds, ran)
                self.batches_run += 1
                self._running = 0
                QUEUE_DEPTH.labels(self.name).set(self.depth)
