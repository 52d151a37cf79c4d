"""Loss-vs-log2-LR curves with a known optimum and noise like the stores', for checking the estimator
(tests/test_estimate.py, scripts/estimator_study.py).

Shapes follow the committed stores' curves: steeper and quadratic-turning-linear on the low-LR side, flatter on the
high side, then a cliff of 0.3-0.8 nats 1.5-3.5 octaves above the optimum. Noise is Student-t (ν = 2) with the
stores' median seed-to-seed difference (0.009 nats) near the optimum, growing to 5× at the cliff, where the stores'
seeds differ most.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from .estimate import DEFAULT_PAIR_MEDIAN, NU, Noise

__all__ = ["Curve", "random_curve", "noisy"]


@dataclass(frozen=True)
class Curve:
    """A noiseless curve: ``centre`` plus the shape parameters; ``optimum`` is its exact argmin (numerically)."""

    centre: float
    low_curvature: float  # nats per octave² below the optimum (turning linear past ``bend`` octaves)
    high_curvature: float  # above it
    bend: float
    cliff_at: float  # octaves above the centre
    cliff_height: float
    floor: float = 1.8

    def __call__(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        u = np.asarray(x, dtype=np.float64) - self.centre
        low = self.low_curvature * u * u / (1 + np.abs(u) / self.bend)
        high = self.high_curvature * u * u
        cliff = self.cliff_height / (1 + np.exp(-(u - self.cliff_at) / 0.15))
        return np.asarray(self.floor + np.where(u < 0, low, high) + cliff, dtype=np.float64)

    @property
    def optimum(self) -> float:
        fine = np.linspace(self.centre - 1, self.centre + 1, 20001)
        return float(fine[np.argmin(self(fine))])

    def noise_scale(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """Factor on the per-run noise: 1 near the optimum, 5 past the cliff."""
        u = np.asarray(x, dtype=np.float64) - self.centre
        return np.asarray(1 + 4 / (1 + np.exp(-(u - self.cliff_at + 0.5) / 0.3)), dtype=np.float64)


def random_curve(rng: np.random.Generator, centre: float, flat: bool = False) -> Curve:
    """A stores-like curve about ``centre``; ``flat``: curvatures of 0.002-0.004, a curve within noise over ±2
    octaves (like (a′)'s SµPar at ρ = 1/16)."""
    low, high = (rng.uniform(0.002, 0.004, 2) if flat else (rng.uniform(0.03, 0.1), rng.uniform(0.01, 0.06)))
    return Curve(centre, float(low), float(high), float(rng.uniform(1.5, 4)), float(rng.uniform(1.5, 3.5)),
                 float(rng.uniform(0.3, 0.8)))


def noisy(curve: Curve, xs: NDArray[np.float64], seeds: int, rng: np.random.Generator,
          pair_median: float = DEFAULT_PAIR_MEDIAN) -> tuple[NDArray[np.float64], list[float]]:
    """The seed-averaged curve at ``xs`` with stores-like noise, and the |differences| of its seed pairs."""
    scale = Noise(pair_median, 0).scale * curve.noise_scale(xs)
    runs = curve(xs)[None, :] + rng.standard_t(NU, size=(seeds, xs.size)) * scale[None, :]
    differences = [float(d) for d in np.abs(runs[0] - runs[1])] if seeds > 1 else []
    return runs.mean(axis=0), differences
