"""Matplotlib figures of a coordinate check (log-log, a line per layer)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from ..core.atomic import write_atomic  # noqa: E402
from .depth import DepthFit  # noqa: E402
from .measurement import GridMeasurement, averaged  # noqa: E402

__all__ = ["plot_coord", "plot_depth"]

_LABELS = {"act": "activations Y", "grad": "activation gradients ∇X", "delta": "update effect ΔY"}


def _min_span(ax: Axes, decades: float = 2.0) -> None:
    """Show at least ``decades`` on the y axis, so a flat line looks flat and a slope stands out."""
    low, high = ax.get_ylim()
    missing = decades - math.log10(high / low)
    if missing > 0:
        pad = 10 ** (missing / 2)
        ax.set_ylim(low / pad, high * pad)


def _panels(steps: int) -> list[tuple[str, int]]:
    return [("act", 0), ("act", steps), ("grad", steps), ("delta", steps)]


def plot_coord(rows: Sequence[GridMeasurement], out_dir: Path, title: str, steps: int) -> list[Path]:
    """Write ``width.png`` (RMS vs width at the highest density) and ``density.png``
    (RMS vs density at the largest width); return their paths."""
    avg = averaged(rows)
    widths = sorted({r["width"] for r in rows})
    densities = sorted({r["density"] for r in rows})
    layers = sorted({(r["layer"], r["role"]) for r in rows}, key=lambda lr: (lr[1] != "hidden", lr[0]))
    paths = []
    for axis, xs, fixed in (("width", widths, densities[-1]), ("density", densities, widths[-1])):
        if len(xs) < 2:
            continue
        fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), constrained_layout=True)
        for ax, (quantity, step) in zip(axes, _panels(steps)):
            for layer, role in layers:
                grid = avg.get((layer, role, quantity, step))
                if not grid:
                    continue
                keys = [(x, fixed) if axis == "width" else (fixed, x) for x in xs]
                pts = [(x, grid[k]) for x, k in zip(xs, keys) if k in grid and grid[k] > 0]
                if len(pts) < 2:
                    continue
                style = "-" if role == "hidden" else "--"
                ax.plot(*zip(*pts), style, marker="o", ms=3, label=f"{layer} ({role})")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            _min_span(ax)
            ax.set_xlabel(axis)
            ax.set_title(f"{_LABELS[quantity]}, step {step}")
            ax.grid(True, which="both", alpha=0.3)
        fixed_text = f"density {fixed:g}" if axis == "width" else f"width {fixed}"
        fig.suptitle(f"{title}: RMS vs {axis} ({fixed_text})")
        handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=7)
        path = Path(out_dir) / f"{axis}.png"
        write_atomic(path, partial(fig.savefig, format="png", dpi=90))
        plt.close(fig)
        paths.append(path)
    return paths


_DEPTH_LABELS = {"act": "last block's output", "delta": "its change since step 0",
                 "block_delta": "depth x mean change of a block's update"}


def plot_depth(fits: Sequence[DepthFit], out_dir: Path, title: str, steps: int) -> Path:
    """Write ``depth.png``: each depth quantity's seed-averaged RMS against depth at the last step, a line per
    (width, density); return its path."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
    for ax, quantity in zip(axes, _DEPTH_LABELS):
        for fit in fits:
            if fit["quantity"] != quantity or fit["step"] != steps:
                continue
            pts = sorted((int(d), v) for d, v in fit["rms"].items() if v > 0)
            slope = fit["depth_slope"]
            ax.plot(*zip(*pts), "-", marker="o", ms=3,
                    label=f"width {fit['width']}, density {fit['density']:g} (slope {slope:+.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _min_span(ax)
        ax.set_xlabel("depth (blocks)")
        ax.set_title(f"{_DEPTH_LABELS[quantity]}, step {steps}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: RMS vs depth")
    path = Path(out_dir) / "depth.png"
    write_atomic(path, partial(fig.savefig, format="png", dpi=90))
    plt.close(fig)
    return path
