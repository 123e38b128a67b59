#!/usr/bin/env bash
# Fetches into .whl/ the wheels a bare GPU machine lacks for the GPU session scripts
# (scripts/gpu_env.sh installs them there): the gRPC stack (with its error-detail protos),
# prometheus_client, safetensors,
# tqdm, pytest and isal, at the versions pinned in requirements.txt, for CPython 3.12 on
# manylinux x86_64 (the lent machines). Run it here, before the session; carry .whl with
# the working tree (a few MB).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(grpcio grpcio-health-checking grpcio-reflection grpcio-status googleapis-common-protos
          protobuf prometheus_client
          safetensors tqdm pytest pluggy iniconfig packaging isal)
pins=()
for package in "${packages[@]}"; do
    pin=$(grep -i -E "^${package}==" requirements.txt) || {
        echo "error: $package is not pinned in requirements.txt" >&2; exit 1; }
    pins+=("$pin")
done
mkdir -p .whl
.venv/bin/python -m pip download --quiet --only-binary :all: --no-deps --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
