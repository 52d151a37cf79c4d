"""Adam's ε per group against the gradients it is compared with (docs/RULES.md, "ε and density"): one backward at
init of the reference GPT (width 256, base 64, ρ ¼, α = 1, base depth 2) at L = 2 and 16; RMS and median of the
kept gradient entries of the embedding, block 0's parameters and the final norm, and each one's group ε.

    PYTHONPATH=src python docs/coord/depth-diagnosis/eps_groups.py
"""

from __future__ import annotations

import torch

from sparsemup.coord.cases import markov_tokens
from sparsemup.core import make_optimizer
from sparsemup.models import GPTConfig, build_gpt

tokens = markov_tokens(0, 2, 65, 256)
for depth in (2, 16):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, width=256, depth=depth, head_dim=16, context=64)
    model = build_gpt(cfg, 64, scheme="supar", density=0.25, seed=0, init_std=0.02, depth_alpha=1.0, base_depth=2)[0]
    optimizer = make_optimizer(model, torch.optim.Adam, lr=2**-7)
    logits = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    eps = {id(p): group["eps"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if p.grad is None or (name.startswith("blocks.") and not name.startswith("blocks.0.")):
            continue
        g = p.grad[p.grad != 0]
        print(f"L {depth:2d} {name:28s} grad RMS {float(g.pow(2).mean().sqrt()):.2e}  median |g| "
              f"{float(g.abs().median()):.2e}  eps {eps[id(p)]:.2e}")
