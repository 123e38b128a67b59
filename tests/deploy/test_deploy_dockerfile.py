"""The Dockerfile parser, and the image against the manifests and the project."""

from __future__ import annotations

import re

import pytest

from deploy import render
from deploy.dockerfile import Dockerfile, DockerfileError, parse, parse_env, parse_expose
from deploy.policy import (
    ALL_IN_ONE,
    SERVICES,
    UID,
    Bundle,
    architecture_ports,
    named_ports,
    pod_template,
)
from deploy.policy.model import HEALTH_PORT


def test_parser_joins_continuations_and_drops_comments() -> None:
    d = parse(
        "# syntax=docker/dockerfile:1\n"
        "ARG BASE=python:3.11.14-slim\n"
        "FROM ${BASE} AS one\n"
        "RUN apt-get update \\\n"
        "# a comment inside the continuation\n"
        "    && apt-get install -y curl \\\n"
        "\n"
        "    && true\n"
        "FROM one\n"
        'CMD ["a", "b"]\n'
    )
    assert d.global_args == {"BASE": "python:3.11.14-slim"}
    first, second = d.stages
    assert (first.name, first.base, second.name, second.base) == ("one", "${BASE}", None, "one")
    run = first.last("RUN")
    assert run is not None
    assert run.value == "apt-get update && apt-get install -y curl && true"
    assert run.line == 4
    assert d.base_image(first) == "python:3.11.14-slim"
    assert d.base_image(first, {"BASE": "debian:13.1"}) == "debian:13.1"
    assert [s.index for s in d.chain(second)] == [1, 0]
    cmd = d.effective("CMD")
    assert cmd is not None and cmd.exec_form == ["a", "b"]


def test_parser_escape_directive() -> None:
    d = parse("# escape=`\nFROM scratch\nRUN a `\n  b\n")
    assert d.escape == "`"
    run = d.final.last("RUN")
    assert run is not None and run.value == "a b"


def test_shell_form_is_not_exec_form() -> None:
    d = parse("FROM scratch\nENTRYPOINT percept serve\n")
    entry = d.effective("ENTRYPOINT")
    assert entry is not None and entry.exec_form is None


def test_default_substitution_and_inheritance() -> None:
    d = parse(
        "ARG VARIANT\n"
        'FROM debian:13.1 AS base-cpu\nENV A=1 B="two words"\nEXPOSE 80\n'
        "FROM base-${VARIANT:-cpu}\nENV A=3\nUSER 10001\n"
    )
    assert d.env() == {"A": "3", "B": "two words"}
    assert d.exposed_ports() == {80}
    user = d.effective("USER")
    assert user is not None and user.value == "10001"


def test_env_and_expose_forms() -> None:
    assert parse_env("KEY some value") == {"KEY": "some value"}
    assert parse_env('A=1 B="x y" C=') == {"A": "1", "B": "x y", "C": ""}
    assert parse_expose("50051 9100-9102/tcp 53/udp") == {50051, 9100, 9101, 9102}
    with pytest.raises(DockerfileError):
        parse_expose("http")


@pytest.mark.parametrize(
    "text",
    [
        "RUN echo before from\n",
        "",
        "FROM\n",
        "FROM a b c d\n",
        "FROM scratch\nRUN <<EOF\necho\nEOF\n",
    ],
)
def test_parser_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(DockerfileError):
        parse(text)


def test_image_entrypoint_is_percept_serve(dockerfile: Dockerfile) -> None:
    entry, cmd = dockerfile.effective("ENTRYPOINT"), dockerfile.effective("CMD")
    assert entry is not None and entry.exec_form == ["percept", "serve"]
    assert cmd is not None and cmd.exec_form == ["all"]


def test_image_exposes_exactly_the_documented_ports(dockerfile: Dockerfile) -> None:
    """The gRPC and metrics ports of docs/architecture.md, and the plaintext health port
    that components/tls turns on (PERCEPT_HEALTH_PORT)."""
    documented = architecture_ports(render.ARCHITECTURE_DOC)
    want = {p for pair in documented.values() for p in pair} | {HEALTH_PORT}
    assert dockerfile.exposed_ports() == want
    for variant in ("gpu", "cpu"):
        assert dockerfile.exposed_ports(overrides={"VARIANT": variant}) == want


def test_manifest_ports_are_exposed_by_the_image(
    dockerfile: Dockerfile, bundles: dict[str, Bundle]
) -> None:
    exposed = dockerfile.exposed_ports()
    for bundle in bundles.values():
        for w in bundle.workloads:
            for c in pod_template(w).spec.containers:
                assert set(named_ports(c).values()) <= exposed, w.ref


def test_variants_build_on_the_right_bases(dockerfile: Dockerfile) -> None:
    gpu = dockerfile.chain(dockerfile.final, {"VARIANT": "gpu"})
    cpu = dockerfile.chain(dockerfile.final, {"VARIANT": "cpu"})
    assert dockerfile.base_image(gpu[-1], {"VARIANT": "gpu"}).startswith("nvidia/cuda:13.0.")
    assert "cudnn-runtime-ubuntu24.04" in gpu[-1].base
    assert dockerfile.base_image(cpu[-1], {"VARIANT": "cpu"}).startswith("python:3.11.")
    assert "slim" in cpu[-1].base
    assert dockerfile.global_args["VARIANT"] == "gpu"


def test_image_runs_as_the_manifests_uid(dockerfile: Dockerfile) -> None:
    user = dockerfile.effective("USER")
    assert user is not None and user.value.split(":")[0] == str(UID)


def test_healthcheck_uses_grpc_health(dockerfile: Dockerfile) -> None:
    health = dockerfile.effective("HEALTHCHECK")
    assert health is not None
    flags, rest = health.flags_and_rest()
    assert rest.startswith("CMD ")
    assert "percept health --target" in rest
    assert "start-period" in flags  # models load and warm up before SERVING
    for port in (ALL_IN_ONE.grpc_port, *(s.grpc_port for s in SERVICES.values())):
        assert str(port) in rest
    # with TLS on the gRPC ports, the check goes to the plaintext health port instead
    assert '[ "${PERCEPT_HEALTH_PORT:-0}" = 0 ] || ports="$PERCEPT_HEALTH_PORT"' in rest


def test_image_pins_the_reference_versions(dockerfile: Dockerfile) -> None:
    args = {
        i.value.split("=", 1)[0]: i.value.split("=", 1)[1]
        for s in dockerfile.stages
        for i in s.all("ARG")
        if "=" in i.value
    }
    assert args["TORCH_GPU"] == "torch==2.11.0+cu130"
    assert args["TORCH_GPU_INDEX"].endswith("/cu130")
    assert args["TORCH_CPU"] == "torch==2.13.0+cpu"
    assert args["FAISS_GPU"] == "faiss-gpu==1.15.1"
    assert args["FAISS_CPU"] == "faiss-cpu==1.15.1"
    assert args["PILLOW_SIMD_VERSION"] == "12.1.1.post0"


# Development, code-generation and build-time-only packages: not in the serving image.
_DEV_ONLY = re.compile(
    r"^(pytest.*|mypy.*|ruff|types-.*|.*-stubs|grpcio-tools|kubernetes.*|kubectl.*|pybind11"
    r"|threadpoolctl)$"
)
_VARIANT_PACKAGES = {"torch", "faiss-cpu", "faiss-gpu"}


def test_image_installs_every_runtime_requirement(dockerfile: Dockerfile) -> None:
    """Each runtime package of requirements.in is installed in the image (the dev tools
    and the variant-specific torch/faiss are left out on purpose)."""
    requirements = render.REPO_ROOT / "requirements.in"
    if not requirements.exists():
        pytest.skip("no requirements.in")
    names = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower())
    venv = dockerfile.stage("venv")
    assert venv is not None
    installed = " ".join(r.value for r in venv.all("RUN")).lower().split()
    missing = [
        n
        for n in names
        if not _DEV_ONLY.match(n) and n not in _VARIANT_PACKAGES and n not in installed
    ]
    assert not missing, f"requirements.in packages the image does not install: {missing}"


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (render.REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for path in (".venv", "data", "out", "runs", ".git", "assets", ".cache", "**/__pycache__"):
        assert path in ignored, path
    for needed in ("models", "services", "training", "protos", "requirements.txt", "README.md"):
        assert needed not in ignored, needed
