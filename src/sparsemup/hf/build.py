"""Build a parameterized transformers causal LM at any width from one template config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..core import parameterize
from ..core.record import RECORD_PREFIX
from ..core.rules import get_scheme
from .configs import head_dim_of, load_config, scale_config

__all__ = ["build", "HF_RECORD", "from_config"]

HF_RECORD = RECORD_PREFIX + "hf"  # {"base_config": dict, "delta_config": dict | None} on a built model


def from_config(config: PretrainedConfig, device: torch.device | str | None = None) -> PreTrainedModel:
    """The causal LM of ``config`` in fp32 on ``device`` (``"meta"`` for a base: shapes only)."""
    with torch.device(device or "cpu"):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def build(
    config: PretrainedConfig | str | Path,
    width: int,
    base_width: int,
    *,
    head_dim: int | None = None,
    device: torch.device | str | None = None,
    **parameterize_options: Any,
) -> PreTrainedModel:
    """A causal LM of hidden size ``width``, parameterized against the same config at ``base_width``.

    ``config`` is a template (instance, ``model_type`` or config.json): every field but the width
    ones is kept; heads scale at a fixed head dim (``head_dim`` or the template's), KV heads in
    the template's proportion and the FFN at its ratio. The base (and, when the widths are equal,
    a delta at twice the width) is built on the meta device. ``parameterize_options`` go to
    ``sparsemup.parameterize`` (scheme, density, init_std, input_alpha, ...).

    Example: ``model = sparsemup.hf.build("llama", 1024, 256, density=0.25, scheme="supar")``.
    """
    if "delta" in parameterize_options:
        raise ValueError("sparsemup.hf.build makes its own delta model; do not pass delta=")
    template = load_config(config)
    model_config = scale_config(template, width, head_dim)
    base_config = scale_config(template, base_width, head_dim)
    scheme = get_scheme(parameterize_options.get("scheme", "supar"))
    if scheme.width and head_dim_of(model_config) != head_dim_of(base_config):
        raise ValueError(
            f"the model's head dim {head_dim_of(model_config)} differs from the base's {head_dim_of(base_config)}: "
            f"transformers fixes the attention scale at 1/sqrt(head_dim), so {scheme.name} cannot correct it; "
            "keep head_dim fixed and scale the number of heads"
        )
    delta_config = scale_config(template, 2 * base_width, head_dim) if width == base_width else None
    base = from_config(base_config, "meta")
    delta = from_config(delta_config, "meta") if delta_config is not None else None
    model = from_config(model_config, device)
    parameterize(model, base, delta=delta, **parameterize_options)
    model.__dict__[HF_RECORD] = {
        "base_config": base_config.to_dict(),
        "delta_config": delta_config.to_dict() if delta_config is not None else None,
    }
    return model
