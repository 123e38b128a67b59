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
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common.channels import open_channel
from services.common.config import add_server_arguments, config_from_args
from services.common.errors import RETRY_PUSHBACK_KEY
from services.common.fair_share import (
    LINGER_SECONDS,
    FairShares,
    client_of,
    peer_host,
)
from services.common.server import RunningServer, ServiceModule, start_in_thread
from services.common.tls import ClientTls
from tests.conftest import is_pushback, server_config
from tests.fixtures.certificates import Authority, SecretFiles, secret
from tests.services.test_listen_address import ipv6_loopback_available
from tests.services.test_work_calls import _reason, _trailer

SERVICE = "test.Gated"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _take(shares: FairShares, client: str) -> bool:
    """A call of ``client``, as WorkCalls makes it: admitted or refused (then wanting)."""
    if shares.total >= shares.limit or shares.over_share(client) is not None:
        shares.refused(client, 0.05)
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
    assert not _take(shares, "ip:b")  # the limit: b now wants calls
    shares.leave("ip:a")  # one of a's calls ends: 7 of 8, its share 4
    refusal = shares.over_share("ip:a")
    assert refusal is not None and (refusal.held, refusal.share, refusal.clients) == (7, 4, 2)
    assert _take(shares, "ip:b")  # the freed slot is b's
    for _ in range(3):
        shares.leave("ip:a")  # a down to 4, its share
    assert _take(shares, "ip:a")  # 3 slots free, 1 kept for b (under its share)
    assert _take(shares, "ip:b")  # b under its share: any free slot
    assert not _take(shares, "ip:a")  # a at 5 of 8, 1 free, kept for b
    assert _take(shares, "ip:b")


def test_a_client_that_calls_one_after_another_keeps_its_slot_a_moment() -> None:
    clock = Clock()
    shares = FairShares(8, clock=clock)
    assert _take(shares, "ip:b")
    assert sum(_take(shares, "ip:a") for _ in range(8)) == 6  # one slot kept for b
    shares.leave("ip:b")  # b's call ends; its next one comes within LINGER_SECONDS
    assert _take(shares, "ip:a")  # 2 free, 1 kept for b
    assert not _take(shares, "ip:a")  # the last slot is kept for b ...
    assert _take(shares, "ip:b")  # ... which takes it
    shares.leave("ip:b")
    clock.now += LINGER_SECONDS + 0.1  # b sends nothing more: the slot is a's again
    assert _take(shares, "ip:a")
    assert shares.total == 8


def test_clients_that_no_longer_want_calls_keep_no_slots() -> None:
    """Clients refused a while ago, or seen once, hold nothing back (a quarter of the
    limit stayed empty while 16 addresses called once every 10 s)."""
    clock = Clock()
    shares = FairShares(64, clock=clock)
    for i in range(30):
        shares.refused(f"ip:10.0.0.{i}", 0.05)
    clock.now += LINGER_SECONDS + 0.1
    assert sum(_take(shares, "ip:a") for _ in range(64)) == 64
    assert shares.wanting == {}


def test_the_slots_kept_for_waiting_clients_are_at_most_a_quarter_of_the_limit() -> None:
    shares = FairShares(16, clock=Clock())
    for i in range(10):
        shares.refused(f"ip:waiting-{i}", 0.05)
    taken = sum(_take(shares, "ip:a") for _ in range(16))
    assert taken == 12  # 16 less the 4 kept, however many clients wait


def test_waiting_clients_are_forgotten_after_twice_their_pushback() -> None:
    clock = Clock()
    shares = FairShares(4, clock=clock)
    shares.refused("ip:b", 3.0)  # a long pushback: b comes back in 3 s
    clock.now += 5.0
    shares.over_share("ip:a")
    assert "ip:b" in shares.wanting
    clock.now += 1.1
    shares.over_share("ip:a")
    assert "ip:b" not in shares.wanting


def test_a_client_at_its_share_leaves_the_last_slot_of_a_small_limit_to_another() -> None:
    """--max-concurrent-rpcs 3: a at 2, its share of 3 between two clients (ceil), is
    refused the last free slot, kept for b (at least one slot is kept, however small the
    limit), which takes it."""
    shares = FairShares(3, clock=Clock())
    assert [_take(shares, "ip:a") for _ in range(3)] == [True] * 3
    assert not _take(shares, "ip:b")
    shares.leave("ip:a")
    refusal = shares.over_share("ip:a")
    assert refusal is not None and (refusal.held, refusal.share, refusal.clients) == (2, 2, 2)
    assert not _take(shares, "ip:a")
    assert _take(shares, "ip:b")


def test_a_share_of_a_limit_that_does_not_divide_evenly_rounds_up() -> None:
    """7 calls between three clients: each one's share is 3, so a with 2 is under it and
    takes the last slot while c waits (b, over its share, holds 4)."""
    shares = FairShares(7, clock=Clock())
    for client, calls in (("ip:a", 2), ("ip:b", 4)):
        for _ in range(calls):
            shares.enter(client)
    shares.refused("ip:c", 0.05)
    assert shares.over_share("ip:a") is None
    assert _take(shares, "ip:a")


def test_no_slot_is_kept_for_a_client_already_at_its_share() -> None:
    """12 calls, a and b at their share of 4, c at 2: one slot is kept for c, the only
    client under its share, so of the two free a may take one."""
    shares = FairShares(12, clock=Clock())
    for client, calls in (("ip:a", 4), ("ip:b", 4), ("ip:c", 2)):
        for _ in range(calls):
            shares.enter(client)
    assert _take(shares, "ip:a")
    assert not _take(shares, "ip:a")  # the last free slot is c's
    assert _take(shares, "ip:c")


def test_a_refused_client_that_gets_a_call_in_counts_once() -> None:
    shares = FairShares(8, clock=Clock())
    for _ in range(8):
        shares.enter("ip:a")
    assert not _take(shares, "ip:b")
    shares.leave("ip:a")
    assert _take(shares, "ip:b")  # b now holds a call: no longer among the waiting
    refusal = shares.over_share("ip:a")
    assert refusal is not None and refusal.clients == 2, refusal


def test_a_shorter_pushback_does_not_cut_a_longer_wait_short() -> None:
    """Refused with a 3 s pushback, then (another call) with 50 ms: b still wants calls
    until 6 s after the first refusal."""
    clock = Clock()
    shares = FairShares(4, clock=clock)
    shares.refused("ip:b", 3.0)
    shares.refused("ip:b", 0.05)
    clock.now += 5.0
    shares.over_share("ip:a")
    assert "ip:b" in shares.wanting


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:10.0.0.5:43210", "10.0.0.5"),
    ("ipv6:%5B::1%5D:40654", "::1"),  # as grpcio sends it: percent-encoded brackets
    ("ipv6:[::1]:5555", "::1"),
    ("ipv6:%5B::ffff:10.0.0.5%5D:5555", "10.0.0.5"),  # IPv4 on a dual-stack socket
    ("ipv6:%5Bfe80::fc:ff:fe00:1%254%5D:5555", "fe80::fc:ff:fe00:1"),  # a zone id
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
    if not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback here: the certificate test below covers the shares")
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


def _fill_and_lock_out(module: GatedModule, a_wait: Any, b_wait: Any) -> dict[bytes, Any]:
    """a's calls a0..a3 fill the server's 4; b's call is refused at the limit. Returns
    a's calls in progress."""
    held = {f"a{i}".encode(): a_wait.future(f"a{i}".encode(), timeout=60) for i in range(4)}
    _wait_running(module, set(held))
    with pytest.raises(grpc.RpcError) as refused:
        b_wait(b"b0", timeout=30)
    assert "limit of 4 concurrent calls" in refused.value.details()  # type: ignore[attr-defined]
    return held


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
        held = _fill_and_lock_out(module, a_wait, b_wait)
        shares = running.server._work.shares
        if fair:  # gRPC's percent-encoded IPv6 peer, read as the address
            assert shares is not None and list(shares.wanting) == ["ip:::1"]

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


def test_under_mutual_tls_each_client_certificate_is_a_client(tmp_path: Path) -> None:
    """Two clients on the same address, told apart by their certificates."""
    authority = Authority()
    server = secret(tmp_path / "server", authority)
    alpha = secret(tmp_path / "alpha", authority, name="alpha")
    beta = secret(tmp_path / "beta", authority, name="beta")
    module = GatedModule()
    running = start_in_thread(server_config(
        "all", max_concurrent_rpcs=4, tls_cert=str(server.cert), tls_key=str(server.key),
        tls_client_ca=str(server.ca)), modules=[module])

    def channel(files: SecretFiles) -> grpc.Channel:
        return open_channel(f"localhost:{running.port}", [], ClientTls.of(
            ca=str(server.ca), cert=str(files.cert), key=str(files.key)))

    a_channel, b_channel = channel(alpha), channel(beta)
    a_wait = a_channel.unary_unary(f"/{SERVICE}/Wait")
    b_wait = b_channel.unary_unary(f"/{SERVICE}/Wait")
    try:
        held = _fill_and_lock_out(module, a_wait, b_wait)
        module.gate(b"a0").set()
        assert held.pop(b"a0").result(30) == b"done:a0"
        with pytest.raises(grpc.RpcError) as over:
            a_wait(b"a4", timeout=30)
        assert over.value.details().startswith(  # type: ignore[attr-defined]
            "this client (the certificate alpha) has 3 of the server's 4 concurrent calls")
        b_call = b_wait.future(b"b1", timeout=60)
        _wait_running(module, {b"b1"})
        module.gate(b"b1").set()
        assert b_call.result(30) == b"done:b1"
    finally:
        for gate in list(module.gates.values()):
            gate.set()
        a_channel.close()
        b_channel.close()
        running.stop()


@pytest.mark.parametrize("same_shape", [True, False], ids=["same-shape", "another-shape"])
@pytest.mark.parametrize("fair", [True, False], ids=["fair-share", "no-shares"])
def test_a_client_s_request_takes_its_turn_ahead_of_a_flood_queued_before_it(
        fair: bool, same_shape: bool, small_photo: Any) -> None:
    """Below the call limit, in the model's queue: a (127.0.0.1) has 8 upscales queued
    behind a running one when b's (::1) arrives, of a's image size or another (another
    batch key). With shares, b's goes in the first or second batch of 4 (turns by client,
    across keys); without them, after all of a's (arrival order)."""
    if not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback here")
    from services import client
    from tests.conftest import encode

    running = start_in_thread(server_config("superres", host="::", warmup=False, max_batch=4,
                                            max_wait_ms=1, fair_share=fair))
    batchers = running.server.modules[0].batchers()
    gate = threading.Event()

    def held(compute: Any) -> Any:
        def process(items: Any) -> Any:
            gate.wait(60)
            return compute(items)
        return process

    for batcher in batchers:
        batcher._process = held(batcher._process)
    image = encode(small_photo)
    b_image = image if same_shape else encode(small_photo[:40, :56])
    done: list[str] = []
    a = grpc.insecure_channel(f"127.0.0.1:{running.port}", options=[
        ("grpc.max_receive_message_length", 64 << 20)])
    b = grpc.insecure_channel(f"[::1]:{running.port}", options=[
        ("grpc.max_receive_message_length", 64 << 20)])

    def depth() -> int:
        return sum(batcher.depth for batcher in batchers)

    def send(channel: grpc.Channel, name: str, queued: int, image: bytes = image) -> Any:
        future = client.upscale_future(channel, image, timeout=120)
        future.add_done_callback(lambda _: done.append(name))
        deadline = time.monotonic() + 30
        while depth() < queued:
            assert time.monotonic() < deadline, f"{name} never reached the queue"
            time.sleep(0.01)
        return future

    try:
        calls = [send(a, "a-running", 1)]
        calls += [send(a, f"a{i}", 2 + i) for i in range(8)]
        calls.append(send(b, "b", 10, b_image))
        gate.set()
        for call in calls:
            call.result()
        after_b = done[done.index("b") + 1:]
        if fair:  # a0, b, a1, a2 (same shape) or a0..a3, then b: then the rest of a's
            assert sum(name.startswith("a") for name in after_b) >= 4, done
        else:
            assert after_b == [], done
    finally:
        gate.set()
        a.close()
        b.close()
        running.stop()
