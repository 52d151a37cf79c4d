"""Applying a parameterization (SP, µP, SµPar) and static sparse masks to any model.

``parameterize`` plans everything first (``sparsemup.core.plan``: roles and width multipliers
from shape comparison with a base model, masks, init stds, forward multipliers, all checks),
then applies the plan: initialises every parameter, installs masks and hooks, and stores the
``Parameterization`` on the model. The rules themselves live in ``sparsemup.core.rules``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from . import hooks
from .attention import SCALING_ATTR, DotProductAttention
from .export import guard_own_savers
from .masks import DEFAULT_BLOCK, stable_seed
from .optim import watch_optimizers
from .plan import Options, Plan, UsagePlan, make_plan
from .record import RECORD_ATTR, Parameterization
from .rules import Role, Scheme
from .structure import TiedParam
from .vocab import ForwardMultipliers, MaskKind

__all__ = ["parameterize", "apply_plan"]


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
    mask_kind: MaskKind = "rows",
    block_size: int = DEFAULT_BLOCK,
    seed: int = 0,
    forward_multipliers: ForwardMultipliers = "hooks",
    mask_dense: bool = False,
    depth_alpha: float | None = None,
    base_depth: int | None = None,
    residual_branches: Sequence[str] | None = None,
    probe: Callable[[nn.Module], object] | None = None,
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
        mask_dense: give hidden weights at density 1 an all-ones mask too, so that dynamic sparsity
            (``sparsemup.dynamic.DynamicSparsity``, e.g. GMP starting dense) can prune them.
        depth_alpha: the depth rule (arXiv 2505.01618): None (none, the default), 1 (CompleteP) or 0.5
            (depth-µP). Each residual branch's output is multiplied by m_L^(−α), m_L = L / base_depth, and
            Adam's LRs and ε take the depth factors of docs/RULES.md.
        base_depth: L_base, the number of residual blocks of the model the hyperparameters were tuned on
            (the width base is built at the model's own depth, so it cannot tell).
        residual_branches: module name patterns of the residual branches' closing modules (e.g.
            ``["blocks.*.attn.proj", "blocks.*.mlp.proj"]``); None finds them. Either way each block's
            update is checked to be the sum of its branches' outputs on a probe batch.
        probe: runs the model on an example batch for that check (default: random token ids through a
            model with ``get_input_embeddings``).

    Returns the ``Parameterization`` (also stored on the model; see ``get_parameterization``).
    Raises ValueError, naming the parameter and the fix, on any inconsistent input, before
    the model is touched.

    Example::

        with torch.device("meta"):
            base = Net(width=64)
        model = Net(width=1024)
        sparsemup.parameterize(model, base, scheme="supar", density=0.25, init_std=0.02)
    """
    options = Options(
        scheme=scheme, density=density, base_density=base_density, init_std=init_std, role_init_std=role_init_std,
        init_scale=init_scale, input_alpha=input_alpha, output_alpha=output_alpha, zero_readout=zero_readout,
        roles=roles, delta=delta, masks=masks, mask_kind=mask_kind, block_size=block_size, seed=seed,
        forward_multipliers=forward_multipliers, mask_dense=mask_dense, depth_alpha=depth_alpha,
        base_depth=base_depth, residual_branches=residual_branches, probe=probe,
    )
    return apply_plan(make_plan(model, base, options))


def apply_plan(plan: Plan) -> Parameterization:
    """Initialise, mask and hook the model as ``plan`` says; store its record and signature on it and return
    the record."""
    target, modules, seed = plan.target, plan.modules, plan.options.seed
    grad_masks: list[tuple[nn.Module, hooks.EnsureGradMask]] = []
    for p in plan.params:
        info, tied = p.info, p.tied
        if info.init_std is not None:
            gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, "init\x00" + info.name))
            values = torch.randn(info.shape, generator=gen) * info.init_std
            if p.mask is not None:
                values = values * p.mask
            with torch.no_grad():
                tied.param.copy_(values.to(tied.param.dtype))
        if p.mask is not None:
            grad_masks += _install_mask(modules, tied, p.mask)
        if plan.options.forward_multipliers == "hooks":
            _install_multipliers(modules, tied, info.forward_multipliers, p.usages)
    if grad_masks:
        target.register_forward_pre_hook(hooks.EnsureAllGradMasks(grad_masks))
    device = plan.params[0].tied.param.device if plan.params else torch.device("cpu")
    target.register_buffer(hooks.SIGNATURE, plan.signature().to(device))
    masked = [(u.name, int(p.mask.sum())) for p in plan.params if p.mask is not None for u in p.tied.usages]
    target.register_load_state_dict_pre_hook(hooks.CheckStateOnLoad(masked))  # type: ignore[no-untyped-call]
    for name, scale in plan.attention_scales.items():
        attention = modules[name]
        assert isinstance(attention, DotProductAttention)  # the plan found it so
        attention.scale = scale
    for name, factor in plan.attention_factors.items():
        module = modules[name]
        setattr(module, SCALING_ATTR, getattr(module, SCALING_ATTR) * factor)
    if plan.options.forward_multipliers == "hooks":
        for name, factor in plan.residual_multipliers.items():
            if factor != 1.0:
                modules[name].register_forward_hook(hooks.OutputMultiplier(factor))
    record = plan.record()
    target.__dict__[RECORD_ATTR] = record
    guard_own_savers(target)
    if plan.scheme.width or plan.options.depth_alpha is not None:
        watch_optimizers(target)
        target.register_forward_pre_hook(hooks.WatchCopies(watch_optimizers))
    return record


def _install_mask(
    modules: Mapping[str, nn.Module], tied: TiedParam, mask: torch.Tensor
) -> list[tuple[nn.Module, hooks.EnsureGradMask]]:
    """Mask buffer, gradient masking and load checks on every owner of a hidden weight."""
    installed = []
    for usage in tied.usages:
        module = modules[usage.module_name]
        mask_name = usage.attr + hooks.MASK_SUFFIX
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
    usages: tuple[UsagePlan, ...],
) -> None:
    for usage, plan in zip(tied.usages, usages):
        if fwd.get(usage.name, 1.0) == 1.0:
            continue
        module = modules[usage.module_name]
        if plan.role is Role.INPUT:
            module.register_forward_hook(hooks.OutputMultiplier(fwd[usage.name]))
        else:
            module.register_forward_pre_hook(hooks.InputMultiplier(fwd[usage.name]))
