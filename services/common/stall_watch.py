"""Health that follows the model batches, not only the event loop.

gRPC health answers from the event loop, which stays responsive while a model's worker
thread hangs (a hung CUDA kernel, a GPU lost to an Xid error): without this a pod with a
wedged GPU stays Ready, its share of a round-robin client's calls all time out, and the
liveness probe never restarts it. :class:`StallWatch` looks at every batcher of the
server's services each second: while one's batch has run past ``--stall-seconds``, that
service's health (readiness) and the server's ``""`` (liveness) are NOT_SERVING, and they
return to SERVING when the batch ends. Batches that take long for a known reason do not
count: Gatys optimisations (minutes by design) and torch.compile of a new shape.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2

from services.common.metrics import STALLED

if TYPE_CHECKING:
    from services.common.server import ServiceModule

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


#: queue name -> the watches (of the servers of this process) that see it stalled: the
#: gauge is 1 while any does. One server per process in a pod; tests run several, whose
#: looks would otherwise overwrite each other's.
_stalled_queues: dict[str, set[int]] = {}
_stalled_lock = threading.Lock()


def _show_stall(queue: str, watch: int, stalled: bool) -> None:
    with _stalled_lock:
        watches = _stalled_queues.setdefault(queue, set())
        if stalled:
            watches.add(watch)
        else:
            watches.discard(watch)
        STALLED.labels(queue).set(1 if watches else 0)


def _seconds(seconds: float) -> str:
    """A duration for a log line: one decimal below 10 s ("0.4 s", not "0 s")."""
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


class StallWatch:
    """Sets health from the batches of ``modules`` (see the module's docstring)."""

    def __init__(self, modules: Sequence[ServiceModule], stall_seconds: float,
                 set_health: Callable[[str, int], Awaitable[None]]) -> None:
        self.modules = list(modules)
        self.set_health = set_health
        #: how often the batches are looked at (seconds)
        self.period = max(0.05, min(1.0, stall_seconds / 4))
        self.stalled: dict[str, str] = {}  # service full name -> what stalls it

    def find_stalls(self) -> dict[str, str]:
        """The services whose calls wait on a stalled batch, and which batch."""
        found: dict[str, str] = {}
        for module in self.modules:
            for batcher in module.batchers():
                seconds = batcher.stalled_for()
                _show_stall(batcher.name, id(self), seconds is not None)
                if seconds is not None:
                    found.setdefault(module.full_name, f"{batcher.name}'s batch has run "
                                                       f"{_seconds(seconds)}")
        return found

    async def update(self) -> None:
        """One look: health changes for the services that stalled or recovered."""
        found = self.find_stalls()
        for name in found.keys() - self.stalled.keys():
            log.error("a model batch stalls: %s reports NOT_SERVING until it ends", name,
                      extra={"service": name, "stall": found[name]})
            await self.set_health(name, NOT_SERVING)
        for name in self.stalled.keys() - found.keys():
            log.warning("the stalled batch ended: %s is SERVING again", name,
                        extra={"service": name})
            await self.set_health(name, SERVING)
        if bool(found) != bool(self.stalled):
            await self.set_health("", NOT_SERVING if found else SERVING)
        self.stalled = found

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.period)
                try:
                    await self.update()
                except Exception:  # a look that failed is no reason to stop looking
                    log.exception("checking the batches for stalls failed")
        finally:  # the server stops: what this watch saw stalled is no longer shown
            for module in self.modules:
                for batcher in module.batchers():
                    _show_stall(batcher.name, id(self), False)
