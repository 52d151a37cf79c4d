"""The one estimator of a loss curve's optimum, its uncertainty and the transfer regret (docs/SWEEPS.md, "How optima
are estimated").

A curve is the seed-averaged final loss at increasing log2 x (x: η_base or σ_base); a None or non-finite loss is a
diverged point. The optimum is the vertex of a least-squares quadratic over the contiguous points within
``WINDOW`` nats of the curve's minimum (at least the minimum and its two neighbours): several points share the say,
so one noisy point moves it by a fraction of what it moves a parabola through three points. A minimum on the grid's
edge, or next to a diverged point, is reported as an edge, not fitted.

Uncertainty comes from a parametric bootstrap: every finite point gets fresh noise of the per-run kind measured in
the stores (Student-t with 2 degrees of freedom, heavy-tailed like the differences between seeds, averaged over the
point's seeds), the whole estimate is redone, and the central ``LEVEL`` of the redone optima, widened on each side
by ``RESOLUTION`` (what a quadratic misses of an asymmetric curve), is the interval. A curve whose interval is wider
than ``FLAT_WIDTH`` (or whose fit has no curvature) is *flat*: within noise, it has no optimum.

The transfer regret is a sparse (or wider) curve's loss at the reference curve's estimated optimum minus its own
best: what keeping the tuned value costs. It and the signed shift of the optimum get their intervals from the same
resamples (the shift's from both curves').
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypedDict

import numpy as np
from numpy.typing import NDArray

__all__ = ["DEFAULT_PAIR_MEDIAN", "FLAT_WIDTH", "LEVEL", "NU", "RESOLUTION", "WINDOW", "CurveEstimate", "Noise",
           "NoiseRecord", "PointEstimate", "Optimum", "TransferCost", "estimate", "point_estimate", "transfer"]

Edge = Literal["low", "high"]  # an optimum on the grid's low or high edge (None: inside)


class NoiseRecord(TypedDict):
    """The per-run noise as a report records it (``Noise.as_dict``)."""

    pair_median: float
    pairs: int
    nu: float
    source: str


class PointEstimate(TypedDict):
    """An optimum without its uncertainty (``point_estimate``)."""

    log2_x: float
    loss: float
    edge: Edge | None


class Optimum(TypedDict):
    """A curve's optimum with its uncertainty (``CurveEstimate.optimum``); no interval on the grid's edge."""

    log2_x: float
    loss: float
    edge: Edge | None
    flat: bool
    interval: list[float] | None
    se: float | None
    fit_span: list[float] | None


class TransferCost(TypedDict):
    """What keeping a reference's optimum costs on another curve (``transfer``)."""

    loss_at_reference: float | None
    regret: float | None
    shift: float
    shift_interval: list[float]
    shift_se: float
    regret_interval: list[float] | None
    regret_se: float | None


_EDGES: dict[int, Edge | None] = {-1: "low", 0: None, 1: "high"}

WINDOW = 0.1  # nats above the minimum within which points join the fit (docs/SWEEPS.md: chosen on synthetic curves)
NU = 2.0  # Student-t degrees of freedom of one run's noise: the tails of the stores' seed differences
# Median |T − T'| for T, T' independent standard t with NU = 2 (2·10⁶ draws; tests/test_estimate.py checks it).
_PAIR_MEDIAN_PER_SCALE = 1.369
# Median |loss(seed 0) − loss(seed 1)| of one run, used when a store has too few seed pairs: (a)'s two seeds within
# 0.1 nats of each curve's minimum (51 pairs: 0.0092); (d)'s two seeds give 0.0080 (46 pairs).
DEFAULT_PAIR_MEDIAN = 0.009
MIN_PAIRS = 8  # fewer seed pairs than this: the default noise
LEVEL = 0.95  # the interval's coverage
# log2 units added to each side of an optimum's interval: what a quadratic misses of an asymmetric curve (on the
# synthetic curves of scripts/estimator_study.py: docs/SWEEPS.md, "How optima are estimated").
RESOLUTION = 0.15
FLAT_WIDTH = 2.0  # log2 units: an optimum located no better than this is no optimum
RESAMPLES = 400
SEED = 20261205  # the bootstrap's generator: reports are reproducible to the digit


@dataclass(frozen=True)
class Noise:
    """One run's loss noise: Student-t (``NU``) of this median seed-to-seed difference; ``pairs`` it was pooled from
    (0: the default)."""

    pair_median: float
    pairs: int

    @classmethod
    def pooled(cls, differences: Sequence[float], min_pairs: int = MIN_PAIRS) -> Noise:
        """From |loss differences| between seeds of the same run; the default below ``min_pairs`` of them."""
        if len(differences) < min_pairs:
            return cls(DEFAULT_PAIR_MEDIAN, 0)
        return cls(float(np.median(np.abs(differences))), len(differences))

    @property
    def scale(self) -> float:
        """The t distribution's scale for one run."""
        return self.pair_median / _PAIR_MEDIAN_PER_SCALE

    def draw(self, rng: np.random.Generator, resamples: int, seeds: NDArray[np.int_]) -> NDArray[np.float64]:
        """Noise of seed-averaged points: (resamples, len(seeds)), each the mean of its point's seeds' draws."""
        most = int(seeds.max()) if seeds.size else 1
        draws = rng.standard_t(NU, size=(resamples, seeds.size, most)) * self.scale
        used = np.arange(most)[None, None, :] < seeds[None, :, None]
        return np.asarray((draws * used).sum(axis=2) / np.maximum(seeds, 1)[None, :], dtype=np.float64)

    def as_dict(self) -> NoiseRecord:
        return {"pair_median": self.pair_median, "pairs": self.pairs, "nu": NU,
                "source": f"{self.pairs} seed pairs" if self.pairs else "default"}


@dataclass(frozen=True)
class _Fits:
    """Estimates of many versions of one curve (rows): optimum, its loss, edge (-1 low, 0, 1 high), curvature and the
    fitted quadratic (coefficients about ``centre``, valid on [lo, hi])."""

    x: NDArray[np.float64]
    loss: NDArray[np.float64]
    edge: NDArray[np.int_]
    curvature: NDArray[np.float64]
    coef: NDArray[np.float64]
    centre: NDArray[np.float64]
    lo: NDArray[np.float64]
    hi: NDArray[np.float64]


def _fit_rows(xs: NDArray[np.float64], ys: NDArray[np.float64], window: float) -> _Fits:
    """The windowed quadratic of every row of ``ys`` (rows with no finite point must be dropped before)."""
    rows, n = ys.shape
    finite = np.isfinite(ys)
    masked = np.where(finite, ys, np.inf)
    best = masked.argmin(axis=1)
    at = np.arange(rows)
    ymin = masked[at, best]
    left_ok = (best > 0) & finite[at, np.maximum(best - 1, 0)]
    right_ok = (best < n - 1) & finite[at, np.minimum(best + 1, n - 1)]
    edge = np.where(~left_ok, -1, np.where(~right_ok, 1, 0))
    # The contiguous run of finite points within the window around the minimum, and always its two neighbours
    # (which bracket the optimum of a curve with one minimum).
    index = np.arange(n)[None, :]
    inside = finite & (masked <= ymin[:, None] + window)
    first = np.minimum(np.where(~inside & (index < best[:, None]), index, -1).max(axis=1) + 1, best - 1)
    last = np.maximum(np.where(~inside & (index > best[:, None]), index, n).min(axis=1) - 1, best + 1)
    use = (index >= first[:, None]) & (index <= last[:, None]) & (edge == 0)[:, None]
    centre = xs[best]
    u = xs[None, :] - centre[:, None]
    basis = np.stack([np.ones_like(u), u, u * u], axis=2)  # rows × n × 3
    weights = use.astype(np.float64)
    normal = np.einsum("rn,rni,rnj->rij", weights, basis, basis)
    rhs = np.einsum("rn,rni,rn->ri", weights, basis, np.where(use, masked, 0.0))
    fitted = edge == 0
    normal[~fitted] = np.eye(3)
    rhs[~fitted] = 0.0
    coef = np.linalg.solve(normal, rhs[:, :, None])[:, :, 0]
    a, b = coef[:, 2], coef[:, 1]
    lo = xs[np.clip(first, 0, n - 1)]
    hi = xs[np.clip(last, 0, n - 1)]
    curved = fitted & (a > 0)
    vertex = np.where(curved, -b / np.where(curved, 2 * a, 1.0), 0.0) + centre
    vertex = np.where(curved, np.clip(vertex, lo, hi), centre)  # no curvature, or an edge: the grid minimum
    du = vertex - centre
    loss = np.where(curved, coef[:, 0] + b * du + a * du * du, ymin)
    return _Fits(vertex, loss, edge, np.where(fitted, a, np.nan), coef, centre, lo, hi)


def _loss_at(fits: _Fits, xs: NDArray[np.float64], ys: NDArray[np.float64], x: NDArray[np.float64],
             smooth: bool) -> NDArray[np.float64]:
    """Each row's loss at its own x: with ``smooth``, the fitted quadratic inside the fit's span (when it curves up),
    else linear between grid points (NaN beside a diverged point or off the grid)."""
    n = xs.size
    k = np.clip(np.searchsorted(xs, x, side="right") - 1, 0, max(n - 2, 0))
    at = np.arange(ys.shape[0])
    xa, xb = xs[k], xs[np.minimum(k + 1, n - 1)]
    ya, yb = ys[at, k], ys[at, np.minimum(k + 1, n - 1)]
    t = np.where(xb > xa, (x - xa) / np.where(xb > xa, xb - xa, 1.0), 0.0)
    linear = np.where((x >= xs[0]) & (x <= xs[-1]), ya + (yb - ya) * t, np.nan)
    linear = np.where(np.isclose(x, xa), ya, np.where(np.isclose(x, xb), yb, linear))
    du = x - fits.centre
    quadratic = fits.coef[:, 0] + fits.coef[:, 1] * du + fits.coef[:, 2] * du * du
    inside = smooth & (fits.edge == 0) & (fits.curvature > 0) & (x >= fits.lo) & (x <= fits.hi)
    return np.where(inside, quadratic, linear)


def point_estimate(xs: Sequence[float], losses: Sequence[float | None],
                   window: float = WINDOW) -> PointEstimate | None:
    """The optimum of one curve without its uncertainty: ``{"log2_x", "loss", "edge"}``; None if all diverged."""
    ys = np.array([math.nan if y is None else y for y in losses], dtype=np.float64)
    if not np.isfinite(ys).any():
        return None
    fits = _fit_rows(np.asarray(xs, dtype=np.float64), ys[None, :], window)
    return {"log2_x": float(fits.x[0]), "loss": float(fits.loss[0]),
            "edge": _EDGES[int(fits.edge[0])]}


@dataclass(frozen=True)
class CurveEstimate:
    """One curve's optimum with its interval, and the resampled curves behind it (for the transfer regret)."""

    xs: NDArray[np.float64]
    ys: NDArray[np.float64]  # row 0: the curve; rows 1…: resamples
    fits: _Fits

    @property
    def optimum(self) -> Optimum:
        """``{"log2_x", "loss", "edge", "flat", "interval", "se", "fit_span"}`` (JSON-serialisable)."""
        f = self.fits
        edge = _EDGES[int(f.edge[0])]
        lo, hi = _interval(f.x[1:])
        lo, hi = lo - RESOLUTION, hi + RESOLUTION
        se = _se(f.x[1:])
        flat = edge is None and (not f.curvature[0] > 0 or hi - lo > FLAT_WIDTH)
        return {"log2_x": float(f.x[0]), "loss": float(f.loss[0]), "edge": edge, "flat": bool(flat),
                "interval": None if edge else [lo, hi], "se": None if edge else se,
                "fit_span": None if edge else [float(f.lo[0]), float(f.hi[0])]}


def _interval(values: NDArray[np.float64]) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2
    lo, hi = np.nanquantile(values, [tail, 1 - tail])
    return float(lo), float(hi)


def _se(values: NDArray[np.float64]) -> float:
    """Half the central 68 % of the resamples: a standard error that a heavy tail does not inflate."""
    lo, hi = np.nanquantile(values, [0.15865, 0.84135])
    return float(hi - lo) / 2


def estimate(xs: Sequence[float], losses: Sequence[float | None], seeds: Sequence[int], noise: Noise,
             rng: np.random.Generator, resamples: int = RESAMPLES, window: float = WINDOW) -> CurveEstimate | None:
    """One curve's optimum and ``resamples`` bootstrap versions of it; None if every point diverged.

    ``seeds`` is the number of seeds averaged at each point (its noise shrinks with it)."""
    ys = np.array([math.nan if y is None else y for y in losses], dtype=np.float64)
    if not np.isfinite(ys).any():
        return None
    grid = np.asarray(xs, dtype=np.float64)
    noisy = ys[None, :] + noise.draw(rng, resamples, np.asarray(seeds, dtype=np.int_))
    rows = np.vstack([ys[None, :], noisy])
    return CurveEstimate(grid, rows, _fit_rows(grid, rows, window))


def transfer(reference: CurveEstimate, other: CurveEstimate) -> TransferCost:
    """What keeping the reference curve's optimum costs on ``other``: the regret (``other``'s loss at the reference's
    estimated optimum, from its quadratic unless the curve is flat, minus its own best; its interval from ``other``'s
    resamples) and the signed shift of the optimum (its interval from both curves' resamples)."""
    at = np.full(other.ys.shape[0], reference.fits.x[0])
    at_reference = _loss_at(other.fits, other.xs, other.ys, at, smooth=not other.optimum["flat"])
    regret = at_reference - other.fits.loss
    shift = other.fits.x - reference.fits.x
    lo, hi = _interval(shift[1:])
    allowance = RESOLUTION * math.sqrt(2)  # both optima's
    usable = np.isfinite(regret[1:])
    bounded = not (_finite(regret[0]) is None or usable.mean() < LEVEL)
    return {"loss_at_reference": _finite(at_reference[0]), "regret": _finite(regret[0]), "shift": float(shift[0]),
            "shift_interval": [lo - allowance, hi + allowance], "shift_se": _se(shift[1:]),
            "regret_interval": list(_interval(regret[1:][usable])) if bounded else None,
            "regret_se": _se(regret[1:][usable]) if bounded else None}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
