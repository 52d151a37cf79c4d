#!/usr/bin/env bash
# Regenerates docs/coord/: the coordinate checks shown in docs/COORD_CHECK.md
# (every scheme on both reference models with the CLI defaults, plus the GPT
# down to density 1/64 to show the finite width·density correction).
# Takes about 20 minutes on 2 CPU cores. Run from the repository root.
set -euo pipefail
for model in mlp gpt; do
  for scheme in sp mup supar; do
    sparsemup coord-check --model "$model" --scheme "$scheme" --out "docs/coord/$model-$scheme" | tee "docs/coord/$model-$scheme.txt"
  done
done
for scheme in mup supar; do
  sparsemup coord-check --model gpt --scheme "$scheme" --densities 1,0.25,0.0625,0.015625 \
    --out "docs/coord/gpt-$scheme-to-1-64" | tee "docs/coord/gpt-$scheme-to-1-64.txt"
done
# The same correction with 4 and 8 sequences per batch (default 2), widths up to 1024.
for batch in 4 8; do
  sparsemup coord-check --model gpt --scheme supar --widths 256,512,1024 --batch-size "$batch" \
    --out "docs/coord/gpt-supar-batch-$batch" | tee "docs/coord/gpt-supar-batch-$batch.txt"
done
