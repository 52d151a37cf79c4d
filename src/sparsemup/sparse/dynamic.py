"""Dynamic sparsity: the mask-update rules of GMP, SET and RigL as pure functions of tensors.

Every function works on a weight's (output neurons, fan-in) view (``sparsemup.core.layout``) and
returns a new boolean mask without touching the weight; applying a mask to a model (zeroing,
optimizer-state resets, checkpoints) is separate. Decisions read only the weights, gradients and
(seed, name, step), so every process of a job takes the same one. ``constant_fan_in`` keeps every
neuron's number of inputs fixed (drop and regrow within each row, as SRigL does), which SµPar's
corrections assume; without it, counts are per layer.

- GMP (Zhu & Gupta 2017): prune by magnitude along a cubic density schedule, ``gmp_density``.
- SET (Mocanu et al. 2018): drop the smallest magnitudes, regrow at random.
- RigL (Evci et al. 2020): drop the smallest magnitudes, regrow where the dense gradient is largest,
  with a cosine-decaying update fraction, ``update_fraction``.
"""

from __future__ import annotations

import math

import torch

from ..core.masks import nonzeros_per_row, stable_seed

__all__ = ["gmp_density", "update_fraction", "prune_to_density", "drop_and_grow", "random_scores"]


def gmp_density(step: int, start_step: int, end_step: int, start_density: float, final_density: float) -> float:
    """Zhu & Gupta's cubic schedule: ρ_t = ρ_f + (ρ_0 − ρ_f)·(1 − p)³, p the progress from ``start_step``
    to ``end_step`` (ρ_0 before, ρ_f after)."""
    if not 0.0 < final_density <= start_density <= 1.0:
        raise ValueError(f"GMP needs 0 < final density ({final_density}) <= start density ({start_density}) <= 1")
    if end_step <= start_step:
        raise ValueError(f"GMP's end step {end_step} must come after its start step {start_step}")
    progress = min(max((step - start_step) / (end_step - start_step), 0.0), 1.0)
    return final_density + (start_density - final_density) * (1.0 - progress) ** 3


def update_fraction(step: int, stop_step: int, initial: float, decay: bool = True) -> float:
    """The fraction of kept weights to drop and regrow at ``step``: RigL's α/2·(1 + cos(π·t/T_end)) when
    ``decay`` (SET: the constant α), and 0 from ``stop_step`` on."""
    if not 0.0 < initial <= 1.0:
        raise ValueError(f"the update fraction must be in (0, 1], got {initial}")
    if step >= stop_step:
        return 0.0
    return initial / 2 * (1 + math.cos(math.pi * step / stop_step)) if decay else initial


def _top(scores: torch.Tensor, allowed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per row, the ``counts[row]`` allowed entries with the highest scores (ties: lowest index first)."""
    masked = torch.where(allowed, scores.float(), torch.tensor(-math.inf))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order))
    return allowed & (rank < counts.unsqueeze(1))


def _flat_top(scores: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` allowed entries of the whole matrix with the highest scores (ties: lowest index first)."""
    return _top(scores.reshape(1, -1), allowed.reshape(1, -1), torch.tensor([count])).reshape(scores.shape)


def prune_to_density(mask: torch.Tensor, magnitude: torch.Tensor, density: float,
                     constant_fan_in: bool = True) -> torch.Tensor:
    """``mask`` with its smallest-magnitude kept entries dropped until ``density`` remains: round(ρ·fan_in)
    per row, or that many per row on average across the layer. Never grows; a row keeps at least one entry."""
    rows, fan_in = mask.shape
    keep = max(1, nonzeros_per_row(density, fan_in))
    current = mask.sum(dim=1)
    if constant_fan_in:
        return _top(magnitude.abs(), mask, torch.minimum(current, torch.tensor(keep)))
    total = min(int(current.sum()), keep * rows)
    kept = _flat_top(magnitude.abs(), mask, total)
    empty = kept.sum(dim=1) == 0  # a row left without inputs keeps its largest weight
    if bool(empty.any()):
        kept[empty] = _top(magnitude.abs()[empty], mask[empty], torch.ones(int(empty.sum()), dtype=torch.long))
    return kept


def drop_and_grow(mask: torch.Tensor, magnitude: torch.Tensor, grow_scores: torch.Tensor, fraction: float,
                  constant_fan_in: bool = True) -> torch.Tensor:
    """Drop ``fraction`` of the kept entries with the smallest magnitude and regrow as many among the entries
    that are then off, highest ``grow_scores`` first (RigL: |dense gradient|; SET: ``random_scores``).

    The kept count is unchanged: per row with ``constant_fan_in``, per layer otherwise. Entries just
    dropped may be regrown (as in RigL), at zero if the caller starts regrown weights at zero.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the update fraction must be in [0, 1], got {fraction}")
    kept_per_row = mask.sum(dim=1)
    if constant_fan_in:
        n = torch.floor(fraction * kept_per_row.double() + 0.5).long()
        survivors = _top(magnitude.abs(), mask, kept_per_row - n)
        return survivors | _top(grow_scores, ~survivors, n)
    total = int(kept_per_row.sum())
    n_total = int(math.floor(fraction * total + 0.5))
    survivors = _flat_top(magnitude.abs(), mask, total - n_total)
    return survivors | _flat_top(grow_scores, ~survivors, n_total)


def random_scores(shape: tuple[int, ...], seed: int, name: str, step: int) -> torch.Tensor:
    """Uniform scores drawn from (seed, name, step): SET's random regrowth, the same in every process."""
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, f"regrow\x00{name}\x00{step}"))
    return torch.rand(shape, generator=gen)
