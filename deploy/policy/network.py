"""NetworkPolicy: a small evaluator of ingress rules, and the reachability policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploy.objects import Resource
from deploy.policy.model import (
    CLIENT_NAMESPACE_LABEL,
    CLIENT_NAMESPACE_VALUE,
    MONITORING_NAMESPACE,
    NAME_LABEL,
    SERVICES,
    Bundle,
    app_name,
    named_ports,
    pod_labels,
    pod_template,
    selector_is_empty,
    selector_matches,
)

# NetworkPolicy evaluation ------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A traffic source: a pod's namespace (and the namespace's labels) and the pod's
    labels."""

    namespace: str
    pod_labels: tuple[tuple[str, str], ...] = ()
    description: str = ""
    namespace_label_pairs: tuple[tuple[str, str], ...] = ()

    @property
    def namespace_labels(self) -> dict[str, str]:
        """The namespace's labels: its own, and the automatic kubernetes.io/metadata.name."""
        return {**dict(self.namespace_label_pairs), "kubernetes.io/metadata.name": self.namespace}


#: the namespace label that opts a namespace in as a client of the gRPC ports
CLIENT_LABEL = ((CLIENT_NAMESPACE_LABEL, CLIENT_NAMESPACE_VALUE),)


def _policy_types(policy: Any) -> list[str]:
    spec = policy.spec
    if spec.policy_types:
        return list(spec.policy_types)
    return ["Ingress"] + (["Egress"] if spec.egress else [])


def _peer_matches(peer: Any, source: Peer, policy_namespace: str) -> bool:
    if peer.ip_block is not None:
        return False  # ipBlock is for cluster-external addresses, not pods
    labels = dict(source.pod_labels)
    if peer.namespace_selector is None:
        if source.namespace != policy_namespace:
            return False
    elif not selector_matches(peer.namespace_selector, source.namespace_labels):
        return False
    return peer.pod_selector is None or selector_matches(peer.pod_selector, labels)


def _port_matches(rule_port: Any, port: int, port_names: dict[str, int]) -> bool:
    if (rule_port.protocol or "TCP") != "TCP":
        return False
    if rule_port.port is None:
        return True
    if isinstance(rule_port.port, str) and not rule_port.port.isdigit():
        return port_names.get(rule_port.port) == port
    low = int(rule_port.port)
    high = rule_port.end_port or low
    return low <= port <= high


def ingress_allowed(
    policies: list[Resource],
    namespace: str,
    dest_labels: dict[str, str],
    dest_ports: dict[str, int],
    port: int,
    source: Peer,
) -> bool:
    """Whether NetworkPolicies let `source` open a TCP connection to `port` of a pod with
    `dest_labels` (and named ports `dest_ports`) in `namespace`."""
    selecting = [
        p
        for p in policies
        if (p.namespace or namespace) == namespace
        and "Ingress" in _policy_types(p.model)
        and selector_matches(p.model.spec.pod_selector, dest_labels)
    ]
    if not selecting:
        return True  # a pod no policy selects is not isolated
    for p in selecting:
        for rule in p.model.spec.ingress or []:
            peers = rule.var_from
            if peers and not any(_peer_matches(x, source, namespace) for x in peers):
                continue
            ports = rule.ports
            if ports and not any(_port_matches(x, port, dest_ports) for x in ports):
                continue
            return True
    return False


#: a port no percept container declares: nothing may reach it
UNDECLARED_PORT = 8080


def check_network_policy(bundle: Bundle) -> list[str]:
    """Ingress is denied by default; inside the namespace only search may call embed's gRPC
    port (also when the percept namespace itself carries the client label); namespaces
    labelled percept.io/client=true may reach the gRPC ports of superres/style/embed/search
    only, and an unlabelled namespace nothing; the monitoring namespace may scrape every
    metrics port; any other port (the plaintext health port of components/tls) no pod or
    namespace may reach: the kubelet probes it from the pod's own node, which
    NetworkPolicy always admits."""
    failures = []
    policies = bundle.of_kind("NetworkPolicy")
    ns = bundle.namespace
    if not any(
        selector_is_empty(p.model.spec.pod_selector)
        and "Ingress" in _policy_types(p.model)
        and not p.model.spec.ingress
        for p in policies
    ):
        failures.append("no default-deny ingress NetworkPolicy (podSelector {} with no rules)")
    insiders = [
        Peer(ns, tuple(sorted(pod_labels(w).items())), f"{app_name(w)} pods", labels)
        for w in bundle.workloads
        for labels in ((), CLIENT_LABEL)
    ]
    client = Peer("clients", (), "a client namespace (percept.io/client=true)", CLIENT_LABEL)
    stranger = Peer("others", (), "an unlabelled namespace")
    monitoring = Peer(MONITORING_NAMESPACE, (), "the monitoring namespace")
    for dest in bundle.workloads:
        dest_name = app_name(dest)
        labels = pod_labels(dest)
        ports: dict[str, int] = {}
        for c in pod_template(dest).spec.containers or []:
            ports.update(named_ports(c))
        cases = [*ports.items(), ("undeclared", UNDECLARED_PORT)]
        for port_name, port in cases:
            expectations: list[tuple[Peer, bool]] = []
            for src in insiders:
                src_name = dict(src.pod_labels).get(NAME_LABEL)
                ok = src_name == "search" and dest_name == "embed" and port_name == "grpc"
                expectations.append((src, ok))
            expectations.append((client, dest_name in SERVICES and port_name == "grpc"))
            expectations.append((stranger, False))
            if port_name == "metrics":
                expectations.append((monitoring, True))
            for src, want in expectations:
                got = ingress_allowed(policies, ns, labels, ports, port, src)
                if got != want:
                    where = (
                        " (namespace labelled as a client)"
                        if src.namespace == ns and src.namespace_label_pairs
                        else ""
                    )
                    failure = (
                        f"{src.description}{where} -> {dest_name}:{port_name} ({port}) is "
                        f"{'allowed' if got else 'denied'}; want {'allowed' if want else 'denied'}"
                    )
                    if failure not in failures:
                        failures.append(failure)
    return failures
