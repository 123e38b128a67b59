"""Offline validation of rendered Kubernetes objects, and their typed client models.

Two independent readings of every object:
1. JSON schema: kubernetes-validate's bundled OpenAPI schemas, in strict mode (an unknown
   field is an error), for the newest Kubernetes version it ships; a custom resource
   (the PodMonitor, the PrometheusRule) against our own schema in deploy/crds.py, as
   strictly.
2. Typed models: the `kubernetes` Python client deserialises the object into its model
   classes (`V1Deployment`, `V2HorizontalPodAutoscaler` ...), which run the client-side
   validation of required fields; a custom resource becomes a `deploy.crds.CustomModel`
   typed by its schema. Serialising the model back must give the same object, so no
   field was dropped on the way. The policy checks then read these models.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from packaging.version import Version

from deploy import crds

MIN_KUBERNETES = "1.33"


@dataclass
class Resource:
    """A rendered object: its YAML dict and its typed `kubernetes.client` model."""

    raw: dict[str, Any]
    model: Any

    @property
    def kind(self) -> str:
        """The object's kind, e.g. "Deployment"."""
        return str(self.raw.get("kind", ""))

    @property
    def name(self) -> str:
        """metadata.name."""
        return str(self.raw.get("metadata", {}).get("name", ""))

    @property
    def namespace(self) -> str | None:
        """metadata.namespace, or None for a cluster-scoped object."""
        ns = self.raw.get("metadata", {}).get("namespace")
        return str(ns) if ns is not None else None

    @property
    def ref(self) -> str:
        """A short reference for messages: kind/name."""
        return f"{self.kind}/{self.name}"


class ModelError(ValueError):
    """An object that the typed client models cannot represent faithfully."""


def schema_version() -> str:
    """The newest Kubernetes version whose schemas kubernetes-validate bundles (major.minor).

    Raises RuntimeError when it is older than MIN_KUBERNETES.
    """
    from kubernetes_validate import utils

    newest = max(utils.all_versions(), key=Version)
    major_minor = ".".join(newest.split(".")[:2])
    if Version(major_minor) < Version(MIN_KUBERNETES):
        raise RuntimeError(
            f"kubernetes-validate bundles schemas up to {major_minor} only; "
            f"need >= {MIN_KUBERNETES}"
        )
    return major_minor


def validator_version() -> str:
    """The installed kubernetes-validate's own version."""
    from kubernetes_validate.version import __version__

    return str(__version__)


def schema_errors(obj: dict[str, Any], version: str) -> list[str]:
    """Strict JSON-schema errors for one object ([] when it validates).

    A kind without a bundled schema is an error too, unless deploy/crds.py has one for it:
    strict validation must not pass an object it could not check.
    """
    from kubernetes_validate import utils

    if crds.schema_for(obj) is not None:
        return crds.schema_errors(obj, version)

    try:
        utils.validate(obj, version, strict=True)
    except utils.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(root)"
        return [f"{path}: {exc.message}"]
    except utils.SchemaNotFoundError as exc:
        return [exc.message]
    except (utils.InvalidSchemaError, utils.VersionNotSupportedError) as exc:
        return [exc.message]
    except KeyError as exc:
        return [f"missing {exc.args[0]}"]
    return []


@functools.cache
def _api_client() -> Any:
    from kubernetes import client

    return client.ApiClient()


def model_class_name(api_version: str, kind: str) -> str:
    """The `kubernetes.client` model class for an apiVersion and kind.

    >>> model_class_name("autoscaling/v2", "HorizontalPodAutoscaler")
    'V2HorizontalPodAutoscaler'
    """
    version = api_version.rsplit("/", 1)[-1]
    return version[:1].upper() + version[1:] + kind


def _normalise(value: Any) -> Any:
    """A comparable form: no null fields, every scalar as text (quantities such as
    `nvidia.com/gpu: 1` become strings in the typed models)."""
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in b:
                return f"{path}.{key} is lost"
            if key not in a:
                return f"{path}.{key} appears"
            diff = _first_difference(a[key], b[key], f"{path}.{key}")
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} has {len(b)} items instead of {len(a)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = _first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else f"{path}: {a!r} became {b!r}"


def _one_line(exc: Exception) -> str:
    """A (pydantic) validation error on one line, without its documentation links."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    return " ".join(ln for ln in lines if ln and not ln.startswith("For further information"))


def to_model(obj: dict[str, Any]) -> Any:
    """Deserialise one object into its typed `kubernetes.client` model.

    A custom resource with a schema in deploy/crds.py becomes a `crds.CustomModel` (its
    metadata and selectors the client's models). Raises ModelError when the client has no
    model for the kind, when the client-side validation rejects it (a required field
    missing), or when serialising the model back loses or changes a field.
    """
    from kubernetes import client

    api_version, kind = str(obj.get("apiVersion", "")), str(obj.get("kind", ""))
    api = _api_client()
    deserialize = api._ApiClient__deserialize
    custom = crds.schema_for(obj)
    if custom is not None:
        cls = f"{kind} ({api_version}, typed by deploy/crds.py)"
    else:
        cls = model_class_name(api_version, kind)
        if not hasattr(client, cls):
            raise ModelError(
                f"the kubernetes client has no model {cls} for {api_version} {kind}"
            )
    try:
        model = crds.typed(obj, custom, deserialize) if custom else deserialize(obj, cls)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{cls}: {_one_line(exc)}") from exc
    back = api.sanitize_for_serialization(model)
    diff = _first_difference(_normalise(obj), _normalise(back))
    if diff:
        raise ModelError(f"{cls} does not round-trip: {diff}")
    return model


def load_resources(objects: list[dict[str, Any]]) -> list[Resource]:
    """Typed resources for rendered objects (raises ModelError on the first bad one)."""
    resources = []
    for obj in objects:
        try:
            resources.append(Resource(obj, to_model(obj)))
        except ModelError as exc:
            kind = obj.get("kind", "?")
            name = obj.get("metadata", {}).get("name", "?")
            raise ModelError(f"{kind}/{name}: {exc}") from exc
    return resources
