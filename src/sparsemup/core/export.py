"""Export a parameterized model to a plain PyTorch module that needs no sparsemup hooks."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from . import hooks
from .attention import SCALING_ATTR
from .layout import layout_of
from .record import RECORD_PREFIX, ParamInfo, get_parameterization
from .rules import Role
from .storage import SparseStorage
from .structure import named_modules, unwrap

__all__ = ["export", "export_with_folds", "Probe", "SaveGuard", "guard_own_savers", "token_probe", "first_tensor"]

Probe = Callable[[nn.Module], object]  # runs a model on an example batch
Captured = tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]  # a module's args, kwargs and output

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
def export(model: nn.Module, probe: Probe | None = None) -> nn.Module:
    """A copy of ``model`` with forward multipliers folded into the weights and no hooks or masks.

    Masked entries are already exact zeros in the weights. α_input is folded into
    the embedding, α_output/m_d into the readout; a readout tied to the embedding is
    untied first, since the two need different factors. Layers sparse by storage (``sparsify``)
    become their plain dense modules. The copy's state_dict has the model's keys minus the
    ``*_mask`` buffers. The original is not changed.

    An attention module whose ``scaling`` the parameterization multiplied (transformers' attention at a head dim
    other than the base's) gets its own scale back and the factor folded into its projections: into one of them
    where q (or k) is a projection of its own, else √c into the fused projection and 1/√c into the output
    projection. Each fold is verified on a probe batch, ``probe(model)`` (default: random token ids through a
    model with ``get_input_embeddings``); a module where no fold reproduces the outputs (a norm on q and k, say)
    is refused by name.

    Example::

        plain = sparsemup.export(model)
        torch.save(plain.state_dict(), "weights.pt")  # loads into the model class with no sparsemup
    """
    return export_with_folds(model, probe)[0]


@torch.no_grad()
def export_with_folds(model: nn.Module, probe: Probe | None = None) -> tuple[nn.Module, dict[str, float]]:
    """``export``, and the factor folded into each weight and bias for the attention scales and the depth rule's
    residual multipliers ({name: factor}), which must be divided out again to restore the parameterized model
    from the plain one's weights."""
    record = get_parameterization(model)
    captured = _capture_attention(unwrap(model), record.attention_factors, probe)
    plain = copy.deepcopy(unwrap(model))
    modules = named_modules(plain)
    for info in record.params.values():
        _fold_forward_multipliers(info, modules)
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
    folds: dict[str, float] = {}
    for name, factor in record.residual_multipliers.items():  # after the swap back: the plain modules' weights
        for param_name, value in _fold_residual(name, plain.get_submodule(name), factor).items():
            folds[f"{name}.{param_name}"] = value
    for module in plain.modules():
        _strip_hooks(module)
    delattr(plain, hooks.SIGNATURE)
    for key, value in list(plain.__dict__.items()):  # the record, backend choices, save guards, ...
        if key.startswith(RECORD_PREFIX) or isinstance(value, SaveGuard):
            del plain.__dict__[key]
    for name, factor in record.attention_factors.items():
        module = modules[name]
        setattr(module, SCALING_ATTR, getattr(module, SCALING_ATTR) / factor)
        training = module.training
        module.eval()
        try:
            for param_name, value in _fold(name, module, factor, *captured[name]).items():
                key = f"{name}.{param_name}" if name else param_name
                folds[key] = folds.get(key, 1.0) * value
        finally:
            module.train(training)
    return plain, folds


def _fold_forward_multipliers(info: ParamInfo, modules: Mapping[str, nn.Module]) -> None:
    """Multiply each usage's weight (and an embedding's bias) by its forward multiplier, untying a tied
    embedding and readout first (they need different factors)."""
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


def _fold_residual(name: str, module: nn.Module, factor: float) -> dict[str, float]:
    """Multiply a residual branch's closing module's weight and bias by its m_L^(−α): exactly the hook's output
    factor for a module whose output is linear in (weight, bias) jointly (a registered layout: Linear, convs)."""
    own = dict(module.named_parameters(recurse=False))
    if layout_of(module) is None or set(own) - {"weight", "bias"} or any(True for _ in module.children()):
        raise ValueError(f"{name}: a {type(module).__name__}, not a layer with a registered layout and only weight "
                         "and bias, so its residual multiplier cannot be folded into its weights; declare the "
                         "branch's closing projection (nn.Linear, a conv) in residual_branches")
    if factor != 1.0:
        for param in own.values():
            param.mul_(factor)
    return {n: factor for n in own}


def token_probe(model: nn.Module) -> object:
    """Random token ids through a model with ``get_input_embeddings`` (a transformers model), no KV cache."""
    embeddings = getattr(model, "get_input_embeddings", None)
    embedding = embeddings() if callable(embeddings) else None
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"sparsemup checks attention folds and residual branches on a probe batch, and cannot make one for a "
            f"{type(model).__name__} (no get_input_embeddings); pass probe=lambda m: m(example_inputs)"
        )
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, embedding.num_embeddings, (2, 16), generator=gen).to(embedding.weight.device)
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    return model(tokens, **kwargs)


def first_tensor(output: object) -> torch.Tensor:
    """A module's output tensor: the output itself, or the first entry of a (nested) tuple or list."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"a module (attention, residual block or branch) returned {type(output).__name__}, not a "
                         "tensor (or a tuple starting with one); sparsemup cannot check it on the probe batch")
    return output


def _capture_attention(model: nn.Module, factors: Mapping[str, float],
                       probe: Probe | None) -> dict[str, Captured]:
    """The inputs and output of every attention module in ``factors`` on the probe batch, in eval mode."""
    if not factors:
        return {}
    captured: dict[str, Captured] = {}
    modules = named_modules(model)

    def recorder(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: object) -> None:
            captured.setdefault(name, (args, dict(kwargs), first_tensor(output).detach().clone()))
        return record

    handles = [modules[name].register_forward_hook(recorder(name), with_kwargs=True) for name in factors]
    training = model.training
    try:
        model.eval()
        (probe or token_probe)(model)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    missing = sorted(set(factors) - set(captured))
    if missing:
        raise ValueError(f"the probe batch did not run attention module(s) {missing}; pass a probe= that does")
    return captured


def _fold(name: str, module: nn.Module, factor: float, args: tuple[Any, ...], kwargs: dict[str, Any],
          expected: torch.Tensor) -> dict[str, float]:
    """Fold ``factor`` into ``module``'s projections (its scale already reset), the first way that reproduces
    ``expected`` on the captured inputs; return {parameter name in the module: factor multiplied in}."""
    projections = [n for n, m in module.named_modules() if m is not module
                   and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]
    root = math.sqrt(factor)
    tries: list[dict[str, float]] = [{f"{p}.weight": factor, f"{p}.bias": factor} for p in projections]
    tries += [{f"{p}.weight": root, f"{p}.bias": root, f"{o}.weight": 1 / root}
              for p in projections for o in projections if o != p]
    params = dict(module.named_parameters())
    tolerance = 1e-5 * float(expected.abs().max()) + 1e-9  # fp32 rounding; at init the scale moves outputs ~1e-3

    def error() -> float:
        return float((first_tensor(module(*args, **kwargs)) - expected).abs().max())

    if error() <= 10 * tolerance:
        raise ValueError(f"{name}: the probe batch does not tell the attention scale apart (outputs barely change "
                         "with it); pass a probe= with longer sequences")
    for scales in tries:
        applied = {k: v for k, v in scales.items() if k in params}
        saved = {k: params[k].detach().clone() for k in applied}
        for key, value in applied.items():
            params[key].mul_(value)
        if error() <= tolerance:
            return applied
        for key, before in saved.items():
            params[key].copy_(before)
    raise ValueError(
        f"{name}: no scaling of its projections ({', '.join(projections) or 'none found'}) reproduces its attention "
        f"scale factor {factor:.6g} (a norm on q and k, say), so a plain copy cannot compute the same function; keep "
        "the head dim equal to the base's (add heads as width grows) for this model"
    )

