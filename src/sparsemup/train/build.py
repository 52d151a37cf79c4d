"""The model a training config describes (the reference GPT or a transformers causal LM), parameterized
and on its backend."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.vocab import Backend, hf_model_spec
from ..dynamic import GMP, SET, DynamicSparsity, Method, RigL
from ..models import GPTConfig, build_gpt
from ..sparse.backend import sparsify
from .data import data_vocab
from .schema import Config
from .validate import stop_step

__all__ = ["build_model", "dynamic_sparsity", "fsdp_units", "logits_of"]


def build_model(cfg: Config, device: torch.device | str = "cpu",
                backends: dict[str, Backend] | None = None) -> nn.Module:
    """The parameterized model of ``cfg.model`` (context ``train.seq_len``, the data's vocabulary): the reference GPT,
    or with ``model.arch = "hf:TYPE"`` that transformers causal LM built by ``sparsemup.hf.build``; its masked
    layers on ``model.backend`` (or on ``backends``, a checkpoint's recorded choice)."""
    m = cfg.model
    blocks = m.mask_kind == "blocks"
    gmp = cfg.sparsity.method == "gmp"  # built at its start density (maybe dense, with all-ones masks to prune)
    options: dict[str, Any] = dict(scheme=m.scheme, density=cfg.sparsity.start_density if gmp else m.density,
                                   mask_dense=gmp, base_density=m.base_density,
                                   init_std=m.init_std, input_alpha=m.input_alpha, output_alpha=m.output_alpha,
                                   seed=cfg.train.seed, mask_kind=m.mask_kind, block_size=m.block_size)
    if m.depth_alpha:  # 0: no depth rule (the library's None)
        options.update(depth_alpha=m.depth_alpha, base_depth=m.base_depth)
    model: nn.Module
    spec = hf_model_spec(m.arch)
    vocab = data_vocab(cfg.data.path, cfg.data.format)
    if spec is not None:
        from .. import hf  # needs sparsemup[hf]; its error names the extra

        template = hf.small_config(spec, vocab, m.depth, cfg.train.seq_len)
        with torch.random.fork_rng(devices=[]):  # the modules' own init (norms, biases) from the run's seed
            torch.manual_seed(cfg.train.seed)
            model = hf.build(template, m.width, m.base_width, head_dim=m.head_dim, device=device, **options)
    else:
        gpt = GPTConfig(vocab_size=vocab, width=m.width, depth=m.depth, head_dim=m.head_dim,
                        context=cfg.train.seq_len, ffn_multiple=m.block_size if blocks else 8)
        model, _ = build_gpt(gpt, m.base_width, device=device, **options)
    sparsify(model, backends or m.backend)  # a checkpoint's per-layer choice ({} for masked dense) replayed
    return model


def dynamic_sparsity(cfg: Config, model: nn.Module) -> DynamicSparsity | None:
    """The mask updates of ``cfg.sparsity`` on ``model`` (None for static masks)."""
    s = cfg.sparsity
    method: Method
    if s.method == "static":
        return None
    if s.method == "gmp":
        method = GMP(cfg.model.density, stop_step(cfg), s.start_density, s.update_every, s.constant_fan_in)
    else:
        kind = SET if s.method == "set" else RigL
        method = kind(stop_step(cfg), s.update_every, s.update_fraction, s.constant_fan_in)
    return DynamicSparsity(model, method, seed=cfg.train.seed, regrow_init=s.regrow_init,
                           weight_decay_mode=cfg.optim.weight_decay_mode)


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: the model's ``fsdp_units()``, or the layers a transformers
    model names in ``_no_split_modules``."""
    own = getattr(model, "fsdp_units", None)
    if callable(own):
        return list(own())
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def logits_of(output: Any) -> torch.Tensor:
    """A model's logits: the output itself, or its ``.logits`` (transformers' model outputs)."""
    logits = getattr(output, "logits", output)
    assert isinstance(logits, torch.Tensor)
    return logits
