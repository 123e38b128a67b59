#!/usr/bin/env bash
# One lease of a CUDA machine for fast style transfer, in a single call:
#   1. the GPU benchmark (benchmarks/bench_style_gpu.py: fp32 eager against fp16/bf16,
#      channels_last, torch.compile and CUDA graphs at 1024 and 512 px);
#   2. training every default style on the GPU, all three processes at once, for the time
#      that is left, the learning rate annealed by the clock (--time-schedule), with the
#      grid penalty (--grid-weight 5e3: the H200 run without it painted period-4 grids) and
#      the tile-consistency term (--tile-weight, TILE_WEIGHT, default 4e6: the H200 run
#      without it gave a the-scream that tiled little better than a 2 px shift; on the CPU
#      4e6 raised a fine-tune's held-out tiling gap from 1.0 to 4.2 dB, docs/style_training.md);
#      the training images are prepared there from data/photos/train.
# Everything it reports goes to $OUT: env.txt, bench.log, style_gpu.json, train.tar.gz.
# Its exit status is the benchmark's (non-zero where a variant or baseline failed, an output
# is under the fidelity floor, or it timed out), after the training and every output.
#
# Usage, from the repository root of a copy that carries data/photos, assets/styles, the
# VGG19 weights file and (for a bare machine without our gRPC stack) .whl/ from
# scripts/gpu_wheels.sh:
#   OUT=/some/dir PERCEPT_GIT_SHA=$(git rev-parse HEAD) scripts/gpu_style_session.sh [SECONDS]
# SECONDS (default 560) is the whole script's time; training stops early enough to fit.
# A check without a GPU: DEVICE=cpu BENCH_ARGS="--sizes 64 --repeats 2" and
# TRAIN_ARGS="--steps 3 --size 64 --batch-size 2" (appended flags win).
set -u -o pipefail
total=${1:-560}
device=${DEVICE:-cuda}
read -r -a bench_args <<<"${BENCH_ARGS:-}"
read -r -a train_args <<<"${TRAIN_ARGS:-}"
# shellcheck source=scripts/gpu_env.sh
source "$(dirname "$0")/gpu_env.sh"

echo "[session] preparing the training images ($(elapsed) s)"
python3 -m training.data.cli prepare --photos data/photos/train --out data/prepared/sr288 \
    --sizes 288 72 --crops-per-image 64 --seed 0 >/tmp/prepare.log 2>&1 \
    || { tail -5 /tmp/prepare.log; echo "[session] prepare failed"; }
sha256sum data/prepared/sr288/images_288.npy >>"$OUT/env.txt" 2>&1

echo "[session] GPU benchmark ($(elapsed) s)"
timeout 300 python3 -m benchmarks.bench_style_gpu --device "$device" --budget-s 170 \
    --out "$OUT/style_gpu.json" "${bench_args[@]}" 2>&1 | grep -v "it/s\]" >"$OUT/bench.log"
bench_status=${PIPESTATUS[0]}
echo "[session] benchmark exit $bench_status ($(elapsed) s)"

minutes=$(python3 -c "print(max(1.0, ($total - $(elapsed) - 45) / 60))")
echo "[session] training three styles for at most $minutes min each, in parallel"
mkdir -p /tmp/train
# Nearest upsampling for every style (stained-tissue moved off bilinear in its version 4:
# with the grid penalty nearest paints no grid, and it folds to 2.25x fewer multiply-adds).
for style in starry-night the-scream stained-tissue; do
    timeout $(python3 -c "print(int($minutes * 60 + 90))") \
        python3 -m training.cli_style train --style "$style" --device "$device" \
        --width 16 --size 256 --batch-size 8 --steps 20000 --max-minutes "$minutes" \
        --time-schedule --grid-weight 5e3 --tile-weight "${TILE_WEIGHT:-4e6}" \
        --sample-every 1000 \
        --checkpoint-every 100000 --out "/tmp/train/models/style-$style" \
        --run-dir "/tmp/train/runs/style-$style" "${train_args[@]}" \
        >"/tmp/train/$style.log" 2>&1 &
done
wait
for style in starry-night the-scream stained-tissue; do
    tr '\r' '\n' <"/tmp/train/$style.log" | grep -v "^\s*$" | tail -4
done
rm -f /tmp/train/runs/*/checkpoint.pt
tar czf "$OUT/train.tar.gz" -C /tmp train
echo "[session] done ($(elapsed) s)"
tail -40 "$OUT/bench.log"
exit "$bench_status"
