"""The policy checks can fail: each test breaks one rendered object (or the Dockerfile)
the way a careless edit would, re-types it, and asserts that the right check names the
problem."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from deploy import render
from deploy.dockerfile import parse as parse_dockerfile
from deploy.pipeline import validate_targets
from deploy.policy import Bundle, check_by_name
from tests.deploy.edits import Mutation, broken, failures, pod, server, set_env


def _del(d: dict[str, Any], *path: str) -> Mutation:
    def mutate(raw: dict[str, Any]) -> None:
        node = raw
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


# (id, target, kind, name, mutation, check, expected text in one failure)
CASES: list[tuple[str, str, str, str, Mutation, str, str]] = [
    (
        "latest-tag",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: server(r).update(image="ghcr.io/percept/percept:latest"),
        "images",
        ":latest",
    ),
    (
        "untagged",
        "overlays/gpu",
        "Deployment",
        "style",
        lambda r: server(r).update(image="ghcr.io/percept/percept"),
        "images",
        "not pinned",
    ),
    (
        "cpu-image-on-gpu",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: server(r).update(image="ghcr.io/percept/percept:0.1.0-cpu"),
        "images",
        "CPU variant",
    ),
    (
        # the gpu overlay before the placeholder: search pulled the CUDA image
        "gpu-image-on-search",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: server(r).update(image="ghcr.io/percept/percept:0.1.0-gpu"),
        "images",
        "StatefulSet/search container server: image 'ghcr.io/percept/percept:0.1.0-gpu' is "
        "not the CPU variant (-cpu) but uses no nvidia.com/gpu",
    ),
    (
        "placeholder-left-unmapped",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: server(r).update(image="percept-cpu-image"),
        "images",
        "image 'percept-cpu-image' is the base's placeholder",
    ),
    (
        # `kustomize edit set image` of the model servers' name only
        "search-on-another-release",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: server(r).update(image="registry.example.com/percept:0.1.0-cpu"),
        "images",
        "the workloads run different releases",
    ),
    (
        "job-on-the-cpu-image",
        "jobs/train-superres",
        "Job",
        "train-superres",
        lambda r: server(r).update(image="ghcr.io/percept/percept:0.1.0-cpu"),
        "images",
        "is the CPU variant on a container that uses nvidia.com/gpu",
    ),
    (
        "gpu-image-on-cpu-nodes",
        "overlays/cpu",
        "Deployment",
        "style",
        lambda r: server(r).update(image="ghcr.io/percept/percept:0.1.0-gpu"),
        "images",
        "is not the CPU variant (-cpu) on CPU nodes",
    ),
    (
        "missing-limits",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: server(r)["resources"].pop("limits"),
        "resources",
        "no memory limit",
    ),
    (
        "request-over-limit",
        "overlays/cpu",
        "StatefulSet",
        "search",
        lambda r: server(r)["resources"]["requests"].update(memory="64Gi"),
        "resources",
        "exceeds",
    ),
    (
        "no-gpu-limit",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: server(r)["resources"]["limits"].pop("nvidia.com/gpu"),
        "gpu",
        "limits.nvidia.com/gpu",
    ),
    (
        "two-gpus",
        "overlays/gpu",
        "Deployment",
        "style",
        lambda r: server(r)["resources"]["limits"].update({"nvidia.com/gpu": "2"}),
        "gpu",
        "want 1",
    ),
    (
        "no-gpu-toleration",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: pod(r).pop("tolerations"),
        "gpu",
        "toleration",
    ),
    (
        "no-gpu-node-selector",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: pod(r).pop("nodeSelector"),
        "gpu",
        "nodeSelector",
    ),
    (
        "gpu-on-search",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: server(r)["resources"]["limits"].update({"nvidia.com/gpu": "1"}),
        "gpu",
        "should not",
    ),
    (
        "gpu-in-cpu-overlay",
        "overlays/cpu",
        "Deployment",
        "superres",
        lambda r: server(r)["resources"]["limits"].update({"nvidia.com/gpu": "1"}),
        "gpu",
        "should not",
    ),
    (
        "gpu-selector-in-cpu-overlay",
        "overlays/cpu",
        "Deployment",
        "style",
        lambda r: pod(r).update(nodeSelector={"nvidia.com/gpu.present": "true"}),
        "gpu",
        "selects GPU nodes",
    ),
    (
        "cuda-device-in-cpu-overlay",
        "overlays/cpu",
        "Deployment",
        "embed",
        lambda r: set_env(r, "PERCEPT_DEVICE", "cuda"),
        "gpu",
        "PERCEPT_DEVICE=cuda",
    ),
    (
        "auto-device-on-gpu",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: set_env(r, "PERCEPT_DEVICE", "auto"),
        "gpu",
        "want 'cuda'",
    ),
    (
        "http-readiness",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: server(r).update(readinessProbe={"httpGet": {"path": "/", "port": 9101}}),
        "probes",
        "not a gRPC probe",
    ),
    (
        "no-liveness",
        "overlays/gpu",
        "Deployment",
        "style",
        lambda r: server(r).pop("livenessProbe"),
        "probes",
        "no livenessProbe",
    ),
    (
        "readiness-wrong-service",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: server(r)["readinessProbe"]["grpc"].update(service="percept.v1.SuperResolution"),
        "probes",
        "percept.v1.Embedding",
    ),
    (
        "probe-wrong-port",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: server(r)["startupProbe"]["grpc"].update(port=50053),
        "probes",
        "not grpc",
    ),
    (
        "root-user",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: (
            pod(r)["securityContext"].update(runAsUser=0),
            server(r)["securityContext"].update(runAsUser=0),
        ),
        "security",
        "runAsUser is 0",
    ),
    (
        "writable-root",
        "overlays/gpu",
        "Deployment",
        "style",
        lambda r: server(r)["securityContext"].update(readOnlyRootFilesystem=False),
        "security",
        "readOnlyRootFilesystem",
    ),
    (
        "privilege-escalation",
        "overlays/cpu",
        "StatefulSet",
        "search",
        lambda r: server(r)["securityContext"].update(allowPrivilegeEscalation=True),
        "security",
        "allowPrivilegeEscalation",
    ),
    (
        "keeps-capabilities",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: server(r)["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
        "security",
        "drop ALL",
    ),
    (
        "no-seccomp",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: (
            pod(r)["securityContext"].pop("seccompProfile"),
            server(r)["securityContext"].pop("seccompProfile"),
        ),
        "security",
        "seccomp",
    ),
    (
        "service-account-token",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: pod(r).update(automountServiceAccountToken=True),
        "security",
        "automountServiceAccountToken",
    ),
    (
        "host-path",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: pod(r)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "security",
        "hostPath",
    ),
    (
        "no-tmp-volume",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: server(r)["volumeMounts"].pop(0),
        "writable-paths",
        "/tmp",
    ),
    (
        "cache-on-root",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: set_env(r, "TORCHINDUCTOR_CACHE_DIR", "/app/.inductor"),
        "writable-paths",
        "TORCHINDUCTOR_CACHE_DIR",
    ),
    (
        "selector-mismatch",
        "overlays/gpu",
        "Deployment",
        "style",
        lambda r: r["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/name": "styles"}),
        "labels",
        "does not match",
    ),
    (
        "missing-part-of",
        "overlays/gpu",
        "Service",
        "embed",
        lambda r: r["metadata"]["labels"].pop("app.kubernetes.io/part-of"),
        "labels",
        "part-of",
    ),
    (
        "template-component-mismatch",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: r["spec"]["template"]["metadata"]["labels"].update(
            {"app.kubernetes.io/component": "index"}
        ),
        "labels",
        "on its pods",
    ),
    (
        "no-spread",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: pod(r).pop("topologySpreadConstraints"),
        "topology",
        "no topologySpread",
    ),
    (
        "spread-counts-other-pods",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: pod(r)["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"].pop(
            "app.kubernetes.io/name"
        ),
        "topology",
        "also counts",
    ),
    (
        "target-port-unknown",
        "overlays/gpu",
        "Service",
        "superres",
        lambda r: r["spec"]["ports"][0].update(targetPort="grcp"),
        "services",
        "'grcp'",
    ),
    (
        "service-port-differs",
        "overlays/gpu",
        "Service",
        "style",
        lambda r: r["spec"]["ports"][0].update(port=443),
        "services",
        "listens on 50052",
    ),
    (
        "cluster-ip-service",
        "overlays/gpu",
        "Service",
        "embed",
        lambda r: r["spec"].pop("clusterIP"),
        "services",
        "not headless",
    ),
    (
        "no-app-protocol",
        "overlays/cpu",
        "Service",
        "search",
        lambda r: r["spec"]["ports"][0].pop("appProtocol"),
        "services",
        "appProtocol",
    ),
    (
        "service-selects-nothing",
        "overlays/gpu",
        "Service",
        "superres",
        lambda r: r["spec"]["selector"].update({"app.kubernetes.io/name": "superess"}),
        "services",
        "selects nothing",
    ),
    (
        "wrong-container-port",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: server(r)["ports"][0].update(containerPort=50052),
        "ports",
        "want 50051",
    ),
    (
        "env-port-differs",
        "overlays/gpu",
        "Deployment",
        "style",
        lambda r: set_env(r, "PERCEPT_PORT", "50051"),
        "ports",
        "PERCEPT_PORT",
    ),
    (
        "entrypoint-overridden",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: server(r).update(command=["python", "-m", "services.embed"]),
        "ports",
        "entrypoint",
    ),
    (
        "wrong-args",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: server(r).update(args=["all"]),
        "ports",
        "service name",
    ),
    (
        "scrape-port",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: r["spec"]["template"]["metadata"]["annotations"].update(
            {"prometheus.io/port": "50051"}
        ),
        "ports",
        "prometheus.io/port",
    ),
    (
        "hpa-missing-target",
        "overlays/gpu",
        "HorizontalPodAutoscaler",
        "style",
        lambda r: r["spec"]["scaleTargetRef"].update(name="styles"),
        "autoscaling",
        "does not exist",
    ),
    (
        "hpa-one-replica-on-gpu",
        "overlays/gpu",
        "HorizontalPodAutoscaler",
        "embed",
        lambda r: r["spec"].update(minReplicas=1),
        "autoscaling",
        "minReplicas 1 < 2",
    ),
    (
        "replicas-fight-hpa",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: r["spec"].update(replicas=3),
        "autoscaling",
        "owns the count",
    ),
    (
        "hpa-on-search",
        "overlays/gpu",
        "HorizontalPodAutoscaler",
        "embed",
        lambda r: r["spec"].update(
            scaleTargetRef={"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "search"}
        ),
        "autoscaling",
        "single writer",
    ),
    (
        "pdb-evicts-search",
        "overlays/gpu",
        "PodDisruptionBudget",
        "search",
        lambda r: r["spec"].update(maxUnavailable=1),
        "disruption-budgets",
        "single writer",
    ),
    (
        "pdb-blocks-drain",
        "overlays/gpu",
        "PodDisruptionBudget",
        "superres",
        lambda r: (r["spec"].pop("maxUnavailable"), r["spec"].update(minAvailable=2)),
        "disruption-budgets",
        "blocks every eviction",
    ),
    (
        "pdb-missing-target",
        "overlays/gpu",
        "PodDisruptionBudget",
        "style",
        lambda r: r["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/name": "x"}),
        "disruption-budgets",
        "selects nothing",
    ),
    (
        "pdb-allows-all",
        "overlays/gpu",
        "PodDisruptionBudget",
        "embed",
        lambda r: r["spec"].update(maxUnavailable="100%"),
        "disruption-budgets",
        "evict all",
    ),
    (
        "no-default-deny",
        "overlays/gpu",
        "NetworkPolicy",
        "default-deny-ingress",
        lambda r: r["spec"].update(podSelector={"matchLabels": {"app.kubernetes.io/name": "x"}}),
        "network-policy",
        "default-deny",
    ),
    (
        "embed-open-to-namespace",
        "overlays/gpu",
        "NetworkPolicy",
        "allow-search-to-embed",
        lambda r: r["spec"]["ingress"][0]["from"][0].update(podSelector={}),
        "network-policy",
        "superres pods -> embed:grpc (50053) is allowed",
    ),
    (
        "clients-policy-covers-own-namespace",
        "overlays/gpu",
        "NetworkPolicy",
        "allow-clients-grpc",
        lambda r: r["spec"]["ingress"][0]["from"][0].update(namespaceSelector={}),
        "network-policy",
        "style pods -> superres:grpc (50051) is allowed",
    ),
    (
        "clients-reach-metrics",
        "overlays/gpu",
        "NetworkPolicy",
        "allow-clients-grpc",
        lambda r: r["spec"]["ingress"][0].pop("ports"),
        "network-policy",
        "a client namespace (percept.io/client=true) -> superres:metrics (9101) is allowed",
    ),
    (
        # the label requirement dropped: every namespace is a client again
        "clients-without-opt-in",
        "overlays/gpu",
        "NetworkPolicy",
        "allow-clients-grpc",
        lambda r: r["spec"]["ingress"][0]["from"][0]["namespaceSelector"].pop("matchLabels"),
        "network-policy",
        "an unlabelled namespace -> search:grpc (50054) is allowed",
    ),
    (
        # the label alone: labelling percept itself would open every pod to every other
        "clients-label-admits-own-namespace",
        "overlays/cpu",
        "NetworkPolicy",
        "allow-clients-grpc",
        lambda r: r["spec"]["ingress"][0]["from"][0]["namespaceSelector"].pop(
            "matchExpressions"
        ),
        "network-policy",
        "style pods (namespace labelled as a client) -> superres:grpc (50051) is allowed",
    ),
    (
        "monitoring-wrong-namespace",
        "overlays/cpu",
        "NetworkPolicy",
        "allow-monitoring-metrics",
        lambda r: r["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"].update(
            {"kubernetes.io/metadata.name": "prometheus"}
        ),
        "network-policy",
        "the monitoring namespace -> search:metrics (9104) is denied",
    ),
    (
        "short-grace",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: pod(r).update(terminationGracePeriodSeconds=20),
        "drain",
        "terminationGracePeriodSeconds 20 < preStop 10 + drain 20",
    ),
    (
        "liveness-restart-waits-the-drain-grace",
        "overlays/gpu",
        "Deployment",
        "style",
        lambda r: server(r)["livenessProbe"].pop("terminationGracePeriodSeconds"),
        "drain",
        "livenessProbe.terminationGracePeriodSeconds is None, want at most 60",
    ),
    (
        "no-pre-stop",
        "overlays/gpu",
        "Deployment",
        "style",
        lambda r: server(r).pop("lifecycle"),
        "drain",
        "no preStop",
    ),
    (
        "long-drain",
        "overlays/gpu",
        "ConfigMap",
        "percept-server",
        lambda r: r["data"].update(PERCEPT_DRAIN_SECONDS="60"),
        "drain",
        "drain 60",
    ),
    (
        "default-progress-deadline",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: r["spec"].pop("progressDeadlineSeconds"),
        "rollout-deadline",
        "progressDeadlineSeconds 600 < startup probe 600 + grace 45 + image pull 600 = 1245",
    ),
    (
        "deadline-shorter-than-style-grace",
        "overlays/gpu",
        "Deployment",
        "style",
        lambda r: r["spec"].update(progressDeadlineSeconds=1500),
        "rollout-deadline",
        "progressDeadlineSeconds 1500 < startup probe 600 + grace 330 + image pull 600",
    ),
    (
        "startup-outgrows-deadline",
        "overlays/cpu",
        "Deployment",
        "embed",
        lambda r: server(r)["startupProbe"].update(failureThreshold=250, initialDelaySeconds=30),
        "rollout-deadline",
        "startup probe 1280 + grace 45",
    ),
    (
        "typo-flag",
        "overlays/gpu",
        "ConfigMap",
        "percept-server",
        lambda r: r["data"].update(PERCEPT_MAX_BATCHES="8"),
        "config",
        "PERCEPT_MAX_BATCHES",
    ),
    (
        "missing-flag",
        "overlays/gpu",
        "ConfigMap",
        "percept-server",
        lambda r: r["data"].pop("PERCEPT_MAX_QUEUE"),
        "config",
        "PERCEPT_MAX_QUEUE is not set",
    ),
    (
        "text-logs",
        "overlays/cpu",
        "ConfigMap",
        "percept-server",
        lambda r: r["data"].update(PERCEPT_LOG_FORMAT="text"),
        "config",
        "want json",
    ),
    (
        "bad-batch",
        "overlays/gpu",
        "ConfigMap",
        "percept-server",
        lambda r: r["data"].update(PERCEPT_MAX_BATCH="0"),
        "config",
        "PERCEPT_MAX_BATCH='0'",
    ),
    (
        "hub-online",
        "overlays/gpu",
        "ConfigMap",
        "percept-runtime",
        lambda r: r["data"].pop("HF_HUB_OFFLINE"),
        "config",
        "HF_HUB_OFFLINE",
    ),
    (
        "missing-configmap",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: server(r)["envFrom"][0]["configMapRef"].update(name="percept-servers"),
        "references",
        "percept-servers does not exist",
    ),
    (
        "two-search-replicas",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: r["spec"].update(replicas=2),
        "search-statefulset",
        "want exactly 1",
    ),
    (
        "index-not-on-pvc",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: set_env(r, "PERCEPT_DATA_DIR", "/tmp/search"),
        "search-statefulset",
        "not a volumeClaimTemplate mount",
    ),
    (
        "embed-through-cluster-ip",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: set_env(r, "PERCEPT_EMBED_TARGET", "embed:50053"),
        "search-statefulset",
        "PERCEPT_EMBED_TARGET",
    ),
    (
        "embed-target-with-namespace",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: set_env(
            r, "PERCEPT_EMBED_TARGET", "dns:///embed.percept.svc.cluster.local:50053"
        ),
        "search-statefulset",
        "a namespace or cluster domain in the name breaks",
    ),
    (
        "search-without-cluster-dns",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: pod(r).update(dnsPolicy="Default"),
        "search-statefulset",
        "dnsPolicy Default",
    ),
    (
        # on the GPU variant (a kustomization mapping it to -gpu) and without void
        "search-sees-gpus",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: server(r).update(
            image="ghcr.io/percept/percept:0.1.0-gpu",
            env=[v for v in server(r)["env"] if v["name"] != "NVIDIA_VISIBLE_DEVICES"],
        ),
        "gpu-isolation",
        "NVIDIA_VISIBLE_DEVICES is 'all' (its image ghcr.io/percept/percept:0.1.0-gpu)",
    ),
    (
        "search-asks-for-all-gpus",
        "overlays/cpu",
        "StatefulSet",
        "search",
        lambda r: set_env(r, "NVIDIA_VISIBLE_DEVICES", "all"),
        "gpu-isolation",
        "NVIDIA_VISIBLE_DEVICES is 'all' (its env)",
    ),
    (
        "search-may-run-on-gpu-nodes",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: pod(r).pop("affinity"),
        "gpu-isolation",
        "may run on GPU nodes",
    ),
    (
        # node selector terms are ORed: one term that admits GPU nodes is enough
        "search-affinity-with-an-open-term",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: pod(r)["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"].append(
            {"matchExpressions": [{"key": "kubernetes.io/os", "operator": "In",
                                   "values": ["linux"]}]}
        ),
        "gpu-isolation",
        "may run on GPU nodes",
    ),
    (
        "index-claims-deleted",
        "overlays/gpu",
        "StatefulSet",
        "search",
        lambda r: r["spec"]["persistentVolumeClaimRetentionPolicy"].update(whenScaled="Delete"),
        "teardown",
        "deletes its claims",
    ),
    (
        "index-deleted-with-set",
        "overlays/cpu",
        "StatefulSet",
        "search",
        lambda r: r["spec"]["persistentVolumeClaimRetentionPolicy"].update(whenDeleted="Delete"),
        "search-statefulset",
        "deletes the index",
    ),
    (
        "wrong-namespace",
        "overlays/gpu",
        "Service",
        "style",
        lambda r: r["metadata"].update(namespace="default"),
        "namespace",
        "want 'percept'",
    ),
    (
        "pss-not-enforced",
        "cluster",
        "Namespace",
        "percept",
        lambda r: r["metadata"]["labels"].pop("pod-security.kubernetes.io/enforce"),
        "namespace",
        "restricted",
    ),
    (
        "unbounded-job",
        "jobs/train-superres",
        "Job",
        "train-superres",
        _del({}, "spec", "activeDeadlineSeconds"),
        "jobs",
        "activeDeadlineSeconds",
    ),
    (
        "job-not-training",
        "jobs/train-superres",
        "Job",
        "train-superres",
        lambda r: server(r).update(command=["sleep", "3600"]),
        "jobs",
        "percept train",
    ),
    (
        "job-without-gpu",
        "jobs/train-superres",
        "Job",
        "train-superres",
        lambda r: server(r)["resources"]["limits"].pop("nvidia.com/gpu"),
        "gpu",
        "limits.nvidia.com/gpu",
    ),
    (
        "job-pvc-missing",
        "jobs/train-superres",
        "Job",
        "train-superres",
        lambda r: pod(r)["volumes"][0]["persistentVolumeClaim"].update(claimName="models"),
        "references",
        "PVC models does not exist",
    ),
    (
        "job-on-another-release",
        "jobs/train-superres",
        "Job",
        "train-superres",
        lambda r: server(r).update(image="ghcr.io/percept/percept:0.2.0-gpu"),
        "release",
        "jobs/train-superres runs 'ghcr.io/percept/percept:0.2.0-gpu' but overlays/gpu runs "
        "'ghcr.io/percept/percept:0.1.0-gpu'",
    ),
    (
        # `kustomize edit set image` in overlays/gpu only: the Job still pulls ghcr.io
        "overlay-retargeted-alone",
        "overlays/gpu",
        "Deployment",
        "embed",
        lambda r: server(r).update(image="registry.example.com/percept:0.1.0-gpu"),
        "release",
        "but jobs/train-superres runs 'ghcr.io/percept/percept:0.1.0-gpu'",
    ),
    (
        "job-image-latest",
        "jobs/train-superres",
        "Job",
        "train-superres",
        lambda r: server(r).update(image="ghcr.io/percept/percept:latest"),
        "images",
        ":latest",
    ),
    (
        "container-port-not-exposed",
        "overlays/gpu",
        "Deployment",
        "superres",
        lambda r: server(r)["ports"].append({"name": "debug", "containerPort": 5678}),
        "image-contract",
        "5678 is not EXPOSEd",
    ),
    (
        "uid-differs-from-image",
        "overlays/gpu",
        "Deployment",
        "style",
        lambda r: (
            pod(r)["securityContext"].update(runAsUser=1000),
            server(r)["securityContext"].update(runAsUser=1000),
        ),
        "image-contract",
        "runAsUser 1000",
    ),
]


@pytest.mark.parametrize(
    ("target", "kind", "name", "mutate", "check", "expected"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_check_fails_on_broken_object(
    bundles: dict[str, Bundle],
    target: str,
    kind: str,
    name: str,
    mutate: Mutation,
    check: str,
    expected: str,
) -> None:
    bundle = bundles[target]
    assert failures(check, bundle) == [], "the unbroken bundle must pass first"
    found = failures(check, broken(bundle, kind, name, mutate))
    assert found, f"{check} did not notice"
    assert any(expected in f for f in found), found


def test_removing_an_hpa_fails(gpu: Bundle) -> None:
    bundle = dataclasses.replace(
        gpu,
        resources=[r for r in gpu.resources if r.ref != "HorizontalPodAutoscaler/style"],
    )
    assert any("Deployment/style: has 0 HPAs" in f for f in failures("autoscaling", bundle))


def test_removing_a_pdb_fails(gpu: Bundle) -> None:
    bundle = dataclasses.replace(
        gpu, resources=[r for r in gpu.resources if r.ref != "PodDisruptionBudget/search"]
    )
    found = failures("disruption-budgets", bundle)
    assert any("StatefulSet/search: has 0 PodDisruptionBudgets" in f for f in found)


def test_removing_a_service_fails(gpu: Bundle) -> None:
    bundle = dataclasses.replace(
        gpu, resources=[r for r in gpu.resources if r.ref != "Service/embed"]
    )
    assert any("no Service selects" in f for f in failures("services", bundle))
    assert any("embed Service" in f for f in failures("search-statefulset", bundle))


@pytest.mark.parametrize("kind", ["Namespace", "PersistentVolumeClaim"])
@pytest.mark.parametrize("target", ["overlays/gpu", "overlays/cpu", "jobs/train-superres"])
def test_an_overlay_or_job_that_renders_stateful_objects_fails(
    bundles: dict[str, Bundle], cluster: Bundle, target: str, kind: str
) -> None:
    """The layout before deploy/k8s/cluster: the Namespace and the models claim in the
    base, so `kubectl delete -k deploy/k8s/overlays/gpu` deleted them (and, with the
    namespace, the search index's claims)."""
    bundle = bundles[target]
    assert failures("teardown", bundle) == []
    moved = [r for r in cluster.resources if r.kind == kind]
    assert moved
    found = failures("teardown", dataclasses.replace(bundle, resources=bundle.resources + moved))
    assert any(
        f"rendered by {target}, so `kubectl delete -k` of it deletes" in f for f in found
    ), found


def test_the_cluster_target_runs_no_pods(cluster: Bundle, gpu: Bundle) -> None:
    assert failures("teardown", cluster) == []
    sts = gpu.get("StatefulSet", "search")
    assert sts is not None
    bundle = dataclasses.replace(cluster, resources=[*cluster.resources, sts])
    assert any("the cluster target runs no pods" in f for f in failures("teardown", bundle))


def test_the_namespace_must_come_from_the_cluster_target(cluster: Bundle) -> None:
    bundle = dataclasses.replace(
        cluster, resources=[r for r in cluster.resources if r.kind != "Namespace"]
    )
    assert "no Namespace percept" in failures("namespace", bundle)


def test_release_is_one_repository_and_version(job: Bundle) -> None:
    """Variants may differ (-gpu, -cpu), the repository and the version may not."""
    mine = "ghcr.io/percept/percept:0.1.0-gpu"
    ok = {"overlays/gpu": [mine], "overlays/cpu": ["ghcr.io/percept/percept:0.1.0-cpu"]}
    assert failures("release", dataclasses.replace(job, release_images=ok)) == []
    for other in ("ghcr.io/percept/percept:0.1.1-cpu", "registry.example.com/percept:0.1.0-cpu"):
        bundle = dataclasses.replace(job, release_images={**ok, "overlays/cpu": [other]})
        found = failures("release", bundle)
        assert found == [
            f"jobs/train-superres runs {mine!r} but overlays/cpu runs {other!r}: retarget "
            "every kustomization that names the image (deploy/README.md, step 2)"
        ], found


def test_config_accepts_the_git_sha_and_nothing_like_it(job: Bundle) -> None:
    sha = "0" * 40
    ok = broken(job, "Job", "train-superres", lambda r: set_env(r, "PERCEPT_GIT_SHA", sha))
    assert failures("config", ok) == []
    bad = broken(job, "Job", "train-superres", lambda r: set_env(r, "PERCEPT_GIT_SHAS", sha))
    assert any("PERCEPT_GIT_SHAS is not a `percept serve` flag" in f
               for f in failures("config", bad))


def test_gpu_isolation_reads_the_image_variant(gpu: Bundle, cpu: Bundle) -> None:
    """Without NVIDIA_VISIBLE_DEVICES=void, search on the -cpu image (python:slim base, what
    both overlays give it) sees no GPU; on a -gpu image (its nvidia/cuda base) it does."""

    def without_void(raw: dict[str, Any]) -> None:
        server(raw)["env"] = [v for v in server(raw)["env"]
                              if v["name"] != "NVIDIA_VISIBLE_DEVICES"]

    def on_the_gpu_image(raw: dict[str, Any]) -> None:
        without_void(raw)
        server(raw)["image"] = "ghcr.io/percept/percept:0.1.0-gpu"

    for bundle in (cpu, gpu):
        assert failures("gpu-isolation", broken(bundle, "StatefulSet", "search",
                                                without_void)) == []
    found = failures("gpu-isolation", broken(gpu, "StatefulSet", "search", on_the_gpu_image))
    assert any("NVIDIA_VISIBLE_DEVICES is 'all'" in f for f in found), found
    # and without a Dockerfile to read, a GPU image is assumed to expose them
    no_dockerfile = dataclasses.replace(gpu, dockerfile=None)
    assert failures("gpu-isolation", no_dockerfile) == []
    found = failures(
        "gpu-isolation", broken(no_dockerfile, "StatefulSet", "search", on_the_gpu_image)
    )
    assert any("NVIDIA_VISIBLE_DEVICES is 'all'" in f for f in found), found


def test_job_without_its_companion_pvc_fails(job: Bundle) -> None:
    bundle = dataclasses.replace(job, companions=[])
    assert any("percept-models does not exist" in f for f in failures("references", bundle))


DOCKERFILE_OK = """\
ARG VARIANT=gpu
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS base-gpu
FROM python:3.11.14-slim-bookworm AS base-cpu
FROM base-${VARIANT} AS build
RUN apt-get update && apt-get install -y build-essential libjpeg-dev
RUN pip wheel -w /wheels pillow-simd==12.1.1.post0
FROM base-${VARIANT} AS venv
ARG TORCH_GPU=torch==2.11.0+cu130 TORCH_CPU=torch==2.13.0+cpu
ARG FAISS_GPU=faiss-gpu==1.15.1 FAISS_CPU=faiss-cpu==1.15.1
COPY --from=build /wheels /wheels
RUN python3 -m training.assets fetch
COPY --from=assets /assets /app/assets
RUN python3 -m services.embed.word_vectors build
FROM base-${VARIANT}
COPY --from=venv /opt/venv /opt/venv
COPY --from=venv /app /app
ENV HF_HUB_OFFLINE=1 HOME=/home/percept
ARG PERCEPT_GIT_SHA=
ENV PERCEPT_GIT_SHA=$PERCEPT_GIT_SHA
USER 10001:10001
EXPOSE 50050-50054 9100-9104
HEALTHCHECK CMD percept health --target localhost:50050
ENTRYPOINT ["percept", "serve"]
CMD ["all"]
"""


def _with_dockerfile(bundle: Bundle, text: str) -> Bundle:
    return dataclasses.replace(bundle, dockerfile=parse_dockerfile(text))


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("python:3.11.14-slim-bookworm", "python:latest", "not pinned"),
        ("nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04", "nvidia/cuda", "not pinned"),
        ("USER 10001:10001", "USER root", "want numeric 10001"),
        ('ENTRYPOINT ["percept", "serve"]', "ENTRYPOINT percept serve", "ENTRYPOINT"),
        ("HEALTHCHECK CMD percept health --target localhost:50050\n", "", "HEALTHCHECK"),
        ("ENV HF_HUB_OFFLINE=1 HOME", "ENV HOME", "HF_HUB_OFFLINE"),
        ("COPY --from=venv", "RUN apt-get install -y gcc\nCOPY --from=venv", "build tools"),
        ("COPY --from=build /wheels /wheels\n", "", "never copied"),
        ("torch==2.11.0+cu130", "torch", "torch==2.11.0"),
        ("faiss-cpu==1.15.1", "faiss-cpu", "faiss-cpu==1.15.1"),
        ("FROM base-${VARIANT}\nCOPY", "FROM build\nCOPY", "compiler stage"),
        ("RUN python3 -m services.embed.word_vectors build\n", "", "noun vectors"),
        # built before the assets (WordNet) are there: the build could not run
        ("RUN python3 -m training.assets fetch\nCOPY --from=assets /assets /app/assets\n"
         "RUN python3 -m services.embed.word_vectors build\n",
         "RUN python3 -m services.embed.word_vectors build\n"
         "COPY --from=assets /assets /app/assets\n", "noun vectors"),
        # built in a stage whose files never reach the image
        ("COPY --from=venv /app /app\n", "", "noun vectors"),
        # models trained in the image would record "uncommitted"
        ("ARG PERCEPT_GIT_SHA=\n", "", "does not record the commit"),
        ("ENV PERCEPT_GIT_SHA=$PERCEPT_GIT_SHA\n", "", "does not record the commit"),
        ("ENV PERCEPT_GIT_SHA=$PERCEPT_GIT_SHA\n", "ENV PERCEPT_GIT_SHA=\n",
         "does not record the commit"),
        ("ARG PERCEPT_GIT_SHA=\nENV PERCEPT_GIT_SHA=$PERCEPT_GIT_SHA\n",
         "ENV PERCEPT_GIT_SHA=$PERCEPT_GIT_SHA\nARG PERCEPT_GIT_SHA=\n", "comes before ARG"),
    ],
)
def test_dockerfile_check_fails(gpu: Bundle, old: str, new: str, expected: str) -> None:
    check = check_by_name("dockerfile").func
    assert check(_with_dockerfile(gpu, DOCKERFILE_OK)) == []
    assert old in DOCKERFILE_OK
    found = check(_with_dockerfile(gpu, DOCKERFILE_OK.replace(old, new)))
    assert any(expected in f for f in found), found


def test_git_sha_in_a_builder_stage_only_fails(gpu: Bundle) -> None:
    """The commit must be in the final image's environment, not a stage it is built from."""
    lines = "ARG PERCEPT_GIT_SHA=\nENV PERCEPT_GIT_SHA=$PERCEPT_GIT_SHA\n"
    text = DOCKERFILE_OK.replace(lines, "").replace(
        "COPY --from=build /wheels /wheels\n", "COPY --from=build /wheels /wheels\n" + lines
    )
    found = check_by_name("dockerfile").func(_with_dockerfile(gpu, text))
    assert any("does not record the commit" in f for f in found), found


def test_image_contract_fails_when_a_port_is_not_exposed(gpu: Bundle) -> None:
    check = check_by_name("image-contract").func
    assert check(_with_dockerfile(gpu, DOCKERFILE_OK)) == []
    text = DOCKERFILE_OK.replace("EXPOSE 50050-50054 9100-9104", "EXPOSE 50050")
    found = check(_with_dockerfile(gpu, text))
    assert any("50051 is not EXPOSEd" in f for f in found), found


def test_image_contract_fails_on_another_entrypoint(gpu: Bundle) -> None:
    text = DOCKERFILE_OK.replace('ENTRYPOINT ["percept", "serve"]', 'ENTRYPOINT ["python"]')
    found = check_by_name("image-contract").func(_with_dockerfile(gpu, text))
    assert any("is not `percept serve`" in f for f in found), found


def test_validation_fails_loudly_on_a_broken_overlay(tmp_path: Path) -> None:
    """End to end: an overlay that sets :latest renders and validates, and the policy
    stage fails with a precise message."""
    overlay = tmp_path / "latest"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {os.path.relpath(render.K8S_DIR / 'overlays' / 'gpu', overlay)}\n"
        "images:\n  - name: ghcr.io/percept/percept\n    newTag: latest\n"
    )
    report = validate_targets((render.Target("tmp/latest", overlay, "gpu"),))
    assert not report.ok
    assert any(
        "[tmp/latest] images: Deployment/superres container server: image "
        "'ghcr.io/percept/percept:latest' uses the :latest tag" in f
        for f in report.failures
    ), report.failures


def test_validate_main_exits_non_zero_with_the_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from deploy import validate

    broken_dir = tmp_path / "bad"
    broken_dir.mkdir()
    (broken_dir / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    target = render.Target("tmp/bad", broken_dir, "cpu")
    monkeypatch.setattr(validate, "validate_targets", lambda: validate_targets((target,)))
    assert validate.main([]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert "[tmp/bad] render:" in captured.err and "missing.yaml" in captured.err


def test_a_retried_job_without_resume_if_present_fails(job: Bundle) -> None:
    assert failures("jobs", job) == []

    def without_resume(raw: dict[str, Any]) -> None:
        server(raw)["args"].remove("--resume-if-present")

    bundle = broken(job, "Job", "train-superres", without_resume)
    assert any("without --resume-if-present" in f for f in failures("jobs", bundle))

    def never_retried(raw: dict[str, Any]) -> None:
        without_resume(raw)
        raw["spec"]["backoffLimit"] = 0

    assert failures("jobs", broken(job, "Job", "train-superres", never_retried)) == []
