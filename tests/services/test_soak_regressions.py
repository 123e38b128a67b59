"""Defects a soak test found (mixed, cancelled and expiring calls for minutes on end),
each reproduced here in well under a second.

A request slot (:class:`services.common.image_model.RequestSlot`: one of a model's
``--max-queue`` slots, and the request's share of ``--max-inflight-mpixels``) is held by
every thread the request starts through it. A call cancelled while its work still waited
for a thread of the busy default executor was dropped unrun, so no thread ever said it
ended: the slot and its pixels were never given back. Under load (the 2-core machine's
executor has 6 threads) a few hundred cancelled or expired calls leaked 3 of the 4 slots
of a style and half the pixel budget in 40 seconds, and the server then answered
RESOURCE_EXHAUSTED to requests it had room for, for ever.
"""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from services.common.image_model import RequestSlot

T = TypeVar("T")


def _on_busy_executor(workers: int,
                      body: Callable[[asyncio.AbstractEventLoop], Awaitable[T]]) -> T:
    """Runs ``body(loop)`` on a loop whose default executor has ``workers`` threads."""

    async def main() -> T:
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=workers)
        loop.set_default_executor(executor)
        try:
            return await body(loop)
        finally:
            executor.shutdown(wait=True)

    return asyncio.run(main())


def test_a_call_cancelled_while_queued_for_a_thread_gives_its_slot_back() -> None:
    ran: list[str] = []
    released: list[str] = []

    async def body(loop: asyncio.AbstractEventLoop) -> None:
        gate = threading.Event()
        blocker = loop.run_in_executor(None, gate.wait, 10)  # the only thread is busy
        slot = RequestSlot(lambda: released.append("slot"))

        async def request() -> None:
            try:
                await slot.to_thread(ran.append, "decoded")  # queued behind the blocker
            finally:
                slot.close()

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.05)
        task.cancel()  # the client hangs up (or its deadline passes) while it waits
        await asyncio.gather(task, return_exceptions=True)
        try:
            assert released == ["slot"]  # at once, not when the executor gets to it
        finally:
            gate.set()
        await blocker
        await asyncio.sleep(0.05)
        assert ran == []  # the work of a caller that left never ran
        assert released == ["slot"]

    _on_busy_executor(1, body)


def test_many_calls_cancelled_at_random_moments_give_back_every_slot_once() -> None:
    """Cancels land before a thread takes the work, while it runs, and after it ended;
    each slot is given back exactly once, and only when its thread (if any) is done."""
    rng = random.Random(7)
    releases: list[int] = []
    running = {"now": 0}
    lock = threading.Lock()

    def work(seconds: float) -> None:
        with lock:
            running["now"] += 1
        time.sleep(seconds)
        with lock:
            running["now"] -= 1

    async def body(loop: asyncio.AbstractEventLoop) -> list[RequestSlot]:
        slots = []

        async def request(slot: RequestSlot) -> None:
            try:
                await slot.to_thread(work, rng.uniform(0, 0.004))
                await slot.to_thread(work, rng.uniform(0, 0.004))
            finally:
                slot.close()

        tasks = []
        for number in range(300):
            slot = RequestSlot(functools.partial(releases.append, number))
            slots.append(slot)
            tasks.append(asyncio.ensure_future(request(slot)))
        for task in tasks:
            if rng.random() < 0.7:
                loop.call_later(rng.uniform(0, 0.2), task.cancel)
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(200):  # the threads that ran still give back theirs
            if len(releases) == 300:
                break
            await asyncio.sleep(0.01)
        return slots

    slots = _on_busy_executor(2, body)
    assert sorted(releases) == list(range(300))
    assert all(slot._threads == 0 for slot in slots)
    assert running["now"] == 0
