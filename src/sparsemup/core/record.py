"""The record of a parameterization: what sparsemup decided for every parameter, stored on the model.

``parameterize`` writes one ``Parameterization`` per model; the optimizer groups, ``explain``,
``export``, the coordinate check and the trainer only read it. It lives in the model's
``__dict__`` (not in a tensor attribute), so it survives deepcopy and pickling and never
enters a state_dict; the state_dict carries a digest of it instead (``hooks.SIGNATURE``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .hooks import DENSE_GRAD_ATTR, MASK_SUFFIX, CheckStateOnLoad
from .options import Options
from .rules import Multipliers, Role, Scheme
from .storage import SparseStorage
from .structure import canonical_name, strip_wrappers, unwrap
from .vocab import MaskKind

__all__ = ["ParamInfo", "Parameterization", "RECORD_PREFIX", "RECORD_ATTR", "is_parameterized",
           "get_parameterization", "get_mask", "apply_masks", "set_mask", "expect_mask_nonzeros", "dense_gradients"]

# Attributes sparsemup keeps in a module's __dict__ start with this (``export`` drops them all).
RECORD_PREFIX = "_sparsemup_"
RECORD_ATTR = RECORD_PREFIX + "parameterization"  # where a model keeps its Parameterization


@dataclass(frozen=True)
class ParamInfo:
    """Everything sparsemup decided about one parameter (tied names share one entry)."""

    name: str
    names: tuple[str, ...]
    role: Role
    shape: tuple[int, ...]
    base_shape: tuple[int, ...]
    multipliers: Multipliers
    density: float  # realised: nonzeros / numel (1.0 when dense)
    base_density: float  # realised density of the base's counterpart
    init_std: float | None  # None: the module's own init was kept (vectors)
    masked: bool
    # Forward multiplier per usage name: α_input on an embedding, α_output/m_d on a readout.
    forward_multipliers: Mapping[str, float] = field(default_factory=dict)
    # Role of each usage: differs from ``role`` only for an embedding tied to a readout.
    usage_roles: Mapping[str, Role] = field(default_factory=dict)


@dataclass(frozen=True)
class Parameterization:
    """The record of one ``parameterize`` call, stored on the model it was applied to."""

    scheme: Scheme
    params: Mapping[str, ParamInfo]
    attention_scales: Mapping[str, float]  # scale set on each DotProductAttention
    seed: int
    mask_kind: MaskKind
    block_size: int  # b of "blocks" masks (recorded for every kind; used only by "blocks")
    input_alpha: float
    output_alpha: float
    # The arguments it was called with (delta and user masks dropped: the masks are in the model).
    options: Options = field(default_factory=lambda: Options())
    # Factor multiplied into the ``scaling`` of each attention module that has one (transformers' attention
    # modules) where the head dim differs from the base's: sqrt(d_head,base / d_head).
    attention_factors: Mapping[str, float] = field(default_factory=dict)
    # The depth rule (CompleteP): m_L^(−α) on the output of each residual branch's closing module, by module name
    # (empty without a depth rule), and the number of residual blocks L found in the model.
    residual_multipliers: Mapping[str, float] = field(default_factory=dict)
    depth: int | None = None

    def info(self, name: str) -> ParamInfo:
        """The entry for a parameter, by any of its (canonical or wrapped) names."""
        for candidate in dict.fromkeys((strip_wrappers(name), canonical_name(name))):
            if candidate in self.params:
                return self.params[candidate]
            for info in self.params.values():
                if candidate in info.names:
                    return info
        raise KeyError(
            f"parameter {name!r} is not part of this parameterization (was it added after "
            "sparsemup.parameterize?)"
        )


def is_parameterized(model: nn.Module) -> bool:
    """Whether ``model`` (or any submodule) was already parameterized."""
    return any(hasattr(m, RECORD_ATTR) for m in unwrap(model).modules())


def get_parameterization(model: nn.Module) -> Parameterization:
    """The ``Parameterization`` recorded on ``model`` (wrappers such as DDP are looked through).

    Example: ``get_parameterization(model).info("blocks.0.mlp.fc.weight").multipliers.density`` is m_ρ.
    """
    inner = unwrap(model)
    record = inner.__dict__.get(RECORD_ATTR)
    if not isinstance(record, Parameterization):
        raise ValueError("this model is not parameterized; call sparsemup.parameterize(model, base, ...) first")
    return record


def get_mask(model: nn.Module, name: str) -> torch.Tensor | None:
    """The mask of a hidden weight (logical shape, the weight's dtype), or None when dense.

    For a masked-dense weight this is its buffer; for one sparse by storage, a fresh expansion.
    """
    info = get_parameterization(model).info(name)
    if not info.masked:
        return None
    module_name, _, attr = info.name.rpartition(".")
    module = unwrap(model).get_submodule(module_name)
    if isinstance(module, SparseStorage):  # sparse by storage (sparsemup.sparsify)
        return module.mask().to(module.get_parameter(attr).dtype)
    mask: torch.Tensor = getattr(module, attr + MASK_SUFFIX)
    return mask


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every masked weight outside its mask (W *= M).

    Not needed with the supported optimizers, which keep masked entries at zero;
    call it after code that writes weights directly. Weights sparse by storage keep no zeros.
    """
    inner = unwrap(model)
    for name, info in get_parameterization(model).params.items():
        module_name, _, attr = name.rpartition(".")
        module = inner.get_submodule(module_name)
        if info.masked and not isinstance(module, SparseStorage):
            module.get_parameter(attr).mul_(module.get_buffer(attr + MASK_SUFFIX))


def _masked_owners(model: nn.Module, name: str) -> tuple[ParamInfo, list[tuple[nn.Module, str]]]:
    """The record of a masked-dense weight and its (owner module, attribute) pairs, one per usage."""
    info = get_parameterization(model).info(name)
    inner = unwrap(model)
    owners = []
    for usage in info.names:
        module_name, _, attr = usage.rpartition(".")
        module = inner.get_submodule(module_name)
        if not info.masked or isinstance(module, SparseStorage):
            raise ValueError(f"{name}: not a masked-dense weight (dense, or sparse by storage); only masked-dense "
                             "weights have a mask buffer to change")
        owners.append((module, attr))
    return info, owners


def expect_mask_nonzeros(model: nn.Module, counts: Mapping[str, int]) -> None:
    """Tell the load-time check that the masks of these weights now hold ``counts`` nonzeros (a dynamic
    schedule changed them), so a state_dict saved at that point loads and one from elsewhere is refused."""
    names = {usage: count for name, count in counts.items() for usage in _masked_owners(model, name)[0].names}
    for hook in unwrap(model)._load_state_dict_pre_hooks.values():
        check = getattr(hook, "hook", hook)
        if isinstance(check, CheckStateOnLoad):
            for usage, count in names.items():
                check.expect(usage, count)


@torch.no_grad()
def set_mask(model: nn.Module, name: str, mask: torch.Tensor) -> None:
    """Replace the mask of the masked-dense weight ``name`` (every usage of a tied weight) and zero the
    weight outside it; the load-time check expects the new count. Optimizer state is the caller's."""
    info, owners = _masked_owners(model, name)
    if tuple(mask.shape) != info.shape:
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} does not match the weight's {info.shape}")
    for module, attr in owners:
        buffer = module.get_buffer(attr + MASK_SUFFIX)
        buffer.copy_(mask.to(buffer.device, buffer.dtype))
        module.get_parameter(attr).mul_(buffer)
    expect_mask_nonzeros(model, {name: int(mask.count_nonzero())})


@contextlib.contextmanager
def dense_gradients(model: nn.Module) -> Iterator[None]:
    """Within the block, backward leaves masked weights' gradients dense (not zeroed outside the mask):
    what RigL's regrowth reads. Mask them (``grad *= mask``) before the optimizer step."""
    owners = {id(m): m for name, info in get_parameterization(model).params.items() if info.masked
              for m, _ in _masked_owners(model, name)[1]}
    for module in owners.values():
        module.__dict__[DENSE_GRAD_ATTR] = True
    try:
        yield
    finally:
        for module in owners.values():
            module.__dict__.pop(DENSE_GRAD_ATTR, None)
