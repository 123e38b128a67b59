"""Policies across objects: Services, autoscaling, disruption budgets, the search
StatefulSet and the namespace."""

from __future__ import annotations

import math
from typing import Any

from deploy.objects import Resource
from deploy.policy.model import (
    EMBED_TLS_ENV,
    SERVICES,
    Bundle,
    all_containers,
    app_name,
    effective_env,
    gpu_count,
    located,
    pod_labels,
    pod_template,
    selector_is_empty,
    selector_matches,
    server_container,
    serves_tls,
    serving_workloads,
)


def _selected_workloads(bundle: Bundle, selector: Any) -> list[Resource]:
    return [w for w in bundle.workloads if selector_matches(selector, pod_labels(w))]


def check_services(bundle: Bundle) -> list[str]:
    """Services are headless (gRPC is balanced per request on the client, not per
    connection by kube-proxy), select exactly one workload, and every port's targetPort
    names a container port of those pods with the same number (clients dial pod IPs);
    gRPC ports declare appProtocol grpc; every server has a Service; a StatefulSet's
    serviceName is a headless Service that selects it."""
    failures = []
    services = bundle.of_kind("Service")
    for svc in services:
        spec = svc.model.spec
        if spec.cluster_ip != "None":
            failures.append(f"{svc.ref}: not headless (clusterIP: {spec.cluster_ip!r})")
        selector = dict(spec.selector or {})
        if not selector:
            failures.append(f"{svc.ref}: no selector")
            continue
        selected = _selected_workloads(bundle, {"match_labels": selector})
        if len(selected) != 1:
            names = ", ".join(w.ref for w in selected) or "nothing"
            failures.append(f"{svc.ref}: selects {names}; want exactly one workload")
            continue
        workload = selected[0]
        containers = pod_template(workload).spec.containers or []
        for port in spec.ports or []:
            target = port.target_port if port.target_port is not None else port.port
            matches = [
                (c, p)
                for c in containers
                for p in c.ports or []
                if (isinstance(target, str) and p.name == target)
                or (not isinstance(target, str) and p.container_port == int(target))
            ]
            if not matches:
                failures.append(
                    f"{svc.ref}: port {port.name} targets {target!r}, which no container of "
                    f"{workload.ref} declares"
                )
                continue
            _container, p = matches[0]
            if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
                failures.append(f"{svc.ref}: port {port.name} targets a number; name the port")
            if p.container_port != port.port:
                failures.append(
                    f"{svc.ref}: port {port.name} is {port.port} but {workload.ref} listens on "
                    f"{p.container_port} (a headless Service's clients dial the pod port)"
                )
            if (port.protocol or "TCP") != (p.protocol or "TCP"):
                failures.append(
                    f"{svc.ref}: port {port.name} protocol differs from the container's"
                )
            if port.name == "grpc" and port.app_protocol != "grpc":
                failures.append(f"{svc.ref}: port grpc has appProtocol {port.app_protocol!r}")
    for res, _c in serving_workloads(bundle):
        labels = pod_labels(res)
        if not any(
            s.model.spec.selector
            and selector_matches({"match_labels": s.model.spec.selector}, labels)
            for s in services
        ):
            failures.append(f"{res.ref}: no Service selects its pods")
    for sts in bundle.of_kind("StatefulSet"):
        governing = bundle.get("Service", sts.model.spec.service_name or "")
        if governing is None:
            failures.append(
                f"{sts.ref}: serviceName {sts.model.spec.service_name!r} does not exist"
            )
        elif governing.model.spec.cluster_ip != "None" or not selector_matches(
            {"match_labels": governing.model.spec.selector or {}}, pod_labels(sts)
        ):
            failures.append(
                f"{sts.ref}: serviceName {governing.name} is not a headless Service for it"
            )
    return failures


def check_autoscaling(bundle: Bundle) -> list[str]:
    """Every GPU model Deployment has one autoscaling/v2 HPA whose target exists, leaves
    `replicas` to the HPA, requests the resource it scales on, and keeps min <= max (at
    least 2 replicas on GPU nodes); the single-writer search is never autoscaled."""
    failures = []
    hpas = bundle.of_kind("HorizontalPodAutoscaler")
    targeted: dict[str, int] = {}
    for hpa in hpas:
        if hpa.raw.get("apiVersion") != "autoscaling/v2":
            failures.append(
                f"{hpa.ref}: apiVersion {hpa.raw.get('apiVersion')}, want autoscaling/v2"
            )
        spec = hpa.model.spec
        ref = spec.scale_target_ref
        target = bundle.get(ref.kind, ref.name)
        if target is None:
            failures.append(f"{hpa.ref}: target {ref.kind}/{ref.name} does not exist")
            continue
        targeted[target.ref] = targeted.get(target.ref, 0) + 1
        if app_name(target) == "search" or target.kind == "StatefulSet":
            failures.append(f"{hpa.ref}: scales {target.ref}, a single writer")
        low = spec.min_replicas if spec.min_replicas is not None else 1
        if low < 1 or low > spec.max_replicas:
            failures.append(f"{hpa.ref}: minReplicas {low} / maxReplicas {spec.max_replicas}")
        if bundle.accelerator == "gpu" and low < 2:
            failures.append(f"{hpa.ref}: minReplicas {low} < 2 (a drain or update would stop it)")
        if target.model.spec.replicas is not None:
            failures.append(
                f"{target.ref}: sets replicas ({target.model.spec.replicas}) although "
                f"{hpa.ref} owns the count"
            )
        if not spec.metrics:
            failures.append(f"{hpa.ref}: no metrics")
        for metric in spec.metrics or []:
            if metric.type == "Resource":
                resource = metric.resource.name
                for c in pod_template(target).spec.containers or []:
                    requests = (c.resources.requests if c.resources else None) or {}
                    if resource not in requests:
                        failures.append(
                            f"{hpa.ref}: scales on {resource} but {located(target, c)} "
                            f"requests no {resource}"
                        )
    for res in bundle.of_kind("Deployment"):
        spec = SERVICES.get(app_name(res))
        if spec is not None and spec.gpu and targeted.get(res.ref, 0) != 1:
            failures.append(f"{res.ref}: has {targeted.get(res.ref, 0)} HPAs, want 1")
    return failures


def disruptions_allowed(pdb: Any, replicas: int) -> int:
    """How many of `replicas` healthy pods a PodDisruptionBudget lets an eviction take."""

    def amount(value: Any, round_up: bool) -> int:
        if isinstance(value, str) and value.endswith("%"):
            fraction = int(value[:-1]) * replicas / 100
            return math.ceil(fraction) if round_up else math.floor(fraction)
        return int(value)

    spec = pdb.spec
    if spec.max_unavailable is not None:
        return min(replicas, amount(spec.max_unavailable, True))
    if spec.min_available is not None:
        return max(0, replicas - amount(spec.min_available, True))
    return replicas


def check_disruption_budgets(bundle: Bundle) -> list[str]:
    """Each Deployment and StatefulSet has exactly one PDB, each PDB selects one workload;
    autoscaled model servers stay drainable (>= 1 eviction allowed at minReplicas, and one
    pod left when there are two); the single-writer search allows no voluntary eviction."""
    failures = []
    pdbs = bundle.of_kind("PodDisruptionBudget")
    covered: dict[str, list[Resource]] = {}
    for pdb in pdbs:
        selector = pdb.model.spec.selector
        if selector_is_empty(selector):
            failures.append(f"{pdb.ref}: empty selector")
            continue
        selected = _selected_workloads(bundle, selector)
        if len(selected) != 1:
            names = ", ".join(w.ref for w in selected) or "nothing"
            failures.append(f"{pdb.ref}: selects {names}; want exactly one workload")
            continue
        covered.setdefault(selected[0].ref, []).append(pdb)
    hpa_min = {}
    for hpa in bundle.of_kind("HorizontalPodAutoscaler"):
        ref = hpa.model.spec.scale_target_ref
        hpa_min[f"{ref.kind}/{ref.name}"] = hpa.model.spec.min_replicas or 1
    for res in bundle.of_kind("Deployment", "StatefulSet"):
        budgets = covered.get(res.ref, [])
        if len(budgets) != 1:
            failures.append(f"{res.ref}: has {len(budgets)} PodDisruptionBudgets, want 1")
            continue
        pdb = budgets[0]
        if res.kind == "StatefulSet":
            replicas = res.model.spec.replicas if res.model.spec.replicas is not None else 1
            if disruptions_allowed(pdb.model, replicas) != 0:
                failures.append(
                    f"{pdb.ref}: lets an eviction take the single writer {res.ref} "
                    "(want maxUnavailable: 0 or minAvailable >= replicas)"
                )
            continue
        replicas = hpa_min.get(res.ref)
        if replicas is None:
            replicas = res.model.spec.replicas if res.model.spec.replicas is not None else 1
        allowed = disruptions_allowed(pdb.model, replicas)
        if allowed < 1:
            failures.append(
                f"{pdb.ref}: blocks every eviction at {replicas} replicas (drains hang)"
            )
        if replicas >= 2 and replicas - allowed < 1:
            failures.append(f"{pdb.ref}: lets a drain evict all {replicas} replicas")
    return failures


def check_search_statefulset(bundle: Bundle) -> list[str]:
    """search is one StatefulSet with exactly 1 replica (single writer), a ReadWriteOnce
    volumeClaimTemplate mounted at its PERCEPT_DATA_DIR and retained on delete, no GPU,
    and PERCEPT_EMBED_TARGET = dns:///embed:<embed grpc>: the headless embed Service by
    its short name, which the pod's DNS search path (dnsPolicy ClusterFirst) resolves in
    its own namespace and cluster domain, whatever they are. Its channel to embed speaks
    what embed serves: with embed on TLS, PERCEPT_EMBED_TLS_CA (and, where embed requires
    client certificates, PERCEPT_EMBED_TLS_CERT and _KEY); with embed on plaintext, none
    of them."""
    failures = []
    found = [w for w in bundle.workloads if app_name(w) == "search"]
    if len(found) != 1 or found[0].kind != "StatefulSet":
        return [f"search must be exactly one StatefulSet, found {[w.ref for w in found]}"]
    sts = found[0]
    spec = sts.model.spec
    if spec.replicas != 1:
        failures.append(f"{sts.ref}: replicas is {spec.replicas}, want exactly 1 (single writer)")
    if spec.update_strategy is not None and spec.update_strategy.type not in (
        None,
        "RollingUpdate",
    ):
        failures.append(f"{sts.ref}: updateStrategy {spec.update_strategy.type}")
    retention = spec.persistent_volume_claim_retention_policy
    if retention is not None and "Delete" in (retention.when_deleted, retention.when_scaled):
        failures.append(f"{sts.ref}: deletes the index PVC (persistentVolumeClaimRetentionPolicy)")
    templates = {t.metadata.name: t for t in spec.volume_claim_templates or []}
    if not templates:
        failures.append(f"{sts.ref}: no volumeClaimTemplates")
    c = server_container(sts)
    if c is None:
        return [*failures, f"{sts.ref}: no gRPC container"]
    env = effective_env(bundle, c)
    data_dir = env.get("PERCEPT_DATA_DIR")
    mounts = {m.mount_path.rstrip("/"): m for m in c.volume_mounts or []}
    if not data_dir:
        failures.append(f"{sts.ref}: PERCEPT_DATA_DIR is not set")
    else:
        mount = mounts.get(data_dir.rstrip("/"))
        if mount is None or mount.name not in templates:
            failures.append(
                f"{sts.ref}: PERCEPT_DATA_DIR {data_dir} is not a volumeClaimTemplate mount"
            )
        elif mount.read_only:
            failures.append(f"{sts.ref}: the index volume is mounted read-only")
        else:
            modes = templates[mount.name].spec.access_modes or []
            if "ReadWriteOnce" not in modes and "ReadWriteOncePod" not in modes:
                failures.append(f"{sts.ref}: index volume access modes {modes}")
    embed = SERVICES["embed"]
    want = f"dns:///embed:{embed.grpc_port}"
    got = env.get("PERCEPT_EMBED_TARGET")
    if got != want:
        why = (
            " (a namespace or cluster domain in the name breaks when an overlay or the "
            "cluster changes them)"
            if got and got.startswith("dns:///embed.")
            else ""
        )
        failures.append(f"{sts.ref}: PERCEPT_EMBED_TARGET is {got!r}, want {want!r}{why}")
    dns_policy = pod_template(sts).spec.dns_policy
    if dns_policy not in (None, "ClusterFirst", "ClusterFirstWithHostNet"):
        failures.append(
            f"{sts.ref}: dnsPolicy {dns_policy}: the short name embed resolves through the "
            "cluster DNS search path (ClusterFirst)"
        )
    svc = bundle.get("Service", "embed")
    if svc is None or svc.model.spec.cluster_ip != "None":
        failures.append("the embed Service is missing or not headless (search resolves its pods)")
    elif not any(
        p.port == embed.grpc_port and p.name == "grpc" for p in svc.model.spec.ports or []
    ):
        failures.append(f"{svc.ref}: no grpc port {embed.grpc_port}")
    for cont in all_containers(pod_template(sts).spec):
        if gpu_count(cont, "limits") or gpu_count(cont, "requests"):
            failures.append(f"{located(sts, cont)}: search asks for a GPU")
    failures += _embed_channel_tls(bundle, sts, env)
    return failures


def _embed_channel_tls(bundle: Bundle, sts: Resource, env: dict[str, str]) -> list[str]:
    """search's PERCEPT_EMBED_TLS_* against what the embed servers serve."""
    embeds = [c for w, c in serving_workloads(bundle) if app_name(w) == "embed"]
    if not embeds:
        return []  # no embed in this render: nothing to match
    embed_env = effective_env(bundle, embeds[0])
    set_here = [name for name in EMBED_TLS_ENV if env.get(name)]
    failures = []
    if not serves_tls(embed_env):
        if set_here:
            failures.append(
                f"{sts.ref}: sets {', '.join(set_here)} but embed serves plaintext: the TLS "
                "handshake with it would fail"
            )
        return failures
    if not env.get("PERCEPT_EMBED_TLS_CA"):
        failures.append(
            f"{sts.ref}: embed serves TLS but PERCEPT_EMBED_TLS_CA is unset: search would "
            "dial it in plaintext, or trust only the system's CAs"
        )
    if embed_env.get("PERCEPT_TLS_CLIENT_CA"):
        for name in ("PERCEPT_EMBED_TLS_CERT", "PERCEPT_EMBED_TLS_KEY"):
            if not env.get(name):
                failures.append(
                    f"{sts.ref}: embed requires client certificates (PERCEPT_TLS_CLIENT_CA) "
                    f"but {name} is unset"
                )
    return failures


def check_namespace(bundle: Bundle) -> list[str]:
    """Every namespaced object lives in `percept`; the cluster target (deploy/k8s/cluster,
    applied once before the overlays) creates that Namespace with the Pod Security
    "restricted" level enforced."""
    failures = []
    for res in bundle.resources:
        if res.kind == "Namespace":
            continue
        if res.namespace != bundle.namespace:
            failures.append(f"{res.ref}: namespace {res.namespace!r}, want {bundle.namespace!r}")
    if bundle.kind == "cluster":
        ns = bundle.get("Namespace", bundle.namespace)
        if ns is None:
            failures.append(f"no Namespace {bundle.namespace}")
        else:
            labels = dict(ns.model.metadata.labels or {})
            if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
                failures.append(f"{ns.ref}: Pod Security 'restricted' is not enforced")
    return failures


def check_teardown(bundle: Bundle) -> list[str]:
    """`kubectl delete -k` of an overlay or a job template deletes no data: they render no
    Namespace (deleting it deletes every claim in it) and no PersistentVolumeClaim (both
    live in deploy/k8s/cluster, applied once), and a StatefulSet keeps its
    volumeClaimTemplates' claims when it is deleted or scaled down
    (persistentVolumeClaimRetentionPolicy Retain). The cluster target runs no pods."""
    failures = []
    if bundle.kind == "cluster":
        for res in bundle.workloads:
            failures.append(f"{res.ref}: the cluster target runs no pods (put it in an overlay)")
    else:
        for res in bundle.of_kind("Namespace", "PersistentVolumeClaim"):
            what = (
                "the namespace and every claim in it"
                if res.kind == "Namespace"
                else "the claim (and its volume, under a Delete reclaim policy)"
            )
            failures.append(
                f"{res.ref}: rendered by {bundle.target}, so `kubectl delete -k` of it deletes "
                f"{what}; it belongs in deploy/k8s/cluster"
            )
    for sts in bundle.of_kind("StatefulSet"):
        retention = sts.model.spec.persistent_volume_claim_retention_policy
        if retention is not None and "Delete" in (retention.when_deleted, retention.when_scaled):
            failures.append(
                f"{sts.ref}: persistentVolumeClaimRetentionPolicy deletes its claims "
                f"(whenDeleted {retention.when_deleted}, whenScaled {retention.when_scaled})"
            )
    return failures
