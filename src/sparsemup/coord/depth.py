"""Coordinate check across depth: the residual stream and each block's update, Θ(1) in the number of blocks.

Per-layer slopes cannot span depths (a 16-block model has layers a 2-block one lacks), so the depth check
measures what every depth has, on the residual blocks (``sparsemup.core.residual.residual_blocks``):

- ``act``: RMS of the last block's output (the residual stream the readout reads), at every step;
- ``delta``: RMS of its change since step 0 (what training did to the stream);
- ``block_delta``: each block's own update: L times the mean over blocks of the RMS of the change of
  u_k = block_k(x) − x on the block's step-0 input x (re-run in eval mode), so that a block is not charged
  with the change of its input. A depth rule makes every block's own change Θ(1/L), so this is Θ(1);
  without one each block's change is Θ(1) and their sum grows with L.

Log-log slopes against depth, per (width, density, quantity, step), decide the verdict (on ``delta`` and
``block_delta``) under the same threshold and instability rule as width and density (docs/COORD_CHECK.md).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn

from ..core.export import first_tensor
from ..core.optim import make_optimizer
from ..core.residual import residual_blocks
from ..core.structure import named_modules
from ..models import GPTConfig, build_gpt
from .cases import GPT_DEFAULTS, HF_DEFAULTS, markov_tokens
from .measurement import THRESHOLD, UNSTABLE, Case, CaseLosses, UnstableCase, unstable_cases

__all__ = ["DEPTH_QUANTITIES", "DEPTH_JUDGED", "DepthMeasurement", "DepthGridMeasurement", "DepthFit", "DepthWorst",
           "DepthVerdict", "DepthEvaluation", "DepthRule", "depth_cases", "hf_depth_cases", "measure_depth",
           "fit_depth_slopes", "depth_verdict", "evaluate_depth"]

DEPTH_QUANTITIES = ("act", "delta", "block_delta")
# Judged: what both rules keep Θ(1) in depth. The stream itself (act) is not: at init α = 1 lets the branches' random
# sum shrink as L^(−1/2) towards the embedding (by design), which shows wherever the branches outweigh the embedding.
DEPTH_JUDGED = ("delta", "block_delta")


class DepthMeasurement(TypedDict):
    """A row of ``measure_depth``: one depth quantity at one step."""

    step: int
    quantity: str
    rms: float


class DepthGridMeasurement(TypedDict):
    """A row of ``evaluate_depth``: a depth measurement with its place in the grid."""

    width: int
    density: float
    depth: int
    seed: int
    step: int
    quantity: str
    rms: float


class DepthFit(TypedDict):
    """The slope against depth of one (width, density, quantity, step), and the seed-averaged RMS by depth."""

    width: int
    density: float
    quantity: str
    step: int
    depth_slope: float | None
    rms: dict[str, float]


class DepthWorst(TypedDict):
    """Where the largest judged slope against depth is."""

    width: int
    density: float
    quantity: str
    step: int


# "pass" is a keyword: the functional form.
_DepthVerdictBase = TypedDict("_DepthVerdictBase", {"pass": bool | None, "max_abs_slope": float | None,
                                                    "threshold": float, "worst": DepthWorst | None})


class DepthVerdict(_DepthVerdictBase, total=False):
    """The verdict across depth (``depth_verdict``); ``reason`` and ``unstable`` when training diverged."""

    reason: str
    unstable: list[UnstableCase]


class DepthEvaluation(TypedDict):
    """What ``evaluate_depth`` returns (and coord.json holds, with the scheme and settings)."""

    verdict: dict[str, DepthVerdict]
    slopes: list[DepthFit]
    measurements: list[DepthGridMeasurement]
    losses: list[CaseLosses]
    seconds: float


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def depth_cases(scheme: str, widths: Sequence[int], densities: Sequence[float], depths: Sequence[int], seeds: int,
                base_width: int, depth_alpha: float | None, base_depth: int,
                batch_size: int | None = None) -> Iterator[Case]:
    """The reference GPT at every (width, density, depth, seed) on the Markov-chain batch, after the base."""
    d = GPT_DEFAULTS
    for seed in range(seeds):
        tokens = markov_tokens(seed, batch_size or d["batch_size"], d["seq_len"] + 1, d["vocab_size"])
        for width, density, depth, base in _grid(widths, densities, depths, base_width, base_depth):
            cfg = GPTConfig(vocab_size=d["vocab_size"], width=width, depth=depth, head_dim=d["head_dim"],
                            context=d["seq_len"])
            build = partial(_first, partial(build_gpt, cfg, base_width, scheme=scheme, density=density, seed=seed,
                                            init_std=d["init_std"], **_depth_rule(depth_alpha, base_depth)))
            yield Case(width, density, seed, build, tokens[:, :-1], tokens[:, 1:], _lm_loss, base, depth)


class DepthRule(TypedDict, total=False):
    """The depth rule's keyword arguments of ``build_gpt`` and ``hf.build`` (none: no rule)."""

    depth_alpha: float
    base_depth: int


def _depth_rule(depth_alpha: float | None, base_depth: int) -> DepthRule:
    return {"depth_alpha": depth_alpha, "base_depth": base_depth} if depth_alpha else {}


def _grid(widths: Sequence[int], densities: Sequence[float], depths: Sequence[int], base_width: int,
          base_depth: int) -> list[tuple[int, float, int, bool]]:
    """(width, density, depth, is the base) of every model of one seed: the dense base first."""
    return [(base_width, 1.0, base_depth, True)] + [(w, rho, L, False) for w in widths for rho in densities
                                                    for L in depths]


def _logits_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    return _lm_loss(output.logits, targets)


def hf_depth_cases(spec: str, scheme: str, widths: Sequence[int], densities: Sequence[float], depths: Sequence[int],
                   seeds: int, base_width: int, depth_alpha: float | None, base_depth: int,
                   batch_size: int | None = None, head_dim: int | None = None) -> Iterator[Case]:
    """A transformers causal LM (``spec``: a model type or config.json, built by ``sparsemup.hf.build``, vocab 256)
    at every (width, density, depth, seed) on the Markov-chain batch, after the base."""
    from .. import hf  # needs sparsemup[hf]; its error names the extra

    d = HF_DEFAULTS
    for seed in range(seeds):
        tokens = markov_tokens(seed, batch_size or d["batch_size"], d["seq_len"] + 1, d["vocab_size"])
        for width, density, depth, base in _grid(widths, densities, depths, base_width, base_depth):
            build = partial(hf.build, hf.small_config(spec, d["vocab_size"], depth), width, base_width,
                            head_dim=head_dim or d["head_dim"], scheme=scheme, density=density, seed=seed,
                            init_std=d["init_std"], **_depth_rule(depth_alpha, base_depth))
            yield Case(width, density, seed, partial(_measurable, build), tokens[:, :-1], tokens[:, 1:],
                       _logits_loss, base, depth)


def _measurable(build: Callable[[], nn.Module]) -> nn.Module:
    """The model of ``build`` with transformers' KV cache off, so a block re-run on its step-0 arguments sees no
    cache that the first call filled, and with dropout off (GPT-2's config drops 10%), so that the stream's change
    is what training did: with dropout on, each step's new dropout masks change the stream at any learning rate."""
    model = build()
    config = getattr(model, "config", None)
    if config is not None:
        config.use_cache = False
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama, Qwen2: a rate, not a module
            setattr(module, "attention_dropout", 0.0)  # noqa: B010 (a float attribute; Module types them as tensors)
    return model


def _first(build: Callable[[], tuple[nn.Module, object]]) -> nn.Module:
    return build()[0]


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def _stream_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """A block's residual-stream input: its first positional argument, or ``hidden_states`` (transformers)."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise ValueError("a residual block was called without the stream as its first argument or hidden_states; "
                         "the check across depth cannot re-run it")
    return x


class _BlockProbe:
    """Hooks that keep each residual block's step-0 call and the last block's output; ``own_updates`` re-runs
    the blocks on those calls."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = named_modules(model)
        self.blocks = residual_blocks(self.modules)
        self.calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.last_out: torch.Tensor | None = None
        self.handles = [self.modules[b].register_forward_hook(partial(self._record, b), with_kwargs=True)
                        for b in self.blocks]

    def _record(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                output: Any) -> None:
        self.calls.setdefault(name, (tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), kwargs))
        if name == self.blocks[-1]:
            self.last_out = first_tensor(output).detach()

    @torch.no_grad()
    def own_updates(self) -> dict[str, torch.Tensor]:
        """Each block's output minus its input, re-run in eval mode on its step-0 arguments."""
        self.model.eval()
        try:
            return {b: first_tensor(self.modules[b](*self.calls[b][0], **self.calls[b][1]))
                    - _stream_input(*self.calls[b]) for b in self.blocks}
        finally:
            self.model.train()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure_depth(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                  loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                  steps: int, losses: list[float]) -> list[DepthMeasurement]:
    """Train ``steps`` steps on one batch; per step the depth quantities (module docstring) as rows
    {step, quantity, rms}. Each step's loss is appended to ``losses``; a non-finite one ends the training.

    A block's own update is measured by re-running it (eval mode, no grad) on the arguments it got at step 0,
    so that the change of its input, which earlier blocks cause, is not counted as its own."""
    probe = _BlockProbe(model)
    rows: list[DepthMeasurement] = []
    first: dict[str, torch.Tensor] = {}
    try:
        model.train()
        for step in range(steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                break
            torch.autograd.backward(loss)
            assert probe.last_out is not None  # the forward pass ran the last block
            last = probe.last_out
            own = probe.own_updates()
            if step == 0:
                first = {**own, "last": last.clone()}
            rows.append({"step": step, "quantity": "act", "rms": _rms(last)})
            if step:
                rows.append({"step": step, "quantity": "delta", "rms": _rms(last - first["last"])})
                change = float(np.mean([_rms(own[b] - first[b]) for b in probe.blocks]))
                rows.append({"step": step, "quantity": "block_delta", "rms": len(probe.blocks) * change})
            if step < steps:
                optimizer.step()
    finally:
        probe.remove()
    return rows


def fit_depth_slopes(rows: Sequence[DepthGridMeasurement]) -> list[DepthFit]:
    """Log-log slope of the seed-averaged RMS against depth, per (width, density, quantity, step)."""
    sums: dict[tuple[int, float, str, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        sums[(r["width"], r["density"], r["quantity"], r["step"])][r["depth"]].append(r["rms"])
    fits: list[DepthFit] = []
    for (width, density, quantity, step), by_depth in sorted(sums.items()):
        points = sorted((depth, float(np.mean(v))) for depth, v in by_depth.items())
        usable = [(x, y) for x, y in points if y > 0]
        slope = float(np.polyfit(np.log([x for x, _ in usable]), np.log([y for _, y in usable]), 1)[0]) \
            if len(usable) >= 2 else None
        fits.append({"width": width, "density": density, "quantity": quantity, "step": step, "depth_slope": slope,
                     "rms": {str(x): y for x, y in points}})
    return fits


def depth_verdict(fits: Sequence[DepthFit], threshold: float = THRESHOLD,
                  unstable: Sequence[UnstableCase] = ()) -> DepthVerdict:
    """Pass when max |depth slope| of the judged quantities (``DEPTH_JUDGED``) over every step, width and density
    is ≤ threshold; none (with the reason) when training was unstable or there is one depth only."""
    judged = [(abs(slope), f) for f in fits
              if (slope := f["depth_slope"]) is not None and f["quantity"] in DEPTH_JUDGED]
    out: DepthVerdict
    if not judged:
        out = {"pass": None, "max_abs_slope": None, "threshold": threshold, "worst": None}
    else:
        largest, worst = max(judged, key=lambda found: found[0])
        out = {"pass": largest <= threshold, "max_abs_slope": largest, "threshold": threshold,
               "worst": {"width": worst["width"], "density": worst["density"], "quantity": worst["quantity"],
                         "step": worst["step"]}}
    if unstable:
        out["pass"] = None
        out["reason"] = UNSTABLE
        out["unstable"] = list(unstable)
    return out


def evaluate_depth(cases: Iterable[Case], lr: float, steps: int,
                   progress: Callable[[Case], None] | None = None) -> DepthEvaluation:
    """Measure every case with Adam (``make_optimizer``: the depth rule's LRs and ε), fit and judge:
    {verdict: {depth: ...}, slopes, measurements, losses, seconds}."""
    start = time.perf_counter()
    rows: list[DepthGridMeasurement] = []
    losses: list[CaseLosses] = []
    for case in cases:
        if case.depth is None:
            raise ValueError("evaluate_depth measures cases of the depth grid (Case.depth set): use depth_cases")
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
            rows += [{"width": case.width, "density": case.density, "depth": case.depth, "seed": case.seed,
                      "step": r["step"], "quantity": r["quantity"], "rms": r["rms"]} for r in measured]
        if progress is not None:
            progress(case)
    fits = fit_depth_slopes(rows)
    return {"verdict": {"depth": depth_verdict(fits, unstable=unstable_cases(losses))}, "slopes": fits,
            "measurements": rows, "losses": losses, "seconds": round(time.perf_counter() - start, 1)}
