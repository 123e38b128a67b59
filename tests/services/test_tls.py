"""TLS and mutual TLS on a real server (the super-resolution service on its committed
models) over loopback: certificates from a throwaway CA, files checked at start, rotated
files read again without a restart, the plaintext health port, and the CLI's flags and
advice when a handshake fails."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from percept.v1 import superres_pb2, superres_pb2_grpc
from services import client
from services.cli import main
from services.common import tls as tls_module
from services.common.channels import RenewingChannel, open_channel
from services.common.metrics import TLS_CERTIFICATE_EXPIRY
from services.common.server import RunningServer, StartupError, start_in_thread
from services.common.tls import (
    EMBED_FLAGS,
    ClientTls,
    ServerTlsFiles,
    TlsError,
    connection_hint,
)
from services.retries import LOST_AFTER_GOAWAY, unavailable_reason
from tests.conftest import encode, free_port, server_config
from tests.fixtures.certificates import DAY, NOW, Authority, SecretFiles, key_pem, secret

SERVICE = "percept.v1.SuperResolution"


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority()


@pytest.fixture()
def files(tmp_path: Path, authority: Authority) -> SecretFiles:
    return secret(tmp_path / "secret", authority)


@pytest.fixture(autouse=True)
def plaintext_default() -> Iterator[None]:
    """The CLI's TLS flags set client.connect's default: back to the environment's."""
    yield
    client.use_tls(None)


def start_tls_server(files: SecretFiles, mutual: bool = False, **overrides: object
                     ) -> RunningServer:
    return start_in_thread(server_config(
        "superres", warmup=False, tls_cert=str(files.cert), tls_key=str(files.key),
        tls_client_ca=str(files.ca) if mutual else "", **overrides))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, authority: Authority
               ) -> Iterator[tuple[RunningServer, SecretFiles]]:
    """Server-only TLS, and a plaintext health port."""
    files = secret(tmp_path_factory.mktemp("tls") / "secret", authority)
    running = start_tls_server(files, health_port=free_port())
    yield running, files
    running.stop()


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, authority: Authority
                ) -> Iterator[tuple[RunningServer, SecretFiles]]:
    files = secret(tmp_path_factory.mktemp("mtls") / "secret", authority)
    running = start_tls_server(files, mutual=True)
    yield running, files
    running.stop()


def check(channel: grpc.Channel, service: str = "") -> str:
    """The health status over ``channel`` (raises the call's RpcError)."""
    try:
        return client.health_status(channel, service, timeout=10)
    finally:
        channel.close()


def failure(channel: grpc.Channel) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        check(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    return caught.value


def verifying(ca: Path, cert: str = "", key: str = "", server_name: str = "") -> ClientTls:
    return ClientTls.of(ca=str(ca), cert=cert, key=key, server_name=server_name)


# -- the files a server starts with ------------------------------------------------------
def load(files: SecretFiles, **changes: str) -> None:
    ServerTlsFiles(**{"cert": str(files.cert), "key": str(files.key),  # type: ignore[arg-type]
                      "client_ca": "", **changes}).load(NOW)


def test_good_files_load(files: SecretFiles) -> None:
    load(files, client_ca=str(files.ca))


@pytest.mark.parametrize(("spoil", "message"), [
    ("missing cert", "--tls-cert .*tls.crt: no such file"),
    ("folder key", "--tls-key .*: a folder, not a PEM file"),
    ("DER cert", "--tls-cert .*: not PEM .*openssl x509 -inform der"),
    ("DER key", "--tls-key .*: not PEM .*openssl pkey -inform der"),
    ("garbled cert", "--tls-cert .*: no readable certificate"),
    ("cert in key", "--tls-key .*: not a readable private key"),
    ("encrypted key", "--tls-key .*: the key is encrypted; gRPC needs it unencrypted"),
    ("other key", "--tls-key .* is not the private key of the certificate in --tls-cert"),
    ("expired", r"--tls-cert .*: expired on 20\d\d-"),
    ("not yet valid", "--tls-cert .*: not valid until .*this machine's clock says"),
    ("no client ca", "--tls-client-ca .*nothing.pem: no such file"),
    ("ed448 key", r"--tls-key .*: gRPC's TLS does not take its key type \(Ed448"),
    ("p521 pair", r"--tls-key .*: gRPC's TLS does not take its key type \(secp521r1\)"),
])
def test_each_bad_file_is_named_with_its_fault(files: SecretFiles, authority: Authority,
                                               spoil: str, message: str) -> None:
    changes = {}
    if spoil == "missing cert":
        files.cert.unlink()
    elif spoil == "folder key":
        files.key.unlink()
        files.key.mkdir()
    elif spoil == "DER cert":
        from cryptography.hazmat.primitives import serialization

        files.cert.write_bytes(authority.issue().certificate.public_bytes(
            serialization.Encoding.DER))
    elif spoil == "DER key":
        from cryptography.hazmat.primitives import serialization

        issued = authority.issue()
        files.cert.write_bytes(issued.cert_pem)
        files.key.write_bytes(issued.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    elif spoil == "garbled cert":
        files.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                               b"-----END CERTIFICATE-----\n")
    elif spoil == "cert in key":
        files.key.write_bytes(files.cert.read_bytes())
    elif spoil == "encrypted key":
        issued = authority.issue()
        files.cert.write_bytes(issued.cert_pem)
        files.key.write_bytes(key_pem(issued.key, password=b"secret"))
    elif spoil == "other key":
        files.key.write_bytes(authority.issue().key_pem)
    elif spoil == "expired":
        files.write(authority.issue(not_before=NOW - 60 * DAY, not_after=NOW - DAY), authority)
    elif spoil == "not yet valid":
        files.write(authority.issue(not_before=NOW + DAY, not_after=NOW + 60 * DAY), authority)
    elif spoil == "ed448 key":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed448

        files.key.write_bytes(ed448.Ed448PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    elif spoil == "p521 pair":  # loads, and then every handshake fails
        files.write(Authority(key="p521").issue(), authority)
    elif spoil == "no client ca":
        changes["client_ca"] = str(files.folder / "nothing.pem")
    with pytest.raises(TlsError, match=message):
        load(files, **changes)


def test_a_server_with_bad_files_does_not_start(files: SecretFiles, authority: Authority
                                                ) -> None:
    files.key.write_bytes(authority.issue().key_pem)
    with pytest.raises(StartupError, match=r"cannot serve TLS: --tls-key .* is not the private"):
        start_tls_server(files)


def test_serve_refuses_half_a_pair_and_a_port_twice(files: SecretFiles,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "superres", "--tls-cert", str(files.cert)]) == 2
    assert "--tls-cert needs --tls-key" in capsys.readouterr().err
    assert main(["serve", "superres", "--tls-client-ca", str(files.ca)]) == 2
    assert "--tls-client-ca (mutual TLS) needs --tls-cert" in capsys.readouterr().err
    assert main(["serve", "superres", "--port", "50999", "--health-port", "50999"]) == 2
    assert "--health-port 50999 is taken" in capsys.readouterr().err
    assert main(["serve", "search", "--embed-tls-ca", str(files.ca)]) == 2
    assert "--embed-target, which is not set" in capsys.readouterr().err


def test_a_client_certificate_needs_its_key() -> None:
    with pytest.raises(TlsError, match="a client certificate needs its key too"):
        ClientTls.of(cert="client.crt")
    with pytest.raises(TlsError, match="a client key needs its certificate too"):
        ClientTls.of(key="client.key")
    assert not ClientTls.of().enabled
    assert ClientTls.of(tls=True).enabled and ClientTls.of(ca="ca.pem").enabled


# -- a TLS server -------------------------------------------------------------------------
def test_a_verifying_client_is_served(tls_server: tuple[RunningServer, SecretFiles],
                                      small_photo: np.ndarray) -> None:
    running, files = tls_server
    channel = open_channel(f"localhost:{running.port}", [], verifying(files.ca))
    try:
        response = superres_pb2_grpc.SuperResolutionStub(channel).Upscale(
            superres_pb2.UpscaleRequest(image=encode(small_photo[:24, :32])), timeout=60)
    finally:
        channel.close()
    assert (response.width, response.height) == (128, 96)
    gauge = TLS_CERTIFICATE_EXPIRY.labels("server")
    assert gauge._value.get() == pytest.approx(  # type: ignore[attr-defined]
        running.server.tls.current.leaf.not_valid_after_utc.timestamp())  # type: ignore[union-attr]


def test_a_plaintext_client_is_refused_with_advice(
        tls_server: tuple[RunningServer, SecretFiles]) -> None:
    running, _ = tls_server
    error = failure(grpc.insecure_channel(f"localhost:{running.port}"))
    assert "pass --tls-ca" in connection_hint(error.details(), ClientTls())


def test_a_client_of_another_ca_is_refused_with_advice(
        tls_server: tuple[RunningServer, SecretFiles], tmp_path: Path) -> None:
    running, _ = tls_server
    other = secret(tmp_path / "other", Authority("another CA"))
    tls = verifying(other.ca)
    error = failure(open_channel(f"localhost:{running.port}", [], tls))
    assert "not signed by a CA this client trusts" in connection_hint(error.details(), tls)


def test_an_address_the_certificate_does_not_name(
        tmp_path: Path, authority: Authority) -> None:
    files = secret(tmp_path / "named", authority, name="superres.percept.svc",
                   dns=("superres.percept.svc",), ips=())
    running = start_tls_server(files)
    try:
        target = f"127.0.0.1:{running.port}"
        tls = verifying(files.ca)
        error = failure(open_channel(target, [], tls))
        assert "pass --tls-server-name NAME" in connection_hint(error.details(), tls)
        named = verifying(files.ca, server_name="superres.percept.svc")
        assert check(open_channel(target, [], named)) == "SERVING"
    finally:
        running.stop()


def test_a_tls_client_of_a_plaintext_server_is_told_so() -> None:
    running = start_in_thread(server_config("superres", warmup=False))
    try:
        tls = ClientTls.of(tls=True)
        error = failure(open_channel(f"localhost:{running.port}", [], tls))
        assert "the server answered in plaintext" in connection_hint(error.details(), tls)
    finally:
        running.stop()


def test_the_health_port_answers_health_alone_in_plaintext(
        tls_server: tuple[RunningServer, SecretFiles]) -> None:
    running, _ = tls_server
    health_port = running.server.health_port
    assert health_port and health_port != running.port
    channel = grpc.insecure_channel(f"localhost:{health_port}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            superres_pb2_grpc.SuperResolutionStub(channel).Upscale(
                superres_pb2.UpscaleRequest(image=b"x"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()


def upscales_answered_ok() -> float:
    """How many Upscale calls this process's servers have answered OK."""
    return REGISTRY.get_sample_value("percept_requests_total", {
        "grpc_service": SERVICE, "grpc_method": "Upscale", "grpc_code": "OK"}) or 0.0


def test_the_health_port_says_not_serving_through_the_drain_and_closes_after_it(
        files: SecretFiles, photo: np.ndarray) -> None:
    """While a call holds the drain, the health port still answers, NOT_SERVING (the
    probes take the pod out of rotation); once the server has stopped, nothing does."""
    running = start_tls_server(files, health_port=free_port())
    work = open_channel(f"localhost:{running.port}", [], verifying(files.ca))
    probe = grpc.insecure_channel(f"localhost:{running.server.health_port}")
    try:
        health = health_pb2_grpc.HealthStub(probe)
        answered_before = upscales_answered_ok()
        upscale = superres_pb2_grpc.SuperResolutionStub(work).Upscale.future(
            superres_pb2.UpscaleRequest(image=encode(photo)), timeout=300)
        while running.server._interceptor.active_work == 0:
            assert not upscale.done(), upscale.exception()
            time.sleep(0.01)
        stopping = threading.Thread(target=running.stop, kwargs={"grace": 300})
        stopping.start()
        status, deadline = health_pb2.HealthCheckResponse.SERVING, time.monotonic() + 60
        while status == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "the health port never said NOT_SERVING"
            status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE),
                                  timeout=10).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not upscale.done(), "NOT_SERVING was seen while the call held the drain"
        try:
            assert upscale.result().width == 4 * photo.shape[1]
        except grpc.RpcError as error:
            # gRPC's server closes the connection as soon as the answer is written, and
            # under load that close can reset it before a 3 MB answer has arrived: the
            # CLI retries such a call (services/retries.py)
            assert unavailable_reason(error) == LOST_AFTER_GOAWAY, error
        stopping.join(60)
        assert upscales_answered_ok() == answered_before + 1  # the drain let it finish
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        work.close()
        probe.close()


# -- mutual TLS ---------------------------------------------------------------------------
def test_mutual_tls_wants_a_certificate_of_its_ca(
        mtls_server: tuple[RunningServer, SecretFiles], tmp_path: Path,
        authority: Authority) -> None:
    running, files = mtls_server
    target = f"localhost:{running.port}"
    anonymous = verifying(files.ca)
    error = failure(open_channel(target, [], anonymous))
    assert "may require a client certificate" in connection_hint(error.details(), anonymous)

    stranger = secret(tmp_path / "stranger", Authority("another CA"), name="stranger")
    strange = verifying(files.ca, cert=str(stranger.cert), key=str(stranger.key))
    error = failure(open_channel(target, [], strange))
    assert "may not accept this client certificate" in connection_hint(error.details(),
                                                                         strange)

    member = secret(tmp_path / "member", authority, name="search")
    assert check(open_channel(target, [], verifying(
        files.ca, cert=str(member.cert), key=str(member.key))), SERVICE) == "SERVING"


def test_a_client_certificate_that_expired_is_refused_before_sending(
        tmp_path: Path, authority: Authority) -> None:
    old = secret(tmp_path / "old", authority, not_before=NOW - 60 * DAY, not_after=NOW - DAY)
    with pytest.raises(TlsError, match=r"--tls-client-cert .*: expired on"):
        open_channel("localhost:1", [], verifying(old.ca, cert=str(old.cert),
                                                  key=str(old.key)))


# -- rotation ------------------------------------------------------------------------------
def replace_files(files: SecretFiles, source: SecretFiles) -> None:
    """Swaps the files in at once, as the kubelet swaps a Secret's ..data link."""
    for name in ("tls.crt", "tls.key", "ca.crt"):
        staged = files.folder / f".{name}.new"
        staged.write_bytes((source.folder / name).read_bytes())
        os.replace(staged, files.folder / name)


def test_rotated_files_serve_new_connections_without_a_restart(
        files: SecretFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    running = start_tls_server(files)
    try:
        target = f"localhost:{running.port}"
        old_ca = files.folder / "old-ca.crt"
        old_ca.write_bytes(files.ca.read_bytes())
        successor = Authority("the next CA")
        trusts_successor = verifying(tmp_path / "next-ca.crt")
        (tmp_path / "next-ca.crt").write_bytes(successor.pem)
        failure(open_channel(target, [], trusts_successor))

        # half-way: the new certificate with the old key is not taken up
        with caplog.at_level(logging.ERROR, logger="percept.tls"):
            half = secret(tmp_path / "half", successor)
            half.key.write_bytes(files.key.read_bytes())
            replace_files(files, half)
            for _ in range(2):
                assert check(open_channel(target, [], verifying(old_ca))) == "SERVING"
        refusals = [r for r in caplog.records if "cannot be used" in r.getMessage()]
        assert len(refusals) == 1, "one line per state of the files, not per handshake"
        assert "is not the private key" in refusals[0].why  # type: ignore[attr-defined]

        replace_files(files, secret(tmp_path / "next", successor))
        assert check(open_channel(target, [], trusts_successor)) == "SERVING"
        failure(open_channel(target, [], verifying(old_ca)))
    finally:
        running.stop()


def test_a_long_lived_client_renews_its_certificate(
        mtls_server: tuple[RunningServer, SecretFiles], tmp_path: Path,
        authority: Authority) -> None:
    running, server_files = mtls_server
    mine = secret(tmp_path / "client", authority, name="search")
    tls = verifying(server_files.ca, cert=str(mine.cert), key=str(mine.key))

    async def scenario() -> tuple[list[int], list[str]]:
        channels = RenewingChannel(f"localhost:{running.port}", [], tls, EMBED_FLAGS,
                                   check_seconds=0.0)
        generations, statuses = [], []

        async def call() -> None:
            stub = health_pb2_grpc.HealthStub(channels.current())
            answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
            generations.append(channels.generation)

        try:
            await call()
            mine.key.write_bytes(authority.issue().key_pem)  # half-way: kept as it was
            await call()
            # the renewed certificate is one the server's CA signed afresh
            mine.write(authority.issue(name="search"), authority)
            await call()
        finally:
            await channels.close()
        return generations, statuses

    generations, statuses = asyncio.run(scenario())
    assert statuses == ["SERVING"] * 3
    assert generations == [1, 1, 2]


# -- the command line -----------------------------------------------------------------------
def test_cli_health_and_info_over_mutual_tls(
        mtls_server: tuple[RunningServer, SecretFiles], tmp_path: Path, authority: Authority,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    running, files = mtls_server
    mine = secret(tmp_path / "cli", authority, name="operator")
    target = ["--target", f"127.0.0.1:{running.port}"]
    flags = ["--tls-ca", str(files.ca), "--tls-client-cert", str(mine.cert),
             "--tls-client-key", str(mine.key), "--tls-server-name", "localhost"]
    assert main(["health", *target, *flags]) == 0
    assert "SERVING" in capsys.readouterr().out
    monkeypatch.setenv("PERCEPT_TLS_CA", str(files.ca))
    monkeypatch.setenv("PERCEPT_TLS_CLIENT_CERT", str(mine.cert))
    monkeypatch.setenv("PERCEPT_TLS_CLIENT_KEY", str(mine.key))
    monkeypatch.setenv("PERCEPT_TLS_SERVER_NAME", "localhost")
    assert main(["info", *target]) == 0
    assert "superres" in capsys.readouterr().out

    monkeypatch.delenv("PERCEPT_TLS_CLIENT_CERT")
    monkeypatch.delenv("PERCEPT_TLS_CLIENT_KEY")
    assert main(["health", *target]) == 1
    assert "may require a client certificate" in capsys.readouterr().err
    assert main(["health", *target, "--tls-client-cert", str(mine.cert)]) == 2
    assert "a client certificate needs its key too" in capsys.readouterr().err
    assert main(["health", *target, "--tls-ca", str(tmp_path / "absent.pem")]) == 2
    assert "--tls-ca " in capsys.readouterr().err


def test_cli_without_tls_flags_is_told_to_pass_them(
        tls_server: tuple[RunningServer, SecretFiles], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    running, _ = tls_server
    for name in ("PERCEPT_TLS", "PERCEPT_TLS_CA", "PERCEPT_TLS_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert main(["health", "--target", f"127.0.0.1:{running.port}"]) == 1
    assert "if the server speaks TLS, pass --tls-ca" in capsys.readouterr().err


def test_a_certificate_expiring_soon_is_warned_of(
        tmp_path: Path, authority: Authority, caplog: pytest.LogCaptureFixture) -> None:
    files = secret(tmp_path / "soon", authority,
                   not_after=NOW + datetime.timedelta(days=2))
    with caplog.at_level(logging.WARNING, logger="percept.tls"):
        tls_module.ServerCredentials(ServerTlsFiles(str(files.cert), str(files.key)))
    assert any("expires soon" in r.getMessage() for r in caplog.records)


def test_files_gone_mid_rotation_keep_the_pair_in_use_with_one_error(
        files: SecretFiles, authority: Authority, caplog: pytest.LogCaptureFixture) -> None:
    credentials = tls_module.ServerCredentials(ServerTlsFiles(str(files.cert),
                                                              str(files.key)))
    first = credentials.current
    files.key.unlink()
    with caplog.at_level(logging.ERROR, logger="percept.tls"):
        assert [credentials._fetch() for _ in range(3)] == [None] * 3  # one per handshake
    refusals = [r for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(refusals) == 1 and "no such file" in refusals[0].why  # type: ignore[attr-defined]
    assert credentials.current is first
    files.write(authority.issue(name="renewed"), authority)
    assert credentials._fetch() is not None
    assert tls_module.subject_name(credentials.current.leaf) == "renewed"
    assert credentials._fetch() is None  # unchanged since


def test_a_renewal_a_clock_skew_ahead_is_taken(files: SecretFiles, authority: Authority
                                              ) -> None:
    files.write(authority.issue(not_before=NOW + datetime.timedelta(minutes=2)), authority)
    load(files)


def test_a_refused_renewal_is_tried_again_until_it_is_valid(
        files: SecretFiles, authority: Authority, caplog: pytest.LogCaptureFixture) -> None:
    """A renewal not valid yet on this clock (beyond the leeway) is refused, then read
    again every RETRY_REFUSED_SECONDS while its files stay as they are: once valid it
    is taken, without the files changing again."""
    wall, monotonic = [NOW], [0.0]
    credentials = tls_module.ServerCredentials(
        ServerTlsFiles(str(files.cert), str(files.key)), clock=lambda: wall[0],
        monotonic=lambda: monotonic[0])
    files.write(authority.issue(name="early", not_before=NOW + datetime.timedelta(hours=1)),
                authority)
    with caplog.at_level(logging.ERROR, logger="percept.tls"):
        assert credentials._fetch() is None
        wall[0] += datetime.timedelta(hours=2)
        monotonic[0] += tls_module.RETRY_REFUSED_SECONDS / 2
        assert credentials._fetch() is None  # not read again yet
        monotonic[0] += tls_module.RETRY_REFUSED_SECONDS
        assert credentials._fetch() is not None
    assert tls_module.subject_name(credentials.current.leaf) == "early"
    assert len([r for r in caplog.records if "cannot be used" in r.getMessage()]) == 1


def test_a_refresh_between_handshakes_still_reaches_grpc(
        files: SecretFiles, authority: Authority) -> None:
    """The server's periodic refresh reads new files first: the next handshake's fetch
    must still hand them to gRPC."""
    credentials = tls_module.ServerCredentials(ServerTlsFiles(str(files.cert),
                                                              str(files.key)))
    files.write(authority.issue(name="renewed"), authority)
    credentials.refresh()
    assert tls_module.subject_name(credentials.current.leaf) == "renewed"
    assert credentials._fetch() is not None
    assert credentials._fetch() is None


def test_a_renewing_channel_after_close_or_off_its_loop_makes_no_channel(
        tmp_path: Path, authority: Authority) -> None:
    mine = secret(tmp_path / "client", authority, name="search")
    tls = verifying(mine.ca, cert=str(mine.cert), key=str(mine.key))

    async def make() -> RenewingChannel:
        return RenewingChannel("localhost:1", [], tls, EMBED_FLAGS, check_seconds=0.0)

    loop = asyncio.new_event_loop()
    try:
        channels = loop.run_until_complete(make())
        first = channels.channel
        mine.write(authority.issue(name="search"), authority)
        with pytest.raises(RuntimeError):  # no running loop: nothing is swapped
            channels.current()
        assert (channels.channel, channels.generation) == (first, 1)

        async def close_then_look() -> grpc.aio.Channel:
            await channels.close()
            return channels.current()

        assert loop.run_until_complete(close_then_look()) is first
        assert channels.generation == 1
    finally:
        loop.close()


def test_without_a_target_a_tls_server_on_the_default_port_is_found_and_named(
        files: SecretFiles, small_photo: np.ndarray, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """With no --target, a server on serve all's port that refuses this client's TLS
    settings is there: the command says what to change, not "nothing answers"."""
    from services.common import config

    monkeypatch.delenv("PERCEPT_TARGET", raising=False)
    for name in config.SERVICE_PORTS:
        monkeypatch.setitem(config.SERVICE_PORTS, name, free_port())
    # every interface, as `percept serve all` binds by default: "localhost" has no
    # address where nothing listens (whose refusal would be gRPC's last error)
    running = start_tls_server(files, host="0.0.0.0", port=config.SERVICE_PORTS["all"])
    try:
        assert main(["health"]) == 1
        assert "if the server speaks TLS, pass --tls-ca" in capsys.readouterr().err
        image = tmp_path / "in.png"
        image.write_bytes(encode(small_photo[:16, :16]))
        assert main(["upscale", str(image), str(tmp_path / "out.png")]) == 1
        error = capsys.readouterr().err
        assert "nothing answers" not in error and "pass --tls-ca" in error
        assert main(["upscale", str(image), str(tmp_path / "out.png"),
                     "--tls-ca", str(files.ca)]) == 0
    finally:
        running.stop()


def test_a_copy_over_the_files_in_place_is_seen_whatever_their_stat_says(
        files: SecretFiles, authority: Authority) -> None:
    """cp over the old files, within one tick of the file system's clock and at the same
    sizes: the contents changed, so the new pair is taken."""
    renewed = authority.issue(name="renewed")
    for path, data in ((files.cert, renewed.cert_pem), (files.key, renewed.key_pem)):
        # the same size for sure: PEM readers skip the newlines after the block
        path.write_bytes(path.read_bytes().ljust(4096, b"\n"))
        assert len(data) < 4096
    credentials = tls_module.ServerCredentials(ServerTlsFiles(str(files.cert),
                                                              str(files.key)))
    times = {path: os.stat(path) for path in (files.cert, files.key)}
    files.cert.write_bytes(renewed.cert_pem.ljust(4096, b"\n"))
    files.key.write_bytes(renewed.key_pem.ljust(4096, b"\n"))
    for path, before in times.items():
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
            before.st_size, before.st_mtime_ns, before.st_ino)  # stat sees no change
    assert credentials._fetch() is not None
    assert tls_module.subject_name(credentials.current.leaf) == "renewed"


@pytest.mark.parametrize("key", ["p384", "rsa"])
def test_the_other_key_types_grpc_takes_serve_mutual_tls(tmp_path: Path, key: str) -> None:
    """RSA and ECDSA P-384 pairs pass the checks and do serve (a real handshake)."""
    authority = Authority(key=key)
    files = secret(tmp_path / "server", authority)
    client_files = secret(tmp_path / "client", authority, name="client")
    running = start_tls_server(files, mutual=True)
    try:
        assert check(open_channel(f"localhost:{running.port}", [], verifying(
            files.ca, cert=str(client_files.cert), key=str(client_files.key)))) == "SERVING"
    finally:
        running.stop()
