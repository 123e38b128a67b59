"""Pure ``torch.nn`` architectures, built by name from an artifact's ``config.json``.

Each architecture module registers its constructor with :func:`register`; services and
trainers build modules with :func:`build` so that the architecture lives in data, not code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
# Modules that register architectures; imported lazily by build().
_ARCHITECTURE_MODULES = (
    "training.nets.superres",
    "training.nets.transformer",
    "training.nets.devise",
)

F = TypeVar("F", bound=Callable[..., nn.Module])


def register(name: str) -> Callable[[F], F]:
    """Registers an architecture constructor under ``name`` (the config's ``type``)."""

    def decorator(constructor: F) -> F:
        if name in _ARCHITECTURES and _ARCHITECTURES[name] is not constructor:
            raise ValueError(f"architecture {name!r} is registered twice")
        _ARCHITECTURES[name] = constructor
        return constructor

    return decorator


def _import_architecture_modules() -> None:
    for module in _ARCHITECTURE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:
                raise


def architectures() -> list[str]:
    """Names of every registered architecture."""
    _import_architecture_modules()
    return sorted(_ARCHITECTURES)


def build(architecture: Mapping[str, Any]) -> nn.Module:
    """Builds the module described by ``{"type": name, **constructor_kwargs}``."""
    _import_architecture_modules()
    spec = dict(architecture)
    kind = spec.pop("type", None)
    if kind not in _ARCHITECTURES:
        known = ", ".join(sorted(_ARCHITECTURES))
        raise ValueError(f"unknown architecture {kind!r}; known: {known}")
    return _ARCHITECTURES[kind](**spec)
