"""The reference GPT a training config describes, parameterized and on its backend."""

from __future__ import annotations

import torch

from ..core.vocab import Backend
from ..models import GPT, GPTConfig, build_gpt
from ..sparse import sparsify
from .data import VOCAB_SIZE
from .schema import Config

__all__ = ["build_model"]


def build_model(cfg: Config, device: torch.device | str = "cpu", backends: dict[str, Backend] | None = None) -> GPT:
    """The parameterized reference GPT described by ``cfg.model`` (context ``train.seq_len``, byte vocabulary),
    its masked layers on ``model.backend`` (or on ``backends``, a checkpoint's recorded choice)."""
    m = cfg.model
    blocks = m.mask_kind == "blocks"
    gpt = GPTConfig(vocab_size=VOCAB_SIZE, width=m.width, depth=m.depth, head_dim=m.head_dim,
                    context=cfg.train.seq_len, ffn_multiple=m.block_size if blocks else 8)
    model, _ = build_gpt(gpt, m.base_width, device=device, scheme=m.scheme, density=m.density,
                         base_density=m.base_density, init_std=m.init_std, input_alpha=m.input_alpha,
                         output_alpha=m.output_alpha, seed=cfg.train.seed, mask_kind=m.mask_kind,
                         block_size=m.block_size)
    if backends:  # a checkpoint's per-layer choice ({} when the run never sparsified)
        sparsify(model, backends)
    elif m.backend != "masked_dense":
        sparsify(model, m.backend)
    return model
