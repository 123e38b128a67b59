"""Fair shares of --max-concurrent-rpcs between clients (services/common/fair_share.py):
the rule on its own, with a clock of the test's, and through a real server core on
loopback, where 127.0.0.1 and ::1 are two clients and a server without shares is the
baseline that locks the second one out."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common.config import add_server_arguments, config_from_args
from services.common.errors import RETRY_PUSHBACK_KEY
from services.common.fair_share import (
    RECENT_SECONDS,
    FairShares,
    client_of,
    peer_host,
)
from services.common.server import RunningServer, ServiceModule, start_in_thread
from tests.conftest import is_pushback, server_config
from tests.services.test_work_calls import _reason, _trailer

SERVICE = "test.Gated"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _take(shares: FairShares, client: str) -> bool:
    """A call of ``client`` where the server's limit is not reached: admitted or not."""
    if sum(shares.holding.values()) >= shares.limit:
        shares.note(client)
        return False
    if shares.over_share(client) is not None:
        return False
    shares.enter(client)
    return True


# -- the rule -------------------------------------------------------------------------------


def test_a_client_alone_has_the_whole_limit() -> None:
    shares = FairShares(8, clock=Clock())
    assert [_take(shares, "ip:a") for _ in range(9)] == [True] * 8 + [False]


def test_the_slots_a_flooding_client_frees_go_to_the_one_it_locked_out() -> None:
    shares = FairShares(8, clock=Clock())
    for _ in range(8):
        assert _take(shares, "ip:a")
    assert not _take(shares, "ip:b")  # the limit: b is now one of the clients calling
    shares.leave("ip:a")  # one of a's calls ends: 7 of 8, its share 4
    refusal = shares.over_share("ip:a")
    assert refusal is not None and (refusal.held, refusal.share, refusal.clients) == (7, 4, 2)
    assert _take(shares, "ip:b")  # the freed slot is b's
    for _ in range(3):
        shares.leave("ip:a")  # a down to 4: its share; b holds 1
    assert _take(shares, "ip:b") and _take(shares, "ip:b")  # under its share: any free slot
    assert not _take(shares, "ip:a")  # 4 of 8 with b under its share and 1 slot free


def test_a_client_among_idle_ones_keeps_one_slot_free_for_them() -> None:
    clock = Clock()
    shares = FairShares(8, clock=clock)
    shares.note("ip:b")  # b called a moment ago, and holds nothing now
    assert [_take(shares, "ip:a") for _ in range(8)] == [True] * 7 + [False]
    assert _take(shares, "ip:b")  # the slot kept for b
    shares.leave("ip:b")
    clock.now += RECENT_SECONDS + 1  # b is forgotten: a may have the last slot
    assert _take(shares, "ip:a")


def test_the_slots_kept_for_idle_clients_are_at_most_a_quarter_of_the_limit() -> None:
    shares = FairShares(16, clock=Clock())
    for i in range(10):
        shares.note(f"ip:idle-{i}")
    taken = sum(_take(shares, "ip:a") for _ in range(16))
    assert taken == 12  # 16 less the 4 kept, however many idle clients there are


def test_clients_seen_long_ago_are_forgotten() -> None:
    clock = Clock()
    shares = FairShares(4, clock=clock)
    for i in range(1000):
        shares.note(f"ip:10.0.{i // 250}.{i % 250}")
        clock.now += 0.1
    assert len(shares.seen) <= RECENT_SECONDS / 0.1 + 1


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:10.0.0.5:43210", "10.0.0.5"),
    ("ipv6:[::1]:5555", "::1"),
    ("ipv6:[::ffff:10.0.0.5]:5555", "10.0.0.5"),  # IPv4 on a dual-stack socket
    ("ipv6:[fe80::1%eth0]:5555", "fe80::1"),
    ("unix:/tmp/socket", "unix:/tmp/socket"),
])
def test_a_client_is_its_address_without_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


class _Context:
    def __init__(self, peer: str, auth: dict[str, list[bytes]]) -> None:
        self._peer, self._auth = peer, auth

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth


def test_a_client_certificate_names_the_client_wherever_it_calls_from() -> None:
    certified = {"x509_common_name": [b"batch-job"], "peer_dns": [b"batch.example"]}
    assert client_of(_Context("ipv4:10.0.0.5:1", certified)) == "cert:batch-job"  # type: ignore[arg-type]
    assert client_of(_Context("ipv4:10.0.0.6:2", certified)) == "cert:batch-job"  # type: ignore[arg-type]
    assert client_of(_Context("ipv4:10.0.0.5:3", {})) == "ip:10.0.0.5"  # type: ignore[arg-type]


# -- through a real server ------------------------------------------------------------------


class GatedModule(ServiceModule):
    """``test.Gated/Wait``: each call runs until the test opens the gate of its request."""

    name = "gated"
    full_name = SERVICE

    def __init__(self) -> None:
        super().__init__(server_config("all"))
        self.gates: dict[bytes, threading.Event] = {}
        self.running: set[bytes] = set()
        self.lock = threading.Lock()

    def gate(self, request: bytes) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(request, threading.Event())

    async def wait(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        gate = self.gate(request)
        self.running.add(request)
        try:
            while not gate.is_set():
                await asyncio.sleep(0.01)
        finally:
            self.running.discard(request)
        return b"done:" + request

    def add_to_server(self, server: grpc.aio.Server) -> None:
        handlers = {"Wait": grpc.unary_unary_rpc_method_handler(self.wait)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE,
                                                                              handlers),))


def _rejected(queue: str) -> float:
    return REGISTRY.get_sample_value("percept_rejected_total", {"queue": queue}) or 0.0


@pytest.fixture(params=[True, False], ids=["fair-share", "no-shares"])
def gated(request: pytest.FixtureRequest) -> Iterator[tuple[GatedModule, RunningServer, bool]]:
    """A dual-stack server (--host ::) of 4 concurrent calls, with shares or without."""
    module = GatedModule()
    running = start_in_thread(server_config("all", host="::", max_concurrent_rpcs=4,
                                            fair_share=request.param), modules=[module])
    yield module, running, request.param
    for gate in list(module.gates.values()):
        gate.set()
    running.stop()


def _wait_running(module: GatedModule, requests: set[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not requests <= module.running:
        assert time.monotonic() < deadline, f"never running: {requests - module.running}"
        time.sleep(0.01)


def test_a_flooding_client_cannot_lock_another_out(
        gated: tuple[GatedModule, RunningServer, bool]) -> None:
    """a (127.0.0.1) fills the 4 calls; b (::1) is refused at the limit. When one of a's
    calls ends, its next one is refused with shares (3 of 4, its share 2) and b's gets
    the slot; without shares a takes it back and b stays locked out."""
    module, running, fair = gated
    a_channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    b_channel = grpc.insecure_channel(f"[::1]:{running.port}")
    a_wait = a_channel.unary_unary(f"/{SERVICE}/Wait")
    b_wait = b_channel.unary_unary(f"/{SERVICE}/Wait")
    try:
        held = {f"a{i}".encode(): a_wait.future(f"a{i}".encode(), timeout=60)
                for i in range(4)}
        _wait_running(module, set(held))
        with pytest.raises(grpc.RpcError) as refused:
            b_wait(b"b0", timeout=30)
        assert "limit of 4 concurrent calls" in refused.value.details()

        module.gate(b"a0").set()
        assert held.pop(b"a0").result(30) == b"done:a0"
        before = _rejected("client-share")
        if fair:
            with pytest.raises(grpc.RpcError) as over:
                a_wait(b"a4", timeout=30)
            error: Any = over.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details().startswith(
                "this client (127.0.0.1) has 3 of the server's 4 concurrent calls in "
                "progress, its share while 2 clients call (--fair-share)")
            assert _reason(error) == "QUEUE_FULL"
            assert is_pushback(_trailer(error, RETRY_PUSHBACK_KEY))
            assert _rejected("client-share") == before + 1
            b_call = b_wait.future(b"b1", timeout=60)
            _wait_running(module, {b"b1"})  # the freed slot went to b
            module.gate(b"b1").set()
            assert b_call.result(30) == b"done:b1"
        else:
            a_call = a_wait.future(b"a4", timeout=60)
            _wait_running(module, {b"a4"})  # a took the slot back
            with pytest.raises(grpc.RpcError) as locked_out:
                b_wait(b"b1", timeout=30)
            assert "limit of 4 concurrent calls" in locked_out.value.details()
            assert _rejected("client-share") == before
            held[b"a4"] = a_call
        for request, call in held.items():
            module.gate(request).set()
            assert call.result(30) == b"done:" + request
    finally:
        a_channel.close()
        b_channel.close()


def test_the_flag_and_its_variable_turn_the_shares_off(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert config_from_args("superres", parser.parse_args([])).fair_share is True
    assert config_from_args("superres",
                            parser.parse_args(["--fair-share", "off"])).fair_share is False
    monkeypatch.setenv("PERCEPT_FAIR_SHARE", "off")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert config_from_args("superres", parser.parse_args([])).fair_share is False
