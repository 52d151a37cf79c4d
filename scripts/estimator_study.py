"""Which window the optimum's quadratic should use, on synthetic curves with a known optimum and stores-like noise
(docs/SWEEPS.md, "How optima are estimated"). For each window (0: the parabola through the grid minimum and its
two neighbours, the estimator before 2026-12): the error of the optimum, the coverage of its 95 % interval, how
often a curved curve is called flat, how often a flat one is, how far a 0.01-nat dip beside a flat minimum moves
the optimum against its standard error, and the error and coverage of the transfer regret.

    python scripts/estimator_study.py            # ≈ 1 min on one core
"""

from __future__ import annotations

import argparse

import numpy as np

from sparsemup.tuning.estimate import WINDOW, Noise, estimate, point_estimate, transfer
from sparsemup.tuning.synthetic import noisy, random_curve

GRIDS = {"octave": np.arange(-11.0, -2.5, 1.0),
         "half-octave near the optimum": np.array([-11, -10, -9, -8.5, -8, -7.5, -7, -6.5, -6, -5, -4, -3.0])}


def store_noise(rng: np.random.Generator, grid: np.ndarray, seeds: int, curves: int = 10) -> Noise:
    """The noise a store of ``curves`` such curves would pool (analysis.pooled_noise); the default with one seed."""
    near: list[float] = []
    for _ in range(curves if seeds > 1 else 0):
        ys, diffs = noisy(random_curve(rng, float(rng.uniform(-9, -6))), grid, seeds, rng)
        near += [d for d, y in zip(diffs, ys) if y <= ys.min() + WINDOW]
    return Noise.pooled(near)


def study(window: float, grid: np.ndarray, seeds: int, draws: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    errors, shape, covered, flat_curved, flat_flat, dip_ratio = [], [], [], [], [], []
    regret_errors, regret_covered = [], []
    for _ in range(draws):
        curve = random_curve(rng, float(rng.uniform(-9, -6)))
        ys, _ = noisy(curve, grid, seeds, rng)
        noise = store_noise(rng, grid, seeds)
        found = estimate(grid, ys.tolist(), [seeds] * grid.size, noise, rng, window=window)
        assert found is not None
        o = found.optimum
        if o["edge"]:
            continue
        errors.append(o["log2_x"] - curve.optimum)
        exact = point_estimate(grid, curve(grid).tolist(), window=window)  # no noise: the quadratic's shape error
        assert exact is not None
        shape.append(abs(exact["log2_x"] - curve.optimum))
        covered.append(o["interval"][0] <= curve.optimum <= o["interval"][1])
        flat_curved.append(o["flat"])
        # The regret of keeping this curve's optimum on another curve shifted by up to ±1.5 octaves: against its
        # true cost there, other(x̂) − min(other).
        other = random_curve(rng, curve.centre + float(rng.uniform(-1.5, 1.5)))
        ys, _ = noisy(other, grid, seeds, rng)
        other_found = estimate(grid, ys.tolist(), [seeds] * grid.size, noise, rng, window=window)
        assert other_found is not None
        if not other_found.optimum["edge"]:
            cost = transfer(found, other_found)
            true = float(other(np.array([o["log2_x"]]))[0] - other(np.array([other.optimum]))[0])
            regret_errors.append(cost["regret"] - true)
            if cost["regret_interval"] is not None:
                regret_covered.append(cost["regret_interval"][0] <= true <= cost["regret_interval"][1])
        flat = random_curve(rng, float(rng.uniform(-8, -7)), flat=True)
        ys, _ = noisy(flat, grid, seeds, rng)
        flat_found = estimate(grid, ys.tolist(), [seeds] * grid.size, noise, rng, window=window)
        assert flat_found is not None
        flat_flat.append(flat_found.optimum["flat"] or flat_found.optimum["edge"] is not None)
        # A flat-bottomed curve (curvature 0.02 on both sides), noiseless, then a 0.01-nat dip at the grid point
        # beside its minimum: the shift of the optimum over the standard error.
        centre = float(rng.uniform(-8, -7))
        base = 1.8 + 0.02 * (grid - centre) ** 2
        before = estimate(grid, base.tolist(), [seeds] * grid.size, noise, rng, window=window)
        k = int(np.argmin(base))
        k = k + 1 if grid[k] < centre else k - 1
        dipped = base.copy()
        dipped[k] -= 0.01
        after = estimate(grid, dipped.tolist(), [seeds] * grid.size, noise, rng, window=window)
        assert before is not None and after is not None
        dip_ratio.append(abs(after.optimum["log2_x"] - before.optimum["log2_x"]) / before.optimum["se"])
    err = np.abs(errors)
    return {"interior draws": len(errors), "median |error|": float(np.median(err)),
            "90 % |error|": float(np.quantile(err, 0.9)), "bias": float(np.mean(errors)),
            "max |error| without noise": float(np.max(shape)),
            "coverage": float(np.mean(covered)), "curved called flat": float(np.mean(flat_curved)),
            "flat called flat or edge": float(np.mean(flat_flat)),
            "dip shift / se (max)": float(np.max(dip_ratio)),
            "regret: median |error| (nats)": float(np.median(np.abs(regret_errors))),
            "regret: 90 % |error|": float(np.quantile(np.abs(regret_errors), 0.9)),
            "regret: bias": float(np.mean(regret_errors)), "regret: coverage": float(np.mean(regret_covered))}


def _cell(column: str, value: float) -> str:
    return f"{value:.0f}" if column == "interior draws" else f"{value:.4f}" if "regret" in column else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--windows", default="0,0.05,0.1,0.2,0.3")
    args = parser.parse_args()
    columns = None
    for grid_name, grid in GRIDS.items():
        for seeds in (1, 2):
            for window in map(float, args.windows.split(",")):
                found = study(window, grid, seeds, args.draws, seed=1)
                if columns is None:
                    columns = list(found)
                    print("| grid | seeds | window (nats) | " + " | ".join(columns) + " |")
                    print("|---|---|---|" + "---|" * len(columns))
                print(f"| {grid_name} | {seeds} | {window:g} | "
                      + " | ".join(_cell(c, found[c]) for c in columns)
                      + " |", flush=True)


if __name__ == "__main__":
    main()
