"""Fair shares of a server's calls between its clients (``--fair-share``, on by default).

The server core runs at most ``--max-concurrent-rpcs`` model-service calls at once and
answers one more busy (services/common/server.py, WorkCalls). Without shares, a client
that keeps that many calls in flight (a batch job of 64 workers, each sending again after
the pushback) takes nearly every slot that frees, and another client's call meets
RESOURCE_EXHAUSTED almost every time it is sent. With them:

- the clients seen in the last :data:`RECENT_SECONDS` (admitted or refused) and those
  with calls in progress share the limit: each one's share is ``ceil(limit / clients)``;
- a client under its share is admitted whenever a slot is free;
- a client at or over it is admitted only while more slots are free than are kept for
  the others under their share (one each, at most a quarter of the limit), and is
  refused busy otherwise (RESOURCE_EXHAUSTED QUEUE_FULL, with the pushback). So the
  slots its calls free go to the others, and a client alone, or among idle ones, still
  has (nearly) the whole limit: the shares cost at most the kept slots.

A client is the verified certificate of its call (mutual TLS: its common name, else its
first DNS name) or else its IP address without the port (one client's connections and
channels are one client; an IPv4 address mapped into IPv6 is the IPv4 address). Clients
behind one proxy or NAT address are one client to the server.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from services.common.authorization import client_names

#: How long a client counts among those sharing the calls after it was last seen.
RECENT_SECONDS = 10.0


def client_of(context: grpc.aio.ServicerContext) -> str:
    """Who makes the call: ``cert:NAME`` (mutual TLS) or ``ip:ADDRESS``."""
    names = client_names(context)
    if names:
        return f"cert:{names[0]}"
    return f"ip:{peer_host(context.peer() or '')}"


def peer_host(peer: str) -> str:
    """gRPC's peer string without the port: ``ipv4:10.0.0.5:43210`` -> ``10.0.0.5``,
    ``ipv6:[::ffff:10.0.0.5]:1`` -> ``10.0.0.5``, ``ipv6:[::1]:1`` -> ``::1``; another
    kind (``unix:...``) as it is."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]") or rest
        try:
            address = ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            return host
        return str(address.ipv4_mapped or address)
    return peer


def shown(client: str) -> str:
    """A client as a status message names it."""
    kind, _, name = client.partition(":")
    return f"the certificate {name}" if kind == "cert" else name


@dataclass(frozen=True)
class OverShare:
    """Why a client's call is refused: it holds ``held`` calls, its ``share`` while
    ``clients`` clients call."""

    held: int
    share: int
    clients: int


class FairShares:
    """Calls in progress per client, and which clients were seen lately."""

    def __init__(self, limit: int, recent_seconds: float = RECENT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.recent_seconds = recent_seconds
        self.clock = clock
        self.holding: Counter[str] = Counter()
        # client -> when it was last seen; the dict's order is oldest first
        self.seen: dict[str, float] = {}

    def note(self, client: str) -> None:
        """``client`` was seen (a call of it admitted or refused)."""
        now = self.clock()
        self.seen.pop(client, None)
        self.seen[client] = now  # last in the order: the dict stays oldest-first
        horizon = now - self.recent_seconds
        while self.seen:
            oldest, when = next(iter(self.seen.items()))
            if when >= horizon:
                break
            del self.seen[oldest]

    def over_share(self, client: str) -> OverShare | None:
        """None when a call of ``client`` may take a free slot (the caller checks that one
        is free); else why not. Notes ``client`` as seen."""
        self.note(client)
        clients = set(self.seen) | set(self.holding)
        share = math.ceil(self.limit / len(clients))
        held = self.holding[client]
        if held < share:
            return None
        under = sum(1 for c in clients if c != client and self.holding[c] < share)
        kept = min(under, max(1, self.limit // 4))
        free = self.limit - sum(self.holding.values())
        if free > kept:
            return None
        return OverShare(held, share, len(clients))

    def enter(self, client: str) -> None:
        self.holding[client] += 1

    def leave(self, client: str) -> None:
        self.holding[client] -= 1
        if self.holding[client] <= 0:
            del self.holding[client]
