"""Applying a parameterization (SP, µP, SµPar) and static sparse masks to any model.

``parameterize`` plans everything first (``sparsemup.core.plan``: roles and width multipliers
from shape comparison with a base model, masks, init stds, forward multipliers, all checks),
then applies the plan: initialises every parameter, installs masks and hooks, and stores the
``Parameterization`` on the model. The rules themselves live in ``sparsemup.core.rules``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from . import hooks
from .attention import SCALING_ATTR, DotProductAttention
from .export import guard_own_savers
from .masks import stable_seed
from .optim import watch_optimizers
from .options import Options, takes_options
from .plan import Plan, UsagePlan, make_plan
from .record import RECORD_ATTR, Parameterization
from .rules import Role
from .structure import TiedParam

__all__ = ["parameterize", "apply_plan"]


@takes_options(Options)
def parameterize(model: nn.Module, base: nn.Module, options: Options) -> Parameterization:
    """Apply a parameterization and static sparse masks to ``model`` in place.

    ``model`` is the model to train, already on its device, with materialised weights; ``base`` the base
    (proxy) model whose hyperparameters transfer: same code, its own width. Only the base's shapes are read,
    so it may live on the meta device. The keyword arguments are the fields of ``Options`` (below).

    Returns the ``Parameterization`` (also stored on the model; see ``get_parameterization``).
    Raises ValueError, naming the parameter and the fix, on any inconsistent input, before
    the model is touched.

    Example::

        with torch.device("meta"):
            base = Net(width=64)
        model = Net(width=1024)
        sparsemup.parameterize(model, base, scheme="supar", density=0.25, init_std=0.02)
    """
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
    target.register_load_state_dict_pre_hook(hooks.CheckStateOnLoad(masked))
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
