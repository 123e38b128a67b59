"""The exact command line of the running process, for manifests and provenance (stdlib)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

from training.assets import REPO_ROOT


def command_line(argv: Iterable[str] | None = None) -> str:
    """``sys.argv`` shell-quoted, with ``percept`` for the console script and
    ``python -m package.module`` for modules run with ``-m`` (whose argv[0] is a path)."""
    parts = list(sys.argv if argv is None else argv)
    if parts and Path(parts[0]).name == "percept":
        parts[0] = "percept"
    elif parts and parts[0].endswith(".py"):
        try:
            module = Path(parts[0]).resolve().relative_to(REPO_ROOT).with_suffix("")
            parts[0:1] = ["python", "-m", ".".join(module.parts).removesuffix(".__main__")]
        except ValueError:
            parts.insert(0, "python")
    return " ".join(shlex.quote(p) for p in parts)
