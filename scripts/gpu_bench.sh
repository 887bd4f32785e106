#!/usr/bin/env bash
# The GPU benchmark, on a synthetic TinyImageNet-sized cache so that it runs on a fresh GPU
# machine without the data set:
#   1. the CUDA tests (tests marked `cuda`);
#   2. `alexnet bench` for every variant at the recommended settings (batch 256, bf16,
#      channels_last): training images/s of the model alone and of the full training path;
#   3. what bf16 autocast, channels_last, FC1 on summed weights and torch.compile each do to the training step's
#      speed (`alexnet bench --compare`, batch 256), for two variants (COMPARE_VARIANTS):
#      each from the recommended settings, and channels_last also in fp32;
#   4. a synthetic TinyImageNet-sized cache (JPEGs in the official layout, then `prepare`);
#   5. the wall time of `alexnet train` for EPOCHS (default 30) epochs of a few variants on it.
# Targets (issue 6): >= 30,000 training images/s per variant on one H100-class GPU, and 30
# epochs of any variant in under 2 minutes.
#
#   scripts/gpu_bench.sh                       # everything
#   scripts/gpu_bench.sh tests bench compare   # some stages: tests bench compare data train
#   SCALE=0.02 DEVICE=cpu EPOCHS=1 STEPS=1 scripts/gpu_bench.sh   # a small smoke run on a CPU
#
# STEPS: alternating step pairs per round of the benchmarks (default 20); VARIANTS: the
# variants trained in 5 (default baseline combined_gap: the largest and the smallest model);
# COMPARE_VARIANTS: those of 3. A failing stage is reported and the next one still runs; the
# exit status is then 1. Rerunnable: each training starts afresh in WORK.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
scale="${SCALE:-1}"
epochs="${EPOCHS:-30}"
work="${WORK:-${TMPDIR:-/tmp}/alexnet_gpu_bench}"
steps="${STEPS:-20}"
stages="${*:-tests bench compare data train}"
mkdir -p "$work"
status=0
failed() { echo "(stage $1 failed; going on)"; status=1; }
has() { [[ " $stages " == *" $1 "* ]]; }

if has tests && [ "$device" = cuda ]; then
  echo "== CUDA tests =="
  "$py" -m pytest -q -m cuda tests/ || failed tests
fi

if has bench; then
  echo "== alexnet bench ($device) =="
  "$py" -m alexnet bench --device "$device" --variants all --bs 256 --amp --no-reference \
    --steps "$steps" --rounds 3 || failed bench
fi

if has compare; then
  echo "== each setting on and off ($device) =="
  # compile last: it needs a C compiler (and Triton on CUDA), which a bare machine may lack
  "$py" -m alexnet bench --device "$device" --variants ${COMPARE_VARIANTS:-baseline combined_gap} --bs 256 --amp \
    --compare amp channels_last fold_fc1 --steps "$steps" --rounds 1 || failed compare
  "$py" -m alexnet bench --device "$device" --variants ${COMPARE_VARIANTS:-baseline combined_gap} --bs 256 --no-amp \
    --compare channels_last --steps "$steps" --rounds 1 || failed compare
  "$py" -m alexnet bench --device "$device" --variants ${COMPARE_VARIANTS:-baseline combined_gap} --bs 256 --amp \
    --compare compile --steps "$steps" --rounds 1 || failed compare
fi

if has data || has train; then
  echo "== synthetic cache: 200 classes x $("$py" -c "print(round(500*$scale))") train, x $("$py" -c "print(max(1,round(50*$scale)))") val =="
  if [ ! -f "$work/cache/manifest.json" ]; then
    rm -rf "$work/layout"
    "$py" - "$work" "$scale" <<'PY' && "$py" -m alexnet prepare --source "$work/layout/tiny-imagenet-200" \
      --data "$work/cache" --counts any --workers "$(nproc)" || failed data
import sys
from pathlib import Path
from tests.synth import make_tiny_imagenet
work, scale = Path(sys.argv[1]), float(sys.argv[2])
make_tiny_imagenet(work / "layout", 200, round(500 * scale), max(1, round(50 * scale)), seed=0)
PY
  fi
fi

if has train; then
  echo "== $epochs epochs of training ($device) =="
  for v in ${VARIANTS:-baseline combined_gap}; do
    rm -rf "$work/run_$v"  # a previous run there would be refused ("holds a previous run")
    start=$(date +%s.%N)
    "$py" -m alexnet train --variant "$v" --data "$work/cache" --epochs "$epochs" --bs 256 --lr 0.04 \
      --schedule onecycle --amp --device "$device" --out "$work/run_$v" --no-progress | tail -n 1
    rc=${PIPESTATUS[0]}
    end=$(date +%s.%N)
    if [ "$rc" -ne 0 ]; then failed "train $v"; continue; fi
    "$py" -c "print(f'$v: {$epochs} epochs in {$end - $start:.1f} s wall (process start, data load and evaluation included)')"
  done
fi
exit $status
