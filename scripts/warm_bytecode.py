"""Byte-compiles what percept imports, once, by importing it with bytecode writing on.

`scripts/setup.sh` installs the requirements with ``pip --no-compile``: pip compiles every
file of every package (about 90 s here, torch, sympy and the kubernetes client being most
of it), while the services and tests import a fraction of them. Importing every module of
percept's packages and the dependencies they import lazily writes the ``__pycache__``
files that matter, in a few seconds, even where the environment sets
``PYTHONDONTWRITEBYTECODE`` (which would otherwise leave every process compiling torch
from source at each start). A module missed here is compiled on first import as usual.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path

PACKAGES = ("percept", "services", "training", "benchmarks")
# Imported inside functions by percept's modules, so the walk above does not reach them.
LAZY = ("sentence_transformers", "transformers.models.bert.modeling_bert", "gensim.models",
        "faiss", "sklearn.linear_model", "sklearn.decomposition", "scipy.optimize",
        "skimage.data", "skimage.metrics", "matplotlib.pyplot", "kubernetes_validate",
        "yaml", "jsonschema", "torch._dynamo", "torch._inductor", "xdist", "pytest",
        "grpc_tools.protoc", "tqdm")


def main() -> int:
    sys.dont_write_bytecode = False
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
    started = time.monotonic()
    failed: list[str] = []
    names = list(LAZY)
    for package in PACKAGES:
        try:
            module = importlib.import_module(package)
        except Exception as error:
            failed.append(f"{package} ({error.__class__.__name__})")
            continue
        paths = getattr(module, "__path__", None)
        if paths is not None:
            names += [m.name for m in pkgutil.walk_packages(paths, prefix=f"{package}.")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            failed.append(f"{name} ({error.__class__.__name__})")
    print(f"[setup] byte-compiled the imports of {len(names)} modules in "
          f"{time.monotonic() - started:.0f} s" + (f"; not importable: {', '.join(failed)}"
                                                   if failed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
