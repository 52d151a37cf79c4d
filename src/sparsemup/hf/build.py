"""Build a parameterized transformers causal LM at any width from one template config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..core.parameterize import parameterize
from ..core.record import RECORD_PREFIX, Parameterization
from ..core.rules import Role
from .configs import load_config, scale_config

__all__ = ["build", "HF_RECORD", "from_config"]

HF_RECORD = RECORD_PREFIX + "hf"  # {"base_config": dict, "delta_config": dict | None} on a built model


def from_config(config: PretrainedConfig, device: torch.device | str | None = None) -> PreTrainedModel:
    """The causal LM of ``config`` in fp32 on ``device`` (``"meta"`` for a base: shapes only)."""
    with torch.device(device or "cpu"):
        model: PreTrainedModel = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32)
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
    model_config = scale_config(template, width, head_dim)  # the same head dim at every width: transformers
    base_config = scale_config(template, base_width, head_dim)  # fixes the attention scale at 1/sqrt(head_dim)
    delta_config = scale_config(template, 2 * base_width, head_dim) if width == base_width else None
    base = from_config(base_config, "meta")
    delta = from_config(delta_config, "meta") if delta_config is not None else None
    model = from_config(model_config, device)
    record = parameterize(model, base, delta=delta, **parameterize_options)
    _check_roles(model, record)
    model.__dict__[HF_RECORD] = {
        "base_config": base_config.to_dict(),
        "delta_config": delta_config.to_dict() if delta_config is not None else None,
    }
    return model


def _check_roles(model: PreTrainedModel, record: Parameterization) -> None:
    """In a causal LM only embeddings are inputs and only the LM head is an output: any other input or output
    weight is a layer whose size the config scaling missed (a field name sparsemup.hf does not know)."""
    output = model.get_output_embeddings()
    for info in record.params.values():
        for usage, role in info.usage_roles.items():
            owner = model.get_submodule(usage.rpartition(".")[0])
            expected = (role is Role.INPUT and isinstance(owner, torch.nn.Embedding)) or (
                role is Role.OUTPUT and owner is output)
            if role in (Role.INPUT, Role.OUTPUT) and not expected:
                raise ValueError(
                    f"{usage} ({tuple(info.shape)}, base {tuple(info.base_shape)}) reads as an {role.value} weight: "
                    "one of its sizes did not scale with width, so its config names that size with a field "
                    "sparsemup.hf does not scale. Build such a model yourself and call sparsemup.parameterize "
                    "(with roles= for that layer)"
                )
