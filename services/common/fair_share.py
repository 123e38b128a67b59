"""Fair shares of a server's calls between its clients (``--fair-share``, on by default).

The server core runs at most ``--max-concurrent-rpcs`` model-service calls at once and
answers one more busy (services/common/server.py, WorkCalls). Without shares, a client
that keeps that many calls in flight (a batch job of 64 workers, each sending again after
the pushback) takes nearly every slot that frees, and another client's call meets
RESOURCE_EXHAUSTED almost every time it is sent. With them:

- the clients that want calls share the limit: those with calls in progress, those
  refused in the last moments (twice the pushback they were given, at least
  :data:`LINGER_SECONDS`) and those whose last call ended within :data:`LINGER_SECONDS`
  (a client that sends its calls one after another); each one's share is
  ``ceil(limit / clients)``;
- a client under its share is admitted whenever a slot is free;
- a client at or over it is admitted only while more slots are free than are kept for
  the other clients under their share (one each, at most a quarter of the limit, and at
  least one), and is refused busy otherwise (RESOURCE_EXHAUSTED QUEUE_FULL, with the
  pushback). So the slots its calls free go to the others, and a client alone has the
  whole limit.

Below the limit, the same clients take turns in each model's queue: the small requests
queued there (an image of one tile, a request of at most a batch of images) are served one
request of each client in turn, whatever their key (services/common/batching.py,
``MicroBatcher._turn_of``), so a client's request waits for about one batch for each key
(image size) another client's earlier-turn requests use, not for all a batch job queued
before it.

A client is the verified certificate of its call (mutual TLS: its common name, else its
first DNS name) or else its IP address without the port (one client's connections and
channels are one client). Clients behind one proxy, NAT or service mesh address are one
client to the server, and so are the replicas of a service that share one certificate.
A call costs O(clients with calls in progress), at most the limit.
"""

from __future__ import annotations

import ipaddress
import math
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from services.common.authorization import client_names

#: How long a client that sends its calls one after another still counts as wanting
#: calls after its last one ended (seconds): the gap to its next call.
LINGER_SECONDS = 1.0


def client_of(context: grpc.aio.ServicerContext) -> str:
    """Who makes the call: ``cert:NAME`` (mutual TLS) or ``ip:ADDRESS``."""
    names = client_names(context)
    if names:
        return f"cert:{names[0]}"
    return f"ip:{peer_host(context.peer() or '')}"


def peer_host(peer: str) -> str:
    """gRPC's peer string without the port: ``ipv4:10.0.0.5:43210`` -> ``10.0.0.5``,
    ``ipv6:%5B::1%5D:1`` (gRPC percent-encodes the brackets) -> ``::1``,
    ``ipv6:[::ffff:10.0.0.5]:1`` -> ``10.0.0.5``, a zone id dropped; another kind
    (``unix:...``) as it is."""
    peer = urllib.parse.unquote(peer)
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
    """Calls in progress per client, and the clients that want calls without holding
    any. Runs on the server's event loop."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self.holding: Counter[str] = Counter()
        self.total = 0
        # clients that hold no call but want one, -> until when; oldest entry first
        self.wanting: dict[str, float] = {}

    def _forget_old(self, now: float) -> None:
        while self.wanting:
            client, until = next(iter(self.wanting.items()))
            if until > now:
                return
            del self.wanting[client]

    def _want(self, client: str, seconds: float) -> None:
        if client in self.holding:
            return
        now = self.clock()
        until = max(self.wanting.pop(client, now), now + seconds)
        self.wanting[client] = until  # last in the order

    def refused(self, client: str, pushback_seconds: float) -> None:
        """A call of ``client`` was answered busy: it wants calls for a while."""
        self._want(client, max(LINGER_SECONDS, 2 * pushback_seconds))

    def over_share(self, client: str) -> OverShare | None:
        """None when a call of ``client`` may take a free slot (the caller checks that one
        is free); else why not."""
        self._forget_old(self.clock())
        known = client in self.holding or client in self.wanting
        clients = len(self.holding) + len(self.wanting) + (0 if known else 1)
        share = math.ceil(self.limit / clients)
        held = self.holding[client]
        if held < share:
            return None
        full = sum(1 for c, n in self.holding.items() if c != client and n >= share)
        under = clients - 1 - full
        kept = min(under, max(1, self.limit // 4))
        if self.limit - self.total > kept:
            return None
        return OverShare(held, share, clients)

    def enter(self, client: str) -> None:
        self.wanting.pop(client, None)
        self.holding[client] += 1
        self.total += 1

    def leave(self, client: str) -> None:
        self.holding[client] -= 1
        self.total -= 1
        if self.holding[client] <= 0:
            del self.holding[client]
            self._want(client, LINGER_SECONDS)
