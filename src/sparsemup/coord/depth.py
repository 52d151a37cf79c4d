"""Coordinate check across depth: the residual stream and each block's update, Θ(1) in the number of blocks.

Per-layer slopes cannot span depths (a 16-block model has layers a 2-block one lacks), so the depth check
measures what every depth has, on the residual blocks (``sparsemup.core.residual.residual_blocks``):

- ``act``: RMS of the last block's output (the residual stream the readout reads), at every step;
- ``delta``: RMS of its change since step 0 (what training did to the stream);
- ``block_delta``: L times the mean over blocks of the RMS of the change of each block's update
  u_k = x_out − x_in. A depth rule that lets every block learn moves each u_k by Θ(1/L), so this is Θ(1);
  without one each block's change is Θ(1) and their sum grows with L.

Log-log slopes against depth, per (width, density, quantity, step), decide the verdict under the same
threshold and instability rule as width and density (docs/COORD_CHECK.md).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import make_optimizer
from ..core.residual import residual_blocks
from ..core.structure import named_modules
from ..models import GPTConfig, build_gpt
from .cases import GPT_DEFAULTS, markov_tokens
from .measurement import THRESHOLD, UNSTABLE, unstable_cases

__all__ = ["DEPTH_QUANTITIES", "DepthCase", "depth_cases", "measure_depth", "fit_depth_slopes", "depth_verdict",
           "evaluate_depth"]

DEPTH_QUANTITIES = ("act", "delta", "block_delta")


@dataclass(frozen=True)
class DepthCase:
    """One model of the depth grid: its place, how to build it, its batch and loss."""

    width: int
    density: float
    depth: int
    seed: int
    build: Callable[[], nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    base: bool = False  # the base model (base width, dense, base depth): trained only to judge stability


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def depth_cases(scheme: str, widths: Sequence[int], densities: Sequence[float], depths: Sequence[int], seeds: int,
                base_width: int, depth_alpha: float | None, base_depth: int,
                batch_size: int | None = None) -> Iterator[DepthCase]:
    """The reference GPT at every (width, density, depth, seed) on the Markov-chain batch, after the base."""
    d = GPT_DEFAULTS
    for seed in range(seeds):
        tokens = markov_tokens(seed, batch_size or d["batch_size"], d["seq_len"] + 1, d["vocab_size"])
        grid = [(base_width, 1.0, base_depth, True)] + [(w, rho, L, False) for w in widths for rho in densities
                                                        for L in depths]
        for width, density, depth, base in grid:
            cfg = GPTConfig(vocab_size=d["vocab_size"], width=width, depth=depth, head_dim=d["head_dim"],
                            context=d["seq_len"])
            rule: dict[str, Any] = {"depth_alpha": depth_alpha, "base_depth": base_depth} if depth_alpha else {}
            build = partial(_first, partial(build_gpt, cfg, base_width, scheme=scheme, density=density, seed=seed,
                                            init_std=d["init_std"], **rule))
            yield DepthCase(width, density, depth, seed, build, tokens[:, :-1], tokens[:, 1:], _lm_loss, base)


def _first(build: Callable[[], tuple[nn.Module, object]]) -> nn.Module:
    return build()[0]


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def measure_depth(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                  steps: int, losses: list[float]) -> list[dict[str, Any]]:
    """Train ``steps`` steps on one batch; per step the depth quantities (module docstring) as rows
    {step, quantity, rms}. Each step's loss is appended to ``losses``; a non-finite one ends the training."""
    modules = named_modules(model)
    blocks = residual_blocks(modules)
    ends: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            ends[name] = (args[0].detach(), out.detach())
        return record

    handles = [modules[b].register_forward_hook(hook(b)) for b in blocks]
    rows: list[dict[str, Any]] = []
    first: dict[str, torch.Tensor] = {}
    try:
        model.train()
        for step in range(steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break
            loss.backward()
            updates = {b: ends[b][1] - ends[b][0] for b in blocks}
            last = ends[blocks[-1]][1]
            if step == 0:
                first = {**updates, "last": last.clone()}
            rows.append({"step": step, "quantity": "act", "rms": _rms(last)})
            if step:
                rows.append({"step": step, "quantity": "delta", "rms": _rms(last - first["last"])})
                change = float(np.mean([_rms(updates[b] - first[b]) for b in blocks]))
                rows.append({"step": step, "quantity": "block_delta", "rms": len(blocks) * change})
            if step < steps:
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
    return rows


def fit_depth_slopes(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Log-log slope of the seed-averaged RMS against depth, per (width, density, quantity, step)."""
    sums: dict[tuple[int, float, str, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        sums[(r["width"], r["density"], r["quantity"], r["step"])][r["depth"]].append(r["rms"])
    fits = []
    for (width, density, quantity, step), by_depth in sorted(sums.items()):
        points = sorted((depth, float(np.mean(v))) for depth, v in by_depth.items())
        usable = [(x, y) for x, y in points if y > 0]
        slope = float(np.polyfit(np.log([x for x, _ in usable]), np.log([y for _, y in usable]), 1)[0]) \
            if len(usable) >= 2 else None
        fits.append({"width": width, "density": density, "quantity": quantity, "step": step, "depth_slope": slope,
                     "rms": {str(x): y for x, y in points}})
    return fits


def depth_verdict(fits: Sequence[dict[str, Any]], threshold: float = THRESHOLD,
                  unstable: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Pass when max |depth slope| over every quantity, step, width and density is ≤ threshold; none (with the
    reason) when training was unstable or there is one depth only."""
    judged = [f for f in fits if f["depth_slope"] is not None]
    if not judged:
        out: dict[str, Any] = {"pass": None, "max_abs_slope": None, "threshold": threshold, "worst": None}
    else:
        worst = max(judged, key=lambda f: abs(f["depth_slope"]))
        out = {"pass": abs(worst["depth_slope"]) <= threshold, "max_abs_slope": abs(worst["depth_slope"]),
               "threshold": threshold,
               "worst": {k: worst[k] for k in ("width", "density", "quantity", "step")}}
    if unstable:
        out.update({"pass": None, "reason": UNSTABLE, "unstable": list(unstable)})
    return out


def evaluate_depth(cases: Iterable[DepthCase], lr: float, steps: int,
                   progress: Callable[[DepthCase], None] | None = None) -> dict[str, Any]:
    """Measure every case with Adam (``make_optimizer``: the depth rule's LRs and ε), fit and judge:
    {verdict: {depth: ...}, slopes, measurements, losses, seconds}."""
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    losses: list[dict[str, Any]] = []
    for case in cases:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(case.seed)
            model = case.build()
            optimizer = make_optimizer(model, torch.optim.Adam, lr=lr)
            case_losses: list[float] = []
            measured = measure_depth(model, case.inputs, case.targets, case.loss_fn, optimizer, steps, case_losses)
        del model, optimizer
        losses.append({"width": case.width, "density": case.density, "depth": case.depth, "seed": case.seed,
                       "base": case.base, "losses": case_losses})
        if not case.base:
            rows += [{"width": case.width, "density": case.density, "depth": case.depth, "seed": case.seed, **r}
                     for r in measured]
        if progress is not None:
            progress(case)
    fits = fit_depth_slopes(rows)
    return {"verdict": {"depth": depth_verdict(fits, unstable=unstable_cases(losses))}, "slopes": fits,
            "measurements": rows, "losses": losses, "seconds": round(time.perf_counter() - start, 1)}
