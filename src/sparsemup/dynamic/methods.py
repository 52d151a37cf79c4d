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
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch

from ..core.masks import nonzeros_per_row, stable_seed

__all__ = ["gmp_density", "update_fraction", "prune_to_density", "drop_and_grow", "random_scores", "GMP", "RigL",
           "SET", "Method", "MethodName", "METHOD_NAMES", "Regrowth"]

MethodName = Literal["static", "gmp", "set", "rigl"]
METHOD_NAMES: tuple[MethodName, ...] = get_args(MethodName)
Regrowth = Literal["none", "random", "gradient"]  # what a method regrows by: nothing, (seed, step), |dense grad|


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


def _layer_top(scores: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` allowed entries of the whole matrix, highest ``scores`` first, each row with an allowed entry
    keeping at least its best one (a neuron never loses all its inputs)."""
    best = _top(scores, allowed, torch.ones(scores.shape[0], dtype=torch.long))
    rest = max(0, count - int(best.sum()))
    return best | _flat_top(scores, allowed & ~best, rest)


def prune_to_density(mask: torch.Tensor, magnitude: torch.Tensor, density: float,
                     constant_fan_in: bool = True) -> torch.Tensor:
    """``mask`` with its smallest-magnitude kept entries dropped until ``density`` remains: exactly
    round(ρ·fan_in) per row, or rows·round(ρ·fan_in) in the layer (every row keeping its largest). Never grows."""
    rows, fan_in = mask.shape
    keep = max(1, nonzeros_per_row(density, fan_in))
    current = mask.sum(dim=1)
    if constant_fan_in:
        return _top(magnitude.abs(), mask, torch.minimum(current, torch.tensor(keep)))
    return _layer_top(magnitude.abs(), mask, min(int(current.sum()), keep * rows))


def drop_and_grow(mask: torch.Tensor, magnitude: torch.Tensor, grow_scores: torch.Tensor, fraction: float,
                  constant_fan_in: bool = True) -> torch.Tensor:
    """Drop ``fraction`` of the kept entries with the smallest magnitude and regrow as many among the entries
    that are then off, highest ``grow_scores`` first (RigL: |dense gradient|; SET: ``random_scores``).

    The kept count is unchanged: per row with ``constant_fan_in``, per layer otherwise (where every row
    keeps its largest entry through the drop). An entry dropped and regrown at once stays (RigL's default).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the update fraction must be in [0, 1], got {fraction}")
    kept_per_row = mask.sum(dim=1)
    if constant_fan_in:
        n = torch.floor(fraction * kept_per_row.double() + 0.5).long()
        survivors = _top(magnitude.abs(), mask, kept_per_row - n)
        return survivors | _top(grow_scores, ~survivors, n)
    total = int(kept_per_row.sum())
    survivors = _layer_top(magnitude.abs(), mask, total - int(math.floor(fraction * total + 0.5)))
    return survivors | _flat_top(grow_scores, ~survivors, total - int(survivors.sum()))


def random_scores(shape: tuple[int, ...], seed: int, name: str, step: int) -> torch.Tensor:
    """Uniform scores drawn from (seed, name, step): SET's random regrowth, the same in every process."""
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, f"regrow\x00{name}\x00{step}"))
    return torch.rand(shape, generator=gen)


def _check_cadence(update_every: int, stop_step: int, first_allowed: int) -> None:
    if update_every < 1:
        raise ValueError(f"update_every must be at least 1, got {update_every}")
    if stop_step < first_allowed:
        raise ValueError(f"no mask update would happen: the first is at step {update_every} (update_every) but updates "
                         f"stop at step {stop_step}; lower update_every or raise the stop step")


@dataclass(frozen=True)
class GMP:
    """Gradual magnitude pruning (Zhu & Gupta 2017): at every ``update_every``-th step up to ``stop_step``,
    prune the smallest magnitudes down to the cubic schedule's density, ``start_density`` at step 0 to
    ``final_density`` at the last update. Pruned entries never return."""

    final_density: float
    stop_step: int
    start_density: float = 1.0
    update_every: int = 10
    constant_fan_in: bool = True
    regrowth: ClassVar[Regrowth] = "none"

    def __post_init__(self) -> None:
        if not 0.0 < self.final_density < self.start_density <= 1.0:
            raise ValueError(f"GMP needs 0 < final density ({self.final_density}) < start density "
                             f"({self.start_density}) <= 1")
        _check_cadence(self.update_every, self.stop_step, self.update_every)

    @property
    def end_step(self) -> int:
        """The last update step, where the final density is reached."""
        return self.stop_step // self.update_every * self.update_every

    def is_update(self, step: int) -> bool:
        """Whether the mask changes after optimizer step ``step`` (steps count from 1)."""
        return 0 < step <= self.end_step and step % self.update_every == 0

    def density(self, step: int) -> float:
        """The target density once the updates up to ``step`` have run."""
        last = min(step // self.update_every * self.update_every, self.end_step)
        if last <= 0:
            return self.start_density
        return gmp_density(last, 0, self.end_step, self.start_density, self.final_density)

    def nonzeros(self, row_counts: torch.Tensor, fan_in: int, step: int) -> int:
        """A layer's mask nonzeros after the updates up to ``step``, from its rows' counts at step 0."""
        total = int(row_counts.sum())
        if step < self.update_every:
            return total
        keep = max(1, nonzeros_per_row(self.density(step), fan_in))
        if self.constant_fan_in:
            return int(row_counts.clamp(max=keep).sum())
        return min(total, keep * len(row_counts))

    def new_mask(self, mask: torch.Tensor, weight: torch.Tensor, grow_scores: torch.Tensor | None,
                 step: int) -> torch.Tensor:
        """The (neurons, fan-in) mask after the update at ``step``."""
        return prune_to_density(mask, weight, self.density(step), self.constant_fan_in)


@dataclass(frozen=True)
class RigL:
    """RigL (Evci et al. 2020): at every ``update_every``-th step before ``stop_step``, drop the smallest
    magnitudes, a fraction ``fraction``·(1 + cos(π·t/stop_step))/2 of the kept weights, and regrow as
    many where the dense gradient is largest. The density stays the initial one."""

    stop_step: int
    update_every: int = 10
    fraction: float = 0.3
    constant_fan_in: bool = True
    regrowth: ClassVar[Regrowth] = "gradient"
    decay: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"the update fraction must be in (0, 1], got {self.fraction}")
        _check_cadence(self.update_every, self.stop_step, self.update_every + 1)

    def is_update(self, step: int) -> bool:
        """Whether the mask changes after optimizer step ``step`` (steps count from 1)."""
        return 0 < step < self.stop_step and step % self.update_every == 0

    def nonzeros(self, row_counts: torch.Tensor, fan_in: int, step: int) -> int:
        """A layer's mask nonzeros, from its rows' counts at step 0: constant."""
        return int(row_counts.sum())

    def new_mask(self, mask: torch.Tensor, weight: torch.Tensor, grow_scores: torch.Tensor | None,
                 step: int) -> torch.Tensor:
        """The (neurons, fan-in) mask after the update at ``step``."""
        if grow_scores is None:
            raise ValueError(f"{type(self).__name__} regrows by {self.regrowth} scores; pass them")
        fraction = update_fraction(step, self.stop_step, self.fraction, decay=self.decay)
        return drop_and_grow(mask, weight, grow_scores, fraction, self.constant_fan_in)


@dataclass(frozen=True)
class SET(RigL):
    """SET (Mocanu et al. 2018): as RigL, but the regrown entries are drawn at random and the update
    fraction stays ``fraction`` until ``stop_step``."""

    regrowth: ClassVar[Regrowth] = "random"
    decay: ClassVar[bool] = False


Method = GMP | RigL
