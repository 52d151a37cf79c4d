"""Applying a parameterization (SP, µP, SµPar) and static sparse masks to any model.

``parameterize`` reads roles and width multipliers from shape comparison with a
base model, draws masks, initialises every parameter, installs forward multipliers,
and records everything in a ``Parameterization`` stored on the model. The rules
themselves live in ``sparsemup.rules``; this module only applies them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from . import hooks
from .attention import DotProductAttention
from .blocksparse import BlockSparseLinear
from .masks import (
    DEFAULT_BLOCK,
    MASK_KINDS,
    blocks_per_row,
    nonzeros_per_row,
    random_mask,
    row_nonzeros,
    stable_seed,
    validate_mask,
)
from .rules import Multipliers, Role, Scheme, attention_scale, forward_multiplier, get_scheme
from .rules import init_std as rule_init_std
from .structure import (
    TiedParam,
    canonical_name,
    check_same_structure,
    collect,
    infer_roles,
    match,
    named_modules,
    strip_wrappers,
    unwrap,
)

__all__ = [
    "ParamInfo",
    "Parameterization",
    "parameterize",
    "get_parameterization",
    "is_parameterized",
    "get_mask",
    "apply_masks",
]

_ATTR = "_sparsemup_parameterization"
_MULTIPLIER_OWNERS = (nn.Linear, nn.Embedding, nn.EmbeddingBag)


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
    attention_scales: Mapping[str, float]
    seed: int
    mask_kind: str
    block_size: int  # b of "blocks" masks (recorded for every kind; used only by "blocks")
    input_alpha: float
    output_alpha: float

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
    return any(hasattr(m, _ATTR) for m in unwrap(model).modules())


def get_parameterization(model: nn.Module) -> Parameterization:
    """The ``Parameterization`` recorded on ``model`` (wrappers such as DDP are looked through)."""
    inner = unwrap(model)
    record = getattr(inner, _ATTR, None)
    if record is None:
        raise ValueError("this model is not parameterized; call sparsemup.parameterize(model, base, ...) first")
    return record


def _mask_name(attr: str) -> str:
    return attr + hooks.MASK_SUFFIX


def get_mask(model: nn.Module, name: str) -> torch.Tensor | None:
    """The mask of a hidden weight (logical shape, the weight's dtype), or None when dense.

    For a masked-dense weight this is its buffer; for a block-sparse one, a fresh expansion.
    """
    info = get_parameterization(model).info(name)
    if not info.masked:
        return None
    module_name, _, attr = info.name.rpartition(".")
    module = unwrap(model).get_submodule(module_name)
    if isinstance(module, BlockSparseLinear):  # sparse by storage (sparsemup.sparsify)
        return module.mask().to(module.weight.dtype)
    return getattr(module, _mask_name(attr))


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every masked weight outside its mask (W *= M).

    Not needed with the supported optimizers, which keep masked entries at zero;
    call it after code that writes weights directly. Block-sparse weights store no zeros.
    """
    inner = unwrap(model)
    for name, info in get_parameterization(model).params.items():
        if info.masked and not isinstance(inner.get_submodule(name.rpartition(".")[0]), BlockSparseLinear):
            inner.get_parameter(name).mul_(get_mask(model, name))


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
            pattern = match(density, tied.names)
            out[name] = float(density[pattern]) if pattern is not None else 1.0
    else:
        _check_unit_interval(density, "density")
        out = {name: float(density) for name in hidden}
    for name in user_masks:
        out[name] = float("nan")  # decided by the mask itself
    return out


def _realised_base_density(base_density: float, base_shape: tuple[int, ...], kind: str, block: int,
                            name: str) -> float:
    fan_in = math.prod(base_shape[1:])
    if kind == "bernoulli" or base_density == 1.0:
        return base_density
    if kind == "blocks":
        return blocks_per_row(base_density, base_shape, block, f"{name} (in the base model)") / (fan_in // block)
    return row_nonzeros(base_density, fan_in, f"{name} (in the base model)") / fan_in


def _multipliers_of(inferred: list, name: str) -> tuple[Role, Multipliers, dict[int, tuple[Role, Multipliers]]]:
    """The parameter's role for init/LR, from the roles of its usages (ties: input + output)."""
    roles = {i.role for i in inferred}
    usages = dict(enumerate((i.role, i.multipliers) for i in inferred))
    if len(roles) == 1:
        return inferred[0].role, inferred[0].multipliers, usages
    if roles == {Role.INPUT, Role.OUTPUT}:
        first_input = next(i for i in inferred if i.role is Role.INPUT)
        return Role.INPUT, first_input.multipliers, usages
    raise ValueError(
        f"parameter {name!r} is tied across usages with roles {sorted(r.value for r in roles)}; only an "
        "embedding tied to a readout (input + output) is supported. Untie it or give its role with roles={...}"
    )


def parameterize(
    model: nn.Module,
    base: nn.Module,
    *,
    scheme: str | Scheme = "supar",
    density: float | Mapping[str, float] = 1.0,
    base_density: float = 1.0,
    init_std: float = 0.02,
    role_init_std: Mapping[str, float] | None = None,
    init_scale: Mapping[str, float] | None = None,
    input_alpha: float = 1.0,
    output_alpha: float = 1.0,
    zero_readout: bool = False,
    roles: Mapping[str, Role | str] | None = None,
    delta: nn.Module | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    mask_kind: str = "rows",
    block_size: int = DEFAULT_BLOCK,
    seed: int = 0,
    forward_multipliers: str = "hooks",
) -> Parameterization:
    """Apply a parameterization and static sparse masks to ``model`` in place.

    Args:
        model: the model to train, already on its device, with materialised weights.
        base: the base (proxy) model whose hyperparameters transfer; same code, its own
            width. Only shapes are read, so it may live on the meta device.
        scheme: "sp", "mup", "supar", or an ablation ("mup+density_init", "mup+density_lr").
        density: ρ of every hidden weight, or {name pattern: ρ} (first match wins;
            unmatched hidden weights stay dense). Only hidden weights can be sparse.
        base_density: ρ_base of the base model's hidden weights (m_ρ = ρ / ρ_base).
        init_std: σ_base; ``role_init_std`` overrides it per role ("input", "hidden", "output").
        init_scale: {name pattern: factor} on top of the scheme's init std (e.g. GPT-2's
            1/sqrt(2·n_layer) on residual output projections).
        input_alpha, output_alpha: α_input (embedding output) and α_output (readout input).
        zero_readout: initialise an untied readout to zero.
        roles: {name pattern: role} overriding inference.
        delta: the model at another width; needed only when ``model`` has the base's shapes.
        masks: {parameter name: 0/1 tensor} user masks for hidden weights (override density).
        mask_kind: "rows" (exactly round(ρ·fan_in) nonzeros per row), "bernoulli", or "blocks"
            (random block_size × block_size tiles, round(ρ·fan_in/b) per block-row: what the
            block-sparse backend, ``sparsemup.sparsify``, runs fast).
        block_size: b of "blocks" masks; it must divide both dims of every masked weight.
        seed: masks and init are drawn from (seed, canonical parameter name).
        forward_multipliers: "hooks" installs them on nn.Linear/nn.Embedding owners;
            "manual" installs none (apply ``ParamInfo.forward_multipliers`` yourself).

    Returns the ``Parameterization`` (also stored on the model; see ``get_parameterization``).
    Raises ValueError, naming the parameter and the fix, on any inconsistent input.
    """
    scheme = get_scheme(scheme)
    target = unwrap(model)
    if target is unwrap(base):
        raise ValueError("model and base are the same object; build the base separately (e.g. on the meta device)")
    if is_parameterized(target):
        raise ValueError(
            "this model is already parameterized; applying twice would double-scale it. Build a fresh model "
            "(and load a state_dict into it after parameterizing, if you are restoring one)"
        )
    _check_unit_interval(base_density, "base_density")
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"unknown mask_kind {mask_kind!r}; choose one of {', '.join(MASK_KINDS)}")
    if forward_multipliers not in ("hooks", "manual"):
        raise ValueError(f"forward_multipliers must be 'hooks' or 'manual', got {forward_multipliers!r}")
    if init_std <= 0:
        raise ValueError(f"init_std must be positive, got {init_std!r}")
    stds = {Role.INPUT: init_std, Role.HIDDEN: init_std, Role.OUTPUT: init_std}
    for key, value in (role_init_std or {}).items():
        if key not in ("input", "hidden", "output") or not value >= 0:
            raise ValueError(f"role_init_std[{key!r}] = {value!r}: give a non-negative std for input, hidden or output")
        stds[Role(key)] = float(value)

    params = collect(target)
    meta = [n for n, t in params.items() if t.param.is_meta]
    if meta:
        raise ValueError(
            f"parameter {meta[0]!r} is on the meta device; materialise the model (model.to_empty(device=...)) "
            "before parameterizing it. Only the base and delta may be meta"
        )
    base_shapes = check_same_structure(params, base, "base")
    role_overrides = _resolve_roles(roles)
    _check_patterns_used(role_overrides, [t.names for t in params.values()], "roles")
    scaling = _scaling_dims(params, base_shapes, delta)
    inferred = infer_roles(target, params, base_shapes, scaling, role_overrides)

    decided = {name: _multipliers_of(inferred[name], name) for name in params}
    hidden = {n: t for n, t in params.items() if decided[n][0] is Role.HIDDEN}
    user_masks = {strip_wrappers(k): v for k, v in (masks or {}).items()}
    for name in user_masks:
        if name not in hidden:
            raise ValueError(
                f"masks[{name!r}]: only hidden weights can be masked; hidden weights include {sorted(hidden)[:8]}"
            )
    requested = _densities(density, hidden, user_masks)
    scales = dict(init_scale or {})
    _check_patterns_used(scales, [t.names for t in params.values()], "init_scale")

    modules = named_modules(target)
    # Phase 1: decide everything and validate, touching nothing, so bad input loses nothing.
    plans: list[tuple[TiedParam, ParamInfo, torch.Tensor | None, dict[int, tuple[Role, Multipliers]]]] = []
    for name, tied in params.items():
        role, mults, usage_roles = decided[name]
        shape = tuple(tied.param.shape)
        mask: torch.Tensor | None = None
        rho, rho_base = 1.0, 1.0
        if role is Role.HIDDEN:
            rho_base = _realised_base_density(base_density, base_shapes[name], mask_kind, block_size, name)
            if name in user_masks:
                mask = validate_mask(user_masks[name], shape, name)
                rho = float(mask.sum()) / mask.numel()
            elif requested[name] < 1.0:
                mask = random_mask(shape, requested[name], seed, name, mask_kind, block_size)
                fan_in = math.prod(shape[1:])
                if mask_kind == "rows":
                    rho = nonzeros_per_row(requested[name], fan_in) / fan_in
                elif mask_kind == "blocks":
                    rho = blocks_per_row(requested[name], shape, block_size, name) / (fan_in // block_size)
                else:
                    rho = float(mask.sum()) / mask.numel()
            mults = Multipliers(width=mults.width, fan_out=mults.fan_out, density=rho / rho_base)
        std: float | None = None
        if role is not Role.VECTOR:
            pattern = match(scales, tied.names)
            factor = scales[pattern] if pattern is not None else 1.0
            std = rule_init_std(role, scheme, mults, stds[role]) * factor
            if role is Role.OUTPUT and zero_readout:
                std = 0.0
        fwd: dict[str, float] = {}
        for i, usage in enumerate(tied.usages):
            u_role, u_mults = usage_roles[i]
            if u_role in (Role.INPUT, Role.OUTPUT):
                fwd[usage.name] = forward_multiplier(u_role, scheme, u_mults, input_alpha, output_alpha)
                owner = modules[usage.module_name]
                needs_hook = forward_multipliers == "hooks" and fwd[usage.name] != 1.0
                if needs_hook and not isinstance(owner, _MULTIPLIER_OWNERS):
                    raise ValueError(
                        f"parameter {usage.name!r} ({u_role.value}) belongs to a {type(owner).__name__}, where "
                        "sparsemup cannot insert its forward multiplier; keep embeddings and readouts in "
                        "nn.Embedding/nn.Linear modules, or pass forward_multipliers='manual' and multiply by "
                        f"get_parameterization(model).info({usage.name!r}).forward_multipliers yourself"
                    )
        if zero_readout and role is Role.INPUT and any(r is Role.OUTPUT for r, _ in usage_roles.values()):
            raise ValueError(
                f"zero_readout: the readout {name!r} is tied to the embedding, so zero init would zero the "
                "embedding too; untie them or drop zero_readout"
            )
        if mask is not None:
            for usage in tied.usages:
                if hasattr(modules[usage.module_name], _mask_name(usage.attr)):
                    raise ValueError(
                        f"{name}: module {usage.module_name!r} already has an attribute {_mask_name(usage.attr)!r}, "
                        "where sparsemup keeps the mask; rename it (or remove torch.nn.utils.prune from it)"
                    )
        info = ParamInfo(
            name=name,
            names=tied.names,
            role=role,
            shape=shape,
            base_shape=base_shapes[name],
            multipliers=mults,
            density=rho,
            base_density=rho_base,
            init_std=std,
            masked=mask is not None,
            forward_multipliers=fwd,
            usage_roles={u.name: usage_roles[i][0] for i, u in enumerate(tied.usages)},
        )
        plans.append((tied, info, mask, usage_roles))
    attention = _attention_scales(target, base, scheme)

    # Phase 2: apply.
    grad_masks: list[tuple[nn.Module, hooks.EnsureGradMask]] = []
    for tied, info, mask, usage_roles in plans:
        if info.init_std is not None:
            gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, "init\x00" + info.name))
            values = torch.randn(info.shape, generator=gen) * info.init_std
            if mask is not None:
                values = values * mask
            with torch.no_grad():
                tied.param.copy_(values.to(tied.param.dtype))
        if mask is not None:
            grad_masks += _install_mask(modules, tied, mask)
        if forward_multipliers == "hooks":
            _install_multipliers(modules, tied, info.forward_multipliers, usage_roles)
    if grad_masks:
        target.register_forward_pre_hook(hooks.EnsureAllGradMasks(grad_masks))
    device = plans[0][0].param.device if plans else torch.device("cpu")
    target.register_buffer(hooks.SIGNATURE, _signature(scheme, plans, attention, input_alpha, output_alpha).to(device))
    masked = [(u.name, int(mask.sum())) for tied, _, mask, _ in plans if mask is not None for u in tied.usages]
    target.register_load_state_dict_pre_hook(hooks.CheckStateOnLoad(masked))
    for name, scale in attention.items():
        modules[name].scale = scale
    record = Parameterization(
        scheme=scheme,
        params={info.name: info for _, info, _, _ in plans},
        attention_scales=attention,
        seed=seed,
        mask_kind=mask_kind,
        block_size=block_size,
        input_alpha=input_alpha,
        output_alpha=output_alpha,
    )
    target.__dict__[_ATTR] = record
    return record


def _signature(scheme: Scheme, plans: list, attention: Mapping[str, float], alpha_in: float,
               alpha_out: float) -> torch.Tensor:
    """sha256 of what the weights do not show (scheme, roles, multipliers, α's) as a uint8 tensor."""
    parts = [f"{scheme}|{alpha_in!r}|{alpha_out!r}|{sorted(attention.items())!r}"]
    for _, info, _, _ in plans:
        m = info.multipliers
        parts.append(f"{info.names}|{info.role.value}|{m.width!r}|{m.fan_out!r}|{m.density!r}|"
                     f"{sorted(info.forward_multipliers.items())!r}")
    digest = hashlib.sha256("\n".join(parts).encode()).digest()
    return torch.frombuffer(bytearray(digest), dtype=torch.uint8).clone()


def _install_mask(
    modules: Mapping[str, nn.Module], tied: TiedParam, mask: torch.Tensor
) -> list[tuple[nn.Module, hooks.EnsureGradMask]]:
    """Mask buffer, gradient masking and load checks on every owner of a hidden weight."""
    installed = []
    for usage in tied.usages:
        module = modules[usage.module_name]
        mask_name = _mask_name(usage.attr)
        param = getattr(module, usage.attr)
        module.register_buffer(mask_name, mask.to(device=param.device, dtype=param.dtype))
        ensure = hooks.EnsureGradMask(usage.attr, mask_name)
        ensure.attach(module)
        module.register_forward_pre_hook(ensure)
        installed.append((module, ensure))
    return installed


def _install_multipliers(
    modules: Mapping[str, nn.Module],
    tied: TiedParam,
    fwd: Mapping[str, float],
    usage_roles: Mapping[int, tuple[Role, Multipliers]],
) -> None:
    for i, usage in enumerate(tied.usages):
        if fwd.get(usage.name, 1.0) == 1.0:
            continue
        module = modules[usage.module_name]
        if usage_roles[i][0] is Role.INPUT:
            module.register_forward_hook(hooks.OutputMultiplier(fwd[usage.name]))
        else:
            module.register_forward_pre_hook(hooks.InputMultiplier(fwd[usage.name]))


def _attention_scales(model: nn.Module, base: nn.Module, scheme: Scheme) -> dict[str, float]:
    """The scheme's logit scale for every DotProductAttention, from its head dim and the base's."""
    base_modules = named_modules(base)
    scales: dict[str, float] = {}
    for name, module in named_modules(model).items():
        if isinstance(module, nn.MultiheadAttention) and scheme.width:
            head_dim = module.embed_dim // module.num_heads
            base_mha = base_modules[name]
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
