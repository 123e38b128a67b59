#!/usr/bin/env python
"""Regenerates percept/v1 Python code (messages, gRPC stubs, .pyi) beside the .proto files.

`make protos` runs it; `--check` regenerates into a temporary folder and exits 1 when the
committed files differ (tests/test_protos.py calls that).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
PACKAGE_DIR = PROTO_ROOT / "percept" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc for every .proto under percept/v1 into out_dir; returns generated files."""
    protos = sorted(PACKAGE_DIR.glob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "percept" / "v1").glob("*_pb2*"))


def generated_files(directory: Path) -> dict[str, Path]:
    return {p.name: p for p in directory.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = generated_files(Path(tmp) / "percept" / "v1")
        current = generated_files(PACKAGE_DIR)
        stale = sorted(name for name in fresh
                       if name not in current or not filecmp.cmp(fresh[name], current[name],
                                                                  shallow=False))
        extra = sorted(set(current) - set(fresh))
        if args.check:
            if stale or extra:
                print("stale generated code: " + ", ".join(stale + extra)
                      + " (run `make protos`)", file=sys.stderr)
                return 1
            print(f"{len(fresh)} generated files are up to date")
            return 0
        for name in extra:
            current[name].unlink()
        for name, path in fresh.items():
            shutil.copyfile(path, PACKAGE_DIR / name)
        print(f"generated {len(fresh)} files in {PACKAGE_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
