#!/usr/bin/env bash
# results/depth-lr: LR against depth, no depth rule against CompleteP (experiments/depth-lr.toml), then its report.
# Resumable: rerun the same command to finish a partly run store. Run from the repository root.
set -euo pipefail
OUT=${1:-results/depth-lr}
python -m sparsemup sweep --config experiments/depth-lr.toml --out "$OUT" --workers 2
python -m sparsemup report "$OUT"
