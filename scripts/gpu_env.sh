# Sourced by the GPU session scripts: starts their clock (`elapsed`), checks $OUT, puts
# this repository (and, on a bare machine, the wheels carried in .whl/: the gRPC stack,
# prometheus_client, safetensors, tqdm, pytest and isal at our pinned versions, fetched
# beforehand by scripts/gpu_wheels.sh) on PYTHONPATH and records the machine in
# $OUT/env.txt.
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The wheels are built for the GPU box's Python 3.12; elsewhere (a dry run with DEVICE=cpu
# in the project's venv) the installed packages serve.
if compgen -G ".whl/*.whl" >/dev/null \
        && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD:$PWD/protos
else
    export PYTHONPATH=$PWD:$PWD/protos
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv
    python3 -c "import torch, grpc, google.protobuf as pb; print('torch', torch.__version__,
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'grpc', grpc.__version__,
'protobuf', pb.__version__)"
    nproc
} >"$OUT/env.txt" 2>&1
