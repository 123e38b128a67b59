"""The rendered manifests meet every deployment policy, and the policies say what the
project documents (ports, flags, drain)."""

from __future__ import annotations

import argparse

import pytest

from deploy import render
from deploy.pipeline import Report
from deploy.policy import (
    CHECKS,
    SERVER_FLAGS,
    SERVICES,
    Bundle,
    Peer,
    app_name,
    architecture_flags,
    architecture_ports,
    disruptions_allowed,
    effective_env,
    ingress_allowed,
    named_ports,
    pod_labels,
    pod_template,
    pre_stop_seconds,
    server_container,
    startup_budget,
)


@pytest.mark.parametrize("check", [c.name for c in CHECKS])
@pytest.mark.parametrize("target", [t.name for t in render.TARGETS])
def test_policy_holds(report: Report, target: str, check: str) -> None:
    t = next(t for t in report.targets if t.target.name == target)
    result = next(r for r in t.results if r.check == check)
    assert result.failures == [], "\n".join(result.failures)


def test_every_check_has_a_summary() -> None:
    names = [c.name for c in CHECKS]
    assert len(names) == len(set(names))
    for c in CHECKS:
        assert len(c.summary) > 30, c.name


def test_ports_are_the_documented_ones() -> None:
    documented = architecture_ports(render.ARCHITECTURE_DOC)
    assert documented.pop("all") == (50050, 9100)
    assert documented == {n: (s.grpc_port, s.metrics_port) for n, s in SERVICES.items()}


def test_known_flags_match_the_server() -> None:
    """SERVER_FLAGS (what the config check accepts) is what `percept serve` parses."""
    documented = architecture_flags(render.ARCHITECTURE_DOC)
    assert documented <= set(SERVER_FLAGS)
    try:
        from services.common.config import add_server_arguments
    except ImportError:
        pytest.skip("services.common.config is not importable here")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    flags = {
        opt[2:]
        for action in parser._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }
    assert flags == set(SERVER_FLAGS)


def _gpu_limits(bundle: Bundle) -> dict[str, str | None]:
    out = {}
    for w in bundle.workloads:
        c = pod_template(w).spec.containers[0]
        out[app_name(w)] = (c.resources.limits or {}).get("nvidia.com/gpu")
    return out


def test_gpu_limits_only_on_model_services_of_the_gpu_overlay(gpu: Bundle, cpu: Bundle) -> None:
    assert _gpu_limits(gpu) == {"superres": "1", "style": "1", "embed": "1", "search": None}
    assert _gpu_limits(cpu) == {"superres": None, "style": None, "embed": None, "search": None}
    for w in cpu.workloads:
        spec = pod_template(w).spec
        assert not spec.node_selector and not spec.tolerations, w.ref


def test_training_job_uses_one_gpu_and_the_models_pvc(job: Bundle, cluster: Bundle) -> None:
    (j,) = job.of_kind("Job")
    spec = pod_template(j).spec
    assert spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    claims = [
        v.persistent_volume_claim.claim_name for v in spec.volumes if v.persistent_volume_claim
    ]
    assert claims == ["percept-models"]
    assert cluster.get("PersistentVolumeClaim", "percept-models") is not None
    assert job.get("PersistentVolumeClaim", "percept-models", companions=True) is not None
    assert spec.containers[0].command[:3] == ["percept", "train", "superres"]


@pytest.mark.parametrize("target", ["overlays/gpu", "overlays/cpu"])
def test_drain_fits_the_grace_period(bundles: dict[str, Bundle], target: str) -> None:
    bundle = bundles[target]
    for w in bundle.workloads:
        c = server_container(w)
        if c is None:
            continue
        drain = float(effective_env(bundle, c)["PERCEPT_DRAIN_SECONDS"])
        pre_stop = pre_stop_seconds(c)
        assert pre_stop is not None and pre_stop > 0
        grace = pod_template(w).spec.termination_grace_period_seconds
        assert grace >= pre_stop + drain + 5, w.ref


def test_probes_ask_grpc_health_for_the_right_names(gpu: Bundle) -> None:
    for w in gpu.workloads:
        c = server_container(w)
        spec = SERVICES[app_name(w)]
        assert c.readiness_probe.grpc.service == spec.health_service
        assert (c.liveness_probe.grpc.service or "") == ""
        assert c.startup_probe.grpc.port == spec.grpc_port == named_ports(c)["grpc"]


def test_search_is_a_single_writer_statefulset(gpu: Bundle) -> None:
    sts = gpu.get("StatefulSet", "search")
    assert sts is not None and sts.model.spec.replicas == 1
    env = effective_env(gpu, server_container(sts))
    # the short name: resolved in the pod's own namespace and cluster domain
    assert env["PERCEPT_EMBED_TARGET"] == "dns:///embed:50053"
    assert pod_template(sts).spec.dns_policy in (None, "ClusterFirst")
    mounts = {m.mount_path: m.name for m in server_container(sts).volume_mounts}
    vct = [t.metadata.name for t in sts.model.spec.volume_claim_templates]
    assert mounts[env["PERCEPT_DATA_DIR"]] in vct
    pdb = gpu.get("PodDisruptionBudget", "search")
    assert pdb is not None and disruptions_allowed(pdb.model, 1) == 0
    assert not [
        h
        for h in gpu.of_kind("HorizontalPodAutoscaler")
        if h.model.spec.scale_target_ref.name == "search"
    ]


def test_hpa_and_pdb_targets_exist(gpu: Bundle) -> None:
    for hpa in gpu.of_kind("HorizontalPodAutoscaler"):
        ref = hpa.model.spec.scale_target_ref
        assert gpu.get(ref.kind, ref.name) is not None
    assert {h.name for h in gpu.of_kind("HorizontalPodAutoscaler")} == {
        "superres",
        "style",
        "embed",
    }
    assert {p.name for p in gpu.of_kind("PodDisruptionBudget")} == set(SERVICES)


def test_disruptions_allowed_arithmetic(gpu: Bundle) -> None:
    pdb = gpu.get("PodDisruptionBudget", "superres")
    assert pdb is not None
    model = pdb.model.model_copy(deep=True)
    assert disruptions_allowed(model, 2) == 1
    model.spec.max_unavailable = "50%"
    assert disruptions_allowed(model, 3) == 2
    model.spec.max_unavailable = None
    model.spec.min_available = 2
    assert disruptions_allowed(model, 2) == 0
    assert disruptions_allowed(model, 5) == 3


def test_network_reachability(gpu: Bundle) -> None:
    policies = gpu.of_kind("NetworkPolicy")
    pods = {app_name(w): w for w in gpu.workloads}

    def allowed(src: Peer, dest: str, port_name: str) -> bool:
        w = pods[dest]
        ports = named_ports(server_container(w))
        return ingress_allowed(policies, "percept", pod_labels(w), ports, ports[port_name], src)

    def insider(name: str) -> Peer:
        return Peer("percept", tuple(sorted(pod_labels(pods[name]).items())))

    label = (("percept.io/client", "true"),)
    clients = Peer("apps", namespace_label_pairs=label)
    strangers = Peer("apps")
    monitoring = Peer("monitoring")
    assert allowed(insider("search"), "embed", "grpc")
    assert not allowed(insider("search"), "embed", "metrics")
    assert not allowed(insider("superres"), "embed", "grpc")
    assert not allowed(insider("embed"), "search", "grpc")
    # labelling percept itself as a client opens nothing inside it
    labelled_insider = Peer("percept", insider("superres").pod_labels, "", label)
    assert not allowed(labelled_insider, "search", "grpc")
    for name in SERVICES:
        assert allowed(clients, name, "grpc")
        assert not allowed(clients, name, "metrics")
        assert not allowed(strangers, name, "grpc")  # opt-in: no label, no access
        assert allowed(monitoring, name, "metrics")
        assert not allowed(monitoring, name, "grpc")
    # A pod outside percept with search's labels is just another client: grpc only.
    search_labels = insider("search").pod_labels
    assert not allowed(Peer("apps", search_labels, "", label), "embed", "metrics")
    assert not allowed(Peer("apps", search_labels), "embed", "grpc")


def test_rollout_deadline_covers_a_pod_replacement(gpu: Bundle) -> None:
    """progressDeadlineSeconds >= grace + startup budget + 600 s of image pull, with the
    numbers the manifests have: 600 s of startup, 45 s (330 s for style) of grace."""
    for d in gpu.of_kind("Deployment"):
        spec = pod_template(d).spec
        startup = startup_budget(spec.containers[0])
        assert startup == 600, d.ref
        grace = spec.termination_grace_period_seconds
        assert d.model.spec.progress_deadline_seconds == 1800 >= startup + grace + 600, d.ref


def test_search_cannot_see_or_reach_gpus(gpu: Bundle) -> None:
    sts = gpu.get("StatefulSet", "search")
    assert sts is not None
    env = effective_env(gpu, server_container(sts))
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
    node = pod_template(sts).spec.affinity.node_affinity
    terms = node.required_during_scheduling_ignored_during_execution.node_selector_terms
    assert [(e.key, e.operator, e.values) for t in terms for e in t.match_expressions] == [
        ("nvidia.com/gpu.present", "NotIn", ["true"])
    ]
