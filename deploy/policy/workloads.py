"""Policies on each workload's pods: resources, GPUs, probes, security, writable paths,
images, labels, topology, ports, drain, configuration, references, training Jobs."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from deploy.policy.model import (
    COMPONENT_LABEL,
    CPU_IMAGE_PLACEHOLDER,
    CUDA_BASE_ENV,
    CUDA_BASE_IMAGE,
    EMBED_TLS_ENV,
    GPU_NODE_LABEL,
    GPU_RESOURCE,
    GRACE_MARGIN_SECONDS,
    IMAGE_PULL_ALLOWANCE_SECONDS,
    IMAGE_REPOSITORY,
    NAME_LABEL,
    NO_GPU_VISIBLE,
    NON_NEGATIVE_FLOAT_FLAGS,
    NON_NEGATIVE_INT_FLAGS,
    OPTIONAL_WRITABLE_ENV,
    PART_OF,
    PART_OF_LABEL,
    PERCEPT_NON_FLAG_ENV,
    POSITIVE_INT_FLAGS,
    REQUIRED_CONFIG,
    SERVER_FLAGS,
    SERVICES,
    TLS_FILE_ENV,
    UID,
    WORKLOAD_KINDS,
    WRITABLE_ENV,
    Bundle,
    all_containers,
    app_name,
    configmap_data,
    effective_env,
    field_value,
    flag_env,
    gpu_count,
    health_port,
    image_version,
    located,
    model_services,
    named_ports,
    parse_quantity,
    pod_labels,
    pod_template,
    pre_stop_seconds,
    selector_is_empty,
    selector_matches,
    server_container,
    serves_tls,
    serving_workloads,
    split_image,
)
from deploy.policy.monitoring import check_pod_monitors


def check_resources(bundle: Bundle) -> list[str]:
    """Every container requests and limits cpu and memory, and requests <= limits."""
    failures = []
    for res in bundle.workloads:
        for c in all_containers(pod_template(res).spec):
            where = located(res, c)
            rr = c.resources
            requests = dict((rr.requests if rr else None) or {})
            limits = dict((rr.limits if rr else None) or {})
            for kind in ("cpu", "memory"):
                if kind not in requests:
                    failures.append(f"{where}: no {kind} request")
                if kind not in limits:
                    failures.append(f"{where}: no {kind} limit")
            for kind, req in requests.items():
                if kind in limits and parse_quantity(req) > parse_quantity(limits[kind]):
                    failures.append(
                        f"{where}: {kind} request {req} exceeds its limit {limits[kind]}"
                    )
    return failures


def _has_gpu_toleration(pod_spec: Any) -> bool:
    for t in pod_spec.tolerations or []:
        if (
            t.key == GPU_RESOURCE
            and t.effect == "NoSchedule"
            and t.operator in ("Exists", None, "Equal")
        ):
            return True
    return False


def check_gpu(bundle: Bundle) -> list[str]:
    """GPU nodes: each model server and training Job limits nvidia.com/gpu to 1, selects GPU
    nodes and tolerates their taint, and runs with PERCEPT_DEVICE=cuda; no other workload
    asks for a GPU. CPU overlay: no GPU resources, selectors or tolerations anywhere."""
    failures = []
    gpu_workloads = {id(r) for r in model_services(bundle)}
    for res in bundle.workloads:
        spec = pod_template(res).spec
        selector = dict(spec.node_selector or {})
        wants_gpu = bundle.accelerator == "gpu" and id(res) in gpu_workloads
        main = (spec.containers or [None])[0]
        for c in all_containers(spec):
            where = located(res, c)
            limit, request = gpu_count(c, "limits"), gpu_count(c, "requests")
            env = effective_env(bundle, c)
            if wants_gpu and c is main:
                if limit is None or parse_quantity(limit) != 1:
                    failures.append(f"{where}: limits.{GPU_RESOURCE} is {limit!r}, want 1")
                if request is not None and request != limit:
                    failures.append(f"{where}: {GPU_RESOURCE} request {request} != limit {limit}")
                if res.kind != "Job" and env.get("PERCEPT_DEVICE") != "cuda":
                    failures.append(
                        f"{where}: PERCEPT_DEVICE is {env.get('PERCEPT_DEVICE')!r}, want "
                        "'cuda' (fail loudly instead of serving on the CPU)"
                    )
            elif limit is not None or request is not None:
                failures.append(f"{where}: asks for {GPU_RESOURCE} but should not")
            if bundle.accelerator == "cpu" and env.get("PERCEPT_DEVICE") == "cuda":
                failures.append(f"{where}: PERCEPT_DEVICE=cuda in the CPU overlay")
        if wants_gpu:
            if selector.get(GPU_NODE_LABEL) != "true":
                failures.append(f'{res.ref}: nodeSelector lacks {GPU_NODE_LABEL}: "true"')
            if not _has_gpu_toleration(spec):
                failures.append(f"{res.ref}: no toleration for the {GPU_RESOURCE} NoSchedule taint")
        else:
            gpu_keys = sorted(k for k in selector if k.startswith("nvidia.com/"))
            if gpu_keys:
                failures.append(
                    f"{res.ref}: selects GPU nodes ({', '.join(gpu_keys)}) without a GPU"
                )
            if _has_gpu_toleration(spec):
                failures.append(f"{res.ref}: tolerates the GPU taint without using a GPU")
    if bundle.accelerator == "gpu" and bundle.kind == "app":
        names = {app_name(r) for r in model_services(bundle)}
        for spec_ in SERVICES.values():
            if spec_.gpu and spec_.name not in names:
                failures.append(f"no GPU workload for the {spec_.name} service")
    return failures


def _image_env(bundle: Bundle, image: str) -> dict[str, str]:
    """The environment an image sets: its Dockerfile's ENV for the variant its tag names
    (-gpu, -cpu; else the Dockerfile's default), over the environment of a CUDA base image,
    which the Dockerfile cannot show (CUDA_BASE_ENV)."""
    _repo, tag, _digest = split_image(image)
    variant = image_version(tag)[1]
    d = bundle.dockerfile
    if d is None:  # no Dockerfile to read: assume the worst of the GPU variant
        return {} if variant == "cpu" else dict(CUDA_BASE_ENV)
    overrides = {"VARIANT": variant} if variant else None
    base = d.base_image(d.chain(d.final, overrides)[-1], overrides)
    env = dict(CUDA_BASE_ENV) if base.startswith(CUDA_BASE_IMAGE + ":") else {}
    env.update(d.env(overrides=overrides))
    return env


def _avoids_gpu_nodes(pod_spec: Any) -> bool:
    """Whether a pod's required node affinity keeps it off nodes labelled
    nvidia.com/gpu.present=true (every term, they are ORed, must exclude them)."""
    affinity = pod_spec.affinity
    node = affinity.node_affinity if affinity is not None else None
    required = (
        node.required_during_scheduling_ignored_during_execution if node is not None else None
    )
    terms = (required.node_selector_terms if required is not None else None) or []
    if not terms:
        return False
    for term in terms:
        if not any(
            e.key == GPU_NODE_LABEL
            and (
                (e.operator == "NotIn" and "true" in (e.values or []))
                or e.operator == "DoesNotExist"
            )
            for e in term.match_expressions or []
        ):
            return False
    return True


def check_gpu_isolation(bundle: Bundle) -> list[str]:
    """A container that requests no nvidia.com/gpu cannot see GPUs: its
    NVIDIA_VISIBLE_DEVICES (its env, else its image's; the nvidia/cuda base of the GPU
    variant sets `all`, which the NVIDIA runtime honours outside the device plugin's
    accounting) is void, none or unset. On GPU nodes a workload without a GPU also
    requires a node that is not a GPU node (node affinity nvidia.com/gpu.present NotIn
    [true], or DoesNotExist)."""
    failures = []
    for res in bundle.workloads:
        spec = pod_template(res).spec
        containers = all_containers(spec)
        uses_gpu = any(gpu_count(c, "limits") or gpu_count(c, "requests") for c in containers)
        for c in containers:
            if gpu_count(c, "limits") or gpu_count(c, "requests"):
                continue
            env = {**_image_env(bundle, c.image or ""), **effective_env(bundle, c)}
            visible = env.get("NVIDIA_VISIBLE_DEVICES")
            if visible is not None and visible not in NO_GPU_VISIBLE:
                source = "its env" if "NVIDIA_VISIBLE_DEVICES" in effective_env(
                    bundle, c) else f"its image {c.image}"
                failures.append(
                    f"{located(res, c)}: requests no {GPU_RESOURCE} but NVIDIA_VISIBLE_DEVICES "
                    f"is {visible!r} ({source}): on a node whose default runtime is NVIDIA's "
                    "it sees the GPUs; set it to 'void'"
                )
        if bundle.accelerator == "gpu" and not uses_gpu and not _avoids_gpu_nodes(spec):
            failures.append(
                f"{res.ref}: uses no GPU but may run on GPU nodes: require "
                f"{GPU_NODE_LABEL} NotIn [true] (requiredDuringScheduling node affinity)"
            )
    return failures


_PROBE_NAMES = {
    "startup_probe": "startupProbe",
    "readiness_probe": "readinessProbe",
    "liveness_probe": "livenessProbe",
}


def check_probes(bundle: Bundle) -> list[str]:
    """Serving containers have startup, readiness and liveness probes, all native gRPC on
    the `grpc` port: readiness asks grpc.health.v1 for the service's fully-qualified name,
    startup and liveness for the overall server (""). With TLS on (PERCEPT_TLS_CERT;
    components/tls) the kubelet's gRPC probes, which speak no TLS, could not pass on the
    grpc port: the server must have a plaintext health port (PERCEPT_HEALTH_PORT) and
    every probe target it."""
    failures = []
    for res, c in serving_workloads(bundle):
        where = located(res, c)
        port = named_ports(c)["grpc"]
        env = effective_env(bundle, c)
        tls = serves_tls(env)
        health = health_port(env)
        if tls and health is None:
            failures.append(
                f"{where}: serves TLS (PERCEPT_TLS_CERT) but PERCEPT_HEALTH_PORT is "
                f"{env.get('PERCEPT_HEALTH_PORT')!r}: the kubelet's gRPC probes speak no TLS "
                "and need the plaintext health port"
            )
        # without TLS a probe may target the grpc port, or the health port when one is on
        # (it answers the same statuses); under TLS the health port alone
        plaintext_ports = {port} | ({health} if health is not None else set())
        spec = SERVICES.get(app_name(res))
        expected = {
            "startup_probe": "",
            "readiness_probe": spec.health_service if spec else None,
            "liveness_probe": "",
        }
        for attr, want_service in expected.items():
            probe = getattr(c, attr)
            label = _PROBE_NAMES[attr]
            if probe is None:
                failures.append(f"{where}: no {label}")
                continue
            if probe.grpc is None:
                other = [k for k in ("http_get", "tcp_socket", "var_exec") if getattr(probe, k)]
                failures.append(
                    f"{where}: {label} is not a gRPC probe ({', '.join(other) or 'none'})"
                )
                continue
            if tls and probe.grpc.port == port:
                failures.append(
                    f"{where}: {label} probes the grpc port {port}, which serves TLS: the "
                    f"kubelet's gRPC probe cannot pass there; probe the plaintext health "
                    f"port ({health})"
                )
            elif tls and health is not None and probe.grpc.port != health:
                failures.append(
                    f"{where}: {label} probes port {probe.grpc.port}, not the health port "
                    f"({health})"
                )
            elif not tls and probe.grpc.port not in plaintext_ports:
                also = f" or health ({health})" if health is not None else ""
                failures.append(
                    f"{where}: {label} probes port {probe.grpc.port}, not grpc ({port}){also}"
                )
            service = probe.grpc.service or ""
            if want_service is not None and service != want_service:
                failures.append(
                    f"{where}: {label} asks for service {service!r}, want {want_service!r}"
                )
    return failures


def _effective(container_sc: Any, pod_sc: Any, attr: str) -> Any:
    """A security setting as Kubernetes applies it: the container's, else the pod's."""
    value = getattr(container_sc, attr, None) if container_sc is not None else None
    if value is None and pod_sc is not None:
        value = getattr(pod_sc, attr, None)
    return value


def check_security(bundle: Bundle) -> list[str]:
    """Pods run as uid 10001 and non-root, with the RuntimeDefault seccomp profile, no host
    namespaces or hostPath, no service-account token; containers have a read-only root
    filesystem, no privilege escalation and drop ALL capabilities (Pod Security
    "restricted")."""
    failures = []
    for res in bundle.workloads:
        spec = pod_template(res).spec
        psc = spec.security_context
        if spec.host_network or spec.host_pid or spec.host_ipc:
            failures.append(f"{res.ref}: uses a host namespace")
        if spec.automount_service_account_token is not False:
            failures.append(f"{res.ref}: automountServiceAccountToken is not false")
        for vol in spec.volumes or []:
            if vol.host_path is not None:
                failures.append(f"{res.ref}: volume {vol.name} is a hostPath")
        for c in all_containers(spec):
            where = located(res, c)
            csc = c.security_context
            if _effective(csc, psc, "run_as_non_root") is not True:
                failures.append(f"{where}: runAsNonRoot is not true")
            uid = _effective(csc, psc, "run_as_user")
            if uid != UID:
                failures.append(f"{where}: runAsUser is {uid}, want {UID}")
            seccomp = _effective(csc, psc, "seccomp_profile")
            if seccomp is None or field_value(seccomp, "type") != "RuntimeDefault":
                failures.append(f"{where}: seccompProfile is not RuntimeDefault")
            if csc is None:
                failures.append(f"{where}: no securityContext")
                continue
            if csc.read_only_root_filesystem is not True:
                failures.append(f"{where}: readOnlyRootFilesystem is not true")
            if csc.allow_privilege_escalation is not False:
                failures.append(f"{where}: allowPrivilegeEscalation is not false")
            if csc.privileged:
                failures.append(f"{where}: privileged")
            caps = csc.capabilities
            if caps is None or "ALL" not in (caps.drop or []):
                failures.append(f"{where}: capabilities do not drop ALL")
            if caps is not None and caps.add:
                failures.append(f"{where}: adds capabilities {caps.add}")
    return failures


def _writable_mounts(spec: Any, container: Any) -> list[str]:
    """Mount paths of a container that are writable volumes (emptyDir, PVC)."""
    kinds = {}
    for vol in spec.volumes or []:
        kinds[vol.name] = (
            "emptyDir"
            if vol.empty_dir is not None
            else "pvc"
            if vol.persistent_volume_claim is not None
            else "other"
        )
    out = []
    for m in container.volume_mounts or []:
        kind = kinds.get(m.name, "pvc")  # volumeClaimTemplates are PVCs
        if kind in ("emptyDir", "pvc") and not m.read_only:
            out.append(m.mount_path.rstrip("/") or "/")
    return out


def _under(path: str, roots: Iterable[str]) -> bool:
    path = path.rstrip("/")
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def check_writable_paths(bundle: Bundle) -> list[str]:
    """With a read-only root filesystem, /tmp is an emptyDir and HOME, TORCH_HOME and
    TORCHINDUCTOR_CACHE_DIR (and any other cache directory set) lie on writable volumes."""
    failures = []
    for res in bundle.workloads:
        spec = pod_template(res).spec
        for c in all_containers(spec):
            if not (c.security_context and c.security_context.read_only_root_filesystem):
                continue
            where = located(res, c)
            writable = _writable_mounts(spec, c)
            if "/tmp" not in writable:
                failures.append(f"{where}: /tmp is not a writable volume")
            env = effective_env(bundle, c)
            for name in WRITABLE_ENV:
                if name not in env:
                    failures.append(f"{where}: {name} is not set")
            for name in WRITABLE_ENV + OPTIONAL_WRITABLE_ENV:
                if name in env and not _under(env[name], writable):
                    failures.append(f"{where}: {name}={env[name]} is not on a writable volume")
    return failures


def check_images(bundle: Bundle) -> list[str]:
    """Images are pinned (a tag other than `latest`, or a digest), come from the project's
    repository (the base's `percept-cpu-image` placeholder mapped by the kustomization),
    are one release (repository and version) in every workload, and are the variant each
    container needs: `-gpu` where it uses nvidia.com/gpu, `-cpu` everywhere else (search
    on the gpu overlay, everything on the cpu overlay)."""
    failures = []
    releases: dict[tuple[str, str | None], set[str]] = {}
    for res in bundle.workloads:
        for c in all_containers(pod_template(res).spec):
            where = located(res, c)
            image = c.image or ""
            repo, tag, digest = split_image(image)
            if not image:
                failures.append(f"{where}: no image")
                continue
            if repo == CPU_IMAGE_PLACEHOLDER:
                failures.append(
                    f"{where}: image {image!r} is the base's placeholder: map it in the "
                    f"kustomization (images: - name: {CPU_IMAGE_PLACEHOLDER}, newName: "
                    f"{IMAGE_REPOSITORY}, newTag: <version>-cpu; deploy/README.md, step 2)"
                )
                continue
            releases.setdefault(_release(image), set()).add(image)
            if tag is None and digest is None:
                failures.append(f"{where}: image {image!r} is not pinned (no tag or digest)")
            if tag == "latest":
                failures.append(f"{where}: image {image!r} uses the :latest tag")
            if repo != IMAGE_REPOSITORY and not repo.endswith("/percept"):
                failures.append(f"{where}: image {image!r} is not the percept image")
            if c.image_pull_policy not in (None, "IfNotPresent", "Always"):
                failures.append(f"{where}: imagePullPolicy {c.image_pull_policy}")
            if tag is None:
                continue  # pinned by digest alone: the variant is not in the name
            uses_gpu = bool(gpu_count(c, "limits") or gpu_count(c, "requests"))
            variant = image_version(tag)[1]
            if bundle.accelerator == "cpu" or not uses_gpu:
                if variant != "cpu":
                    why = ("on CPU nodes" if bundle.accelerator == "cpu" else
                           f"but uses no {GPU_RESOURCE}: the base names its image "
                           f"{CPU_IMAGE_PLACEHOLDER}, for the kustomization to map to -cpu")
                    failures.append(f"{where}: image {image!r} is not the CPU variant (-cpu) {why}")
            elif variant == "cpu":
                failures.append(
                    f"{where}: image {image!r} is the CPU variant on a container that uses "
                    f"{GPU_RESOURCE}: it needs the -gpu tag"
                )
            elif variant != "gpu":
                failures.append(f"{where}: image {image!r} is not the GPU variant (-gpu)")
    if len(releases) > 1:
        seen = sorted(i for images in releases.values() for i in images)
        failures.append(
            f"the workloads run different releases: {', '.join(seen)} (retarget both image "
            f"names, {IMAGE_REPOSITORY} and {CPU_IMAGE_PLACEHOLDER}; deploy/README.md, step 2)"
        )
    return failures


def _release(image: str) -> tuple[str, str | None]:
    """(repository, version): the tag without its variant suffix."""
    repo, tag, _digest = split_image(image)
    return repo, image_version(tag)[0]


def check_release(bundle: Bundle) -> list[str]:
    """Every kustomization runs one release: the workloads of this target run the same
    repository and version (the tag without its -gpu/-cpu suffix) as those of every other
    target (overlays and job templates), so an image retargeted in some kustomizations
    but not in the others fails."""
    failures = []
    own = {c.image or "" for res in bundle.workloads for c in all_containers(
        pod_template(res).spec)}
    for target, images in sorted(bundle.release_images.items()):
        if target == bundle.target:
            continue
        for other in sorted(set(images)):
            for image in sorted(own):
                if _release(image) != _release(other):
                    failures.append(
                        f"{bundle.target} runs {image!r} but {target} runs {other!r}: retarget "
                        "every kustomization that names the image (deploy/README.md, step 2)"
                    )
    return failures


_LABELLED_KINDS = (
    *WORKLOAD_KINDS,
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "PersistentVolumeClaim",
    "PodMonitor",
)


def check_labels(bundle: Bundle) -> list[str]:
    """Every object is part-of percept; workloads, Services, HPAs, PDBs, PVCs and
    PodMonitors carry app.kubernetes.io/name and /component; each workload's selector
    matches its own pod template's labels and no other workload's pods."""
    failures = []
    for res in bundle.resources:
        labels = dict(res.model.metadata.labels or {})
        if labels.get(PART_OF_LABEL) != PART_OF:
            failures.append(f"{res.ref}: label {PART_OF_LABEL} is not {PART_OF!r}")
        if res.kind in _LABELLED_KINDS:
            for key in (NAME_LABEL, COMPONENT_LABEL):
                if not labels.get(key):
                    failures.append(f"{res.ref}: no {key} label")
    workloads = bundle.workloads
    for res in workloads:
        tpl_labels = pod_labels(res)
        meta = dict(res.model.metadata.labels or {})
        for key in (NAME_LABEL, COMPONENT_LABEL, PART_OF_LABEL):
            if not tpl_labels.get(key):
                failures.append(f"{res.ref}: pod template has no {key} label")
            elif meta.get(key) and meta[key] != tpl_labels[key]:
                failures.append(
                    f"{res.ref}: {key} is {meta[key]!r} on the object but "
                    f"{tpl_labels[key]!r} on its pods"
                )
        selector = res.model.spec.selector if res.kind != "CronJob" else None
        if res.kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            if selector_is_empty(selector):
                failures.append(f"{res.ref}: empty selector")
                continue
            if not selector_matches(selector, tpl_labels):
                failures.append(f"{res.ref}: selector does not match its pod template labels")
            for other in workloads:
                if other is not res and selector_matches(selector, pod_labels(other)):
                    failures.append(f"{res.ref}: selector also matches the pods of {other.ref}")
    return failures


def check_topology(bundle: Bundle) -> list[str]:
    """Deployments spread their pods over nodes (kubernetes.io/hostname) and StatefulSets
    over zones at least; each constraint selects the workload's own pods only."""
    failures = []
    for res in bundle.of_kind("Deployment", "StatefulSet"):
        spec = pod_template(res).spec
        constraints = spec.topology_spread_constraints or []
        keys = {t.topology_key for t in constraints}
        if not constraints:
            failures.append(f"{res.ref}: no topologySpreadConstraints")
            continue
        if res.kind == "Deployment" and "kubernetes.io/hostname" not in keys:
            failures.append(f"{res.ref}: pods are not spread over nodes (kubernetes.io/hostname)")
        own = pod_labels(res)
        for t in constraints:
            if selector_is_empty(t.label_selector) or not selector_matches(t.label_selector, own):
                failures.append(
                    f"{res.ref}: spread constraint on {t.topology_key} does not select its own pods"
                )
            for other in bundle.workloads:
                if other is not res and selector_matches(t.label_selector, pod_labels(other)):
                    failures.append(
                        f"{res.ref}: spread constraint on {t.topology_key} also counts {other.ref}"
                    )
    return failures


def check_ports(bundle: Bundle) -> list[str]:
    """Each service runs as the workload kind and on the ports of docs/architecture.md:
    container ports `grpc` and `metrics`, PERCEPT_PORT/PERCEPT_METRICS_PORT, `args` naming
    the service for the image's `percept serve` entrypoint, and Prometheus scrape
    annotations on the metrics port; a plaintext health port (PERCEPT_HEALTH_PORT, for the
    probes under TLS) is declared as the container port `health` and is neither of the
    other two. A PodMonitor (components/podmonitor) selects every
    server's pods and no others, and scrapes their `metrics` container port at /metrics,
    which the NetworkPolicies open to the monitoring namespace; its scrapeTimeout fits its
    interval."""
    failures = []
    found: set[str] = set()
    for res in bundle.workloads:
        name = app_name(res)
        spec = SERVICES.get(name)
        c = server_container(res)
        if c is None:
            if spec is not None:
                failures.append(f"{res.ref}: serves {name} but has no container port named grpc")
            continue
        where = located(res, c)
        if spec is None:
            failures.append(f"{where}: serves gRPC but {name!r} is not a percept service")
            continue
        found.add(name)
        if res.kind != spec.kind:
            failures.append(f"{res.ref}: {name} must be a {spec.kind}")
        ports = named_ports(c)
        for port_name, want in (("grpc", spec.grpc_port), ("metrics", spec.metrics_port)):
            if ports.get(port_name) != want:
                failures.append(f"{where}: port {port_name} is {ports.get(port_name)}, want {want}")
        env = effective_env(bundle, c)
        for var, want in (
            ("PERCEPT_PORT", spec.grpc_port),
            ("PERCEPT_METRICS_PORT", spec.metrics_port),
        ):
            if env.get(var) != str(want):
                failures.append(f"{where}: {var} is {env.get(var)!r}, want '{want}'")
        health = health_port(env)
        declared = ports.get("health")
        if health is not None and declared != health:
            failures.append(
                f"{where}: PERCEPT_HEALTH_PORT is {health} but the container port named health "
                f"is {declared}: declare it (the probes and the image's EXPOSE go by it)"
            )
        if declared is not None and health is None:
            failures.append(
                f"{where}: declares the container port health ({declared}) but "
                f"PERCEPT_HEALTH_PORT is {env.get('PERCEPT_HEALTH_PORT')!r}: nothing listens there"
            )
        if health is not None and health in (spec.grpc_port, spec.metrics_port):
            failures.append(
                f"{where}: PERCEPT_HEALTH_PORT {health} is also its grpc or metrics port"
            )
        if c.command:
            failures.append(f"{where}: overrides the image's entrypoint (command: {c.command})")
        if not c.args or c.args[0] != name:
            failures.append(f"{where}: args {c.args} do not start with the service name {name!r}")
        ann = dict(pod_template(res).metadata.annotations or {})
        if ann.get("prometheus.io/scrape") != "true":
            failures.append(f'{res.ref}: pods lack prometheus.io/scrape: "true"')
        if ann.get("prometheus.io/port") != str(spec.metrics_port):
            failures.append(
                f"{res.ref}: prometheus.io/port is {ann.get('prometheus.io/port')!r}, "
                f"want '{spec.metrics_port}'"
            )
        if ann.get("prometheus.io/path") != "/metrics":
            failures.append(f"{res.ref}: prometheus.io/path is {ann.get('prometheus.io/path')!r}")
    if bundle.kind == "app":
        for name in SERVICES:
            if name not in found:
                failures.append(f"no workload serves {name}")
    return failures + check_pod_monitors(bundle)


def _seconds(raw: str | None) -> float | None:
    """A non-negative number of seconds from an env value, or None."""
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


#: The most a pod the liveness probe restarts may take to stop (probe-level grace).
LIVENESS_GRACE_SECONDS = 60


def check_drain(bundle: Bundle) -> list[str]:
    """terminationGracePeriodSeconds >= preStop sleep + the server's drain
    (PERCEPT_DRAIN_SECONDS) + 5 s; the liveness probe's own terminationGracePeriodSeconds at
    most LIVENESS_GRACE_SECONDS. (Liveness may fail sooner than the drain ends: the
    kubelet stops liveness and startup probes once a pod is being deleted,
    pkg/kubelet/prober/worker.go, so a draining pod is not restarted.)"""
    failures = []
    for res, c in serving_workloads(bundle):
        where = located(res, c)
        spec = pod_template(res).spec
        grace = spec.termination_grace_period_seconds
        grace = 30 if grace is None else grace
        pre_stop = pre_stop_seconds(c)
        if pre_stop is None:
            failures.append(f"{where}: no preStop sleep")
            pre_stop = 0
        raw = effective_env(bundle, c).get("PERCEPT_DRAIN_SECONDS")
        drain = _seconds(raw)
        if drain is None:
            failures.append(f"{where}: PERCEPT_DRAIN_SECONDS is {raw!r}, want seconds")
            continue
        need = pre_stop + drain + GRACE_MARGIN_SECONDS
        if grace < need:
            failures.append(
                f"{res.ref}: terminationGracePeriodSeconds {grace} < preStop {pre_stop} + "
                f"drain {drain:g} + margin {GRACE_MARGIN_SECONDS} = {need:g}"
            )
        liveness = c.liveness_probe
        kill_after = None if liveness is None else liveness.termination_grace_period_seconds
        if liveness is not None and (kill_after is None or kill_after > LIVENESS_GRACE_SECONDS):
            failures.append(
                f"{where}: livenessProbe.terminationGracePeriodSeconds is {kill_after}, want "
                f"at most {LIVENESS_GRACE_SECONDS}: a pod the liveness probe restarts (a "
                f"batch stalled on a hung GPU, --stall-seconds) would otherwise wait the "
                f"pod's {grace} s drain grace, its hung thread keeping it from exiting"
            )
    return failures


def startup_budget(container: Any) -> int:
    """Seconds a container's startup probe allows before the kubelet restarts it:
    initialDelaySeconds + failureThreshold x periodSeconds (Kubernetes' defaults 0, 3, 10);
    0 without a startup probe."""
    probe = container.startup_probe
    if probe is None:
        return 0
    delay = probe.initial_delay_seconds or 0
    threshold = probe.failure_threshold if probe.failure_threshold is not None else 3
    period = probe.period_seconds if probe.period_seconds is not None else 10
    return int(delay + threshold * period)


def check_rollout_deadline(bundle: Bundle) -> list[str]:
    """A Deployment's progressDeadlineSeconds (default 600) covers one pod's replacement:
    the old pod's terminationGracePeriodSeconds (with maxSurge 0 the new pod waits for its
    GPU) + the startup probe's budget (initialDelaySeconds + failureThreshold x
    periodSeconds) + 600 s to pull the image; otherwise a slow but healthy rollout is
    reported failed (ProgressDeadlineExceeded) and `kubectl rollout status` exits."""
    failures = []
    for res in bundle.of_kind("Deployment"):
        spec = pod_template(res).spec
        deadline = res.model.spec.progress_deadline_seconds
        deadline = 600 if deadline is None else deadline
        grace = spec.termination_grace_period_seconds
        grace = 30 if grace is None else grace
        startup = max((startup_budget(c) for c in spec.containers or []), default=0)
        need = startup + grace + IMAGE_PULL_ALLOWANCE_SECONDS
        if deadline < need:
            failures.append(
                f"{res.ref}: progressDeadlineSeconds {deadline} < startup probe {startup} + "
                f"grace {grace} + image pull {IMAGE_PULL_ALLOWANCE_SECONDS} = {need}"
            )
    return failures


def check_config(bundle: Bundle) -> list[str]:
    """The server ConfigMap sets the required flags (max batch, wait, queue, message size,
    pixels, drain, log format json) with valid values; every PERCEPT_* variable names a
    real `percept serve` flag (or PERCEPT_GIT_SHA, the image's commit); HF_HUB_OFFLINE=1
    everywhere. TLS: a certificate comes with its key (PERCEPT_TLS_CERT/KEY,
    PERCEPT_EMBED_TLS_CERT/KEY), a client CA only with a certificate, PERCEPT_EMBED_TLS_*
    only with PERCEPT_EMBED_TARGET (search), and the servers of a target serve TLS all or
    none (a partly applied components/tls)."""
    failures = []
    known = {flag_env(f) for f in SERVER_FLAGS} | set(PERCEPT_NON_FLAG_ENV)
    tls_on: dict[str, bool] = {}
    for cm in bundle.of_kind("ConfigMap"):
        for key in cm.model.data or {}:
            if key.startswith("PERCEPT_") and key not in known:
                failures.append(f"{cm.ref}: {key} is not a `percept serve` flag")
    for res in bundle.workloads:
        for c in all_containers(pod_template(res).spec):
            where = located(res, c)
            env = effective_env(bundle, c)
            for key in env:
                if key.startswith("PERCEPT_") and key not in known:
                    failures.append(f"{where}: {key} is not a `percept serve` flag")
            if env.get("HF_HUB_OFFLINE") != "1":
                failures.append(f"{where}: HF_HUB_OFFLINE is not 1")
            if server_container(res) is not c:
                continue
            for key in REQUIRED_CONFIG:
                if key not in env:
                    failures.append(f"{where}: {key} is not set")
            for key in POSITIVE_INT_FLAGS + NON_NEGATIVE_INT_FLAGS:
                if key in env:
                    value = env[key]
                    low = 1 if key in POSITIVE_INT_FLAGS else 0
                    if not value.isdigit() or int(value) < low:
                        failures.append(f"{where}: {key}={value!r} is not an integer >= {low}")
            for key in NON_NEGATIVE_FLOAT_FLAGS:
                if key in env and _seconds(env[key]) is None:
                    failures.append(f"{where}: {key}={env[key]!r} is not a number >= 0")
            if env.get("PERCEPT_LOG_FORMAT") not in (None, "json"):
                failures.append(
                    f"{where}: PERCEPT_LOG_FORMAT is {env['PERCEPT_LOG_FORMAT']!r}, want json"
                )
            if env.get("PERCEPT_DEVICE", "auto") not in ("auto", "cpu", "cuda"):
                failures.append(f"{where}: PERCEPT_DEVICE {env['PERCEPT_DEVICE']!r}")
            batch, queue = env.get("PERCEPT_MAX_BATCH", ""), env.get("PERCEPT_MAX_QUEUE", "")
            if batch.isdigit() and queue.isdigit() and int(queue) < int(batch):
                failures.append(f"{where}: PERCEPT_MAX_QUEUE {queue} < PERCEPT_MAX_BATCH {batch}")
            failures += _tls_pairs(where, env)
            tls_on[res.ref] = serves_tls(env)
    if any(tls_on.values()) and not all(tls_on.values()):
        on = ", ".join(ref for ref, tls in tls_on.items() if tls)
        off = ", ".join(ref for ref, tls in tls_on.items() if not tls)
        failures.append(
            f"{on} serve TLS but {off} do not: components/tls applies to every server "
            "(its patch target missed these)"
        )
    return failures


def _tls_pairs(where: str, env: dict[str, str]) -> list[str]:
    """A server's TLS settings that only work together (services/common/config.py refuses
    the others): a certificate and its key, a client CA (mutual TLS) on a server that
    serves TLS, authorization rules (--tls-authorize) on a server that asks for client
    certificates, search's TLS towards embed only where there is an embed target."""
    failures = []
    for cert, key in (
        ("PERCEPT_TLS_CERT", "PERCEPT_TLS_KEY"),
        ("PERCEPT_EMBED_TLS_CERT", "PERCEPT_EMBED_TLS_KEY"),
    ):
        if bool(env.get(cert)) != bool(env.get(key)):
            given, lacking = (cert, key) if env.get(cert) else (key, cert)
            failures.append(f"{where}: {given} is set without {lacking}")
    if env.get("PERCEPT_TLS_CLIENT_CA") and not serves_tls(env):
        failures.append(
            f"{where}: PERCEPT_TLS_CLIENT_CA (mutual TLS) is set but PERCEPT_TLS_CERT is not: "
            "the server serves plaintext"
        )
    if env.get("PERCEPT_TLS_AUTHORIZE") and not env.get("PERCEPT_TLS_CLIENT_CA"):
        failures.append(
            f"{where}: PERCEPT_TLS_AUTHORIZE is set without PERCEPT_TLS_CLIENT_CA: the names "
            "it allows are those of verified client certificates"
        )
    embed_tls = [name for name in EMBED_TLS_ENV if env.get(name)]
    if embed_tls and not env.get("PERCEPT_EMBED_TARGET"):
        failures.append(
            f"{where}: {', '.join(embed_tls)} set without PERCEPT_EMBED_TARGET (only search "
            "calls embed): `percept serve` refuses to start"
        )
    return failures


def check_references(bundle: Bundle) -> list[str]:
    """Every ConfigMap (envFrom, env, volume) and PersistentVolumeClaim a pod refers to
    exists in the render (a job's PVC in the overlay it is applied beside). Every TLS file
    a PERCEPT_*TLS* variable names lies on a Secret (or projected) volume of the pod that
    lists that key, not optional, mounted read-only and whole (a subPath mount never sees a
    rotated Secret; the Secret itself is made outside the render, by cert-manager or
    kubectl)."""
    failures = []
    for res in bundle.workloads:
        spec = pod_template(res).spec
        for c in all_containers(spec):
            failures += _tls_file_references(bundle, res, spec, c)
            for source in c.env_from or []:
                ref = source.config_map_ref
                if (
                    ref is not None
                    and not ref.optional
                    and configmap_data(bundle, ref.name) is None
                ):
                    failures.append(
                        f"{located(res, c)}: envFrom ConfigMap {ref.name} does not exist"
                    )
            for var in c.env or []:
                ref = var.value_from.config_map_key_ref if var.value_from else None
                if ref is not None and not ref.optional:
                    data = configmap_data(bundle, ref.name)
                    if data is None or ref.key not in data:
                        failures.append(
                            f"{located(res, c)}: {var.name} refers to missing {ref.name}/{ref.key}"
                        )
        for vol in spec.volumes or []:
            cm = vol.config_map
            if cm is not None and not cm.optional and configmap_data(bundle, cm.name) is None:
                failures.append(f"{res.ref}: volume {vol.name}: ConfigMap {cm.name} missing")
            if vol.persistent_volume_claim is not None:
                claim = vol.persistent_volume_claim.claim_name
                if bundle.get("PersistentVolumeClaim", claim, companions=True) is None:
                    failures.append(f"{res.ref}: volume {vol.name}: PVC {claim} does not exist")
    return failures


def check_jobs(bundle: Bundle) -> list[str]:
    """Training Jobs run `percept train ...`, never restart in place, and are bounded:
    backoffLimit, activeDeadlineSeconds and ttlSecondsAfterFinished are set; they write to
    a PersistentVolumeClaim. A Job that retries passes `--resume-if-present`: the trainer
    refuses to start over a checkpoint, so without it a retry after an eviction fails at
    once on the checkpoint its first try left."""
    failures = []
    jobs = bundle.of_kind("Job")
    if bundle.kind == "job" and not jobs:
        failures.append("the job target renders no Job")
    for job in jobs:
        spec = job.model.spec
        pod = spec.template.spec
        if pod.restart_policy not in ("Never", "OnFailure"):
            failures.append(f"{job.ref}: restartPolicy {pod.restart_policy}")
        if spec.backoff_limit is None or spec.backoff_limit > 6:
            failures.append(f"{job.ref}: backoffLimit {spec.backoff_limit} (want <= 6)")
        if spec.active_deadline_seconds is None:
            failures.append(
                f"{job.ref}: no activeDeadlineSeconds (a stuck run holds a GPU forever)"
            )
        if spec.ttl_seconds_after_finished is None:
            failures.append(f"{job.ref}: no ttlSecondsAfterFinished")
        c = (pod.containers or [None])[0]
        if c is None or list(c.command or [])[:2] != ["percept", "train"]:
            failures.append(f"{job.ref}: does not run `percept train`")
        if not any(v.persistent_volume_claim is not None for v in pod.volumes or []):
            failures.append(f"{job.ref}: writes no PersistentVolumeClaim")
        retries = spec.backoff_limit is None or spec.backoff_limit > 0
        if c is not None and retries and "--resume-if-present" not in (c.args or []):
            failures.append(f"{job.ref}: retried (backoffLimit {spec.backoff_limit}) without "
                            "--resume-if-present: a retry would fail on the first try's "
                            "checkpoint")
    return failures


def _secret_keys(volume: Any) -> tuple[str, set[str] | None, bool] | None:
    """(what, the file paths it holds or None when it holds every key of its Secrets,
    optional) of a Secret or projected volume; None for any other volume."""
    if volume.secret is not None:
        items = volume.secret.items
        paths = {i.path for i in items} if items else None
        return f"Secret {volume.secret.secret_name}", paths, bool(volume.secret.optional)
    if volume.projected is not None:
        secrets = [s.secret for s in volume.projected.sources or [] if s.secret is not None]
        if not secrets:
            return None
        listed: set[str] = set()
        for secret in secrets:
            listed |= {i.path for i in secret.items or []}
        # a source without items projects every key of its Secret
        held = None if any(not secret.items for secret in secrets) else listed
        names = ", ".join(secret.name or "?" for secret in secrets)
        return f"projected Secret {names}", held, any(bool(x.optional) for x in secrets)
    return None


def _tls_file_references(bundle: Bundle, res: Any, spec: Any, container: Any) -> list[str]:
    """The TLS files a container's PERCEPT_*TLS* variables name: on a mounted Secret."""
    failures = []
    where = located(res, container)
    env = effective_env(bundle, container)
    volumes = {v.name: v for v in spec.volumes or []}
    seen: set[str] = set()
    for name in TLS_FILE_ENV:
        path = env.get(name)
        if not path:
            continue
        mounts = [
            m
            for m in container.volume_mounts or []
            if _under(path, [m.mount_path]) and path.rstrip("/") != m.mount_path.rstrip("/")
        ]
        if not mounts:
            failures.append(f"{where}: {name}={path} lies on no volume mount")
            continue
        mount = max(mounts, key=lambda m: len(m.mount_path))
        volume = volumes.get(mount.name)
        found = _secret_keys(volume) if volume is not None else None
        if found is None:
            failures.append(
                f"{where}: {name}={path} lies on volume {mount.name}, which is not a Secret"
            )
            continue
        what, paths, optional = found
        relative = path[len(mount.mount_path.rstrip("/")) + 1 :]
        if paths is not None and relative not in paths:
            failures.append(
                f"{where}: {name}={path}: volume {mount.name} ({what}) holds "
                f"{', '.join(sorted(paths))}, not {relative}"
            )
        if mount.name in seen:
            continue  # the mount itself is checked once
        seen.add(mount.name)
        if optional:
            failures.append(
                f"{where}: volume {mount.name} ({what}) is optional: a missing Secret "
                "would start the server without its TLS files"
            )
        if not mount.read_only:
            failures.append(f"{where}: volume {mount.name} is not mounted read-only")
        if mount.sub_path or mount.sub_path_expr:
            failures.append(
                f"{where}: volume {mount.name} is mounted with a subPath, which never "
                "sees a rotated Secret (mount the whole volume)"
            )
    return failures
