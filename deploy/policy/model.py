"""What the policies check against: the project's promises (ports, flags, uid), the
`Bundle` of one rendered target, and helpers that read the typed `kubernetes.client`
models (pod templates, selectors, effective environment, quantities)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from deploy.dockerfile import Dockerfile
from deploy.objects import Resource

# ---------------------------------------------------------------------------------------
# What the project promises (docs/architecture.md, DESIGN.md)
# ---------------------------------------------------------------------------------------

NAMESPACE = "percept"
PART_OF = "percept"
UID = 10001
IMAGE_REPOSITORY = "ghcr.io/percept/percept"
#: the image name the base gives the containers that use no GPU (search), so that a
#: kustomization can map it to the CPU variant (-cpu) while the model servers, which name
#: IMAGE_REPOSITORY, get the overlay's variant: kustomize sets images by name
CPU_IMAGE_PLACEHOLDER = "percept-cpu-image"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = "nvidia.com/gpu.present"
MONITORING_NAMESPACE = "monitoring"
#: the namespace label that admits a namespace's pods to the gRPC ports (opt-in; set by an
#: operator with `kubectl label namespace NS percept.io/client=true`)
CLIENT_NAMESPACE_LABEL = "percept.io/client"
CLIENT_NAMESPACE_VALUE = "true"
#: seconds of terminationGracePeriodSeconds beyond preStop + drain
GRACE_MARGIN_SECONDS = 5
#: seconds a Deployment's progressDeadlineSeconds allows for pulling the image onto a node
#: (the GPU image is about 10 GB) beyond the startup probe's budget and the old pod's grace
IMAGE_PULL_ALLOWANCE_SECONDS = 600
#: image variants, by the suffix of their tag (deploy/docker/Dockerfile, VARIANT)
VARIANT_SUFFIXES = ("-gpu", "-cpu")
#: NVIDIA_VISIBLE_DEVICES values with which the NVIDIA container runtime exposes no GPU
#: (unset and "" as well): "void" also leaves the driver libraries out, "none" mounts them
NO_GPU_VISIBLE = ("void", "none", "")
#: the environment the GPU variant's base image (nvidia/cuda) sets and the Dockerfile cannot
#: show: with the NVIDIA runtime as the node's default, a container that inherits it sees
#: every GPU of the node, outside the device plugin's accounting
CUDA_BASE_IMAGE = "nvidia/cuda"
CUDA_BASE_ENV = {"NVIDIA_VISIBLE_DEVICES": "all"}
#: environment names the image or a manifest may set that are not `percept serve` flags
#: (training/export.py reads PERCEPT_GIT_SHA for a model's provenance)
PERCEPT_NON_FLAG_ENV = ("PERCEPT_GIT_SHA",)

NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
PART_OF_LABEL = "app.kubernetes.io/part-of"

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob")


@dataclass(frozen=True)
class ServiceSpec:
    """One percept service as docs/architecture.md defines it."""

    name: str
    grpc_port: int
    metrics_port: int
    health_service: str
    gpu: bool
    kind: str


SERVICES: dict[str, ServiceSpec] = {
    "superres": ServiceSpec(
        "superres", 50051, 9101, "percept.v1.SuperResolution", True, "Deployment"
    ),
    "style": ServiceSpec("style", 50052, 9102, "percept.v1.StyleTransfer", True, "Deployment"),
    "embed": ServiceSpec("embed", 50053, 9103, "percept.v1.Embedding", True, "Deployment"),
    "search": ServiceSpec("search", 50054, 9104, "percept.v1.ImageSearch", False, "StatefulSet"),
}
#: `percept serve all`: every service in one process (the image's default CMD).
ALL_IN_ONE = ServiceSpec("all", 50050, 9100, "", False, "")

#: `percept serve` flags (each read from PERCEPT_<FLAG>): docs/architecture.md and
#: services/common/config.py (a test keeps this list in step with the server).
SERVER_FLAGS = (
    "host",
    "port",
    "metrics-port",
    "models-dir",
    "data-dir",
    "device",
    "max-batch",
    "max-wait-ms",
    "max-queue",
    "max-concurrent-rpcs",
    "fair-share",
    "max-message-mb",
    "max-pixels",
    "max-inflight-mpixels",
    "drain-seconds",
    "stall-seconds",
    "keepalive-seconds",
    "min-client-ping-seconds",
    "log-format",
    "log-level",
    "failed-call-log-limit",
    "embed-target",
    "max-iterations",
    "max-optimisations",
    "default-model",
    "compile",
    "cuda-graphs",
    "cpu-dtype",
    "style-tile",
    "warmup",
    "retain-memory",
    "word-vectors",
    "word-vectors-format",
    "search-index",
    "search-ann-threshold",
    "search-nprobe",
    "search-ef-search",
    "tls-cert",
    "tls-key",
    "tls-client-ca",
    "tls-authorize",
    "health-port",
    "embed-tls-ca",
    "embed-tls-cert",
    "embed-tls-key",
)
#: flags the server ConfigMap must set explicitly.
REQUIRED_CONFIG = (
    "PERCEPT_MAX_BATCH",
    "PERCEPT_MAX_WAIT_MS",
    "PERCEPT_MAX_QUEUE",
    "PERCEPT_MAX_MESSAGE_MB",
    "PERCEPT_MAX_PIXELS",
    "PERCEPT_DRAIN_SECONDS",
    "PERCEPT_LOG_FORMAT",
)
POSITIVE_INT_FLAGS = (
    "PERCEPT_MAX_BATCH",
    "PERCEPT_MAX_QUEUE",
    "PERCEPT_MAX_MESSAGE_MB",
    "PERCEPT_MAX_PIXELS",
    "PERCEPT_PORT",
    "PERCEPT_MAX_ITERATIONS",
    "PERCEPT_MAX_OPTIMISATIONS",
)
NON_NEGATIVE_INT_FLAGS = ("PERCEPT_METRICS_PORT", "PERCEPT_HEALTH_PORT")
NON_NEGATIVE_FLOAT_FLAGS = ("PERCEPT_MAX_WAIT_MS", "PERCEPT_DRAIN_SECONDS")
#: TLS (deploy/k8s/components/tls): the server's certificate, key and client CA, and
#: search's CA, client certificate and key towards embed; each names a PEM file
SERVER_TLS_ENV = ("PERCEPT_TLS_CERT", "PERCEPT_TLS_KEY", "PERCEPT_TLS_CLIENT_CA")
EMBED_TLS_ENV = ("PERCEPT_EMBED_TLS_CA", "PERCEPT_EMBED_TLS_CERT", "PERCEPT_EMBED_TLS_KEY")
TLS_FILE_ENV = SERVER_TLS_ENV + EMBED_TLS_ENV
#: the port components/tls has every server answer grpc.health.v1 on in plaintext
#: (PERCEPT_HEALTH_PORT, container port `health`), for the kubelet's probes, which speak no
#: TLS; the policies check what the manifests set, not this number
HEALTH_PORT = 50060
#: cache and home directories that must be writable under a read-only root filesystem.
WRITABLE_ENV = ("HOME", "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR")
OPTIONAL_WRITABLE_ENV = (
    "XDG_CACHE_HOME",
    "TRITON_CACHE_DIR",
    "CUDA_CACHE_PATH",
    "HF_HOME",
    "MPLCONFIGDIR",
)


def flag_env(flag: str) -> str:
    """`--max-batch` -> PERCEPT_MAX_BATCH."""
    return "PERCEPT_" + flag.lstrip("-").upper().replace("-", "_")


def architecture_ports(doc: Path) -> dict[str, tuple[int, int]]:
    """The `| service | gRPC port | metrics port |` table of docs/architecture.md."""
    ports: dict[str, tuple[int, int]] = {}
    for line in doc.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*([a-z]+)\b[^|]*\|\s*(\d+)\s*\|\s*(\d+)\s*\|\s*$", line)
        if m:
            ports[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    return ports


def architecture_flags(doc: Path) -> set[str]:
    """The `percept serve` flags named in docs/architecture.md (`--max-batch` ...)."""
    text = doc.read_text(encoding="utf-8")
    return set(re.findall(r"`--([a-z][a-z-]*)`", text))


# ---------------------------------------------------------------------------------------
# The bundle: one rendered target
# ---------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """The typed objects of one rendered target, and what the checks need besides.

    `accelerator` is the node type the target deploys to ("gpu" or "cpu"); `kind` is
    "cluster" for the objects applied once (Namespace, PersistentVolumeClaims), "app" for
    an overlay, "job" for a job template, "component" for an optional component's own
    objects; `companions` are the objects of the target a job is applied beside (its PVC
    lives there) or a component is added to (the pods its PodMonitor scrapes);
    `release_images` maps every target of the validation (this one included) to the images
    its workloads run, so that a check can see whether they are all one release.
    """

    target: str
    accelerator: Literal["gpu", "cpu"]
    resources: list[Resource]
    kind: Literal["cluster", "app", "job", "component"] = "app"
    companions: list[Resource] = field(default_factory=list)
    dockerfile: Dockerfile | None = None
    namespace: str = NAMESPACE
    release_images: dict[str, list[str]] = field(default_factory=dict)

    def of_kind(self, *kinds: str) -> list[Resource]:
        """The objects of the given kinds, in render order."""
        return [r for r in self.resources if r.kind in kinds]

    def get(self, kind: str, name: str, *, companions: bool = False) -> Resource | None:
        """The object of a kind and name, or None."""
        pool = self.resources + (self.companions if companions else [])
        for r in pool:
            if r.kind == kind and r.name == name:
                return r
        return None

    @property
    def workloads(self) -> list[Resource]:
        """Every object that runs pods."""
        return self.of_kind(*WORKLOAD_KINDS)


# ---------------------------------------------------------------------------------------
# Helpers over the typed models
# ---------------------------------------------------------------------------------------


def pod_template(res: Resource) -> Any:
    """The V1PodTemplateSpec of a workload (None for other objects)."""
    if res.kind == "CronJob":
        return res.model.spec.job_template.spec.template
    if res.kind in WORKLOAD_KINDS:
        return res.model.spec.template
    return None


def pod_labels(res: Resource) -> dict[str, str]:
    """The labels of a workload's pods."""
    tpl = pod_template(res)
    return dict((tpl.metadata.labels or {}) if tpl is not None and tpl.metadata else {})


def app_name(res: Resource) -> str:
    """The app.kubernetes.io/name of a workload's pods (or of the object itself)."""
    labels = pod_labels(res) or dict(res.model.metadata.labels or {})
    return labels.get(NAME_LABEL, "")


def all_containers(pod_spec: Any) -> list[Any]:
    """Init containers and containers of a pod spec."""
    return list(pod_spec.init_containers or []) + list(pod_spec.containers or [])


def named_ports(container: Any) -> dict[str, int]:
    """A container's named ports: name -> containerPort."""
    return {p.name: p.container_port for p in container.ports or [] if p.name}


def server_container(res: Resource) -> Any:
    """The container of a workload that serves gRPC (has a port named `grpc`), or None."""
    tpl = pod_template(res)
    if tpl is None:
        return None
    for c in tpl.spec.containers or []:
        if "grpc" in named_ports(c):
            return c
    return None


def serving_workloads(bundle: Bundle) -> list[tuple[Resource, Any]]:
    """(workload, its gRPC container) for every workload that serves."""
    out = []
    for res in bundle.workloads:
        c = server_container(res)
        if c is not None:
            out.append((res, c))
    return out


def model_services(bundle: Bundle) -> list[Resource]:
    """The workloads that need a GPU on GPU nodes: the model servers and training Jobs."""
    out = []
    for res in bundle.workloads:
        spec = SERVICES.get(app_name(res))
        component = pod_labels(res).get(COMPONENT_LABEL)
        if (spec is not None and spec.gpu) or (res.kind == "Job" and component == "training"):
            out.append(res)
    return out


def field_value(obj: Any, name: str) -> Any:
    """A field of a typed model or of a plain dict (some nested fields stay dicts)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def selector_matches(selector: Any, labels: dict[str, str]) -> bool:
    """Whether a label selector (V1LabelSelector or a dict) matches the labels.

    An empty selector matches everything, as in NetworkPolicy and PDB semantics.
    """
    if selector is None:
        return True
    match_labels = (
        field_value(selector, "match_labels") or field_value(selector, "matchLabels") or {}
    )
    for k, v in match_labels.items():
        if labels.get(k) != v:
            return False
    exprs = (
        field_value(selector, "match_expressions")
        or field_value(selector, "matchExpressions")
        or []
    )
    for expr in exprs:
        key, op = field_value(expr, "key"), field_value(expr, "operator")
        values = list(field_value(expr, "values") or [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def selector_is_empty(selector: Any) -> bool:
    """True for a missing selector or one with no terms (it selects everything)."""
    if selector is None:
        return True
    return not (field_value(selector, "match_labels") or field_value(selector, "match_expressions"))


def configmap_data(bundle: Bundle, name: str) -> dict[str, str] | None:
    """The data of a ConfigMap in the bundle (or its companions), or None."""
    res = bundle.get("ConfigMap", name, companions=True)
    if res is None:
        return None
    return dict(res.model.data or {})


def effective_env(bundle: Bundle, container: Any) -> dict[str, str]:
    """The environment Kubernetes gives a container: envFrom sources in order, then `env`
    (which wins). Values from ConfigMaps are resolved; other sources are left out."""
    env: dict[str, str] = {}
    for source in container.env_from or []:
        ref = source.config_map_ref
        if ref is None:
            continue
        data = configmap_data(bundle, ref.name) or {}
        for k, v in data.items():
            env[(source.prefix or "") + k] = v
    for var in container.env or []:
        if var.value is not None:
            env[var.name] = var.value
        elif var.value_from is not None and var.value_from.config_map_key_ref is not None:
            ref = var.value_from.config_map_key_ref
            data = configmap_data(bundle, ref.name) or {}
            if ref.key in data:
                env[var.name] = data[ref.key]
        else:
            env.setdefault(var.name, "")
    return env


def serves_tls(env: dict[str, str]) -> bool:
    """Whether a server with this environment serves gRPC over TLS (PERCEPT_TLS_CERT)."""
    return bool(env.get("PERCEPT_TLS_CERT"))


def health_port(env: dict[str, str]) -> int | None:
    """The plaintext health port a server's PERCEPT_HEALTH_PORT turns on; None when it is
    unset, 0 (off) or not a number."""
    raw = env.get("PERCEPT_HEALTH_PORT", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def parse_quantity(value: Any) -> Decimal:
    """A Kubernetes quantity ("500m", "4Gi", "2") as a number."""
    from kubernetes.utils import parse_quantity as kube_parse_quantity

    return Decimal(kube_parse_quantity(value))


def pre_stop_seconds(container: Any) -> int | None:
    """How long a container's preStop hook sleeps (sleep action, or exec `sleep N`)."""
    lifecycle = container.lifecycle
    hook = lifecycle.pre_stop if lifecycle is not None else None
    if hook is None:
        return None
    if hook.sleep is not None:
        return int(hook.sleep.seconds)
    if hook.var_exec is not None and hook.var_exec.command:
        m = re.search(r"\bsleep\s+(\d+)\b", " ".join(hook.var_exec.command))
        if m:
            return int(m.group(1))
    return None


def image_version(tag: str | None) -> tuple[str | None, str | None]:
    """`0.1.0-gpu` -> ("0.1.0", "gpu"); a tag without a variant suffix -> (tag, None)."""
    if tag is None:
        return None, None
    for suffix in VARIANT_SUFFIXES:
        if tag.endswith(suffix):
            return tag[: -len(suffix)], suffix[1:]
    return tag, None


def workload_images(objects: list[dict[str, Any]]) -> list[str]:
    """The images of every container of the workloads among rendered objects (raw dicts)."""
    images = []
    for obj in objects:
        kind = obj.get("kind")
        if kind not in WORKLOAD_KINDS:
            continue
        spec = obj.get("spec") or {}
        if kind == "CronJob":
            spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
        pod = ((spec.get("template") or {}).get("spec")) or {}
        for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
            images.append(str(c.get("image") or ""))
    return images


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """`registry/repo:tag@sha256:...` -> (repository, tag, digest)."""
    ref, _, digest = image.partition("@")
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :], digest or None
    return ref, None, digest or None


def located(res: Resource, container: Any | None = None) -> str:
    return f"{res.ref} container {container.name}" if container is not None else res.ref


def gpu_count(container: Any, which: str) -> str | None:
    """A container's nvidia.com/gpu in `limits` or `requests`, or None."""
    rr = container.resources
    values = (getattr(rr, which) if rr else None) or {}
    return values.get(GPU_RESOURCE)
