"""The micro-batcher: real batches, key grouping, bounded queue, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Hashable, Sequence

import numpy as np
import pytest

from services.common.batching import MicroBatcher
from services.common.errors import DeadlineExceeded, ResourceExhausted


class Recorder:
    """A batch function that records each batch it was given."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.release.wait(10)
        time.sleep(self.delay)
        self.batches.append(list(items))
        return [item * 2 for item in items]


def test_concurrent_requests_form_batches_larger_than_one() -> None:
    recorder = Recorder(delay=0.02)

    async def main() -> list[int]:
        batcher = MicroBatcher("t-batch", recorder, max_batch=8, max_wait_ms=20, max_queue=64)
        results = await asyncio.gather(*(batcher.submit(i) for i in range(32)))
        await batcher.stop()
        return list(results)

    results = asyncio.run(main())
    assert results == [i * 2 for i in range(32)]
    assert max(len(b) for b in recorder.batches) > 1
    assert all(len(b) <= 8 for b in recorder.batches)
    assert len(recorder.batches) < 32


def test_a_batch_limit_caps_the_batches_of_large_keys_only() -> None:
    """As TiledImageModel uses it: a key's batch limit (from the pixels of its shape) caps
    its batches; other keys still batch up to max_batch."""
    recorder = Recorder(delay=0.02)
    recorder.release.clear()  # queue everything first, so every batch can fill up

    async def main() -> None:
        batcher = MicroBatcher("t-limit", recorder, max_batch=8, max_wait_ms=30, max_queue=64,
                               batch_limit=lambda key: 2 if key == "large" else 99)
        calls = [batcher.submit(i, key="large" if i % 2 else "small") for i in range(24)]
        tasks = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0.05)
        recorder.release.set()
        await asyncio.gather(*tasks)
        await batcher.stop()

    asyncio.run(main())
    large = [b for b in recorder.batches if b[0] % 2]
    small = [b for b in recorder.batches if not b[0] % 2]
    assert sum(map(len, large)) == sum(map(len, small)) == 12
    assert all(len(b) <= 2 for b in large) and max(len(b) for b in large) == 2
    assert max(len(b) for b in small) > 2 and all(len(b) <= 8 for b in small)


def test_requests_with_different_keys_are_never_mixed() -> None:
    recorder = Recorder()

    async def main() -> None:
        batcher = MicroBatcher("t-keys", recorder, max_batch=16, max_wait_ms=30, max_queue=64)
        await asyncio.gather(*(batcher.submit(i, key=i % 2) for i in range(20)))
        await batcher.stop()

    asyncio.run(main())
    for batch in recorder.batches:
        assert len({item % 2 for item in batch}) == 1


def test_a_steady_stream_of_one_key_does_not_hold_back_another() -> None:
    """Groups take turns by their oldest request: clients that resubmit one key at once
    (thumbnails of one size, all-ConSE embeddings) keep its group from ever emptying, and
    a request of another key (another tile shape, DeViSE) used to wait until the stream
    stopped, past its deadline. Now it runs after the requests that came before it."""
    recorder = Recorder(delay=0.01)

    async def main() -> tuple[int, int]:
        batcher = MicroBatcher("t-fair", recorder, max_batch=4, max_wait_ms=5, max_queue=64)
        other_done = asyncio.Event()

        async def stream() -> None:
            while not other_done.is_set():
                await batcher.submit(1, key="stream")

        streams = [asyncio.ensure_future(stream()) for _ in range(12)]
        await asyncio.sleep(0.2)  # the stream is steady: its group never empties
        batches_before = len(recorder.batches)
        try:  # (starved, it would wait for as long as the stream goes on)
            result = await asyncio.wait_for(batcher.submit(1000, key="other"), 5)
        finally:
            other_done.set()
            await asyncio.gather(*streams)
        await batcher.stop()
        ran_at = next(i for i, b in enumerate(recorder.batches) if b == [1000])
        return result, ran_at - batches_before

    result, batches_ahead = asyncio.run(main())
    assert result == 2000
    # only the stream's requests that came before it: at most 12, in batches of 4
    assert batches_ahead <= 3


def test_a_small_request_goes_ahead_of_the_tiles_of_large_ones() -> None:
    """The items of a request that fits in one batch are served before those of larger
    requests queued earlier (a 64 px upscale waited 10 s behind the tiles of 16 512 px
    ones); the large requests keep their order among themselves, and a batch still fills
    up with their items of the same key."""
    recorder = Recorder()
    recorder.release.clear()  # the worker blocks on the first batch: the rest queue up

    async def main() -> None:
        batcher = MicroBatcher("t-small", recorder, max_batch=4, max_wait_ms=1, max_queue=64)
        first = asyncio.ensure_future(batcher.submit(-1, key="tile", small=False))
        await asyncio.sleep(0.05)  # running (blocked)
        large = [asyncio.ensure_future(batcher.submit(100 * r + i, key="tile", small=False))
                 for r in (1, 2) for i in range(8)]
        await asyncio.sleep(0.02)
        small = [asyncio.ensure_future(batcher.submit(7, key="tile")),
                 asyncio.ensure_future(batcher.submit(9, key="other"))]
        await asyncio.sleep(0.02)
        recorder.release.set()
        await asyncio.gather(first, *large, *small)
        await batcher.stop()

    asyncio.run(main())
    assert recorder.batches[0] == [-1]
    # the small one of the same key first, filled up with the large ones' oldest tiles;
    # then the small one of another key; then the rest in their order
    assert recorder.batches[1] == [7, 100, 101, 102]
    assert recorder.batches[2] == [9]
    assert [i for b in recorder.batches[3:] for i in b] == [103, 104, 105, 106, 107,
                                                             200, 201, 202, 203, 204, 205,
                                                             206, 207]


def _submit_request(batcher: MicroBatcher[int, int], client: str | None,
                    items: Sequence[int], **options: object) -> list[asyncio.Future[int]]:
    """``items`` submitted as one RPC's by ``client`` (as WorkCalls marks a call's client
    where --fair-share is on)."""
    from services.common.metrics import Call, current_call

    call = Call()
    call.client = client
    token = current_call.set(call)
    try:  # each task copies the context, with the call, as it is made
        return [asyncio.ensure_future(batcher.submit(item, **options))  # type: ignore[arg-type]
                for item in items]
    finally:
        current_call.reset(token)


def _submit_as(batcher: MicroBatcher[int, int], client: str | None, item: int,
               **options: object) -> asyncio.Future[int]:
    """``item`` submitted as an RPC of its own by ``client``."""
    (future,) = _submit_request(batcher, client, [item], **options)
    return future


#: Requests submitted together: (client, the items of one request, key) each.
Wave = list[tuple[str | None, Sequence[int], Hashable]]


def _batches_behind_a_running_one(max_batch: int, waves: Sequence[Wave],
                                  first_client: str | None = "ip:10.0.0.9",
                                  first_key: Hashable = None) -> list[list[int]]:
    """The batches a batcher (``max_batch``, max_wait 1 ms) makes of requests queued while
    another one, the first batch, runs blocked: each wave's requests submitted together, a
    wave 10 ms after the one before."""
    recorder = Recorder()
    recorder.release.clear()

    async def main() -> None:
        batcher = MicroBatcher("t-queued", recorder, max_batch=max_batch, max_wait_ms=1,
                               max_queue=64)
        first = _submit_as(batcher, first_client, -1, key=first_key)
        await asyncio.sleep(0.05)  # running (blocked)
        queued: list[asyncio.Future[int]] = []
        for wave in waves:
            for client, items, key in wave:
                queued += _submit_request(batcher, client, items, key=key)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)
        recorder.release.set()
        await asyncio.gather(first, *queued)
        await batcher.stop()

    asyncio.run(main())
    return recorder.batches


def test_small_requests_take_turns_by_client() -> None:
    """A client with many requests queued (a batch job) holds another's back by one of its
    own per turn, not by all it queued first: each client's requests in their order, the
    clients one request each in turn. Requests of no known client (fair shares off) are
    one more client."""
    batches = _batches_behind_a_running_one(4, [
        [("ip:10.0.0.1", [100 + i], None) for i in range(8)],
        [("ip:10.0.0.2", [200 + i], None) for i in range(2)],
        [(None, [300], None), ("ip:10.0.0.3", [400], None)]])
    assert batches == [[-1], [100, 200, 300, 400], [101, 201, 102, 103], [104, 105, 106, 107]]


def test_without_clients_small_requests_keep_their_arrival_order() -> None:
    """Fair shares off: no request has a client, and the queue is first come, first
    served, as before turns."""
    batches = _batches_behind_a_running_one(4, [[(None, [i], None) for i in range(10)]],
                                            first_client=None)
    assert batches == [[-1], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_a_client_s_request_of_another_key_takes_its_turn_too() -> None:
    """Turns run across keys (a one-tile image's key is its shape): b's request of another
    shape waits for the batch that holds a's current request, not for all of a's. Without
    clients (shares off), it waits for all that arrived before it."""

    def batches(a: str | None, b: str | None) -> list[list[int]]:
        return _batches_behind_a_running_one(4, [
            [(a, [100 + i], "64x64") for i in range(8)], [(b, [200], "60x80")]],
            first_client=None, first_key="other")  # a warm-up item runs first

    assert batches("ip:10.0.0.1", "ip:10.0.0.2") == [[-1], [100, 101, 102, 103], [200],
                                                     [104, 105, 106, 107]]
    assert batches(None, None) == [[-1], [100, 101, 102, 103], [104, 105, 106, 107], [200]]


def test_a_request_s_items_take_its_turn_together() -> None:
    """The images of one request (one RPC) share its turn: a request of four images that
    came first is served first, whole, not one image per turn behind the later clients."""
    batches = _batches_behind_a_running_one(4, [
        [("ip:10.0.0.1", range(10, 14), None)],
        [(f"ip:10.0.1.{i}", [20 + i], None) for i in range(4)]])
    assert batches == [[-1], [10, 11, 12, 13], [20, 21, 22, 23]]


def test_a_request_of_many_items_takes_a_turn_per_batch_of_them() -> None:
    """A request of more items than a batch (a stream of many, say) shares a turn a batch
    of items at a time: another client's request, queued after six of its items, goes in
    the batch after its first two (max_batch 2), not after all six."""
    batches = _batches_behind_a_running_one(2, [
        [("ip:10.0.0.1", range(10, 16), None)], [("ip:10.0.0.2", [20], None)]])
    assert batches == [[-1], [10, 11], [20, 12], [13, 14], [15]]


def test_clients_sending_one_request_at_a_time_cannot_starve_one_with_two_waiting() -> None:
    """Six clients that send their next request as soon as the last is answered keep
    their places in the turns (each next request a turn later), so h's second request,
    a turn after its first, is served in its turn, not after they stop (it waited for all
    of their 30 rounds when a client with nothing waiting started afresh at the current
    turn every time)."""
    recorder = Recorder(delay=0.002)
    recorder.release.clear()

    async def main() -> None:
        batcher = MicroBatcher("t-starve", recorder, max_batch=2, max_wait_ms=5,
                               max_queue=64)
        first = _submit_as(batcher, "ip:10.0.0.9", -1)
        await asyncio.sleep(0.05)  # running (blocked)
        h = [_submit_as(batcher, "ip:10.0.0.1", 100 + i) for i in range(2)]

        async def one_at_a_time(number: int) -> None:
            for round_number in range(30):
                await _submit_as(batcher, f"ip:10.0.1.{number}", 1000 * number + round_number)

        light = [asyncio.ensure_future(one_at_a_time(n)) for n in range(1, 7)]
        await asyncio.sleep(0.02)
        recorder.release.set()
        await asyncio.gather(first, *h, *light)
        await batcher.stop()

    asyncio.run(main())
    served = [i for batch in recorder.batches for i in batch]
    assert len(served) == 1 + 2 + 180
    assert served.index(101) < 16, recorder.batches[:10]  # h's second: within its turn


class GatedBatches:
    """A batch function whose n-th batch waits for ``gates[n]``; it records each batch
    and when it started."""

    def __init__(self, gates: int) -> None:
        self.gates = [threading.Event() for _ in range(gates)]
        self.batches: list[tuple[float, list[int]]] = []

    def __call__(self, items: Sequence[int]) -> list[int]:
        number = len(self.batches)
        self.batches.append((time.monotonic(), list(items)))
        if number < len(self.gates):
            self.gates[number].wait(30)
        return list(items)


def test_the_wait_for_companions_counts_from_the_longest_waiting_request() -> None:
    """A turn may put a newer request at the head of its group (b's, turn 2, ahead of a's
    fourth, turn 3, queued long before it); the group's wait for companions (max_wait
    2 s) still counts from a's, whose 2 s have passed when the worker comes back to the
    group: the batch runs at once, not 2 s after b's arrival."""
    gated = GatedBatches(gates=2)

    async def main() -> float:
        batcher = MicroBatcher("t-oldest", gated, max_batch=3, max_wait_ms=2000,
                               max_queue=64)
        calls = [_submit_as(batcher, "ip:10.0.0.9", -1, key="other")]  # runs at once
        await asyncio.sleep(0.05)
        calls += [_submit_as(batcher, "ip:10.0.0.1", i) for i in range(4)]
        await asyncio.sleep(0.05)
        gated.gates[0].set()  # a's first three are the next batch (full: no wait)
        await asyncio.sleep(0.95)
        calls.append(_submit_as(batcher, "ip:10.0.0.2", 9))
        await asyncio.sleep(1.2)  # a's fourth has waited over 2 s
        released = time.monotonic()
        gated.gates[1].set()
        await asyncio.gather(*calls)
        await batcher.stop()
        return released

    released = asyncio.run(main())
    assert [items for _, items in gated.batches] == [[-1], [0, 1, 2], [9, 3]]
    started = gated.batches[2][0]
    assert started - released < 0.5, started - released  # not ~0.8 s more


def test_a_client_that_arrives_later_starts_at_the_turn_reached_so_far() -> None:
    """The turns move on as batches are taken: a client whose first requests arrive after
    four of a's have run starts at the turn reached (a's fourth), and takes turns with
    a's rest, not at the first turn, where all three of its requests would go ahead of
    every one a has waiting (as they would if the current turn never advanced)."""
    gated = GatedBatches(gates=5)

    async def main() -> None:
        batcher = MicroBatcher("t-later", gated, max_batch=1, max_wait_ms=1, max_queue=64)
        calls = [_submit_as(batcher, "ip:10.0.0.9", -1)]  # runs at once
        await asyncio.sleep(0.05)
        calls += [_submit_as(batcher, "ip:10.0.0.1", 100 + i) for i in range(8)]
        for number, gate in enumerate(gated.gates[:4]):  # a's first four are taken
            gate.set()
            while len(gated.batches) < number + 2:  # the next batch (of one) started
                await asyncio.sleep(0.005)
        calls += [_submit_as(batcher, "ip:10.0.0.2", 200 + i) for i in range(3)]
        await asyncio.sleep(0.05)
        gated.gates[4].set()
        await asyncio.gather(*calls)
        await batcher.stop()

    asyncio.run(main())
    served = [items for _, items in gated.batches]
    assert served == [[-1], [100], [101], [102], [103],
                      [200], [104], [201], [105], [202], [106], [107]], served


def test_a_stream_of_small_requests_does_not_hold_back_a_large_one_for_good() -> None:
    """Small requests go first, but after SMALL_TURNS_IN_A_ROW batches of them while a
    larger request waits, the larger one's batch runs: a steady stream of small requests
    left it waiting until its deadline."""
    from services.common.batching import SMALL_TURNS_IN_A_ROW

    recorder = Recorder(delay=0.01)

    async def main() -> tuple[list[int], int]:
        batcher = MicroBatcher("t-bound", recorder, max_batch=4, max_wait_ms=1, max_queue=64)
        large_done = asyncio.Event()

        async def stream() -> None:
            while not large_done.is_set():
                await batcher.submit(1, key="tile")

        streams = [asyncio.ensure_future(stream()) for _ in range(8)]
        await asyncio.sleep(0.2)  # small requests keep the batcher busy
        before = len(recorder.batches)
        try:  # (starved, it would wait for as long as the stream goes on)
            results = await asyncio.wait_for(asyncio.gather(*(
                batcher.submit(1000 + i, key="tile", small=False) for i in range(4))), 5)
        finally:
            large_done.set()
            await asyncio.gather(*streams)
        await batcher.stop()
        ran_at = next(i for i, b in enumerate(recorder.batches) if 1000 in b)
        return list(results), ran_at - before

    results, batches_ahead = asyncio.run(main())
    assert results == [2000, 2002, 2004, 2006]
    # the batch running when it came, then at most SMALL_TURNS_IN_A_ROW of small ones
    assert batches_ahead <= SMALL_TURNS_IN_A_ROW + 1


def test_full_queue_refuses_at_once() -> None:
    recorder = Recorder()
    recorder.release.clear()  # block the worker so the queue fills

    async def main() -> None:
        batcher = MicroBatcher("t-full", recorder, max_batch=1, max_wait_ms=0, max_queue=3)
        accepted = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(ResourceExhausted, match="queue is full"):
            await batcher.submit(99)
        # refused without waiting for room (a wait would last until the release below):
        # a bound loose enough for a loaded machine
        assert time.perf_counter() - started < 1.0
        assert batcher.depth == 3  # the refused request took no place in the queue
        recorder.release.set()
        assert await asyncio.gather(*accepted) == [0, 2, 4]
        await batcher.stop()

    asyncio.run(main())


def test_expired_requests_are_dropped_before_compute() -> None:
    recorder = Recorder()
    recorder.release.clear()

    async def main() -> None:
        batcher = MicroBatcher("t-deadline", recorder, max_batch=1, max_wait_ms=0, max_queue=8)
        blocker = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(batcher.submit(2, timeout=0.05))
        await asyncio.sleep(0.2)
        recorder.release.set()
        assert await blocker == 2
        with pytest.raises(DeadlineExceeded, match="dropped before compute"):
            await doomed
        await batcher.stop()

    asyncio.run(main())
    assert recorder.batches == [[1]]  # item 2 never reached the model


def test_a_caller_gone_at_its_deadline_counts_as_a_deadline_drop() -> None:
    """gRPC cancels a handler when its deadline passes: the dropped item is counted under
    reason="deadline", and only a caller that hung up before it under "cancelled"."""
    from prometheus_client import REGISTRY

    recorder = Recorder()
    recorder.release.clear()

    def dropped(reason: str) -> float:
        return REGISTRY.get_sample_value("percept_dropped_total",
                                         {"queue": "t-gone", "reason": reason}) or 0.0

    async def main() -> None:
        batcher = MicroBatcher("t-gone", recorder, max_batch=1, max_wait_ms=0, max_queue=8)
        blocker = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        timed = asyncio.ensure_future(batcher.submit(2, timeout=0.05))
        hung_up = asyncio.ensure_future(batcher.submit(3, timeout=60))
        await asyncio.sleep(0.1)  # past the first one's deadline
        timed.cancel()  # as gRPC does at the deadline
        hung_up.cancel()  # long before its deadline
        recorder.release.set()
        assert await blocker == 2
        await asyncio.sleep(0.1)
        await batcher.stop()

    before = dropped("deadline"), dropped("cancelled")
    asyncio.run(main())
    assert (dropped("deadline"), dropped("cancelled")) == (before[0] + 1, before[1] + 1)
    assert recorder.batches == [[1]]


def test_a_queued_request_whose_caller_left_frees_its_place_at_once() -> None:
    """Its place in --max-queue is free for the next request at once, not only when the
    worker reaches it (a client that hangs up must not make the next one busy)."""
    recorder = Recorder()
    recorder.release.clear()

    async def main() -> None:
        batcher = MicroBatcher("t-withdraw", recorder, max_batch=1, max_wait_ms=0,
                               max_queue=2)
        running = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        left = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.01)
        assert batcher.depth == 2
        left.cancel()
        await asyncio.gather(left, return_exceptions=True)
        assert batcher.depth == 1
        after = asyncio.ensure_future(batcher.submit(3))  # not busy
        await asyncio.sleep(0.01)
        recorder.release.set()
        assert (await running, await after) == (2, 6)
        await batcher.stop()

    asyncio.run(main())
    assert recorder.batches == [[1], [3]]


def test_the_worker_survives_every_waiting_request_leaving_while_it_waits() -> None:
    """All the requests a batch was waiting to fill with leave within --max-wait-ms: the
    worker goes back to waiting (it died on the empty queue, and every later request hung)."""
    recorder = Recorder()

    async def main() -> int:
        batcher = MicroBatcher("t-all-left", recorder, max_batch=4, max_wait_ms=100,
                               max_queue=8)
        left = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
        await asyncio.sleep(0.02)
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        await asyncio.sleep(0.15)  # past the wait for companions
        result = await asyncio.wait_for(batcher.submit(5), 5)
        await batcher.stop()
        return result

    assert asyncio.run(main()) == 10
    assert recorder.batches == [[5]]


def test_a_request_that_left_behind_others_with_array_items_leaves_the_queue() -> None:
    """Queued items are image tiles (arrays, whose == is elementwise): the request is
    found by identity, its place is freed, and its caller sees a plain cancellation."""
    release = threading.Event()

    def tiles(items: Sequence[np.ndarray]) -> list[float]:
        release.wait(10)
        return [float(item.sum()) for item in items]

    async def main() -> None:
        batcher = MicroBatcher("t-arrays", tiles, max_batch=1, max_wait_ms=0, max_queue=8)
        running = asyncio.ensure_future(batcher.submit(np.ones((4, 4))))
        await asyncio.sleep(0.05)
        ahead = asyncio.ensure_future(batcher.submit(np.ones((4, 4))))
        behind = asyncio.ensure_future(batcher.submit(np.ones((4, 4))))
        await asyncio.sleep(0.01)
        assert batcher.depth == 3
        behind.cancel()
        outcome = (await asyncio.gather(behind, return_exceptions=True))[0]
        assert isinstance(outcome, asyncio.CancelledError), repr(outcome)
        assert batcher.depth == 2
        release.set()
        assert (await running, await ahead) == (16.0, 16.0)
        await batcher.stop()

    asyncio.run(main())


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on() -> None:
    calls = []

    def flaky(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise ValueError("unlucky")
        return list(items)

    async def main() -> None:
        batcher = MicroBatcher("t-flaky", flaky, max_batch=1, max_wait_ms=0, max_queue=8)
        with pytest.raises(ValueError, match="unlucky"):
            await batcher.submit(13)
        assert await batcher.submit(7) == 7
        await batcher.stop()

    asyncio.run(main())


def test_a_lone_request_runs_without_waiting_but_a_burst_still_batches() -> None:
    """A request that comes to an idle batcher runs at once instead of waiting max_wait
    for companions; requests that come together still batch."""
    recorder = Recorder()

    async def main() -> tuple[float, int, int]:
        batcher = MicroBatcher("t-lone", recorder, max_batch=8, max_wait_ms=3000, max_queue=64)
        started = time.monotonic()
        assert await batcher.submit(1) == 2
        alone = time.monotonic() - started
        skipped = batcher.waits_skipped
        recorder.release.clear()  # a burst: queued together while a batch is held
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(10, 18)]
        await asyncio.sleep(0.05)
        recorder.release.set()
        await asyncio.gather(*tasks)
        await batcher.stop()
        return alone, skipped, batcher.waits_skipped

    alone, skipped_alone, skipped_total = asyncio.run(main())
    assert alone < 1.5, f"a lone request waited {alone:.2f} s of the 3 s max_wait"
    assert skipped_alone == 1
    assert skipped_total == 1, "a request of the burst skipped the wait"
    assert sorted(len(b) for b in recorder.batches) == [1, 8]


def test_a_sequential_client_never_waits_even_when_requests_come_back_to_back() -> None:
    """Each request of a sequential client arrives at an idle batcher, however soon after
    the one before (a GPU request takes a millisecond or two, far under max_wait), and so
    runs at once."""
    recorder = Recorder()

    async def main() -> tuple[list[float], int]:
        batcher = MicroBatcher("t-seq", recorder, max_batch=8, max_wait_ms=3000, max_queue=64)
        times = []
        for value in range(4):
            started = time.monotonic()
            assert await batcher.submit(value) == value * 2
            times.append(time.monotonic() - started)
        await batcher.stop()
        return times, batcher.waits_skipped

    times, skipped = asyncio.run(main())
    assert max(times) < 1.5, f"a sequential request waited: {times}"
    assert skipped == 4
    assert [len(b) for b in recorder.batches] == [1, 1, 1, 1]


def test_a_busy_answer_asks_for_about_one_batch_s_time() -> None:
    """The retry pushback follows the batches: a place in the queue frees as a batch ends,
    so a client asked to wait about that long neither hammers a slow model (a Gatys
    optimisation takes minutes) nor waits long for a fast one."""
    from services.common.batching import DEFAULT_PUSHBACK_MS, MAX_PUSHBACK_MS, MIN_PUSHBACK_MS
    from services.common.errors import Busy

    recorder = Recorder(delay=0.2)

    async def main() -> None:
        batcher = MicroBatcher("t-pushback", recorder, max_batch=1, max_wait_ms=0, max_queue=1)
        assert batcher.retry_after_ms == DEFAULT_PUSHBACK_MS  # no batch has run yet
        await batcher.submit(1)
        assert batcher.batch_seconds is not None and batcher.batch_seconds >= 0.2
        running = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.02)
        with pytest.raises(Busy) as busy:
            await batcher.submit(3)
        assert busy.value.retry_after_ms == batcher.retry_after_ms >= 200
        await running
        await batcher.stop()

    asyncio.run(main())
    bounds = MicroBatcher("t-bounds", recorder, max_batch=1, max_wait_ms=0, max_queue=1)
    for seconds, pushback in [(0.3, 300), (1e-4, MIN_PUSHBACK_MS), (600.0, MAX_PUSHBACK_MS)]:
        bounds.batch_seconds = seconds
        assert bounds.retry_after_ms == pushback


def test_the_first_batch_counts_for_as_long_as_it_has_run() -> None:
    """Before any batch has ended there is no mean: a batch already running longer than
    the default pushback (a first Gatys optimisation) counts for its running time."""
    recorder = Recorder(delay=0.6)

    async def main() -> None:
        from services.common.errors import Busy

        batcher = MicroBatcher("t-first", recorder, max_batch=1, max_wait_ms=0, max_queue=1)
        running = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.35)
        with pytest.raises(Busy) as busy:
            await batcher.submit(2)
        assert busy.value.retry_after_ms >= 300 and batcher.batch_seconds is None
        await running
        await batcher.stop()

    asyncio.run(main())
