"""--tls-authorize: which verified clients may call which methods, on a real mutual-TLS
server (the super-resolution service) over loopback, each client with its own
certificate of the cluster's CA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from percept.v1 import server_pb2, server_pb2_grpc, superres_pb2, superres_pb2_grpc
from services.cli import main
from services.common.authorization import parse_rules
from services.common.channels import open_channel
from services.common.server import RunningServer, start_in_thread
from services.common.tls import ClientTls
from tests.conftest import encode, server_config
from tests.fixtures.certificates import Authority, SecretFiles, secret

RULES = ("percept.v1.SuperResolution/Upscale=operator,*.indexers.example;"
         "grpc.reflection.v1alpha.ServerReflection/*=operator")


@pytest.fixture(scope="module")
def authority() -> Authority:
    return Authority()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, authority: Authority
           ) -> Iterator[tuple[RunningServer, SecretFiles]]:
    files = secret(tmp_path_factory.mktemp("authz") / "server", authority)
    running = start_in_thread(server_config(
        "superres", warmup=False, tls_cert=str(files.cert), tls_key=str(files.key),
        tls_client_ca=str(files.ca), tls_authorize=RULES))
    yield running, files
    running.stop()


def channel_of(server: tuple[RunningServer, SecretFiles], tmp_path: Path,
               authority: Authority, name: str, dns: tuple[str, ...] = ()) -> grpc.Channel:
    """A channel with a client certificate of ``authority`` named ``name`` (and ``dns``)."""
    running, files = server
    mine = secret(tmp_path / name, authority, name=name, dns=dns, ips=())
    return open_channel(f"localhost:{running.port}", [], ClientTls.of(
        ca=str(files.ca), cert=str(mine.cert), key=str(mine.key)))


def upscale(channel: grpc.Channel, photo: np.ndarray) -> superres_pb2.UpscaleResponse:
    return superres_pb2_grpc.SuperResolutionStub(channel).Upscale(
        superres_pb2.UpscaleRequest(image=encode(photo[:16, :16])), timeout=60)


def refusal(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in status.details)
    assert info.reason == "CLIENT_NOT_AUTHORIZED"
    return caught.value


def test_a_client_the_rules_name_is_served(server: tuple[RunningServer, SecretFiles],
                                           tmp_path: Path, authority: Authority,
                                           small_photo: np.ndarray) -> None:
    with channel_of(server, tmp_path, authority, "operator") as channel:
        assert upscale(channel, small_photo).width == 64
    # a subjectAltName DNS name that the rule's pattern matches
    with channel_of(server, tmp_path, authority, "box-17",
                    dns=("box-17.indexers.example",)) as channel:
        assert upscale(channel, small_photo).width == 64


def test_another_client_of_the_ca_is_refused_with_its_names(
        server: tuple[RunningServer, SecretFiles], tmp_path: Path, authority: Authority,
        small_photo: np.ndarray) -> None:
    with channel_of(server, tmp_path, authority, "search",
                    dns=("search.percept.svc",)) as channel:
        error = refusal(lambda: upscale(channel, small_photo))
        assert error.details() == (
            "the client certificate of search, search.percept.svc may not call "
            "percept.v1.SuperResolution/Upscale (the server's --tls-authorize)")
        assert dict(error.trailing_metadata() or ()).get("x-request-id")
        # methods no rule names stay open to every client of the CA
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        info = server_pb2_grpc.ServerInfoStub(channel).GetServerInfo(
            server_pb2.GetServerInfoRequest(), timeout=10)
        assert info.services


def test_a_streaming_method_is_guarded_too(server: tuple[RunningServer, SecretFiles],
                                           tmp_path: Path, authority: Authority) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    def reflect(channel: grpc.Channel) -> list[str]:
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([request]), timeout=10)
        return [s.name for a in answers for s in a.list_services_response.service]

    with channel_of(server, tmp_path, authority, "operator") as channel:
        assert "percept.v1.SuperResolution" in reflect(channel)
    with channel_of(server, tmp_path, authority, "search") as channel:
        refusal(lambda: reflect(channel))


@pytest.mark.parametrize(("rules", "message"), [
    ("percept.v1.ImageSearch/AddImages", "is not METHOD=NAME"),
    ("percept.v1.ImageSearch/AddImages=", "is not METHOD=NAME"),
    ("AddImages=indexer", "names no method: write SERVICE/METHOD"),
])
def test_rules_that_cannot_be_read_are_refused(rules: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rules(rules)


def test_rules_parse_and_the_first_match_decides() -> None:
    from services.common.authorization import Authorization

    rules = parse_rules(" /percept.v1.ImageSearch/Delete*=admin ; "
                        "percept.v1.ImageSearch/*=indexer, admin ;")
    authorization = Authorization(rules)
    rule = authorization.rule_for("/percept.v1.ImageSearch/DeleteImages")
    assert rule is not None and rule.names == ("admin",)
    rule = authorization.rule_for("/percept.v1.ImageSearch/AddImages")
    assert rule is not None and rule.allows(["indexer"]) and not rule.allows(["search"])
    assert authorization.rule_for("/percept.v1.Embedding/EmbedText") is None


def test_serve_refuses_rules_without_client_certificates_or_that_do_not_parse(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, authority: Authority) -> None:
    files = secret(tmp_path / "s", authority)
    tls = ["--tls-cert", str(files.cert), "--tls-key", str(files.key)]
    assert main(["serve", "superres", *tls, "--tls-authorize", RULES]) == 2
    assert "--tls-authorize needs --tls-client-ca" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["serve", "superres", *tls, "--tls-client-ca", str(files.ca),
              "--tls-authorize", "Upscale=operator"])
    assert exited.value.code == 2
    assert "names no method" in capsys.readouterr().err


def test_uri_email_and_ip_names_are_not_names_the_rules_match(
        server: tuple[RunningServer, SecretFiles], tmp_path: Path, authority: Authority,
        small_photo: np.ndarray) -> None:
    """A CA's policy governs DNS names: a URI, e-mail or IP name that reads "operator" is
    no grant (gRPC's auth context lists them all among the subjectAltNames)."""
    running, files = server
    mine = secret(tmp_path / "sly", authority, name="", dns=("sly.example",),
                  ips=("10.0.0.1",), uris=("operator",), emails=("operator",))
    with open_channel(f"localhost:{running.port}", [], ClientTls.of(
            ca=str(files.ca), cert=str(mine.cert), key=str(mine.key))) as channel:
        error = refusal(lambda: upscale(channel, small_photo))
    assert error.details().startswith("the client certificate of sly.example may not call")


def test_a_refusal_names_three_of_many_names(
        server: tuple[RunningServer, SecretFiles], tmp_path: Path, authority: Authority,
        small_photo: np.ndarray) -> None:
    dns = tuple(f"host-{n}.example" for n in range(120))
    with channel_of(server, tmp_path, authority, "many", dns=dns) as channel:
        error = refusal(lambda: upscale(channel, small_photo))
    assert error.details().startswith(
        "the client certificate of many, host-0.example, host-1.example and 118 more may "
        "not call percept.v1.SuperResolution/Upscale")


def test_rules_that_match_nothing_or_never_decide_are_named() -> None:
    from services.common.authorization import Authorization, served_methods

    served = served_methods(["percept.v1.ImageSearch", "grpc.health.v1.Health"])
    assert "percept.v1.ImageSearch/AddImages" in served
    assert "grpc.health.v1.Health/Watch" in served
    rules = Authorization(parse_rules(
        "percept.v1.ImageSearch/*=reader;"
        "percept.v1.ImageSearch/AddImages=indexer;"  # hidden by the first
        "percept.v1.ImageSearch/addimages=indexer;"  # case
        "grpc.health.v1.Health/Check=probe"))
    assert rules.problems(served) == [
        "rule 2 (percept.v1.ImageSearch/AddImages) never decides: earlier rules match all "
        "of its methods first",
        "rule 3 (percept.v1.ImageSearch/addimages) matches no method this server serves "
        "(names are case sensitive)"]


def test_a_server_warns_of_a_rule_that_matches_nothing(
        tmp_path: Path, authority: Authority, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    files = secret(tmp_path / "server", authority)
    with caplog.at_level(logging.WARNING, logger="percept.server"):
        running = start_in_thread(server_config(
            "superres", warmup=False, tls_cert=str(files.cert), tls_key=str(files.key),
            tls_client_ca=str(files.ca),
            tls_authorize="percept.v1.SuperResolution/upscale=operator"))
        running.stop()
    assert any("rule 1 (percept.v1.SuperResolution/upscale) matches no method" in
               r.getMessage() for r in caplog.records)
