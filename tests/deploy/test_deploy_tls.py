"""The optional mutual-TLS component (deploy/k8s/components/tls), rendered in
overlays/gpu-tls: every server serves TLS from the mounted Secret, its probes moved to the
plaintext health port and nothing else changed; the policies catch a probe left on the
TLS port, an undeclared health port, a TLS file off the Secret volume, and a search that
does not speak embed's TLS; deploy/README.md's certificate recipe makes a certificate
that works for it."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import subprocess
from collections import Counter
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import render
from deploy.dockerfile import parse as parse_dockerfile
from deploy.pipeline import Report, validate_targets
from deploy.policy import SERVICES, Bundle, Peer, check_by_name
from deploy.policy.model import (
    EMBED_TLS_ENV,
    HEALTH_PORT,
    MONITORING_NAMESPACE,
    SERVER_TLS_ENV,
    app_name,
    effective_env,
    named_ports,
    pod_labels,
    pod_template,
    server_container,
)
from deploy.policy.network import CLIENT_LABEL, ingress_allowed
from tests.deploy.edits import Mutation, broken, failures, pod, server, set_env

COMPONENT = render.K8S_DIR / "components" / "tls"
OVERLAY = render.K8S_DIR / "overlays" / "gpu-tls"
TARGET = next(t for t in render.TARGETS if t.name == "overlays/gpu-tls")
DEPLOY_README = render.REPO_ROOT / "deploy" / "README.md"
TLS_DIR = "/etc/percept/tls"
SECRET = "percept-tls"
SECRET_KEYS = {"tls.crt", "tls.key", "ca.crt"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")



@pytest.fixture(scope="module")
def tls(bundles: dict[str, Bundle]) -> Bundle:
    """overlays/gpu with components/tls."""
    return bundles[TARGET.name]












def drop_env(raw: dict[str, Any], name: str) -> None:
    server(raw)["env"] = [v for v in server(raw)["env"] if v["name"] != name]


def tls_mount(raw: dict[str, Any]) -> dict[str, Any]:
    return next(m for m in server(raw)["volumeMounts"] if m["name"] == "tls")


def tls_volume(raw: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in pod(raw)["volumes"] if v["name"] == "tls")


def health_port(raw: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in server(raw)["ports"] if p["name"] == "health")


def as_empty_dir(volume: dict[str, Any]) -> None:
    volume.pop("secret")
    volume["emptyDir"] = {}


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def _overlay(tmp_path: Path, name: str, body: str) -> Path:
    """A kustomization in tmp_path/name; `{k8s}` in body is deploy/k8s, relative to it."""
    folder = tmp_path / name
    folder.mkdir()
    k8s = os.path.relpath(render.K8S_DIR, folder)
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        + body.replace("{k8s}", k8s)
    )
    return folder


# The component and the overlay ----------------------------------------------------------


def test_the_component_is_a_kustomize_component_the_overlay_adds() -> None:
    k = yaml.safe_load((COMPONENT / "kustomization.yaml").read_text())
    assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    assert "resources" not in k  # it renders nothing of its own: the Secret is made outside
    files = {p["path"] for p in k["patches"]}
    others = {p.name for p in COMPONENT.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert others == files
    overlay = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../gpu"]
    assert overlay["components"] == ["../../components/tls"]
    assert "images" not in overlay  # overlays/gpu's images: step 2 retargets them there
    assert TARGET.kind == "app" and TARGET.accelerator == "gpu"


def test_the_overlay_renders_the_gpu_stack_and_passes(report: Report, gpu: Bundle,
                                                      tls: Bundle) -> None:
    t = next(t for t in report.targets if t.target.name == TARGET.name)
    assert t.failures == []
    assert Counter(r.kind for r in tls.resources) == Counter(r.kind for r in gpu.resources)
    assert not tls.of_kind("Secret")  # made by cert-manager or kubectl, never rendered
    # the Services and NetworkPolicies are the gpu overlay's: nothing opened, nothing added
    for kind in ("Service", "NetworkPolicy", "HorizontalPodAutoscaler", "PodDisruptionBudget"):
        assert [r.raw for r in tls.of_kind(kind)] == [r.raw for r in gpu.of_kind(kind)], kind


def test_every_server_serves_mutual_tls_from_the_secret(tls: Bundle) -> None:
    servers = [(w, server_container(w)) for w in tls.workloads]
    assert sorted(app_name(w) for w, _ in servers) == sorted(SERVICES)
    for w, c in servers:
        env = effective_env(tls, c)
        assert env["PERCEPT_TLS_CERT"] == f"{TLS_DIR}/tls.crt", w.ref
        assert env["PERCEPT_TLS_KEY"] == f"{TLS_DIR}/tls.key", w.ref
        assert env["PERCEPT_TLS_CLIENT_CA"] == f"{TLS_DIR}/ca.crt", w.ref
        # the same in every server: from the percept-server ConfigMap, like the other
        # common flags; the health port beside PERCEPT_PORT in the container's own env
        own = {v.name: v.value for v in c.env}
        assert not set(SERVER_TLS_ENV) & set(own), w.ref
        assert own["PERCEPT_HEALTH_PORT"] == str(HEALTH_PORT), w.ref
        (mount,) = [m for m in c.volume_mounts if m.mount_path == TLS_DIR]
        assert mount.read_only and not mount.sub_path, w.ref
        volume = next(v for v in pod_template(w).spec.volumes if v.name == mount.name)
        assert volume.secret.secret_name == SECRET, w.ref
        assert {i.key for i in volume.secret.items} == SECRET_KEYS, w.ref
        assert all(i.key == i.path for i in volume.secret.items), w.ref
        assert volume.secret.default_mode == 0o440, w.ref
        assert pod_template(w).spec.security_context.fs_group == 10001, w.ref  # group-read
    search = server_container(tls.get("StatefulSet", "search"))
    env = effective_env(tls, search)
    assert {k: env[k] for k in EMBED_TLS_ENV} == {
        "PERCEPT_EMBED_TLS_CA": f"{TLS_DIR}/ca.crt",
        "PERCEPT_EMBED_TLS_CERT": f"{TLS_DIR}/tls.crt",
        "PERCEPT_EMBED_TLS_KEY": f"{TLS_DIR}/tls.key",
    }
    for w in tls.workloads:
        if app_name(w) != "search":
            assert not set(EMBED_TLS_ENV) & set(effective_env(tls, server_container(w)))


def test_probes_moved_to_the_health_port_and_nothing_else_changed(gpu: Bundle,
                                                                  tls: Bundle) -> None:
    for w in tls.workloads:
        before = gpu.get(w.kind, w.name)
        assert before is not None
        new, old = server(w.raw), server(before.raw)
        ports = named_ports(server_container(w))
        assert ports == {**named_ports(server_container(before)), "health": HEALTH_PORT}
        assert HEALTH_PORT not in (SERVICES[app_name(w)].grpc_port,
                                   SERVICES[app_name(w)].metrics_port)
        for probe in PROBES:
            assert new[probe]["grpc"]["port"] == HEALTH_PORT, (w.ref, probe)
            moved = copy.deepcopy(old[probe])
            moved["grpc"]["port"] = HEALTH_PORT
            assert new[probe] == moved, (w.ref, probe)  # service names, periods, thresholds
        # /metrics stays plaintext and where it was
        ann = pod_template(w).metadata.annotations
        assert ann == pod_template(before).metadata.annotations
        assert ports["metrics"] == SERVICES[app_name(w)].metrics_port
        # everything else in the pod is the gpu overlay's
        assert _rest(w.raw) == _rest(before.raw), w.ref
        added = {v["name"]: v for v in pod(w.raw)["volumes"]}
        assert added.pop("tls") and list(added.values()) == pod(before.raw)["volumes"]
        envs = [v for v in new["env"] if v["name"] not in (*EMBED_TLS_ENV, "PERCEPT_HEALTH_PORT")]
        assert envs == old["env"], w.ref


def _rest(raw: dict[str, Any]) -> dict[str, Any]:
    """A pod spec without what the component changes (probes, ports, env, the ConfigMap
    reference whose hash changes, the Secret's mount and volume)."""
    spec = copy.deepcopy(pod(raw))
    c = spec["containers"][0]
    for key in (*PROBES, "ports", "env", "envFrom", "volumeMounts"):
        c.pop(key, None)
    spec.pop("volumes")
    return spec


def test_the_health_port_is_reachable_by_no_pod_or_namespace(tls: Bundle) -> None:
    """No NetworkPolicy rule for the plaintext port: the kubelet probes from the node,
    which NetworkPolicy always admits; clients, insiders and monitoring stay out."""
    policies = tls.of_kind("NetworkPolicy")
    peers = [
        Peer("apps", namespace_label_pairs=CLIENT_LABEL),
        Peer("apps"),
        Peer(MONITORING_NAMESPACE),
        *(Peer("percept", tuple(sorted(pod_labels(w).items()))) for w in tls.workloads),
    ]
    for w in tls.workloads:
        ports = named_ports(server_container(w))
        for peer in peers:
            assert not ingress_allowed(policies, "percept", pod_labels(w), ports,
                                       ports["health"], peer), (w.ref, peer)
    search = pod_labels(tls.get("StatefulSet", "search"))
    embed = tls.get("Deployment", "embed")
    ports = named_ports(server_container(embed))
    assert ingress_allowed(policies, "percept", pod_labels(embed), ports, ports["grpc"],
                           Peer("percept", tuple(sorted(search.items()))))


def test_the_component_works_on_the_cpu_overlay_too(tmp_path: Path) -> None:
    """Its ConfigMap merge and patches also fit overlays/cpu (which merges the same
    ConfigMap itself): rendered through the whole validation."""
    folder = _overlay(tmp_path, "cpu-tls",
                      "resources:\n  - {k8s}/overlays/cpu\n"
                      "components:\n  - {k8s}/components/tls\n")
    report = validate_targets((render.Target("tmp/cpu-tls", folder, "cpu"),))
    assert report.ok, "\n".join(report.failures)
    (t,) = report.targets
    assert t.bundle is not None
    for w in t.bundle.workloads:
        env = effective_env(t.bundle, server_container(w))
        assert env["PERCEPT_TLS_CERT"] == f"{TLS_DIR}/tls.crt"
        assert env["PERCEPT_DEVICE"] == "cpu"  # overlays/cpu's own merge kept
        assert server(w.raw)["livenessProbe"]["grpc"]["port"] == HEALTH_PORT


def test_an_overlay_that_moves_a_probe_back_fails_validation(tmp_path: Path) -> None:
    """End to end: a patch on overlays/gpu-tls that points readiness at the TLS port
    renders and validates, and the probes policy names it."""
    folder = _overlay(tmp_path, "probe-back",
                      "resources:\n  - {k8s}/overlays/gpu-tls\n"
                      "patches:\n"
                      "  - target: {kind: Deployment, name: superres}\n"
                      "    patch: |-\n"
                      "      - op: replace\n"
                      "        path: /spec/template/spec/containers/0/readinessProbe/grpc/port\n"
                      "        value: 50051\n")
    report = validate_targets((render.Target("tmp/probe-back", folder, "gpu"),))
    assert not report.ok
    assert any(
        "[tmp/probe-back] probes: Deployment/superres container server: readinessProbe "
        "probes the grpc port 50051, which serves TLS" in f for f in report.failures
    ), report.failures


# The policies can fail ------------------------------------------------------------------

# (id, kind, name, mutation, check, expected text in one failure)
CASES: list[tuple[str, str, str, Mutation, str, str]] = [
    (
        "probe-on-the-tls-port",
        "Deployment",
        "embed",
        lambda r: server(r)["livenessProbe"]["grpc"].update(port=50053),
        "probes",
        "livenessProbe probes the grpc port 50053, which serves TLS",
    ),
    (
        "probe-on-another-port",
        "StatefulSet",
        "search",
        lambda r: server(r)["startupProbe"]["grpc"].update(port=9104),
        "probes",
        "startupProbe probes port 9104, not the health port (50060)",
    ),
    (
        "tls-without-health-port",
        "Deployment",
        "style",
        lambda r: drop_env(r, "PERCEPT_HEALTH_PORT"),
        "probes",
        "serves TLS (PERCEPT_TLS_CERT) but PERCEPT_HEALTH_PORT is None",
    ),
    (
        "health-port-off",
        "Deployment",
        "style",
        lambda r: set_env(r, "PERCEPT_HEALTH_PORT", "0"),
        "ports",
        "declares the container port health (50060) but PERCEPT_HEALTH_PORT is '0'",
    ),
    (
        "health-port-undeclared",
        "Deployment",
        "superres",
        lambda r: server(r).update(ports=[p for p in server(r)["ports"]
                                          if p["name"] != "health"]),
        "ports",
        "PERCEPT_HEALTH_PORT is 50060 but the container port named health is None",
    ),
    (
        "health-port-is-the-metrics-port",
        "Deployment",
        "superres",
        lambda r: (set_env(r, "PERCEPT_HEALTH_PORT", "9101"),
                   health_port(r).update(containerPort=9101)),
        "ports",
        "PERCEPT_HEALTH_PORT 9101 is also its grpc or metrics port",
    ),
    (
        "secret-mounted-with-subpath",
        "Deployment",
        "embed",
        lambda r: tls_mount(r).update(subPath="tls.crt"),
        "references",
        "is mounted with a subPath, which never sees a rotated Secret",
    ),
    (
        "secret-mounted-writable",
        "Deployment",
        "style",
        lambda r: tls_mount(r).pop("readOnly"),
        "references",
        "volume tls is not mounted read-only",
    ),
    (
        "secret-without-the-ca",
        "StatefulSet",
        "search",
        lambda r: tls_volume(r)["secret"].update(items=[
            i for i in tls_volume(r)["secret"]["items"] if i["key"] != "ca.crt"]),
        "references",
        "PERCEPT_TLS_CLIENT_CA=/etc/percept/tls/ca.crt: volume tls (Secret percept-tls) holds "
        "tls.crt, tls.key, not ca.crt",
    ),
    (
        "secret-optional",
        "Deployment",
        "superres",
        lambda r: tls_volume(r)["secret"].update(optional=True),
        "references",
        "is optional: a missing Secret would start the server without its TLS files",
    ),
    (
        "tls-files-on-an-empty-dir",
        "Deployment",
        "superres",
        lambda r: as_empty_dir(tls_volume(r)),
        "references",
        "PERCEPT_TLS_CERT=/etc/percept/tls/tls.crt lies on volume tls, which is not a Secret",
    ),
    (
        "tls-files-on-no-volume",
        "Deployment",
        "embed",
        lambda r: server(r).update(volumeMounts=[m for m in server(r)["volumeMounts"]
                                                 if m["name"] != "tls"]),
        "references",
        "PERCEPT_TLS_KEY=/etc/percept/tls/tls.key lies on no volume mount",
    ),
    (
        "certificate-without-key",
        "Deployment",
        "embed",
        lambda r: set_env(r, "PERCEPT_TLS_KEY", ""),
        "config",
        "PERCEPT_TLS_CERT is set without PERCEPT_TLS_KEY",
    ),
    (
        "one-server-left-plaintext",
        "Deployment",
        "style",
        lambda r: (set_env(r, "PERCEPT_TLS_CERT", ""), set_env(r, "PERCEPT_TLS_KEY", ""),
                   set_env(r, "PERCEPT_TLS_CLIENT_CA", "")),
        "config",
        "serve TLS but Deployment/style do not",
    ),
    (
        "search-trusts-no-ca-for-embed",
        "StatefulSet",
        "search",
        lambda r: drop_env(r, "PERCEPT_EMBED_TLS_CA"),
        "search-statefulset",
        "embed serves TLS but PERCEPT_EMBED_TLS_CA is unset",
    ),
    (
        "search-without-a-client-certificate",
        "StatefulSet",
        "search",
        lambda r: (drop_env(r, "PERCEPT_EMBED_TLS_CERT"), drop_env(r, "PERCEPT_EMBED_TLS_KEY")),
        "search-statefulset",
        "embed requires client certificates (PERCEPT_TLS_CLIENT_CA) but "
        "PERCEPT_EMBED_TLS_CERT is unset",
    ),
    (
        "search-client-certificate-without-key",
        "StatefulSet",
        "search",
        lambda r: drop_env(r, "PERCEPT_EMBED_TLS_KEY"),
        "config",
        "PERCEPT_EMBED_TLS_CERT is set without PERCEPT_EMBED_TLS_KEY",
    ),
    (
        # in the ConfigMap, every server would get them: superres has no embed target
        "embed-tls-on-a-model-server",
        "Deployment",
        "superres",
        lambda r: set_env(r, "PERCEPT_EMBED_TLS_CA", f"{TLS_DIR}/ca.crt"),
        "config",
        "PERCEPT_EMBED_TLS_CA set without PERCEPT_EMBED_TARGET (only search calls embed)",
    ),
    (
        "health-port-opened-to-clients",
        "NetworkPolicy",
        "allow-clients-grpc",
        lambda r: r["spec"]["ingress"][0].pop("ports"),
        "network-policy",
        "a client namespace (percept.io/client=true) -> superres:health (50060) is allowed",
    ),
    (
        "health-port-opened-to-the-namespace",
        "NetworkPolicy",
        "allow-monitoring-metrics",
        lambda r: r["spec"]["ingress"].append({"ports": [{"port": "health"}]}),
        "network-policy",
        "an unlabelled namespace -> embed:health (50060) is allowed",
    ),
]


@pytest.mark.parametrize(
    ("kind", "name", "mutate", "check", "expected"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_check_fails_on_broken_tls(
    tls: Bundle, kind: str, name: str, mutate: Mutation, check: str, expected: str
) -> None:
    assert failures(check, tls) == [], "the unbroken bundle must pass first"
    found = failures(check, broken(tls, kind, name, mutate))
    assert found, f"{check} did not notice"
    assert any(expected in f for f in found), found


def test_the_tls_checks_leave_plaintext_alone(gpu: Bundle) -> None:
    """Without TLS the probes stay on the grpc port (or a health port, if one is on), and
    search must not dial a plaintext embed with TLS."""
    assert failures("probes", gpu) == []
    found = failures("probes", broken(gpu, "Deployment", "superres",
                                      lambda r: server(r)["livenessProbe"]["grpc"].update(
                                          port=HEALTH_PORT)))
    assert any("livenessProbe probes port 50060, not grpc (50051)" in f for f in found), found

    def health_on(raw: dict[str, Any]) -> None:
        set_env(raw, "PERCEPT_HEALTH_PORT", str(HEALTH_PORT))
        server(raw)["ports"].append({"name": "health", "containerPort": HEALTH_PORT})
        server(raw)["livenessProbe"]["grpc"]["port"] = HEALTH_PORT

    plain_health = broken(gpu, "Deployment", "superres", health_on)
    for check in ("probes", "ports", "config"):
        assert failures(check, plain_health) == [], check
    found = failures("search-statefulset", broken(
        gpu, "StatefulSet", "search",
        lambda r: set_env(r, "PERCEPT_EMBED_TLS_CA", f"{TLS_DIR}/ca.crt")))
    assert any("sets PERCEPT_EMBED_TLS_CA but embed serves plaintext" in f for f in found), found
    found = failures("config", broken(
        gpu, "Deployment", "embed",
        lambda r: set_env(r, "PERCEPT_TLS_CLIENT_CA", f"{TLS_DIR}/ca.crt")))
    assert any("PERCEPT_TLS_CLIENT_CA (mutual TLS) is set but PERCEPT_TLS_CERT is not" in f
               for f in found), found


def test_authorization_rules_need_client_certificates(tls: Bundle, gpu: Bundle) -> None:
    def rules(raw: dict[str, Any]) -> None:
        set_env(raw, "PERCEPT_TLS_AUTHORIZE", "percept.v1.ImageSearch/AddImages=indexer")

    assert failures("config", broken(tls, "StatefulSet", "search", rules)) == []
    found = failures("config", broken(gpu, "StatefulSet", "search", rules))
    assert any("PERCEPT_TLS_AUTHORIZE is set without PERCEPT_TLS_CLIENT_CA" in f
               for f in found), found


def test_the_image_must_expose_the_health_port(tls: Bundle, gpu: Bundle) -> None:
    text = render.DOCKERFILE.read_text()
    assert f" {HEALTH_PORT}\n" in text
    without = parse_dockerfile(text.replace(f" {HEALTH_PORT}\n", "\n", 1))
    check = check_by_name("image-contract").func
    assert check(dataclasses.replace(gpu, dockerfile=without)) == []
    found = check(dataclasses.replace(tls, dockerfile=without))
    assert any(f"port health {HEALTH_PORT} is not EXPOSEd" in f for f in found), found


def test_a_projected_secret_volume_passes_and_is_checked(tls: Bundle) -> None:
    """The same Secret through a projected volume (a cluster's own variant) is a Secret
    volume too; its items are checked the same way."""

    def projected(keys: set[str]) -> Mutation:
        def mutate(raw: dict[str, Any]) -> None:
            vol = tls_volume(raw)
            vol.pop("secret")
            vol["projected"] = {"sources": [{"secret": {
                "name": SECRET, "items": [{"key": k, "path": k} for k in sorted(keys)]}}]}
        return mutate

    ok = broken(tls, "Deployment", "embed", projected(SECRET_KEYS))
    assert failures("references", ok) == []
    found = failures("references", broken(tls, "Deployment", "embed",
                                          projected(SECRET_KEYS - {"tls.key"})))
    assert any("(projected Secret percept-tls) holds ca.crt, tls.crt, not tls.key" in f
               for f in found), found


# The docs -------------------------------------------------------------------------------


def _tls_section() -> str:
    return _section(DEPLOY_README.read_text(), "## 10. Mutual TLS")


def _blocks(text: str, language: str = "") -> list[str]:
    """The fenced code blocks of a Markdown text whose info string is `language`."""
    blocks: list[str] = []
    current: list[str] | None = None
    info = ""
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if current is None and stripped.startswith("```"):
            current, info = [], stripped[3:].strip()
        elif current is not None and stripped == "```":
            if info == language:
                blocks.append("".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def _dialled_names(bundle: Bundle) -> set[str]:
    """The names clients dial: each Service in the namespace, short and qualified, and
    the host of search's PERCEPT_EMBED_TARGET."""
    names = set()
    for svc in bundle.of_kind("Service"):
        names |= {svc.name, f"{svc.name}.percept", f"{svc.name}.percept.svc",
                  f"{svc.name}.percept.svc.cluster.local"}
    env = effective_env(bundle, server_container(bundle.get("StatefulSet", "search")))
    target = env["PERCEPT_EMBED_TARGET"]
    names.add(target.removeprefix("dns:///").rsplit(":", 1)[0])
    return names


def test_the_docs_say_how_to_enable_and_connect() -> None:
    section = " ".join(_tls_section().split())
    assert "components: [../../components/tls]" in section
    assert "kubectl apply -k deploy/k8s/overlays/gpu-tls" in section
    for text in ("--tls-ca ca.crt", "--tls-client-cert client.crt",
                 "--tls-client-key client.key", "--tls-server-name", "PERCEPT_TLS_CA",
                 "PERCEPT_TLS_CLIENT_CERT", "PERCEPT_TLS_CLIENT_KEY",
                 "PERCEPT_TLS_SERVER_NAME", "grpc.ssl_channel_credentials",
                 "grpc.secure_channel", "plaintext", "serverAuth", "clientAuth",
                 "no restart", "subPath"):
        assert text in section, text
    (python,) = _blocks(_tls_section(), "python")
    compile(python, "deploy/README.md", "exec")
    for arg in ("root_certificates=", "private_key=", "certificate_chain="):
        assert arg in python


def test_the_documented_certificate_covers_every_dialled_name(tls: Bundle) -> None:
    """The cert-manager example: the Secret the component mounts, both usages, and a SAN
    for every name a client or search dials (search: the short name `embed`)."""
    docs = [d for block in _blocks(_tls_section(), "yaml")
            for d in yaml.safe_load_all(block) if d and d.get("kind") == "Certificate"]
    (cert,) = [d for d in docs if d["metadata"]["name"] == SECRET]
    spec = cert["spec"]
    assert cert["metadata"]["namespace"] == "percept"
    assert spec["secretName"] == SECRET
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert set(spec["dnsNames"]) == _dialled_names(tls)
    assert "embed" in spec["dnsNames"]
    issuer = spec["issuerRef"]["name"]
    assert any(d["metadata"]["name"] == issuer for block in _blocks(_tls_section(), "yaml")
               for d in yaml.safe_load_all(block) if d and d.get("kind") == "ClusterIssuer")


def _recipe() -> str:
    (block,) = [b for b in _blocks(_tls_section()) if "openssl x509 -req" in b]
    return block


def test_the_documented_secret_has_the_keys_the_component_mounts(tls: Bundle) -> None:
    recipe = " ".join(_recipe().replace("\\\n", " ").split())
    command = re.search(r"kubectl -n percept create secret generic (\S+) (.*)$", recipe)
    assert command is not None and command.group(1) == SECRET
    keys = set(re.findall(r"--from-file=(\S+)", command.group(2)))
    assert keys == SECRET_KEYS
    for w in tls.workloads:
        volume = next(v for v in pod_template(w).spec.volumes if v.name == "tls")
        assert {i.key for i in volume.secret.items} == keys


def test_the_documented_openssl_recipe_makes_certificates_that_work(
    tmp_path: Path, tls: Bundle
) -> None:
    """Run the README's recipe (kubectl stubbed), then: the certificate names every dialled
    name with both EKUs; a gRPC server on it that requires client certificates from ca.crt
    (what the servers do with PERCEPT_TLS_CLIENT_CA) accepts search's client (the same
    certificate, dialling `embed`) and a client with client.crt, and refuses a client
    without a certificate."""
    import grpc
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from services.common.tls import ServerTlsFiles

    assert shutil.which("openssl"), "make setup installs openssl (scripts/setup.sh)"

    script = "kubectl() { printf '%s\\n' \"$*\" > kubectl.args; }\nset -euo pipefail\n"
    proc = subprocess.run(["bash", "-c", script + _recipe()], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "create secret generic percept-tls" in (tmp_path / "kubectl.args").read_text()
    read = {name: (tmp_path / name).read_bytes()
            for name in ("ca.crt", "tls.crt", "tls.key", "client.crt", "client.key")}
    cert = x509.load_pem_x509_certificate(read["tls.crt"])
    sans = set(cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    assert sans == _dialled_names(tls)
    ekus = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= ekus
    # the checks `percept serve` makes of its files at start accept them
    ServerTlsFiles(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"),
                   str(tmp_path / "ca.crt")).load(cert.not_valid_before_utc)

    server_ = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server_)
    credentials = grpc.ssl_server_credentials([(read["tls.key"], read["tls.crt"])],
                                              root_certificates=read["ca.crt"],
                                              require_client_auth=True)
    port = server_.add_secure_port("127.0.0.1:0", credentials)
    server_.start()
    try:
        def check(name: str, cert: str | None, key: str | None) -> Any:
            creds = grpc.ssl_channel_credentials(
                root_certificates=read["ca.crt"],
                private_key=read[key] if key else None,
                certificate_chain=read[cert] if cert else None)
            with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[
                    ("grpc.ssl_target_name_override", name)]) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                try:
                    return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
                except grpc.RpcError as exc:
                    return exc.code()

        serving = health_pb2.HealthCheckResponse.SERVING
        assert check("embed", "tls.crt", "tls.key") == serving  # search -> embed
        assert check("superres.percept.svc.cluster.local", "client.crt", "client.key") == (
            serving)
        assert check("embed", None, None) == grpc.StatusCode.UNAVAILABLE  # no certificate
        assert check("elsewhere", "client.crt", "client.key") == grpc.StatusCode.UNAVAILABLE
    finally:
        server_.stop(None)
