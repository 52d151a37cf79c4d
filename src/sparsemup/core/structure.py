"""Reading a model's structure: canonical names, tied parameters, and role inference.

Roles come from comparing each parameter's shape with its counterpart in the base
model (and, when the model has the base's shapes, a ``delta`` model of another
width): the dims that differ are the ones that scale with width.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from torch import nn

from .layout import Layout, group_count, layout_of
from .rules import Multipliers, Role

__all__ = ["canonical_name", "strip_wrappers", "named_modules", "unwrap", "Usage", "TiedParam", "collect",
           "infer_roles", "match", "check_same_structure", "growing_groups", "weight_layout"]

# Wrappers inside a model (torch.compile'd submodules, FSDP1, activation checkpointing) insert
# these components into parameter names; masks and metadata are keyed by names without them.
_WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def strip_wrappers(name: str) -> str:
    """``name`` without the components that wrappers inside a model insert (``_orig_mod`` etc.)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def canonical_name(name: str) -> str:
    """A name as a user may give it (possibly from a DDP-wrapped model) in sparsemup's form.

    Drops a leading ``module.`` (DDP/DataParallel) and the wrapper components of
    ``strip_wrappers``; ``module`` components elsewhere are real submodule names and stay.
    """
    name = strip_wrappers(name)
    return name[len("module."):] if name.startswith("module.") else name


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


@dataclass(frozen=True)
class Usage:
    """One place a parameter appears: the module that owns it and its attribute name."""

    name: str  # canonical full name, e.g. "blocks.0.mlp.fc.weight"
    module_name: str
    attr: str


@dataclass
class TiedParam:
    """A parameter with every name it appears under (several when weights are tied)."""

    param: nn.Parameter
    usages: list[Usage]

    @property
    def name(self) -> str:
        return self.usages[0].name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(u.name for u in self.usages)


def collect(model: nn.Module) -> dict[str, TiedParam]:
    """All parameters of ``model`` keyed by their first canonical name, ties grouped."""
    by_id: dict[int, TiedParam] = {}
    owner_of: dict[str, int] = {}
    for module_name, module in unwrap(model).named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            module_name_c = strip_wrappers(module_name)
            full = f"{module_name_c}.{attr}" if module_name_c else attr
            if owner_of.setdefault(full, id(param)) != id(param):
                raise ValueError(f"two different parameters are both named {full!r} once wrapper names are removed")
            usage = Usage(full, module_name_c, attr)
            entry = by_id.setdefault(id(param), TiedParam(param, []))
            if usage not in entry.usages:
                entry.usages.append(usage)
    return {entry.name: entry for entry in by_id.values()}


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule of the unwrapped model under its name without wrapper components."""
    return {strip_wrappers(n): m for n, m in unwrap(model).named_modules(remove_duplicate=False)}


def weight_layout(module: nn.Module, name: str, ndim: int) -> Layout:
    """The layout of the ``ndim``-dim weight ``name`` owned by ``module``; a clear error if it has none."""
    layout = layout_of(module)
    if layout is None:
        kind = type(module).__name__
        hint = (" (import sparsemup.hf, which registers transformers' layers)"
                if type(module).__module__.startswith("transformers") else "")
        raise ValueError(
            f"parameter {name!r} ({ndim}-D) belongs to a {kind}, whose weight layout sparsemup does not know{hint}. "
            f"Register it: sparsemup.register_layout({kind}, fan_in=(1,), fan_out=(0,)) with the dims of its "
            f"weight that are fan-in and fan-out, or give its role, e.g. roles={{{name!r}: 'input'}} "
            "(input, output or vector; a hidden weight needs its layout)"
        )
    if layout.ndim != ndim:
        raise ValueError(
            f"parameter {name!r} has {ndim} dims but the layout registered for {type(module).__name__} has "
            f"{layout.ndim} (fan_out {layout.fan_out}, fan_in {layout.fan_in}); register the right layout or "
            f"give its role with roles={{{name!r}: ...}}"
        )
    return layout


def growing_groups(model: nn.Module, base: nn.Module, delta: nn.Module | None) -> set[str]:
    """Names of modules whose group count grows with width (depthwise convs): it differs between the
    base and the delta (or the model, when there is no delta)."""
    other = named_modules(delta if delta is not None else model)
    grown = set()
    for name, module in named_modules(base).items():
        layout = layout_of(module)
        if layout is not None and layout.groups and name in other:
            if group_count(other[name], layout) != group_count(module, layout):
                grown.add(name)
    return grown


def _ratio(shape: tuple[int, ...], base: tuple[int, ...], dims: tuple[int, ...]) -> float:
    return math.prod(shape[d] / base[d] for d in dims)


def match(patterns: Mapping[str, object], names: tuple[str, ...]) -> str | None:
    """The first pattern (fnmatch, in mapping order) matching any of ``names``."""
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            return pattern
    return None


@dataclass(frozen=True)
class Inferred:
    """Role and multipliers of one usage of a parameter."""

    role: Role
    multipliers: Multipliers


def _infer_usage(
    usage: Usage,
    module: nn.Module,
    shape: tuple[int, ...],
    base_shape: tuple[int, ...],
    scaling: tuple[bool, ...],
    override: Role | None,
    groups_grow: bool,
) -> Inferred:
    ndim = len(shape)
    every_dim = _ratio(shape, base_shape, tuple(range(ndim)))
    if ndim <= 1:
        role = override or Role.VECTOR
        if role is not Role.VECTOR:
            raise ValueError(
                f"parameter {usage.name!r} has {ndim} dim(s) and can only have role 'vector', not {role.value!r}"
            )
        return Inferred(Role.VECTOR, Multipliers(width=every_dim))
    known = layout_of(module)
    if override in (Role.INPUT, Role.OUTPUT) and (known is None or known.ndim != ndim):
        return Inferred(override, Multipliers(width=every_dim))  # one width dim: its layout does not matter
    if override is Role.VECTOR:
        return Inferred(Role.VECTOR, Multipliers(width=1.0))  # as given: no width dim is assumed
    layout = weight_layout(module, usage.name, ndim)
    m_out, m_in = _ratio(shape, base_shape, layout.fan_out), _ratio(shape, base_shape, layout.fan_in)
    if override is None and groups_grow:  # depthwise: one filter per channel, its fan-in fixed as channels grow
        return Inferred(Role.VECTOR, Multipliers(width=every_dim))
    if override is None:
        grows_out = any(scaling[d] for d in layout.fan_out)
        grows_in = any(scaling[d] for d in layout.fan_in)
        if grows_out and grows_in:
            override = Role.HIDDEN
        elif grows_out:
            override = Role.INPUT
        elif grows_in:
            override = Role.OUTPUT
        else:
            raise ValueError(
                f"cannot classify {usage.name!r} (shape {shape}): none of its dims scale "
                f"with width (base shape {base_shape}). Give its role explicitly, e.g. "
                f"roles={{{usage.name!r}: 'hidden'}} (roles: input, hidden, output, vector)"
            )
    if override is Role.HIDDEN:
        return Inferred(Role.HIDDEN, Multipliers(width=m_in, fan_out=m_out))
    if override is Role.INPUT:
        return Inferred(Role.INPUT, Multipliers(width=m_out))
    return Inferred(Role.OUTPUT, Multipliers(width=m_in))


def infer_roles(
    model: nn.Module,
    params: Mapping[str, TiedParam],
    base_shapes: Mapping[str, tuple[int, ...]],
    scaling: Mapping[str, tuple[bool, ...]],
    roles: Mapping[str, Role],
    grouped: Collection[str] = (),
) -> dict[str, list[Inferred]]:
    """Role and multipliers of every usage of every parameter, by shape comparison.

    ``scaling[name][d]`` says whether dim d grows with width; ``roles`` maps name
    patterns to explicit roles, which win over inference; ``grouped`` names the modules
    whose group count grows with width (their weights are vector-like).
    """
    modules = named_modules(model)
    out: dict[str, list[Inferred]] = {}
    for name, tied in params.items():
        pattern = match(roles, tied.names)
        override = roles[pattern] if pattern is not None else None
        shape = tuple(tied.param.shape)
        out[name] = [
            _infer_usage(u, modules[u.module_name], shape, base_shapes[name], scaling[name], override,
                         u.module_name in grouped)
            for u in tied.usages
        ]
    return out


def check_same_structure(
    model_params: Mapping[str, TiedParam], other: nn.Module, what: str
) -> dict[str, tuple[int, ...]]:
    """Shapes of ``other``'s parameters keyed like ``model_params``; a clear error if they differ."""
    other_params = collect(other)
    mine = {n for t in model_params.values() for n in t.names}
    theirs = {n for t in other_params.values() for n in t.names}
    if mine != theirs:
        missing = sorted(mine - theirs)[:5]
        extra = sorted(theirs - mine)[:5]
        raise ValueError(
            f"the {what} model's structure does not match the model's: "
            f"parameters missing from the {what}: {missing or 'none'}; only in the {what}: {extra or 'none'}. "
            f"Build the {what} with the same code as the model, changing only its width"
        )
    shape_of = {n: tuple(t.param.shape) for t in other_params.values() for n in t.names}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tied in model_params.items():
        shape = shape_of[name]
        if len(shape) != tied.param.dim():
            raise ValueError(
                f"parameter {name!r} has {tied.param.dim()} dims in the model but {len(shape)} in the {what} "
                f"({tuple(tied.param.shape)} vs {shape}); the {what} must differ from the model only in width"
            )
        shapes[name] = shape
    return shapes

