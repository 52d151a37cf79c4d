"""Planning a parameterization: every decision and every check, before anything is touched.

``make_plan`` reads roles and multipliers from the base (and delta) shapes, resolves densities,
draws masks and computes init stds, forward multipliers and attention scales. It raises on
any inconsistent input, naming the parameter and the fix, and changes nothing; applying the
``Plan`` (``sparsemup.core.parameterize``) then cannot fail halfway, so bad input loses nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .attention import SCALING_ATTR, DotProductAttention
from .hooks import MASK_SUFFIX
from .layout import Layout, from_neurons, group_count, layout_of, neurons_shape, neurons_view
from .masks import blocks_per_row, random_mask, row_nonzeros, validate_mask
from .options import Options
from .record import Parameterization, ParamInfo, is_parameterized
from .residual import residual_branches
from .rules import (
    Multipliers,
    Role,
    Scheme,
    attention_scale,
    check_depth_alpha,
    depth_multiplier,
    forward_multiplier,
    get_scheme,
    residual_multiplier,
)
from .rules import init_std as rule_init_std
from .structure import (
    Inferred,
    TiedParam,
    check_same_structure,
    collect,
    growing_groups,
    infer_roles,
    match,
    named_modules,
    strip_wrappers,
    unwrap,
    weight_layout,
)
from .vocab import FORWARD_MULTIPLIERS, MASK_KINDS, MaskKind, check_choice

__all__ = ["UsagePlan", "ParamPlan", "Plan", "make_plan"]

@dataclass(frozen=True)
class UsagePlan:
    """Role and multipliers of one usage of a parameter (a tied weight has several)."""

    role: Role
    multipliers: Multipliers


@dataclass(frozen=True)
class ParamPlan:
    """What applying the plan does to one parameter: its record, its mask and the roles of its usages."""

    tied: TiedParam
    info: ParamInfo
    mask: torch.Tensor | None  # bool, on the CPU; None when dense
    usages: tuple[UsagePlan, ...]  # aligned with ``tied.usages``


@dataclass(frozen=True)
class Plan:
    """A validated parameterization of one model, ready to apply."""

    target: nn.Module
    modules: Mapping[str, nn.Module]
    scheme: Scheme
    params: tuple[ParamPlan, ...]
    attention_scales: Mapping[str, float]
    options: Options
    attention_factors: Mapping[str, float]
    residual_multipliers: Mapping[str, float]  # m_L^(−α) on each residual branch's closing module
    depth: int | None  # residual blocks L (None without a depth rule)

    def record(self) -> Parameterization:
        """The ``Parameterization`` this plan stores on the model."""
        o = self.options
        return Parameterization(
            scheme=self.scheme,
            params={p.info.name: p.info for p in self.params},
            attention_scales=dict(self.attention_scales),
            seed=o.seed,
            mask_kind=o.mask_kind,
            block_size=o.block_size,
            input_alpha=o.input_alpha,
            output_alpha=o.output_alpha,
            options=dataclasses.replace(o, delta=None, masks=None, probe=None),
            attention_factors=dict(self.attention_factors),
            residual_multipliers=dict(self.residual_multipliers),
            depth=self.depth,
        )

    def signature(self) -> torch.Tensor:
        """sha256 of what the weights do not show (scheme, roles, multipliers, α's) as a uint8 tensor."""
        o = self.options
        parts = [f"{self.scheme}|{o.input_alpha!r}|{o.output_alpha!r}|{sorted(self.attention_scales.items())!r}"]
        if self.attention_factors:  # absent when there are none, so that older signatures stay valid
            parts.append(f"attention factors|{sorted(self.attention_factors.items())!r}")
        if o.depth_alpha is not None:  # absent without a depth rule, so that older signatures stay valid
            parts.append(f"depth|{float(o.depth_alpha)!r}|{self.depth!r}|{o.base_depth!r}|"
                         f"{sorted(self.residual_multipliers.items())!r}")
        for p in self.params:
            m = p.info.multipliers
            depth = f"|{m.depth!r}" if o.depth_alpha is not None else ""
            parts.append(f"{p.info.names}|{p.info.role.value}|{m.width!r}|{m.fan_out!r}|{m.density!r}|"
                         f"{sorted(p.info.forward_multipliers.items())!r}{depth}")
        digest = hashlib.sha256("\n".join(parts).encode()).digest()
        return torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()


def _check_unit_interval(value: float, what: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 < float(value) <= 1.0):
        raise ValueError(f"{what} must be a number in (0, 1], got {value!r}")


def _scaling_dims(
    model_params: Mapping[str, TiedParam],
    base_shapes: Mapping[str, tuple[int, ...]],
    delta: nn.Module | None,
) -> dict[str, tuple[bool, ...]]:
    """Which dims of each parameter grow with width: differ between base and delta (or model)."""
    if delta is not None:
        other = check_same_structure(model_params, delta, "delta")
    else:
        other = {n: tuple(t.param.shape) for n, t in model_params.items()}
        if all(other[n] == base_shapes[n] for n in model_params):
            raise ValueError(
                "the model has exactly the base model's shapes, so sparsemup cannot tell which dims grow "
                "with width; pass delta=<the same model built at another width> (the meta device is fine: "
                "with torch.device('meta'): delta = Model(width=2 * base_width))"
            )
    return {n: tuple(a != b for a, b in zip(base_shapes[n], other[n])) for n in model_params}


def _resolve_roles(roles: Mapping[str, Role | str] | None) -> dict[str, Role]:
    resolved: dict[str, Role] = {}
    for pattern, role in (roles or {}).items():
        try:
            resolved[pattern] = role if isinstance(role, Role) else Role(role)
        except ValueError:
            raise ValueError(
                f"roles[{pattern!r}] = {role!r} is not a role; use one of {', '.join(r.value for r in Role)}"
            ) from None
    return resolved


def _check_patterns_used(patterns: Mapping[str, object], names: list[tuple[str, ...]], what: str) -> None:
    for pattern in patterns:
        if not any(match({pattern: None}, n) for n in names):
            raise ValueError(f"{what} pattern {pattern!r} matches no parameter it can apply to; check the name")


def _densities(
    density: float | Mapping[str, float], hidden: Mapping[str, TiedParam], user_masks: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """Requested density of every hidden weight (1.0 = dense)."""
    if isinstance(density, Mapping):
        for pattern, value in density.items():
            _check_unit_interval(value, f"density[{pattern!r}]")
        _check_patterns_used(density, [t.names for t in hidden.values()], "density (hidden weights only)")
        out = {}
        for name, tied in hidden.items():
            found = match(density, tied.names)
            out[name] = float(density[found]) if found is not None else 1.0
    else:
        _check_unit_interval(density, "density")
        out = {name: float(density) for name in hidden}
    for name in user_masks:
        out[name] = float("nan")  # decided by the mask itself
    return out


def _realised_density(density: float, shape: tuple[int, ...], neurons: tuple[int, int], kind: MaskKind, block: int,
                      name: str) -> float:
    """The density a random mask of ``kind`` realises: nonzeros per neuron / fan-in (requested for bernoulli)."""
    fan_in = neurons[1]
    if kind == "bernoulli" or density == 1.0:
        return density
    if kind == "blocks":
        if len(shape) != 2:
            blocks_per_row(density, shape, block, name)  # the error for a weight that is not 2-D
        return blocks_per_row(density, neurons, block, name) / (fan_in // block)
    return row_nonzeros(density, fan_in, name) / fan_in


def _draw_mask(shape: tuple[int, ...], neurons: tuple[int, int], layout: Layout, groups: int, density: float,
               o: Options, name: str) -> torch.Tensor:
    """A random mask of ``shape`` with the same fan-in for every output neuron of the layout
    (``neurons``: the weight's (neurons, fan-in) shape)."""
    rows = random_mask(neurons, density, o.seed, name, o.mask_kind, o.block_size)
    return from_neurons(rows, shape, layout, groups)


def _check_not_narrower(inferred: Mapping[str, list[Inferred]], base_shapes: Mapping[str, tuple[int, ...]],
                        params: Mapping[str, TiedParam]) -> None:
    """Refuse a base wider than the model (a width multiplier below 1): almost always model and base swapped."""
    for name, usages in inferred.items():
        for usage in usages:
            m = usage.multipliers
            if m.width < 1 or m.fan_out < 1:
                raise ValueError(
                    f"parameter {name!r} is narrower in the model than in the base (shape "
                    f"{tuple(params[name].param.shape)} vs base {base_shapes[name]}, width multiplier "
                    f"{min(m.width, m.fan_out):g}); model and base look swapped: call parameterize(model, base) "
                    "with the wide model first and the small base (the proxy the hyperparameters were tuned on) "
                    "second, or build the base at a width no larger than the model's (width >= base_width)"
                )


def _decide(inferred: list[Inferred], name: str) -> tuple[UsagePlan, tuple[UsagePlan, ...]]:
    """The parameter's role and multipliers for init/LR, from those of its usages (ties: input + output)."""
    roles = {i.role for i in inferred}
    usages = tuple(UsagePlan(i.role, i.multipliers) for i in inferred)
    if len(roles) == 1:
        return usages[0], usages
    if roles == {Role.INPUT, Role.OUTPUT}:
        return next(u for u in usages if u.role is Role.INPUT), usages
    raise ValueError(
        f"parameter {name!r} is tied across usages with roles {sorted(r.value for r in roles)}; only an "
        "embedding tied to a readout (input + output) is supported. Untie it or give its role with roles={...}"
    )


def make_plan(model: nn.Module, base: nn.Module, options: Options) -> Plan:
    """Decide and validate everything ``parameterize`` will do to ``model``, touching nothing."""
    o = options
    scheme = get_scheme(o.scheme)
    target = unwrap(model)
    if target is unwrap(base):
        raise ValueError("model and base are the same object; build the base separately (e.g. on the meta device)")
    if is_parameterized(target):
        raise ValueError(
            "this model is already parameterized; applying twice would double-scale it. Build a fresh model "
            "(and load a state_dict into it after parameterizing, if you are restoring one)"
        )
    stds = _check_options(o)
    params, base_shapes, inferred = _infer(target, base, o)
    decided = {name: _decide(inferred[name], name) for name in params}
    branches, depth = _depth_plan(target, o)
    m_depth = depth_multiplier(depth, o.base_depth) if depth is not None and o.base_depth is not None else 1.0
    hidden = {n: t for n, t in params.items() if decided[n][0].role is Role.HIDDEN}
    user_masks = {strip_wrappers(k): v for k, v in (o.masks or {}).items()}
    for name in user_masks:
        if name not in hidden:
            raise ValueError(
                f"masks[{name!r}]: only hidden weights can be masked; hidden weights include {sorted(hidden)[:8]}"
            )
    requested = _densities(o.density, hidden, user_masks)
    scales = dict(o.init_scale or {})
    _check_patterns_used(scales, [t.names for t in params.values()], "init_scale")
    shared = _Shared(o, scheme, named_modules(target), base_shapes, user_masks, requested, set(branches.values()),
                     m_depth, scales, stds)
    planned = tuple(_plan_param(name, tied, *decided[name], shared) for name, tied in params.items())
    attention = _attention_scales(target, base, scheme)
    factors = _scaling_factors(target, base, scheme)
    residual = {name: residual_multiplier(o.depth_alpha, m_depth) for name in branches}
    return Plan(target, shared.modules, scheme, planned, attention, o, factors, residual, depth)


def _check_options(o: Options) -> dict[Role, float]:
    """Check the options that need no model; returns σ_base of each role."""
    _check_unit_interval(o.base_density, "base_density")
    check_choice(o.mask_kind, MASK_KINDS, "mask_kind")
    check_choice(o.forward_multipliers, FORWARD_MULTIPLIERS, "forward_multipliers")
    if o.init_std <= 0:
        raise ValueError(f"init_std must be positive, got {o.init_std!r}")
    stds = {Role.INPUT: o.init_std, Role.HIDDEN: o.init_std, Role.OUTPUT: o.init_std}
    for key, value in (o.role_init_std or {}).items():
        if key not in {r.value for r in stds} or not value >= 0:
            raise ValueError(f"role_init_std[{key!r}] = {value!r}: give a non-negative std for input, hidden or output")
        stds[Role(key)] = float(value)
    return stds


def _infer(target: nn.Module, base: nn.Module, o: Options) -> tuple[
        dict[str, TiedParam], dict[str, tuple[int, ...]], dict[str, list[Inferred]]]:
    """The model's parameters, the base's shapes and each parameter's inferred roles and width multipliers."""
    params = collect(target)
    meta = [n for n, t in params.items() if t.param.is_meta]
    if meta:
        raise ValueError(
            f"parameter {meta[0]!r} is on the meta device; materialise the model (model.to_empty(device=...)) "
            "before parameterizing it. Only the base and delta may be meta"
        )
    base_shapes = check_same_structure(params, base, "base")
    role_overrides = _resolve_roles(o.roles)
    _check_patterns_used(role_overrides, [t.names for t in params.values()], "roles")
    scaling = _scaling_dims(params, base_shapes, o.delta)
    grouped = growing_groups(target, base, o.delta)
    inferred = infer_roles(target, params, base_shapes, scaling, role_overrides, grouped)
    _check_not_narrower(inferred, base_shapes, params)
    return params, base_shapes, inferred


@dataclass(frozen=True)
class _Shared:
    """What planning each parameter reads besides the parameter itself."""

    o: Options
    scheme: Scheme
    modules: Mapping[str, nn.Module]
    base_shapes: Mapping[str, tuple[int, ...]]
    user_masks: Mapping[str, torch.Tensor]
    requested: Mapping[str, float]  # requested density of each hidden weight
    blocks: set[str]  # the residual blocks (empty without a depth rule)
    m_depth: float
    scales: Mapping[str, float]  # init_scale
    stds: Mapping[Role, float]


def _plan_param(name: str, tied: TiedParam, chosen: UsagePlan, usages: tuple[UsagePlan, ...], s: _Shared) -> ParamPlan:
    """Mask, multipliers, init std and forward multipliers of one parameter, checked."""
    o, role, mults = s.o, chosen.role, chosen.multipliers
    mask: torch.Tensor | None = None
    rho, rho_base = 1.0, 1.0
    if role is Role.HIDDEN:
        mask, rho, rho_base = _hidden_mask(name, tied, s)
        mults = Multipliers(width=mults.width, fan_out=mults.fan_out, density=rho / rho_base)
    if s.blocks and any(_in_blocks(n, s.blocks) for n in tied.names):
        mults = dataclasses.replace(mults, depth=s.m_depth)
    std: float | None = None
    if role is not Role.VECTOR:
        pattern = match(s.scales, tied.names)
        factor = s.scales[pattern] if pattern is not None else 1.0
        std = rule_init_std(role, s.scheme, mults, s.stds[role]) * factor
        if role is Role.OUTPUT and o.zero_readout:
            std = 0.0
    fwd = _forward_multipliers(tied, usages, s)
    if o.zero_readout and role is Role.INPUT and any(u.role is Role.OUTPUT for u in usages):
        raise ValueError(
            f"zero_readout: the readout {name!r} is tied to the embedding, so zero init would zero the "
            "embedding too; untie them or drop zero_readout"
        )
    if mask is not None:
        for usage in tied.usages:
            if hasattr(s.modules[usage.module_name], usage.attr + MASK_SUFFIX):
                raise ValueError(
                    f"{name}: module {usage.module_name!r} already has an attribute "
                    f"{usage.attr + MASK_SUFFIX!r}, where sparsemup keeps the mask; rename it (or remove "
                    "torch.nn.utils.prune from it)"
                )
    info = ParamInfo(
        name=name, names=tied.names, role=role, shape=tuple(tied.param.shape), base_shape=s.base_shapes[name],
        multipliers=mults, density=rho, base_density=rho_base, init_std=std, masked=mask is not None,
        forward_multipliers=fwd, usage_roles={u.name: plan.role for u, plan in zip(tied.usages, usages)},
    )
    return ParamPlan(tied, info, mask, usages)


def _hidden_mask(name: str, tied: TiedParam, s: _Shared) -> tuple[torch.Tensor | None, float, float]:
    """A hidden weight's mask (None when dense) and its realised density and the base's."""
    o, shape = s.o, tuple(tied.param.shape)
    owner = s.modules[tied.usages[0].module_name]
    layout = weight_layout(owner, name, len(shape))
    groups = group_count(owner, layout)
    neurons = neurons_shape(shape, layout, groups)
    rho_base = _realised_density(o.base_density, s.base_shapes[name],
                                 neurons_shape(s.base_shapes[name], layout, groups), o.mask_kind,
                                 o.block_size, f"{name} (in the base model)")
    mask: torch.Tensor | None = None
    rho = 1.0
    if name in s.user_masks:
        mask = validate_mask(s.user_masks[name], shape, name,
                             neurons=functools.partial(neurons_view, layout=layout, groups=groups))
        rho = float(mask.sum()) / mask.numel()
    elif s.requested[name] < 1.0 or o.mask_dense:
        rho = _realised_density(s.requested[name], shape, neurons, o.mask_kind, o.block_size, name)
        mask = _draw_mask(shape, neurons, layout, groups, s.requested[name], o, name)
        if o.mask_kind == "bernoulli":
            rho = float(mask.sum()) / mask.numel()
    return mask, rho, rho_base


def _forward_multipliers(tied: TiedParam, usages: tuple[UsagePlan, ...], s: _Shared) -> dict[str, float]:
    """The forward multiplier of each input or output usage; refuses one that needs a hook where none can go."""
    o = s.o
    fwd: dict[str, float] = {}
    for usage, plan in zip(tied.usages, usages):
        if plan.role not in (Role.INPUT, Role.OUTPUT):
            continue
        fwd[usage.name] = forward_multiplier(plan.role, s.scheme, plan.multipliers, o.input_alpha, o.output_alpha)
        owner_layout = layout_of(s.modules[usage.module_name])
        needs_hook = o.forward_multipliers == "hooks" and fwd[usage.name] != 1.0
        if needs_hook and not (owner_layout is not None and owner_layout.hookable):
            raise ValueError(
                f"parameter {usage.name!r} ({plan.role.value}) belongs to a "
                f"{type(s.modules[usage.module_name]).__name__}, where sparsemup cannot insert its forward "
                "multiplier; keep embeddings and readouts in layers with a registered layout (nn.Linear, "
                "nn.Embedding, convs, or sparsemup.register_layout), or pass forward_multipliers='manual' "
                "and multiply by "
                f"get_parameterization(model).info({usage.name!r}).forward_multipliers yourself"
            )
    return fwd


def _in_blocks(name: str, blocks: set[str]) -> bool:
    """Whether parameter ``name`` lives inside one of the residual ``blocks``."""
    return any(name.startswith(block + ".") for block in blocks)


def _depth_plan(model: nn.Module, o: Options) -> tuple[dict[str, str], int | None]:
    """The residual branches ({closing module: block}) and the number of blocks L under a depth rule."""
    if o.depth_alpha is None:
        if o.base_depth is not None or o.residual_branches is not None:
            raise ValueError("base_depth and residual_branches belong to a depth rule; set depth_alpha (1 for "
                             "CompleteP, 0.5 for depth-µP) or leave them out")
        return {}, None
    check_depth_alpha(o.depth_alpha)
    if o.base_depth is None:
        raise ValueError("depth_alpha needs base_depth=<the number of residual blocks of the model the "
                         "hyperparameters were tuned on>; the width base is built at the model's own depth, so "
                         "sparsemup cannot read it from the base")
    depth_multiplier(1, o.base_depth)  # the error for a base_depth that is not a positive integer
    if isinstance(o.residual_branches, str):
        raise ValueError(f"residual_branches takes a list of module name patterns, got the string "
                         f"{o.residual_branches!r}; write [{o.residual_branches!r}]")
    branches = residual_branches(model, o.residual_branches, o.probe)
    return branches, len(set(branches.values()))


HEAD_DIM_ATTRS = ("head_dim", "head_size")


def _head_dim(module: nn.Module) -> int | None:
    for attr in HEAD_DIM_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _scaling_factors(model: nn.Module, base: nn.Module, scheme: Scheme) -> dict[str, float]:
    """sqrt(d_head,base / d_head) for every attention module with a ``scaling`` attribute (transformers') whose
    head dim differs from its base counterpart's: multiplied into that scale it gives µP's sqrt(d_head,base)/d_head
    (times any factor the module adds, such as GPT-2's per-layer one)."""
    if not scheme.width:
        return {}
    base_modules = named_modules(base)
    factors: dict[str, float] = {}
    for name, module in named_modules(model).items():
        scaling = getattr(module, SCALING_ATTR, None)
        if isinstance(module, DotProductAttention) or not isinstance(scaling, (int, float)) or isinstance(scaling,
                                                                                                         bool):
            continue
        head_dim, base_head_dim = _head_dim(module), _head_dim(base_modules.get(name, nn.Module()))
        if head_dim is None or base_head_dim is None:
            raise ValueError(
                f"{name}: a {type(module).__name__} with an attention scale {SCALING_ATTR!r} but no head dim "
                f"attribute ({' or '.join(HEAD_DIM_ATTRS)}) here or in the base, so sparsemup cannot tell whether "
                f"{scheme.name} needs its scale changed; give the module a head_dim attribute, or use "
                "sparsemup.DotProductAttention"
            )
        if head_dim != base_head_dim:
            factors[name] = math.sqrt(base_head_dim / head_dim)
    return factors


def _attention_scales(model: nn.Module, base: nn.Module, scheme: Scheme) -> dict[str, float]:
    """The scheme's logit scale for every DotProductAttention, from its head dim and the base's."""
    base_modules = named_modules(base)
    scales: dict[str, float] = {}
    for name, module in named_modules(model).items():
        if isinstance(module, nn.MultiheadAttention) and scheme.width:
            head_dim = module.embed_dim // module.num_heads
            base_mha = base_modules[name]
            if not isinstance(base_mha, nn.MultiheadAttention):
                raise ValueError(f"{name}: an nn.MultiheadAttention in the model but a {type(base_mha).__name__} in "
                                 "the base; build the base with the same code as the model")
            base_head_dim = base_mha.embed_dim // base_mha.num_heads
            if head_dim != base_head_dim:
                raise ValueError(
                    f"{name}: nn.MultiheadAttention fixes its logit scale at 1/sqrt(head_dim), but {scheme.name} "
                    f"needs sqrt({base_head_dim})/{head_dim} here; keep head_dim equal to the base's (add heads "
                    "as width grows) or use sparsemup.DotProductAttention, whose scale sparsemup sets"
                )
        if not isinstance(module, DotProductAttention):
            continue
        counterpart = base_modules.get(name)
        if not isinstance(counterpart, DotProductAttention):
            raise ValueError(f"attention module {name!r} has no DotProductAttention counterpart in the base model")
        scales[name] = attention_scale(scheme, module.head_dim, counterpart.head_dim)
    return scales
