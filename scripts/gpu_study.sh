#!/usr/bin/env bash
# The full ablation study on one CUDA GPU: the nine rows x 3 seeds x 30 epochs, batch 256,
# bf16 autocast, then the results table (runs_gpu/results.md; also results.csv, results.json,
# val_top1.png, best_top1.png).
#
# Expected duration: roughly 1 to 2 hours on one H100/H200-class GPU, plus the one-time
# download and preparation of TinyImageNet-200 (a few minutes). This is an ESTIMATE, not a
# measurement: 27 runs x 30 epochs x 100,000 training images at ~80-240 MFLOPs per image
# forward (`alexnet summary`), assuming 15,000-30,000 training images/s for these small
# 64x64 models. The real per-run wall time and images/s land in the table.
#
# Resumable: if the script (or the machine) stops, run it again with the same settings;
# finished runs are skipped and an interrupted one continues from its last.pth.
#
# Settings can be changed through the environment, e.g.
#   OUT=runs_gpu SEEDS=3 EPOCHS=30 BS=256 scripts/gpu_study.sh
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

"$py" -m alexnet ablate --epochs "${EPOCHS:-30}" --seeds "${SEEDS:-3}" --bs "${BS:-256}" --amp --device cuda \
  --out "$out" "$@"

echo
echo "== $out/results.md =="
cat "$out/results.md"
