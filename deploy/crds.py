"""The custom resources percept renders, which neither kubernetes-validate nor the
`kubernetes` client knows: a JSON schema of our own for each, checked as strictly as the
bundled ones, and a typed model derived from that schema.

Two kinds of the Prometheus Operator (monitoring.coreos.com/v1), each schema
written for this project: a subset of the operator's CRD with only the fields its
component uses, and stricter than the CRD. They are not the operator's CRDs
(monitoring.coreos.com_*.yaml in prometheus-operator/prometheus-operator): a field the
operator accepts but a schema here lacks fails validation until it is added here.
`metadata` and `selector` are the Kubernetes ObjectMeta and LabelSelector of the schemas
kubernetes-validate bundles (strict).

- PODMONITOR_SCHEMA, the PodMonitor of deploy/k8s/components/podmonitor:
  `podMetricsEndpoints` and each endpoint's `port` are required (honorLabels,
  relabelings ... are not there).
- PROMETHEUSRULE_SCHEMA, the PrometheusRule of deploy/k8s/components/alerts: `groups` is
  required and non-empty, each group has a `name` and at least one rule, each rule an
  `expr` and exactly one of `alert` and `record` (a recording rule has no `for` and no
  annotations, as Prometheus itself requires), `for` is a duration, `labels` and
  `annotations` map strings to strings (group `interval`, `limit`, `keep_firing_for` ...
  are not there). That group names, and alert names, are unique is the `alerts` policy's
  to check (deploy/policy/monitoring.py): a JSON schema cannot say it.
"""

from __future__ import annotations

import functools
import keyword
import re
from collections.abc import Callable
from typing import Any

#: the bundled definitions of the built-in types, by their absolute reference
_K8S_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1."
#: a custom keyword: the `kubernetes.client` model that types the value (jsonschema ignores it)
CLIENT_MODEL = "x-kubernetes-client-model"
#: the operator's Duration (its CRD's pattern): 30s, 1m30s, 500ms ...
DURATION_PATTERN = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$"
)
_DURATION = {"type": "string", "pattern": DURATION_PATTERN}

PODMONITOR_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$comment": "percept's own subset of the Prometheus Operator's PodMonitor (deploy/crds.py)",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"$ref": _K8S_META + "ObjectMeta", CLIENT_MODEL: "V1ObjectMeta"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                # the pods to scrape, in the PodMonitor's own namespace (no namespaceSelector)
                "selector": {"$ref": _K8S_META + "LabelSelector", CLIENT_MODEL: "V1LabelSelector"},
                # the pod label whose value becomes the `job` label of the metrics
                "jobLabel": {"type": "string", "minLength": 1},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            # the name of a container port of the selected pods
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                    },
                },
            },
        },
    },
}

#: a custom keyword: the message of an error of the `oneOf` or `not` beside it, instead of
#: jsonschema's, which repeats the whole failing value (jsonschema ignores it)
MESSAGE = "x-percept-message"
#: a Prometheus metric name (what a recording rule records)
METRIC_NAME_PATTERN = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _forbidden(message: str) -> dict[str, Any]:
    """A property that must be absent, with the message that says why."""
    return {"not": {}, MESSAGE: message}


PROMETHEUSRULE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$comment": "percept's own subset of the Prometheus Operator's PrometheusRule "
    "(deploy/crds.py)",
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"$ref": _K8S_META + "ObjectMeta", CLIENT_MODEL: "V1ObjectMeta"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            # unique in the PrometheusRule: the `alerts` policy checks it
                            "name": {"type": "string", "minLength": 1},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "properties": {
                                        "alert": {"type": "string", "minLength": 1},
                                        "record": {
                                            "type": "string",
                                            "pattern": METRIC_NAME_PATTERN,
                                        },
                                        # PromQL (the CRD also takes a number: not here)
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": _DURATION,
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    MESSAGE: "a rule has exactly one of `alert` (an alerting "
                                    "rule) and `record` (a recording rule)",
                                    # Prometheus refuses these on a recording rule
                                    "if": {"required": ["record"]},
                                    "then": {
                                        "properties": {
                                            "for": _forbidden("a recording rule has no `for`"),
                                            "annotations": _forbidden(
                                                "a recording rule has no annotations"
                                            ),
                                        }
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

#: (apiVersion, kind) -> the schema of a custom resource percept renders
SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "PodMonitor"): PODMONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUSRULE_SCHEMA,
}

#: where an error of these schemas points a reader
SOURCE = "percept's own schema, deploy/crds.py"


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return str(obj.get("apiVersion", "")), str(obj.get("kind", ""))


def schema_for(obj: dict[str, Any]) -> dict[str, Any] | None:
    """Our schema for an object's apiVersion and kind, or None for any other kind."""
    return SCHEMAS.get(_key(obj))


@functools.cache
def _validator(key: tuple[str, str], version: str) -> Any:
    """A strict Draft 2020-12 validator of one of SCHEMAS, whose references to the
    built-in types resolve to kubernetes-validate's strict definitions for `version`
    (major.minor)."""
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    schema = SCHEMAS[key]
    full = [v for v in utils.all_versions() if utils.major_minor(v) == version][-1]
    definitions = utils.schema_contents(
        f"kubernetes-json-schema/v{full}-local-strict/_definitions.json", version
    )
    registry: Registry[Any] = Resource.from_contents(definitions) @ Registry()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def schema_errors(obj: dict[str, Any], version: str) -> list[str]:
    """Every error of an object against its schema in SCHEMAS ([] when it validates), as
    `path: message`, in document order. KeyError for a kind without one (schema_for)."""
    validator = _validator(_key(obj), version)
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.path])
    out = []
    for e in errors:
        message = e.message
        if e.validator == "pattern" and e.validator_value == DURATION_PATTERN:
            message = f"{e.instance!r} is not a duration (30s, 1m30s, 500ms ...)"
        elif e.validator in ("oneOf", "not") and MESSAGE in e.schema:
            message = str(e.schema[MESSAGE])
        out.append(f"{'.'.join(str(p) for p in e.path) or '(root)'}: {message} ({SOURCE})")
    return out


def _snake(name: str) -> str:
    """podMetricsEndpoints -> pod_metrics_endpoints, as the kubernetes client names fields;
    a Python keyword gets its `var_` prefix (a rule's `for` -> var_for, as `exec` is
    var_exec in the client)."""
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()
    return f"var_{snake}" if keyword.iskeyword(snake) else snake


class CustomModel:
    """A custom resource (or a part of one) typed by its schema, as the `kubernetes` client
    types the built-in ones: each property the schema declares is an attribute under its
    snake_case name (None when absent); fields the schema does not declare are dropped,
    so the round trip of `deploy.objects.to_model` reports them."""

    def __init__(self, kind: str, fields: dict[str, tuple[str, Any]]) -> None:
        self._kind = kind
        self._keys = {attr: key for attr, (key, _value) in fields.items()}
        for attr, (_key, value) in fields.items():
            setattr(self, attr, value)

    def __getattr__(self, name: str) -> Any:
        # only reached for a name that is not a field: a misspelt one must not read as None
        raise AttributeError(f"{name!r} is not a field of {object.__getattribute__(self, '_kind')}")

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set, under their JSON names (for serialisation)."""
        return {
            key: getattr(self, attr)
            for attr, key in self._keys.items()
            if getattr(self, attr) is not None
        }

    def __repr__(self) -> str:
        return f"{self._kind}({self.to_dict()!r})"


def typed(
    value: Any, schema: dict[str, Any], deserialize: Callable[[Any, str], Any], kind: str = ""
) -> Any:
    """`value` typed by `schema`: objects with declared properties become CustomModels,
    values marked with CLIENT_MODEL the named `kubernetes.client` model (through
    `deserialize`), arrays lists of typed items; anything else stays as it is."""
    if value is None:
        return None
    if CLIENT_MODEL in schema:
        return deserialize(value, schema[CLIENT_MODEL])
    properties = schema.get("properties")
    if properties is not None and isinstance(value, dict):
        name = kind or str(value.get("kind", "object"))
        fields = {
            _snake(key): (key, typed(value.get(key), sub, deserialize, f"{name}.{key}"))
            for key, sub in properties.items()
        }
        return CustomModel(name, fields)
    if "items" in schema and isinstance(value, list):
        return [typed(v, schema["items"], deserialize, f"{kind}[]") for v in value]
    return value


def duration_seconds(value: str) -> float | None:
    """A Prometheus duration (`30s`, `1m30s`, `500ms`) in seconds; None if it is not one."""
    m = re.fullmatch(DURATION_PATTERN, value)
    if m is None:
        return None
    if value == "0":
        return 0.0
    units = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(
        int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|y|w|d|h|m|s)", value)
    )
