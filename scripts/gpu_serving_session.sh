#!/usr/bin/env bash
# One lease of a CUDA machine for the serving path, in a single call:
#   1. the CUDA-graph and image-model tests on the device (tests/services/
#      test_cuda_graphs.py runs only there);
#   2. benchmarks/bench_style_gpu.py: fp32 eager against the fast variants, the style and
#      super-resolution services' TiledImageModel in each serving configuration (eager,
#      torch.compile, CUDA graphs of either), Stylize over gRPC, and, while its budget
#      lasts, more compiled variants (BENCH_ARGS=--autotune: max-autotune ones), and
#      --profile: the kernels that take the compiled served form's time, and one
#      served request's wall time against the GPU's busy time.
# Everything it reports goes to $OUT: env.txt, pytest.log, bench.log, style_gpu.json.
#
# Usage, from the repository root of a copy that carries data/photos, assets/styles, the
# VGG19 weights file and (on a bare machine) .whl/ from scripts/gpu_wheels.sh (without
# its isal wheel the PNG encoder falls back to zlib, about 3x slower):
#   OUT=/some/dir scripts/gpu_serving_session.sh [SECONDS]
# With the device tool: carry data/photos, assets/styles,
# assets/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin and .whl (with the tracked
# tree, about 57 MB of the 64 allowed on 27 Nov).
# SECONDS (default 480) bounds the whole script. BENCH_ARGS adds benchmark flags; a check
# without a GPU: DEVICE=cpu BENCH_ARGS="--sizes 64 --repeats 2 --no-paper-width".
set -u -o pipefail
total=${1:-480}
read -r -a bench_args <<<"${BENCH_ARGS:-}"
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"

echo "[session] tests on the device ($(elapsed) s)"
# --import-mode=importlib: tests/services must not shadow the services package (no editable
# install there to put the project first)
timeout 150 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib \
    tests/services/test_cuda_graphs.py tests/services/test_image_model.py \
    tests/services/test_tiling.py tests/services/test_batching.py >"$OUT/pytest.log" 2>&1
echo "[session] pytest exit $? ($(elapsed) s)"
tail -15 "$OUT/pytest.log"

left=$(( total - $(elapsed) - 15 ))
echo "[session] GPU benchmark, at most $left s ($(elapsed) s)"
timeout "$left" python3 -m benchmarks.bench_style_gpu --device "${DEVICE:-cuda}" \
    --only starry-night paper \
    --budget-s $(( left * 2 / 3 )) --profile --out "$OUT/style_gpu.json" "${bench_args[@]}" \
    2>&1 | grep -v "it/s\]" >"$OUT/bench.log"
echo "[session] benchmark exit ${PIPESTATUS[0]} ($(elapsed) s)"
grep "^\[gpu-bench\]" "$OUT/bench.log" | tail -60
