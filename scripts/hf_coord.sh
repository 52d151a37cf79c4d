#!/usr/bin/env bash
# Regenerates docs/coord/hf-*: the coordinate checks of transformers models shown in docs/MODELS.md
# (Llama and GPT-2 on the default hf grid for every scheme, and Llama at the reference GPT's
# LR 2^-7, where it is unstable). Needs sparsemup[hf]. About 5 minutes on 2 CPU cores.
set -euo pipefail
for model in llama gpt2; do
  for scheme in sp mup supar; do
    sparsemup coord-check --model "hf:$model" --scheme "$scheme" --out "docs/coord/hf-$model-$scheme" 2>/dev/null \
      | tee "docs/coord/hf-$model-$scheme.txt"
  done
done
sparsemup coord-check --model hf:llama --scheme supar --lr 0.0078125 --out docs/coord/hf-llama-supar-lr-2-7 2>/dev/null \
  | tee docs/coord/hf-llama-supar-lr-2-7.txt
