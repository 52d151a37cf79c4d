"""Export a parameterized model to a plain PyTorch module that needs no sparsemup hooks."""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import hooks
from .backend import _ATTR as _BACKENDS
from .backend import move_hooks
from .blocksparse import BlockSparseLinear
from .parameterize import _ATTR, get_parameterization
from .rules import Role
from .structure import named_modules, unwrap

__all__ = ["export"]


def _strip_hooks(module: nn.Module) -> None:
    for registry in (module._forward_hooks, module._forward_pre_hooks, module._load_state_dict_pre_hooks):
        for key in [k for k, h in registry.items() if isinstance(getattr(h, "hook", h), hooks.HOOK_TYPES)]:
            del registry[key]


@torch.no_grad()
def export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with forward multipliers folded into the weights and no hooks or masks.

    Masked entries are already exact zeros in the weights. α_input is folded into
    the embedding, α_output/m_d into the readout; a readout tied to the embedding is
    untied first, since the two need different factors. The copy's state_dict has the
    model's keys minus the ``*_mask`` buffers. The original is not changed.
    """
    record = get_parameterization(model)
    plain = copy.deepcopy(unwrap(model))
    modules = named_modules(plain)
    for info in record.params.values():
        for usage_name, factor in info.forward_multipliers.items():
            module_name, _, attr = usage_name.rpartition(".")
            module = modules[module_name]
            if getattr(module, "max_norm", None) is not None:
                raise ValueError(f"{usage_name}: cannot fold a multiplier into an embedding with max_norm")
            weight = getattr(module, attr)
            if len(info.forward_multipliers) > 1:  # tied embedding + readout: give each its own tensor
                weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
                setattr(module, attr, weight)
            if factor != 1.0:
                weight.mul_(factor)
                bias = getattr(module, "bias", None)
                if info.usage_roles[usage_name] is Role.INPUT and bias is not None:
                    bias.mul_(factor)  # the hook scaled the whole output, bias included
        if info.masked:
            for usage_name in info.names:
                module_name, _, attr = usage_name.rpartition(".")
                if not isinstance(modules[module_name], BlockSparseLinear):
                    delattr(modules[module_name], attr + hooks.MASK_SUFFIX)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BlockSparseLinear):  # back to a plain nn.Linear with exact zeros
            parent_name, _, child = name.rpartition(".")
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device=module.weight.device, dtype=module.weight.dtype)
            linear.weight.copy_(module.dense_weight())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            move_hooks(module, linear)
            setattr(plain.get_submodule(parent_name), child, linear)
    for module in plain.modules():
        _strip_hooks(module)
    delattr(plain, hooks.SIGNATURE)
    del plain.__dict__[_ATTR]
    plain.__dict__.pop(_BACKENDS, None)
    return plain

