"""The whole offline validation: render -> JSON schema -> typed models -> policies.

`validate_targets()` runs it for every target in `deploy.render.TARGETS` and returns one
`Report`; `deploy/validate.py` prints it, and the tests reuse the same bundles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deploy import render
from deploy.dockerfile import Dockerfile, DockerfileError
from deploy.dockerfile import load as load_dockerfile
from deploy.objects import ModelError, Resource, schema_errors, schema_version, to_model
from deploy.policy import Bundle, CheckResult, run_checks
from deploy.policy.model import workload_images

#: the stages every target goes through before its policy checks
STAGES = ("render", "schema", "typed-models")


@dataclass
class TargetReport:
    """What happened to one target: each stage's failures, its bundle and check results."""

    target: render.Target
    stages: dict[str, list[str]] = field(default_factory=dict)
    bundle: Bundle | None = None
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        """Every failure of this target, stage failures first."""
        out = [
            f"[{self.target.name}] {stage}: {f}" for stage, fs in self.stages.items() for f in fs
        ]
        out += [f"[{self.target.name}] {r.check}: {f}" for r in self.results for f in r.failures]
        return out


@dataclass
class Report:
    """The validation of every target."""

    kubectl: str
    kubernetes_version: str
    validator_version: str
    targets: list[TargetReport]
    dockerfile_error: str | None = None

    @property
    def failures(self) -> list[str]:
        """Every failure, in target order."""
        out = [f"Dockerfile: {self.dockerfile_error}"] if self.dockerfile_error else []
        for t in self.targets:
            out += t.failures
        return out

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failures


def build_bundle(
    target: render.Target,
    objects: list[dict],
    version: str,
    dockerfile: Dockerfile | None,
    companions: list[Resource] | None = None,
    release_images: dict[str, list[str]] | None = None,
) -> TargetReport:
    """Schema-validate and type the rendered objects of a target, then check policies.
    `release_images` maps every target rendered beside it to its workloads' images."""
    report = TargetReport(target)
    schema: list[str] = []
    models: list[str] = []
    resources: list[Resource] = []
    for obj in objects:
        ref = f"{obj.get('kind', '?')}/{obj.get('metadata', {}).get('name', '?')}"
        schema += [f"{ref}: {e}" for e in schema_errors(obj, version)]
        try:
            resources.append(Resource(obj, to_model(obj)))
        except ModelError as exc:
            models.append(f"{ref}: {exc}")
    report.stages["schema"] = schema
    report.stages["typed-models"] = models
    if models:
        return report  # the policy checks read the typed models: not all could be built
    report.bundle = Bundle(
        target=target.name,
        accelerator=target.accelerator,
        resources=resources,
        kind=target.kind,
        companions=companions or [],
        dockerfile=dockerfile,
        release_images=release_images or {target.name: workload_images(objects)},
    )
    report.results = run_checks(report.bundle)
    return report


def validate_targets(targets: tuple[render.Target, ...] = render.TARGETS) -> Report:
    """Render, validate and check every target."""
    kubectl = render.find_kubectl()
    version = schema_version()
    from deploy.objects import validator_version

    dockerfile: Dockerfile | None = None
    dockerfile_error = None
    try:
        dockerfile = load_dockerfile(render.DOCKERFILE)
    except (OSError, DockerfileError) as exc:
        dockerfile_error = str(exc)
    report = Report(kubectl, version, validator_version(), [], dockerfile_error)
    # Every target first: the release check compares each target's images with the others'.
    rendered: dict[str, list[dict]] = {}
    render_errors: dict[str, str] = {}
    for target in targets:
        try:
            rendered[target.name] = render.render(target, kubectl)
        except render.RenderError as exc:
            render_errors[target.name] = str(exc)
    release_images = {name: workload_images(objs) for name, objs in rendered.items()}
    by_name: dict[str, TargetReport] = {}
    for target in targets:
        if target.name in render_errors:
            failed = TargetReport(target, {"render": [render_errors[target.name]]})
            report.targets.append(failed)
            by_name[target.name] = failed
            continue
        objects = rendered[target.name]
        companions: list[Resource] = []
        if target.companion:
            companion = by_name.get(target.companion)
            if companion is None or companion.bundle is None:
                failed = TargetReport(
                    target, {"render": [f"its companion {target.companion} did not validate"]}
                )
                report.targets.append(failed)
                by_name[target.name] = failed
                continue
            companions = companion.bundle.resources
        result = build_bundle(
            target, objects, version, dockerfile, companions, release_images
        )
        result.stages = {"render": [], **result.stages}
        report.targets.append(result)
        by_name[target.name] = result
    return report
