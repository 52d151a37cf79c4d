"""Export a parameterized model to a plain PyTorch module that needs no sparsemup hooks."""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import hooks
from .record import RECORD_PREFIX, get_parameterization
from .rules import Role
from .storage import SparseStorage
from .structure import named_modules, unwrap

__all__ = ["export", "SaveGuard", "guard_own_savers"]

# Serializers of model libraries that write a model's weights as they are: for a parameterized model
# they would drop its forward multipliers (and write masks and the signature as weights).
_OWN_SAVERS = ("save_pretrained",)


class SaveGuard:
    """Stands in for a parameterized model's own ``save_pretrained``, which would drop its forward
    multipliers: it refuses, naming the helper that folds them in first."""

    def __init__(self, owner: str, method: str) -> None:
        self.owner, self.method = owner, method

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"{self.owner}.{self.method} would save this parameterized model without sparsemup's forward "
            "multipliers (and with its masks as weights), so the saved model would compute something else. "
            "For a transformers model use sparsemup.hf.save_pretrained(model, directory), which folds them in "
            f"and records how to continue SµPar training; otherwise call {self.method} on sparsemup.export(model)"
        )


def guard_own_savers(model: nn.Module) -> None:
    """Replace ``model``'s own serializers (``save_pretrained``) by a ``SaveGuard`` on this instance."""
    for method in _OWN_SAVERS:
        if callable(getattr(model, method, None)):
            model.__dict__[method] = SaveGuard(type(model).__name__, method)


def _strip_hooks(module: nn.Module) -> None:
    for registry in (module._forward_hooks, module._forward_pre_hooks, module._load_state_dict_pre_hooks):
        for key in [k for k, h in registry.items() if isinstance(getattr(h, "hook", h), hooks.HOOK_TYPES)]:
            del registry[key]


@torch.no_grad()
def export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with forward multipliers folded into the weights and no hooks or masks.

    Masked entries are already exact zeros in the weights. α_input is folded into
    the embedding, α_output/m_d into the readout; a readout tied to the embedding is
    untied first, since the two need different factors. Layers sparse by storage (``sparsify``)
    become their plain dense modules. The copy's state_dict has the model's keys minus the
    ``*_mask`` buffers. The original is not changed.

    Example::

        plain = sparsemup.export(model)
        torch.save(plain.state_dict(), "weights.pt")  # loads into the model class with no sparsemup
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
                if not isinstance(modules[module_name], SparseStorage):
                    delattr(modules[module_name], attr + hooks.MASK_SUFFIX)
    for name, module in list(plain.named_modules()):
        if isinstance(module, SparseStorage):  # back to a plain dense module with exact zeros
            parent_name, _, child = name.rpartition(".")
            dense = module.to_dense_module()
            hooks.move_hooks(module, dense)
            setattr(plain.get_submodule(parent_name), child, dense)
    for module in plain.modules():
        _strip_hooks(module)
    delattr(plain, hooks.SIGNATURE)
    for key, value in list(plain.__dict__.items()):  # the record, backend choices, save guards, ...
        if key.startswith(RECORD_PREFIX) or isinstance(value, SaveGuard):
            del plain.__dict__[key]
    return plain

