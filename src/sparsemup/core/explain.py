"""A table of what the parameterization decided for every parameter, for users to check."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypedDict

import torch
from torch import nn

from .optim import optimizer_family
from .record import get_parameterization
from .rules import Family, adam_eps_multiplier, lr_multiplier, weight_decay_multiplier
from .vocab import WeightDecayMode

__all__ = ["ExplainRow", "explain_rows", "explain"]


class _Row(TypedDict):
    name: str  # tied names joined by " = "
    role: str
    shape: tuple[int, ...]
    m_d: float
    m_rho: float
    density: float
    init_std: float | None  # None: the module's own init was kept
    lr_mult: float
    wd_mult: float
    forward: dict[str, float]  # forward multiplier by usage name


class ExplainRow(_Row, total=False):
    """One parameter's line of ``explain``; ``m_L`` and ``eps_mult`` only under a depth rule."""

    m_L: float
    eps_mult: float


def explain_rows(
    model: nn.Module,
    optimizer: type[torch.optim.Optimizer] | Family | str = "adam",
    weight_decay_mode: WeightDecayMode = "independent",
    decay_vectors: bool = False,
) -> list[ExplainRow]:
    """One row per parameter: role, shape, m_d, m_ρ, density, init std, LR/WD/forward multipliers; with a depth
    rule also m_L (1 outside the residual blocks) and Adam's ε multiplier."""
    record = get_parameterization(model)
    family = optimizer_family(optimizer)
    alpha = record.options.depth_alpha
    rows = []
    for info in record.params.values():
        lr_mult = lr_multiplier(info.role, record.scheme, info.multipliers, family, alpha)
        row: ExplainRow = {
            "name": info.name if len(info.names) == 1 else " = ".join(info.names),
            "role": info.role.value,
            "shape": info.shape,
            "m_d": info.multipliers.width,
            "m_rho": info.multipliers.density,
            "density": info.density,
            "init_std": info.init_std,
            "lr_mult": lr_mult,
            "wd_mult": weight_decay_multiplier(info.role, lr_mult, weight_decay_mode, decay_vectors),
            "forward": dict(info.forward_multipliers),
        }
        if alpha is not None:
            row["m_L"] = info.multipliers.depth
            row["eps_mult"] = adam_eps_multiplier(record.scheme, info.multipliers, alpha)
        rows.append(row)
    return rows


def _fmt(value: object) -> str:
    if value is None:
        return "(kept)"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k.rpartition('.')[0] or k}:{v:.4g}" for k, v in value.items()) or "-"
    return str(value)


def explain(
    model: nn.Module,
    optimizer: type[torch.optim.Optimizer] | Family | str = "adam",
    weight_decay_mode: WeightDecayMode = "independent",
    decay_vectors: bool = False,
) -> str:
    """The ``explain_rows`` table as aligned text, with the scheme and attention scales on top.

    Args:
        model: a parameterized model.
        optimizer: the optimizer class (or family name, "adam" or "sgd") whose LR rule the table shows.
        weight_decay_mode, decay_vectors: as for ``param_groups``.

    Example: ``print(sparsemup.explain(model, torch.optim.AdamW))``.
    """
    record = get_parameterization(model)
    rows = explain_rows(model, optimizer, weight_decay_mode, decay_vectors)
    columns = ["name", "role", "shape", "m_d", "m_rho", "density", "init_std", "lr_mult", "wd_mult", "forward"]
    alpha = record.options.depth_alpha
    if alpha is not None:
        columns[4:4] = ["m_L"]
        columns[-1:-1] = ["eps_mult"]
    cells: list[Mapping[str, object]] = list(rows)
    table = [columns] + [[_fmt(r[c]) for c in columns] for r in cells]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [
        f"scheme {record.scheme.name} | optimizer family {optimizer_family(optimizer).value} | "
        f"weight decay {weight_decay_mode} | mask {record.mask_kind}, seed {record.seed}"
    ]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    for name, scale in record.attention_scales.items():
        lines.append(f"attention {name}: logit scale {scale:.6g}")
    for name, factor in record.attention_factors.items():
        lines.append(f"attention {name}: its scaling multiplied by {factor:.6g} (sqrt(base head dim / head dim))")
    if alpha is not None:
        depth, base_depth = record.depth or 0, record.options.base_depth or 1  # both set under a depth rule
        lines.append(f"depth rule alpha {alpha:g}: {depth} residual blocks, base depth {base_depth}, m_L "
                     f"{_fmt(depth / base_depth)} (LRs in blocks x m_L^(alpha-1), Adam eps x m_L^(-alpha)/m_d)")
        for name, factor in record.residual_multipliers.items():
            lines.append(f"residual branch {name}: output x {factor:.6g} (m_L^-alpha)")
    return "\n".join(lines)
