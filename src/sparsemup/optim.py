"""Optimizer parameter groups carrying the scheme's learning-rate and weight-decay multipliers.

As in microsoft/mup, the parameterization reaches the optimizer only through
``torch.optim`` parameter groups, so any optimizer of a known family, any LR
scheduler that scales groups proportionally, and sharded optimizers work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .parameterize import Parameterization, get_parameterization
from .rules import WEIGHT_DECAY_MODES, Family, lr_multiplier, weight_decay_multiplier
from .structure import strip_wrappers, unwrap

__all__ = ["optimizer_family", "param_groups", "make_optimizer", "FAMILY_OF", "L2_DECAY"]

# Entry-wise normalised optimizers follow µP's Adam rule; raw-gradient ones its SGD rule.
FAMILY_OF: dict[type[torch.optim.Optimizer], Family] = {
    torch.optim.Adam: Family.ADAM,
    torch.optim.AdamW: Family.ADAM,
    torch.optim.Adamax: Family.ADAM,
    torch.optim.NAdam: Family.ADAM,
    torch.optim.RAdam: Family.ADAM,
    torch.optim.RMSprop: Family.ADAM,
    torch.optim.Adagrad: Family.ADAM,
    torch.optim.SGD: Family.SGD,
}


# Adam-family optimizers whose weight decay is always an L2 term added to the gradient.
# (NAdam and RAdam decouple it only with decoupled_weight_decay=True, which groups cannot see.)
L2_DECAY = (torch.optim.Adam, torch.optim.Adamax, torch.optim.RMSprop, torch.optim.Adagrad)


def optimizer_family(optimizer: str | Family | type[torch.optim.Optimizer]) -> Family:
    """The rule family of an optimizer class or family name; unknown ones are an error, never a guess."""
    if isinstance(optimizer, Family):
        return optimizer
    if isinstance(optimizer, str):
        try:
            return Family(optimizer.lower())
        except ValueError:
            pass
    elif isinstance(optimizer, type):
        for cls in optimizer.__mro__:
            if cls in FAMILY_OF:
                return FAMILY_OF[cls]
    known = ", ".join(sorted(c.__name__ for c in FAMILY_OF))
    raise ValueError(
        f"no parameterization rule is known for optimizer {optimizer!r}; use one of {known}, or name the "
        "family explicitly (optimizer='adam' for entry-wise normalised updates, 'sgd' for raw-gradient ones)"
    )


def param_groups(
    model: nn.Module,
    optimizer: str | Family | type[torch.optim.Optimizer],
    lr: float,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "independent",
    decay_vectors: bool = False,
) -> list[dict[str, Any]]:
    """``torch.optim`` parameter groups with each parameter's LR and weight decay.

    ``lr`` and ``weight_decay`` are the base values (η_base, wd_base). Groups hold
    ``lr`` = η_base·lr_mult and ``weight_decay`` = wd_base·wd_mult, plus the
    multipliers under ``lr_mult`` / ``wd_mult`` for inspection. ``independent``
    weight decay (default) keeps lr·wd per layer equal to the base model's, so a
    decay tuned on the base transfers; ``coupled`` is PyTorch's lr·wd as is, as in
    the official SµPar code. Frozen parameters (requires_grad=False) are left out.
    """
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(
            f"unknown weight_decay_mode {weight_decay_mode!r}; choose one of {', '.join(WEIGHT_DECAY_MODES)}"
        )
    if lr <= 0 or weight_decay < 0:
        raise ValueError(f"lr must be positive and weight_decay non-negative, got lr={lr}, weight_decay={weight_decay}")
    family = optimizer_family(optimizer)
    if weight_decay and weight_decay_mode == "independent" and optimizer in L2_DECAY:
        raise ValueError(
            f"{optimizer.__name__} applies weight decay as an L2 term that passes through its normaliser, so "
            "lr·wd is not its decay and the 'independent' rule does not apply; use a decoupled optimizer "
            "(torch.optim.AdamW) or weight_decay_mode='coupled'"
        )
    record: Parameterization = get_parameterization(model)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        info = record.info(strip_wrappers(name))
        lr_mult = lr_multiplier(info.role, record.scheme, info.multipliers, family)
        wd_mult = weight_decay_multiplier(info.role, lr_mult, weight_decay_mode, decay_vectors)
        group = groups.setdefault(
            (lr_mult, wd_mult),
            {"params": [], "lr": lr * lr_mult, "weight_decay": weight_decay * wd_mult,
             "lr_mult": lr_mult, "wd_mult": wd_mult, "param_names": []},
        )
        group["params"].append(param)
        group["param_names"].append(info.name)
    return list(groups.values())


def make_optimizer(
    model: nn.Module,
    optimizer_class: type[torch.optim.Optimizer],
    lr: float,
    weight_decay: float = 0.0,
    weight_decay_mode: str = "independent",
    decay_vectors: bool = False,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """``optimizer_class(param_groups(model, ...), **kwargs)``: the groups are the contract."""
    groups = param_groups(model, optimizer_class, lr, weight_decay, weight_decay_mode, decay_vectors)
    return optimizer_class(groups, lr=lr, **kwargs)
