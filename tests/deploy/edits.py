"""Edits of rendered objects for the tests that show a policy check fails: a copy of a
bundle with one object changed the way a careless edit would, and what one check says."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

from deploy.objects import Resource, to_model
from deploy.policy import Bundle, check_by_name

Mutation = Callable[[dict[str, Any]], None]


def broken(bundle: Bundle, kind: str, name: str, mutate: Mutation) -> Bundle:
    """A copy of the bundle in which one object (by kind and name) was changed."""
    resources = []
    hit = False
    for r in bundle.resources:
        if r.kind == kind and (r.name == name or r.name.startswith(name + "-")):
            raw = copy.deepcopy(r.raw)
            mutate(raw)
            resources.append(Resource(raw, to_model(raw)))
            hit = True
        else:
            resources.append(r)
    assert hit, f"no {kind}/{name} in {bundle.target}"
    return dataclasses.replace(bundle, resources=resources)


def failures(check: str, bundle: Bundle) -> list[str]:
    """What one check says about a bundle."""
    return check_by_name(check).func(bundle)


def pod(raw: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a workload dict."""
    return raw["spec"]["template"]["spec"]


def server(raw: dict[str, Any]) -> dict[str, Any]:
    """The first container of a workload dict."""
    return pod(raw)["containers"][0]


def set_env(raw: dict[str, Any], name: str, value: str) -> None:
    """Set (or add) an env var on the first container."""
    env = server(raw).setdefault("env", [])
    for var in env:
        if var["name"] == name:
            var["value"] = value
            return
    env.append({"name": name, "value": value})
