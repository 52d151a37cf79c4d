"""Optimizer parameter groups carrying the scheme's learning-rate and weight-decay multipliers.

As in microsoft/mup, the parameterization reaches the optimizer only through
``torch.optim`` parameter groups, so any optimizer with a known rule, any LR scheduler
that scales groups proportionally, and sharded optimizers work unchanged.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from .record import Parameterization, ParamInfo, get_parameterization, is_parameterized
from .rules import Family, adam_eps_multiplier, lr_multiplier, weight_decay_multiplier
from .structure import strip_wrappers, unwrap
from .vocab import WEIGHT_DECAY_MODES, WeightDecayMode, check_choice

__all__ = ["OptimizerRule", "register_optimizer", "optimizer_rule", "optimizer_family", "param_groups",
           "make_optimizer", "GuardMode", "set_optimizer_guard", "watch_optimizers"]

GuardMode = Literal["warn", "error", "off"]
GROUP_TAG = "lr_mult"  # every group of ``param_groups`` carries it (and checkpoints of its optimizers keep it)


@dataclass(frozen=True)
class OptimizerRule:
    """What the parameterization needs to know about an optimizer class.

    family: entry-wise normalised updates follow µP's Adam rule, raw-gradient ones its SGD rule.
    lr_wd_decay: a weight's decay per step is lr·wd (decoupled decay as in AdamW, or plain SGD's
        L2 term), which the ``independent`` weight-decay rule relies on; False where decay is an
        L2 term passing through the optimizer's normaliser (Adam, RMSprop, ...).
    """

    family: Family
    lr_wd_decay: bool


_RULES: dict[type[torch.optim.Optimizer], OptimizerRule] = {
    torch.optim.Adam: OptimizerRule(Family.ADAM, lr_wd_decay=False),
    torch.optim.AdamW: OptimizerRule(Family.ADAM, lr_wd_decay=True),
    torch.optim.Adamax: OptimizerRule(Family.ADAM, lr_wd_decay=False),
    # NAdam and RAdam decouple their decay only with decoupled_weight_decay=True, a constructor flag that
    # parameter groups cannot see: they are taken as decoupled (pass that flag, or use weight_decay_mode="coupled").
    torch.optim.NAdam: OptimizerRule(Family.ADAM, lr_wd_decay=True),
    torch.optim.RAdam: OptimizerRule(Family.ADAM, lr_wd_decay=True),
    torch.optim.RMSprop: OptimizerRule(Family.ADAM, lr_wd_decay=False),
    torch.optim.Adagrad: OptimizerRule(Family.ADAM, lr_wd_decay=False),
    torch.optim.SGD: OptimizerRule(Family.SGD, lr_wd_decay=True),
}


def register_optimizer(optimizer_class: type[torch.optim.Optimizer], family: Family | str,
                       lr_wd_decay: bool) -> None:
    """Declare the rule of an optimizer class sparsemup does not know (its subclasses inherit it).

    Example: ``register_optimizer(Lion, "adam", lr_wd_decay=True)`` for a sign-based optimizer
    with decoupled weight decay.
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ValueError(f"register_optimizer takes a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    name = family.value if isinstance(family, Family) else family.lower()
    check_choice(name, tuple(f.value for f in Family), "optimizer family")
    _RULES[optimizer_class] = OptimizerRule(Family(name), lr_wd_decay)


def optimizer_rule(optimizer_class: type[torch.optim.Optimizer]) -> OptimizerRule:
    """The rule of the most specific registered class in ``optimizer_class``'s MRO; unknown ones are an error."""
    for cls in optimizer_class.__mro__:
        if cls in _RULES:
            return _RULES[cls]
    known = ", ".join(sorted(c.__name__ for c in _RULES))
    raise ValueError(
        f"no parameterization rule is known for optimizer {optimizer_class!r}; use one of {known} (or a "
        "subclass), or declare it with sparsemup.core.optim.register_optimizer(cls, family='adam' or 'sgd', "
        "lr_wd_decay=...)"
    )


def optimizer_family(optimizer: type[torch.optim.Optimizer] | Family | str) -> Family:
    """The rule family of an optimizer class, or of a family name ("adam", "sgd")."""
    if isinstance(optimizer, type):
        return optimizer_rule(optimizer).family
    try:
        return Family(optimizer.lower() if isinstance(optimizer, str) else optimizer)
    except ValueError:
        raise ValueError(f"unknown optimizer family {optimizer!r}; choose adam or sgd, or pass the optimizer "
                         "class") from None


def param_groups(
    model: nn.Module,
    optimizer_class: type[torch.optim.Optimizer],
    lr: float,
    weight_decay: float = 0.0,
    weight_decay_mode: WeightDecayMode = "independent",
    decay_vectors: bool = False,
    eps: float | None = None,
) -> list[dict[str, Any]]:
    """``torch.optim`` parameter groups with each parameter's LR and weight decay (and Adam's ε under a depth rule).

    Args:
        model: a parameterized model (wrappers such as DDP are looked through).
        optimizer_class: the class the groups are for (its rule decides the multipliers), e.g.
            ``torch.optim.AdamW``; a class only, so groups of one rule cannot feed another optimizer.
        lr, weight_decay: the base values η_base and wd_base. Groups hold ``lr`` = η_base·lr_mult
            and ``weight_decay`` = wd_base·wd_mult, plus ``lr_mult``/``wd_mult`` and ``param_names``.
        weight_decay_mode: ``independent`` (default) keeps lr·wd per layer equal to the base model's,
            so a decay tuned on the base transfers; ``coupled`` is PyTorch's lr·wd as is (the official
            SµPar code). ``independent`` with nonzero decay is refused for optimizers whose decay is an
            L2 term (Adam, RMSprop, ... and their subclasses).
        decay_vectors: also decay biases and norm gains.
        eps: the base ε of an Adam-family optimizer (default: the class's own default). Used only with a depth
            rule, whose groups hold ``eps`` = ε_base·eps_mult and ``eps_mult``; without one ε is left to the
            optimizer, as before.

    Frozen parameters (requires_grad=False) are left out.

    Example::

        groups = sparsemup.param_groups(model, torch.optim.AdamW, lr=3e-3, weight_decay=0.1)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))
    """
    rule = _checked_rule(optimizer_class, lr, weight_decay, weight_decay_mode)
    record = get_parameterization(model)
    base_eps = _base_eps(optimizer_class, eps) if record.options.depth_alpha is not None else None
    groups: dict[tuple[float, float, float], dict[str, Any]] = {}
    for name, param in unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        info = record.info(strip_wrappers(name))
        lr_mult, wd_mult, eps_mult = _multipliers(record, info, rule, weight_decay_mode, decay_vectors)
        new = {"params": [], "lr": lr * lr_mult, "weight_decay": weight_decay * wd_mult,
               "lr_mult": lr_mult, "wd_mult": wd_mult, "param_names": []}
        if base_eps is not None:
            new.update(eps=base_eps * eps_mult, eps_mult=eps_mult)
        group = groups.setdefault((lr_mult, wd_mult, eps_mult), new)
        group["params"].append(param)
        group["param_names"].append(info.name)
    return list(groups.values())


def _multipliers(record: Parameterization, info: ParamInfo, rule: OptimizerRule, weight_decay_mode: WeightDecayMode,
                 decay_vectors: bool) -> tuple[float, float, float]:
    """A parameter's LR, weight decay and Adam ε multipliers under ``rule``."""
    alpha = record.options.depth_alpha
    lr_mult = lr_multiplier(info.role, record.scheme, info.multipliers, rule.family, alpha)
    wd_mult = weight_decay_multiplier(info.role, lr_mult, weight_decay_mode, decay_vectors)
    return lr_mult, wd_mult, adam_eps_multiplier(record.scheme, info.multipliers, alpha)


def _checked_rule(optimizer_class: type[torch.optim.Optimizer], lr: float, weight_decay: float,
                  weight_decay_mode: WeightDecayMode) -> OptimizerRule:
    """The rule of ``optimizer_class``, after checking the arguments of ``param_groups`` against it."""
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ValueError(f"param_groups takes the optimizer class (e.g. torch.optim.AdamW), got {optimizer_class!r}")
    check_choice(weight_decay_mode, WEIGHT_DECAY_MODES, "weight_decay_mode")
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"lr must be positive and weight_decay non-negative, got lr={lr}, weight_decay={weight_decay}")
    rule = optimizer_rule(optimizer_class)
    if weight_decay and weight_decay_mode == "independent" and not rule.lr_wd_decay:
        raise ValueError(
            f"{optimizer_class.__name__} applies weight decay as an L2 term that passes through its normaliser, so "
            "lr·wd is not its decay and the 'independent' rule does not apply; use a decoupled optimizer "
            "(torch.optim.AdamW) or weight_decay_mode='coupled'"
        )
    return rule


def _base_eps(optimizer_class: type[torch.optim.Optimizer], eps: float | None) -> float:
    """ε_base for a depth rule: the one given, else the optimizer class's default (it must take an ``eps``)."""
    default = inspect.signature(optimizer_class.__init__).parameters.get("eps")
    if default is None:
        raise ValueError(f"the depth rule scales Adam's ε, but {optimizer_class.__name__} takes no eps argument; "
                         "register an Adam-family optimizer with one, or use depth_alpha=None")
    value = eps if eps is not None else default.default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"eps must be a non-negative number, got {value!r}")
    return float(value)


def make_optimizer(
    model: nn.Module,
    optimizer_class: type[torch.optim.Optimizer],
    lr: float,
    weight_decay: float = 0.0,
    weight_decay_mode: WeightDecayMode = "independent",
    decay_vectors: bool = False,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_class(param_groups(model, optimizer_class, ...), **kwargs)``: the groups are the contract.

    Example::

        opt = sparsemup.make_optimizer(model, torch.optim.AdamW, lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    """
    groups = param_groups(model, optimizer_class, lr, weight_decay, weight_decay_mode, decay_vectors,
                          kwargs.get("eps"))
    build: Callable[..., torch.optim.Optimizer] = optimizer_class  # every torch optimizer takes lr
    return build(groups, lr=lr, **kwargs)


# ---- the guard against optimizers that bypass the groups: checked once, at each optimizer's first step ----

_WATCHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # parameterized models whose groups carry multipliers
_CHECKED: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
_guard_mode: GuardMode = "warn"
_hook: RemovableHandle | None = None


def set_optimizer_guard(mode: GuardMode) -> None:
    """What happens at the first step of an optimizer holding a parameterized model's parameters in groups not
    built by ``param_groups``/``make_optimizer`` (their per-layer LRs would be lost): ``"warn"`` (default) warns
    once per optimizer, ``"error"`` refuses the step (the strict setting), ``"off"`` checks nothing."""
    global _guard_mode
    check_choice(mode, get_args(GuardMode), "optimizer guard mode")
    _guard_mode = mode


def watch_optimizers(model: nn.Module) -> None:
    """Have the optimizer guard check optimizers for ``model``'s parameters (``parameterize`` calls it for every
    scheme but SP, whose multipliers are all 1). Installs the one global step pre-hook on first use."""
    global _hook
    if model in _WATCHED:  # every forward of a parameterized model asks (hooks.WatchCopies)
        return
    _WATCHED.add(model)
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check_first_step)


def _check_first_step(optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Global step pre-hook: O(1) after an optimizer's first step; at it, look for parameterized parameters in
    untagged groups."""
    if _guard_mode == "off" or optimizer in _CHECKED:
        return
    watched = {id(p) for model in list(_WATCHED) if is_parameterized(model) for p in model.parameters()}
    untagged = sum(1 for g in optimizer.param_groups if GROUP_TAG not in g for p in g["params"] if id(p) in watched)
    if not untagged:
        _CHECKED.add(optimizer)
        return
    message = (
        f"this {type(optimizer).__name__} holds {untagged} parameter(s) of a parameterized model in groups not built "
        "by sparsemup, so their per-layer learning rates (the parameterization's LR multipliers) are lost; build it "
        "with sparsemup.make_optimizer(model, cls, lr=...) or cls(sparsemup.param_groups(model, cls, lr=...)); with "
        "transformers' Trainer, use sparsemup.hf.Trainer, which builds it from the TrainingArguments. "
        "Silence with sparsemup.set_optimizer_guard('off')"
    )
    if _guard_mode == "error":
        raise RuntimeError(message)  # unchecked still: every step is refused
    _CHECKED.add(optimizer)
    warnings.warn(message, stacklevel=3)
