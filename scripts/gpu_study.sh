#!/usr/bin/env bash
# The full ablation study on one CUDA GPU: the nine rows x 3 seeds x 30 epochs, batch 256,
# fp32 (cuDNN's TF32 convolutions; AMP=1 for bf16 autocast), channels_last, then the results table
# (runs_gpu/results.md; also results.csv, results.json, val_top1.png, best_top1.png).
#
# Expected duration: roughly 30 to 45 minutes on one H200, plus the one-time download and
# preparation of TinyImageNet-200 (a few minutes). An ESTIMATE from measured parts, not a run
# of this script: on one H200, 30 epochs of Combined-Large (the variant with the fewest
# training images/s of the seven there) took 85.5 s wall in bf16 (27 runs that long: 38
# minutes), and fp32 ran the full training path 1.36-1.53x faster than bf16 at batch 256
# (README, "On a GPU"). The real per-run wall time and images/s land in the table.
#
# Resumable: if the script (or the machine) stops, run it again with the same settings;
# finished runs are skipped and an interrupted one continues from its last.pth.
#
# Settings can be changed through the environment, e.g.
#   OUT=runs_gpu SEEDS=3 EPOCHS=30 BS=256 AMP=1 scripts/gpu_study.sh
# and extra `alexnet ablate` options passed as arguments, e.g.
#   scripts/gpu_study.sh --data /path/to/cache --variants baseline combined_small
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi
out="${OUT:-runs_gpu}"
for a in "$@"; do  # the table printed at the end is read from $out
  case "$a" in
    --out|--out=*) echo "gpu_study.sh: give the study folder as OUT=DIR, not $a" >&2; exit 2 ;;
  esac
done

"$py" -m alexnet ablate --epochs "${EPOCHS:-30}" --seeds "${SEEDS:-3}" --bs "${BS:-256}" $([ "${AMP:-0}" = 1 ] && echo --amp) --channels-last --device cuda \
  --out "$out" "$@"

echo
echo "== $out/results.md =="
cat "$out/results.md"
