"""The gRPC channel arguments of a server's main port (message limits, connection age,
keepalive: gRFC A8, A9), and the keepalive of a percept client that holds a channel open.

Keepalive, both ways:

- **Clients' pings.** A client may ping to keep its connection alive through NATs and load
  balancers that drop idle ones (AWS's NLB after 350 s, for one), with or without calls in
  progress, as often as every ``--min-client-ping-seconds`` (10: the shortest keepalive
  time gRPC's Java and Go clients allow). gRPC's server defaults accept one every 5
  minutes while calls run and one every 2 hours without: a client with a 10 s keepalive
  had its health Watch stream ended UNAVAILABLE "Too many pings" after 30 s. A client
  pinging more often than allowed is still told GOAWAY too_many_pings and disconnected
  at its third such ping (gRPC's protection against ping floods).
- **The server's pings.** A connection quiet for ``--keepalive-seconds`` (60) is pinged,
  and closed when no answer comes within :func:`keepalive_timeout_ms` (any ping of the
  server's must be answered that soon): a client that vanished (its node lost, a
  partition) no longer holds its streams, Watch streams included, until the connection's
  maximum age and its grace end it (65 minutes), and the pings keep idle connections open
  through the same NATs. 0 turns them off (other pings then time out after a minute, as
  with gRPC's defaults).
- **A percept client's pings.** Search pings its Embedding service's connections after
  :data:`CLIENT_KEEPALIVE_SECONDS` of quiet: when an embedding pod vanishes (its node
  lost: nothing answers and nothing closes), its connection is dropped within 20 s of the
  ping, and the calls go to the other pods, instead of each waiting out its deadline.
"""

from __future__ import annotations

from services.common.config import ServerConfig

#: Recycling connections every 5 minutes lets clients that balance round-robin over the
#: pods they are connected to find pods added by a scale-up.
MAX_CONNECTION_AGE_MS = 300_000
#: Lets calls in flight on an aged connection finish: an hour, the longest default
#: deadline of the CLI (a StylizeWithImage optimisation).
MAX_CONNECTION_AGE_GRACE_MS = 3_600_000
#: The longest the server waits for a ping's answer (gRPC's default, 20 s).
KEEPALIVE_TIMEOUT_MS = 20_000
#: gRPC's "never" for a keepalive time (its largest value, about 24 days). With it and no
#: timeouts given, gRPC takes those as never too: a raw client that never acknowledged the
#: server's SETTINGS was still connected after 90 s (closed after 60 s with them given,
#: the SETTINGS timeout being 2 x the keepalive timeout, at least a minute).
NEVER_MS = 2**31 - 1
#: gRPC's ping timeout where keepalive pings are off: a minute, its default.
DEFAULT_PING_TIMEOUT_MS = 60_000
#: How long a percept client's connection may stay quiet before it pings (seconds).
CLIENT_KEEPALIVE_SECONDS = 30.0


def keepalive_timeout_ms(keepalive_ms: int) -> int:
    """How long the server waits for its ping's answer: 20 s, or the keepalive time
    where that is shorter."""
    return max(1, min(KEEPALIVE_TIMEOUT_MS, keepalive_ms))


def _pinging(every_ms: int) -> list[tuple[str, int]]:
    """A ping after ``every_ms`` of quiet, however many in a row; the connection is closed
    when one goes unanswered for :func:`keepalive_timeout_ms`."""
    timeout_ms = keepalive_timeout_ms(every_ms)
    return [("grpc.keepalive_time_ms", every_ms), ("grpc.keepalive_timeout_ms", timeout_ms),
            # gRPC 1.85 times keepalive pings out by this (1 minute by default, whatever
            # the keepalive timeout); it applies to every ping this side sends
            ("grpc.http2.ping_timeout_ms", timeout_ms),
            ("grpc.http2.max_pings_without_data", 0)]


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The channel arguments of the main port's gRPC server."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
        # clients' pings: with or without calls, at most one per --min-client-ping-seconds
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms",
         round(config.min_client_ping_seconds * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    if config.keepalive_seconds <= 0:  # no pings; gRPC's timeouts for the others
        return [*options, ("grpc.keepalive_time_ms", NEVER_MS),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.http2.ping_timeout_ms", DEFAULT_PING_TIMEOUT_MS)]
    # the server's pings: after --keepalive-seconds of quiet
    return [*options, *_pinging(max(1, round(config.keepalive_seconds * 1000)))]


def client_keepalive_options(seconds: float) -> list[tuple[str, int]]:
    """Channel arguments for a client that pings a connection quiet for ``seconds`` (with
    or without calls; at most once a second, gRPC's limit; 0 never) and drops it when no
    answer comes within 20 s, or ``seconds`` where that is shorter."""
    if seconds <= 0:
        return []
    return [*_pinging(max(1000, round(seconds * 1000))),
            ("grpc.keepalive_permit_without_calls", 1)]
