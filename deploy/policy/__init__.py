"""percept's deployment policies, checked on the rendered, typed Kubernetes objects.

Each check is a function `Bundle -> list[str]`: the list of violations, empty when the
policy holds. `CHECKS` lists them with a one-line summary; `run_checks` runs those that
apply to a bundle. The checks read the `kubernetes.client` models (attribute names such
as `container.readiness_probe.grpc.service`), so a misspelt field cannot pass silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from deploy.policy.image import check_dockerfile, check_image_contract
from deploy.policy.model import (
    ALL_IN_ONE,
    NAMESPACE,
    SERVER_FLAGS,
    SERVICES,
    UID,
    Bundle,
    ServiceSpec,
    app_name,
    architecture_flags,
    architecture_ports,
    effective_env,
    named_ports,
    pod_labels,
    pod_template,
    pre_stop_seconds,
    server_container,
)
from deploy.policy.monitoring import (
    check_alert_rules,
    check_dashboards,
    check_object_namespaces,
)
from deploy.policy.network import Peer, check_network_policy, ingress_allowed
from deploy.policy.services import (
    check_autoscaling,
    check_disruption_budgets,
    check_search_statefulset,
    check_services,
    check_teardown,
    disruptions_allowed,
)
from deploy.policy.workloads import (
    check_config,
    check_drain,
    check_gpu,
    check_gpu_isolation,
    check_images,
    check_jobs,
    check_labels,
    check_ports,
    check_probes,
    check_references,
    check_release,
    check_resources,
    check_rollout_deadline,
    check_security,
    check_topology,
    check_writable_paths,
    startup_budget,
)

__all__ = [
    "ALL_IN_ONE",
    "CHECKS",
    "NAMESPACE",
    "SERVER_FLAGS",
    "SERVICES",
    "UID",
    "Bundle",
    "CheckResult",
    "Peer",
    "PolicyCheck",
    "ServiceSpec",
    "app_name",
    "architecture_flags",
    "architecture_ports",
    "check_by_name",
    "disruptions_allowed",
    "effective_env",
    "ingress_allowed",
    "iter_failures",
    "named_ports",
    "pod_labels",
    "pod_template",
    "pre_stop_seconds",
    "run_checks",
    "server_container",
    "startup_budget",
]

# ---------------------------------------------------------------------------------------
# Running them
# ---------------------------------------------------------------------------------------

CheckFn = Callable[[Bundle], list[str]]


@dataclass(frozen=True)
class PolicyCheck:
    """A named policy, the bundle kinds it applies to ("cluster", "app", "job",
    "component"), and the function that checks it."""

    name: str
    func: CheckFn
    scopes: tuple[str, ...] = ("app", "job")

    @property
    def summary(self) -> str:
        """The check's docstring on one line: what must hold."""
        return " ".join((self.func.__doc__ or "").split())

    def applies(self, bundle: Bundle) -> bool:
        """Whether the check runs on this bundle."""
        return bundle.kind in self.scopes


#: every kind of target
ALL_KINDS = ("cluster", "app", "job", "component")

CHECKS: tuple[PolicyCheck, ...] = (
    PolicyCheck("resources", check_resources),
    PolicyCheck("gpu", check_gpu),
    PolicyCheck("gpu-isolation", check_gpu_isolation),
    PolicyCheck("probes", check_probes),
    PolicyCheck("security", check_security),
    PolicyCheck("writable-paths", check_writable_paths),
    PolicyCheck("images", check_images),
    PolicyCheck("release", check_release),
    PolicyCheck("labels", check_labels, ALL_KINDS),
    PolicyCheck("topology", check_topology),
    PolicyCheck("services", check_services, ("app",)),
    PolicyCheck("ports", check_ports, ("app", "job", "component")),
    PolicyCheck("autoscaling", check_autoscaling, ("app",)),
    PolicyCheck("disruption-budgets", check_disruption_budgets, ("app",)),
    PolicyCheck("network-policy", check_network_policy, ("app",)),
    PolicyCheck("drain", check_drain),
    PolicyCheck("rollout-deadline", check_rollout_deadline, ("app",)),
    PolicyCheck("config", check_config),
    PolicyCheck("references", check_references),
    PolicyCheck("search-statefulset", check_search_statefulset, ("app",)),
    # the Grafana dashboard ConfigMaps live in the monitoring namespace: `dashboards`
    PolicyCheck("namespace", check_object_namespaces, ALL_KINDS),
    PolicyCheck("teardown", check_teardown, ALL_KINDS),
    PolicyCheck("jobs", check_jobs),
    PolicyCheck("dockerfile", check_dockerfile, ("app",)),
    PolicyCheck("image-contract", check_image_contract),
    PolicyCheck("alerts", check_alert_rules, ("app", "component")),
    PolicyCheck("dashboards", check_dashboards, ("app", "component")),
)


def check_by_name(name: str) -> PolicyCheck:
    """The registered check called `name`."""
    for check in CHECKS:
        if check.name == name:
            return check
    raise KeyError(name)


@dataclass
class CheckResult:
    """What one check found on one bundle."""

    check: str
    target: str
    failures: list[str]
    applied: bool = True

    @property
    def passed(self) -> bool:
        """True when the check ran and found nothing (or did not apply)."""
        return not self.failures


def run_checks(bundle: Bundle, checks: Iterable[PolicyCheck] = CHECKS) -> list[CheckResult]:
    """Run every applicable check on a bundle; a check that crashes is a failure."""
    results = []
    for check in checks:
        if not check.applies(bundle):
            results.append(CheckResult(check.name, bundle.target, [], applied=False))
            continue
        try:
            failures = check.func(bundle)
        except Exception as exc:  # a malformed object must fail the check, not the run
            failures = [f"check crashed: {type(exc).__name__}: {exc}"]
        results.append(CheckResult(check.name, bundle.target, failures))
    return results


def iter_failures(results: Iterable[CheckResult]) -> Iterator[str]:
    """`[target] check: failure` lines."""
    for r in results:
        for f in r.failures:
            yield f"[{r.target}] {r.check}: {f}"
