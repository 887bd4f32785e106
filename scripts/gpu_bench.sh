#!/usr/bin/env bash
# The GPU benchmark, on a synthetic TinyImageNet-sized cache so that it runs on a fresh GPU
# machine without the data set:
#   1. the CUDA tests (tests marked `cuda`);
#   2. `alexnet bench` for every variant at the recommended settings (batch 256, bf16,
#      channels_last): training images/s of the model alone and of the full training path;
#   3. what bf16 autocast, channels_last and torch.compile each do to the training step's
#      speed (`alexnet bench --compare`, batch 256), for two variants (COMPARE_VARIANTS):
#      each from the recommended settings, and channels_last also in fp32;
#   4. the wall time of `alexnet train` for EPOCHS (default 30) epochs of a few variants.
# Targets (issue 6): >= 30,000 training images/s per variant on one H100-class GPU, and 30
# epochs of any variant in under 2 minutes.
#
#   scripts/gpu_bench.sh                       # everything
#   SCALE=0.02 DEVICE=cpu EPOCHS=1 STEPS=1 scripts/gpu_bench.sh   # a small smoke run on a CPU
#
# STEPS: alternating step pairs per round of the benchmarks (default 30); VARIANTS: the
# variants trained in 4.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
scale="${SCALE:-1}"
epochs="${EPOCHS:-30}"
work="${WORK:-${TMPDIR:-/tmp}/alexnet_gpu_bench}"
mkdir -p "$work"

if [ "$device" = cuda ]; then
  echo "== CUDA tests =="
  "$py" -m pytest -q -m cuda tests/ || echo "(CUDA tests failed; continuing with the benchmark)"
fi

echo "== alexnet bench ($device) =="
"$py" -m alexnet bench --device "$device" --variants all --bs 256 --amp --no-reference \
  --steps "${STEPS:-30}" --rounds 3

echo "== each setting on and off ($device) =="
"$py" -m alexnet bench --device "$device" --variants ${COMPARE_VARIANTS:-baseline combined_gap} --bs 256 --amp \
  --compare amp channels_last compile --steps "${STEPS:-30}" --rounds 1
"$py" -m alexnet bench --device "$device" --variants ${COMPARE_VARIANTS:-baseline combined_gap} --bs 256 --no-amp \
  --compare channels_last --steps "${STEPS:-30}" --rounds 1

echo "== synthetic cache: 200 classes x $(python3 -c "print(round(500*$scale))") train, x $(python3 -c "print(max(1,round(50*$scale)))") val =="
if [ ! -f "$work/cache/manifest.json" ]; then
  "$py" - "$work" "$scale" <<'PY'
import sys
from pathlib import Path
from tests.synth import make_tiny_imagenet
work, scale = Path(sys.argv[1]), float(sys.argv[2])
make_tiny_imagenet(work / "layout", 200, round(500 * scale), max(1, round(50 * scale)), seed=0)
PY
  "$py" -m alexnet prepare --source "$work/layout/tiny-imagenet-200" --data "$work/cache" --counts any \
    --workers "$(nproc)"
fi

echo "== $epochs epochs of training ($device) =="
for v in ${VARIANTS:-baseline combined_small combined_gap}; do
  start=$(date +%s.%N)
  "$py" -m alexnet train --variant "$v" --data "$work/cache" --epochs "$epochs" --bs 256 --lr 0.04 \
    --schedule onecycle --amp --device "$device" --out "$work/run_$v" --no-progress | tail -n 1
  end=$(date +%s.%N)
  python3 -c "print(f'$v: {$epochs} epochs in {$end - $start:.1f} s wall (process start, data load and evaluation included)')"
done
