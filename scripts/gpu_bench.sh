#!/usr/bin/env bash
# The GPU benchmark, on a synthetic TinyImageNet-sized cache so that it runs on a fresh GPU
# machine without the data set:
#   1. the CUDA tests (tests marked `cuda`);
#   2. `alexnet bench` for every variant at batch 256 in PRECISION: training images/s of the
#      model alone and of the full training path;
#   3. what bf16 autocast, channels_last, FC1 on summed weights and torch.compile each do to the
#      training step's speed (`alexnet bench --compare`, batch 256, from PRECISION), for two
#      variants (COMPARE_VARIANTS), bf16 at batch 1024, and torch.compile in its default mode
#      and replaying CUDA graphs (reduce-overhead) for COMPILE_VARIANTS (combined_gap);
#   2b. (stage `profile`) per training step of (1) and (2), for three variants: the kernels
#      launched, the host's time to issue the step and the GPU's busy time (`--profile`);
#   3b. (stage `fused`, also in the default list) the colour variants' full path with the
#      augmentation's colour ops compiled for the GPU (ALEXNET_FUSED_AUGMENT=all), to hold
#      against their rows of stage 2;
#   4. a synthetic TinyImageNet-sized cache (JPEGs in the official layout, then `prepare`),
#      made on the CPU in the background while stages 1-3 use the GPU;
#   5. the wall time of `alexnet train` for EPOCHS (default 30) epochs of a few variants on it.
# Targets (issue 6): >= 30,000 training images/s per variant on one H100-class GPU, and 30
# epochs of any variant in under 2 minutes. Measured on one H200 (README, "On a GPU").
#
#   scripts/gpu_bench.sh                       # everything (about 9 minutes on one H200 without `profile` and `fused`, estimated from its stages there)
#   scripts/gpu_bench.sh tests bench compare   # some stages: tests bench profile compare fused data train
#   scripts/gpu_bench.sh tests profile bench; scripts/gpu_bench.sh fused compare train
#                                              # the whole list in two commands, where one command may run
#                                              # 10 minutes at most (a lent machine); `train` makes the cache
#   SCALE=0.02 DEVICE=cpu EPOCHS=1 STEPS=1 scripts/gpu_bench.sh   # a small smoke run on a CPU
#
# PRECISION: --no-amp (default: fp32, cuDNN's TF32 convolutions; at batch 256 on an H200 the
# full training path ran 1.36-1.53x the images/s of bf16, most likely because its casts add
# kernel launches to a step bound by them) or --amp; channels_last either way (the bench's default). STEPS: alternating step pairs per round of the
# benchmarks (default 20); VARIANTS: the variants trained in 5 (default baseline combined:
# Combined-Large had the fewest images/s of all seven on the H200); COMPARE_VARIANTS: those of 3.
# A failing stage is reported and the next one still runs; the exit status is then 1.
# Rerunnable: each training starts afresh in WORK.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
device="${DEVICE:-cuda}"
scale="${SCALE:-1}"
epochs="${EPOCHS:-30}"
work="${WORK:-${TMPDIR:-/tmp}/alexnet_gpu_bench}"
steps="${STEPS:-20}"
precision="${PRECISION:---no-amp}"
compare_variants="${COMPARE_VARIANTS:-baseline combined_gap}"
all_stages="tests bench profile compare fused data train"
stages="${*:-$all_stages}"
for s in $stages; do  # a misspelt stage would otherwise run nothing and exit 0
  if [[ " $all_stages " != *" $s "* ]]; then
    echo "unknown stage: $s (stages: $all_stages)" >&2
    exit 2
  fi
done
mkdir -p "$work"
status=0
failed() { echo "(stage $1 failed; going on)"; status=1; }
has() { [[ " $stages " == *" $1 "* ]]; }

make_data() {
  if [ -f "$work/cache/manifest.json" ]; then
    echo "synthetic cache: $work/cache (already there)"
    return 0
  fi
  echo "synthetic cache: 200 classes x $("$py" -c "print(round(500*$scale))") train, x $("$py" -c "print(max(1,round(50*$scale)))") val"
  rm -rf "$work/layout"
  "$py" - "$work" "$scale" <<'PY' && "$py" -m alexnet prepare --source "$work/layout/tiny-imagenet-200" \
    --data "$work/cache" --counts any --workers "$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))"
import sys
from pathlib import Path
from tests.synth import make_tiny_imagenet
work, scale = Path(sys.argv[1]), float(sys.argv[2])
make_tiny_imagenet(work / "layout", 200, round(500 * scale), max(1, round(50 * scale)), seed=0)
PY
}

# The cache is CPU work (80-86 s for 110,000 JPEGs on an H200 machine's 16 cores): made while
# the GPU stages run, at the lowest priority and on all cores but two, since a GPU step this
# short is bounded by how fast one host thread launches kernels. Stopped with the script.
if [ -f "$work/data.pgid" ]; then  # a build an earlier run left behind (killed without its trap)
  kill -- "-$(cat "$work/data.pgid")" 2>/dev/null
  rm -f "$work/data.pgid"
fi
if has data || has train; then
  setsid nice -n 19 bash -c "$(declare -f make_data); py='$py' work='$work' scale='$scale' make_data" >"$work/data.log" 2>&1 &
  data_pid=$!
  echo "$data_pid" >"$work/data.pgid"
  # its own process group: prepare's workers go too
  trap 'kill -- "-$data_pid" 2>/dev/null; rm -f "$work/data.pgid"' EXIT
fi

if has tests && [ "$device" = cuda ]; then
  echo "== CUDA tests =="
  "$py" -m pytest -q -m cuda tests/ || failed tests
fi

if has bench; then
  echo "== alexnet bench ($device, $precision) =="
  "$py" -m alexnet bench --device "$device" --variants all --bs 256 $precision --no-reference \
    --steps "$steps" --rounds 3 || failed bench
fi

if has profile; then
  # Host-bound or GPU-bound: where the host's time per step exceeds the GPU's busy time, the
  # GPU waits for launches (alexnet/stepprofile.py).
  echo "== per step: kernels, host time, GPU time ($device, $precision) =="
  "$py" -m alexnet bench --device "$device" --variants baseline combined combined_gap --bs 256 $precision \
    --no-reference --steps 5 --rounds 1 --profile || failed profile
fi

if has compare; then
  echo "== each setting on and off ($device) =="
  "$py" -m alexnet bench --device "$device" --variants $compare_variants --bs 256 $precision \
    --compare amp channels_last fold_fc1 --steps "$steps" --rounds 1 || failed compare
  # bf16 where a step is large enough for its arithmetic, not its launches, to set the pace
  "$py" -m alexnet bench --device "$device" --variants baseline --bs 1024 $precision \
    --compare amp --steps 5 --rounds 1 || failed compare
  # compile last: it needs a C compiler (and Triton on CUDA), which a bare machine may lack;
  # then its CUDA graphs (reduce-overhead), for a step that launches bound
  for mode in default reduce-overhead; do
    "$py" -m alexnet bench --device "$device" --variants ${COMPILE_VARIANTS:-combined_gap} --bs 256 $precision \
      --compare compile --compile-mode $mode --steps "$steps" --rounds 1 || failed compare
  done
fi

if has fused; then
  # One kernel (two loops) for the colour ops and normalisation instead of about a dozen
  # launches: the colour variants' (2)/(1) here against stage 2's (a fresh process per row).
  echo "== alexnet bench, colour ops compiled ($device, $precision) =="
  ALEXNET_FUSED_AUGMENT=all "$py" -m alexnet bench --device "$device" --variants combined combined_small combined_gap \
    --bs 256 $precision --no-reference --steps "$steps" --rounds 3 --profile || failed fused
fi

if has data || has train; then
  echo "== synthetic cache =="
  wait "$data_pid" || failed data
  cat "$work/data.log"
fi

if has train; then
  echo "== $epochs epochs of training ($device, $precision) =="
  for v in ${VARIANTS:-baseline combined}; do
    rm -rf "$work/run_$v"  # a previous run there would be refused ("holds a previous run")
    start=$(date +%s.%N)
    "$py" -m alexnet train --variant "$v" --data "$work/cache" --epochs "$epochs" --bs 256 --lr 0.04 \
      --schedule onecycle $precision --channels-last --device "$device" --out "$work/run_$v" --no-progress
    rc=$?
    end=$(date +%s.%N)
    if [ "$rc" -ne 0 ]; then failed "train $v"; continue; fi
    "$py" -c "print(f'$v: {$epochs} epochs in {$end - $start:.1f} s wall (process start, data load and evaluation included)')"
  done
fi
exit $status
