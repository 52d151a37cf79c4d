#!/usr/bin/env bash
# Regenerates the coordinate checks with dynamic masks shown in docs/DYNAMIC.md: RigL (30% of the kept
# weights dropped by magnitude and regrown by dense gradient every 5 steps until step 15 of 20) under SP,
# µP and SµPar on the reference MLP and SµPar on the GPT (CLI defaults; SP on the GPT up to width 1024),
# and SµPar's grids with static masks at 20 steps to compare with. About 40 minutes on 2 CPU cores.
# Run from the repository root.
set -euo pipefail
mkdir -p docs/coord
for scheme in sp mup supar; do
  sparsemup coord-check --model mlp --scheme "$scheme" --sparsity-method rigl \
    --out "docs/coord/mlp-$scheme-rigl" | tee "docs/coord/mlp-$scheme-rigl.txt"
done
sparsemup coord-check --model mlp --scheme supar --steps 20 --out docs/coord/mlp-supar-20-steps \
  | tee docs/coord/mlp-supar-20-steps.txt
sparsemup coord-check --model gpt --scheme sp --widths 256,512,1024 --sparsity-method rigl \
  --out docs/coord/gpt-sp-rigl | tee docs/coord/gpt-sp-rigl.txt
sparsemup coord-check --model gpt --scheme supar --sparsity-method rigl --out docs/coord/gpt-supar-rigl \
  | tee docs/coord/gpt-supar-rigl.txt
sparsemup coord-check --model gpt --scheme supar --steps 20 --out docs/coord/gpt-supar-20-steps \
  | tee docs/coord/gpt-supar-20-steps.txt
