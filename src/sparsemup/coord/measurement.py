"""Coordinate check: measure that activations, gradients and updates are Θ(1) in width and density.

Model-agnostic: layers are found from the model's ``Parameterization`` and observed
with forward and backward hooks. For every (width, density, seed) the model trains a
few steps on one fixed batch; at each step we record per layer the RMS of its output
Y, of the gradient of the loss with respect to its input ∇X, and of ΔY = Y_t − Y_0 on
that batch. The log-log slopes of the seed-averaged RMS against width and density
(see ``fit_slopes``) decide the verdict (docs/THEORY.md, docs/COORD_CHECK.md).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypedDict

import numpy as np
import torch
from torch import nn

from ..core.optim import make_optimizer
from ..core.record import dense_gradients, get_parameterization
from ..core.rules import Role
from ..core.structure import named_modules
from ..dynamic import DynamicSparsity

__all__ = ["QUANTITIES", "THRESHOLD", "UNSTABLE", "MaskUpdates", "Case", "Measurement", "GridMeasurement", "Fit",
           "CaseLosses", "UnstableCase", "LayerWorst", "AxisVerdict", "Evaluation", "measure", "run", "fit_slopes",
           "unstable_cases", "verdict", "evaluate", "check"]

QUANTITIES = ("act", "grad", "delta")
# Failing slopes are ≥ 0.5 (activations ∝ √ρ under SP/µP); passing ones are ≈ 0.
THRESHOLD = 0.25
# Quantities judged per axis. Activation gradients scale as 1/m_d by design (Adam
# normalises this away), so they do not count against width (docs/THEORY.md).
JUDGED = {"width": ("act", "delta"), "density": ("act", "grad", "delta")}
UNSTABLE = "unstable at this LR: lower --lr"  # the verdict's reason when training itself diverged
# ``mask_updates(model, seed)``: the dynamic sparsity a sparse case trains with (``sparsemup.dynamic``).
MaskUpdates = Callable[[nn.Module, int], DynamicSparsity]
# A loss rise from one step to the next above this fraction is instability (stable runs measured here fall at
# every step; an untuned transformers Llama's base at 2^-7 rises 17% in one step): docs/MODELS.md.
RISE_TOLERANCE = 0.01


@dataclass(frozen=True)
class Case:
    """One model to measure: its place in the grid, how to build it, its batch and loss.

    The model is built only when measured, so one model is alive at a time.
    """

    width: int
    density: float
    seed: int
    build: Callable[[], nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # The base model itself (its width, dense), trained only to judge stability: not part of the fits.
    base: bool = False
    # The number of blocks, in the check across depth (``coord.depth``); None on the width and density grid.
    depth: int | None = None


class Measurement(TypedDict):
    """One row of ``measure``: a layer's RMS of one quantity at one step."""

    step: int
    layer: str
    role: str
    quantity: str
    rms: float


class GridMeasurement(Measurement):
    """A row of ``run``: a measurement with its place in the grid."""

    width: int
    density: float
    seed: int


class Fit(TypedDict):
    """The log-log slopes of one (layer, quantity, step) (``fit_slopes``)."""

    layer: str
    role: str
    quantity: str
    step: int
    width_slope: float | None
    density_slope: float | None
    density_slope_by_width: dict[str, float | None]


class _CaseLossesBase(TypedDict):
    width: int
    density: float
    seed: int
    base: bool
    losses: list[float]


class CaseLosses(_CaseLossesBase, total=False):
    """The loss of every step of one case (``depth``: in the check across depth)."""

    depth: int


class UnstableCase(TypedDict):
    """A case whose training diverged (``unstable_cases``)."""

    width: int
    density: float
    seed: int
    base: bool
    first: float
    last: float
    worst_rise: float | None
    finite: bool


class LayerWorst(TypedDict):
    """Where the largest judged slope of an axis is."""

    layer: str
    quantity: str
    step: int


# "pass" is a keyword: the functional form.
_AxisVerdictBase = TypedDict("_AxisVerdictBase", {"pass": bool | None, "max_abs_slope": float | None,
                                                  "threshold": float, "worst": LayerWorst | None})


class AxisVerdict(_AxisVerdictBase, total=False):
    """The verdict of one axis (``verdict``); ``reason`` and ``unstable`` when training diverged,
    ``max_abs_slope_by_width`` on the density axis."""

    reason: str
    unstable: list[UnstableCase]
    max_abs_slope_by_width: dict[str, float | None]


class Evaluation(TypedDict):
    """What ``evaluate`` and ``check`` return (and coord.json holds, with the scheme and settings)."""

    verdict: dict[str, AxisVerdict]
    slopes: list[Fit]
    measurements: list[GridMeasurement]
    losses: list[CaseLosses]
    seconds: float


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().float().pow(2).mean().sqrt())


def _observed_layers(model: nn.Module) -> dict[str, tuple[nn.Module, Role]]:
    """Modules owning an input, hidden or output weight, with that usage's role."""
    record = get_parameterization(model)
    modules = named_modules(model)
    layers: dict[str, tuple[nn.Module, Role]] = {}
    for info in record.params.values():
        if info.role is Role.VECTOR:
            continue
        for usage, role in info.usage_roles.items():
            module_name = usage.rpartition(".")[0]
            layers[module_name] = (modules[module_name], role)
    return layers


class _Probe:
    """Forward and backward hooks that record each observed layer's RMS of Y, ∇X and ΔY at the current step."""

    def __init__(self, layers: Mapping[str, tuple[nn.Module, Role]]) -> None:
        self.layers = layers
        self.step = 0
        self.current: dict[tuple[str, str], float] = {}
        self.initial: dict[str, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, (module, role) in layers.items():
            self.handles.append(module.register_forward_hook(partial(self._forward, name)))
            if role is not Role.INPUT:  # an input layer's input is data: it has no gradient
                self.handles.append(module.register_full_backward_hook(partial(self._backward, name)))

    def _forward(self, name: str, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        out = output.detach()
        self.current[(name, "act")] = _rms(out)
        if self.step == 0:
            self.initial[name] = out.clone()
        else:
            self.current[(name, "delta")] = _rms(out - self.initial[name])

    def _backward(self, name: str, module: nn.Module, grad_input: tuple[torch.Tensor | None, ...],
                  grad_output: Any) -> None:
        if grad_input and grad_input[0] is not None:
            self.current[(name, "grad")] = _rms(grad_input[0])

    def rows(self) -> list[Measurement]:
        """This step's recorded values as rows."""
        return [Measurement(step=self.step, layer=name, role=self.layers[name][1].value, quantity=quantity, rms=value)
                for (name, quantity), value in self.current.items()]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def measure(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    steps: int,
    losses: list[float] | None = None,
    dynamic: DynamicSparsity | None = None,
) -> list[Measurement]:
    """Train ``steps`` steps on one batch; per step and layer, RMS of Y, ∇X and ΔY.

    Returns rows {step, layer, role, quantity, rms}; step 0 is at init (no ΔY). With ``losses``,
    the loss of every step is appended to it and a non-finite loss ends the training there;
    without, a non-finite loss raises FloatingPointError. With ``dynamic``, its mask updates run after
    the optimizer steps they are due at.
    """
    probe = _Probe(_observed_layers(model))
    rows: list[Measurement] = []
    try:
        model.train()
        for step in range(steps + 1):
            probe.step = step
            probe.current.clear()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            value = loss.item()
            if losses is not None:
                losses.append(value)
            if not math.isfinite(value):
                if losses is not None:
                    break
                raise FloatingPointError(f"loss is {value} at step {step}; lower the coordinate check's lr")
            dense = dynamic is not None and step < steps and dynamic.wants_gradients(step + 1)
            with dense_gradients(model) if dense else contextlib.nullcontext():
                torch.autograd.backward(loss)
            gradients = dynamic.take_gradients() if dense and dynamic is not None else None
            rows += probe.rows()
            if step < steps:
                optimizer.step()
                if dynamic is not None:
                    dynamic.update(step + 1, optimizer, gradients)
    finally:
        probe.remove()
    return rows


def run(
    cases: Iterable[Case],
    optimizer_class: type[torch.optim.Optimizer],
    lr: float,
    steps: int,
    progress: Callable[[Case], None] | None = None,
    losses: list[CaseLosses] | None = None,
    mask_updates: MaskUpdates | None = None,
) -> list[GridMeasurement]:
    """``measure`` every case with a fresh optimizer from ``sparsemup.make_optimizer``, each model built
    with torch's global generator seeded from its case; ``mask_updates(model, seed)`` gives the sparse
    cases' dynamic masks (dense cases and the base stay dense).

    ``progress`` is called with each case once it is measured. With ``losses``, {width, density, seed,
    base, losses} of every case is appended to it, and a case whose loss turns non-finite stops there
    (without, it raises FloatingPointError). Base cases give losses only, no rows.
    """
    rows: list[GridMeasurement] = []
    roles: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))  # layer -> role -> widths
    for case in cases:
        # Parameters sparsemup leaves to the module's own init (biases, norm gains) and dropout draw from torch's
        # global generator: seed it from the case (leaving the caller's state as it was), so every case gives
        # the same numbers wherever it sits in the grid and a coordinate check repeats exactly.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(case.seed)
            model = case.build()
            optimizer = make_optimizer(model, optimizer_class, lr=lr)
            dynamic = None
            if mask_updates is not None and not case.base and case.density < 1.0:
                dynamic = mask_updates(model, case.seed)
                dynamic.attach(optimizer)
            case_losses: list[float] = []
            measured = measure(model, case.inputs, case.targets, case.loss_fn, optimizer, steps,
                               case_losses if losses is not None else None, dynamic)
        del model, optimizer
        if losses is not None:
            losses.append({"width": case.width, "density": case.density, "seed": case.seed, "base": case.base,
                           "losses": case_losses})
        if not case.base:
            for row in measured:
                rows.append({"width": case.width, "density": case.density, "seed": case.seed, "step": row["step"],
                             "layer": row["layer"], "role": row["role"], "quantity": row["quantity"],
                             "rms": row["rms"]})
                roles[row["layer"]][row["role"]].add(case.width)
            _check_roles(roles)  # after each case: a conflict stops the check before more models are trained
        if progress is not None:
            progress(case)
    return rows


def _check_roles(seen: Mapping[str, Mapping[str, set[int]]]) -> None:
    """A layer must have one role across the grid: slopes across widths compare like with like."""
    for layer, roles in seen.items():
        if len(roles) > 1:
            found = "; ".join(f"{role} at widths {sorted(widths)}" for role, widths in sorted(roles.items()))
            raise ValueError(
                f"layer {layer!r} changes role across the grid ({found}): its dims do not grow the same way at "
                "every width (e.g. a fixed number of KV heads). Give its role explicitly when parameterizing "
                f"(roles={{'{layer}.weight': 'hidden'}}) or keep its shape scaling the same way at every width"
            )


def evaluate(cases: Iterable[Case], optimizer_class: type[torch.optim.Optimizer], lr: float, steps: int,
             progress: Callable[[Case], None] | None = None,
             mask_updates: MaskUpdates | None = None) -> Evaluation:
    """``run`` the cases, fit the slopes and judge them: {verdict, slopes, measurements, losses, seconds}."""
    start = time.perf_counter()
    losses: list[CaseLosses] = []
    rows = run(cases, optimizer_class, lr, steps, progress, losses, mask_updates)
    fits = fit_slopes(rows)
    return {"verdict": verdict(fits, unstable=unstable_cases(losses)), "slopes": fits, "measurements": rows,
            "losses": losses, "seconds": round(time.perf_counter() - start, 1)}


def check(
    build: Callable[[int, float, int], nn.Module],
    widths: Sequence[int],
    densities: Sequence[float],
    batch: tuple[torch.Tensor, torch.Tensor] | Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    seeds: int = 1,
    lr: float = 2**-7,
    steps: int = 5,
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
    progress: Callable[[Case], None] | None = None,
    base_width: int | None = None,
) -> Evaluation:
    """The coordinate check of your own model family, in one call; the same result as ``sparsemup coord-check``.

    Args:
        build: ``build(width, density, seed)`` returns the model at that grid point, already parameterized
            (``sparsemup.parameterize`` with that density and seed) against one fixed base.
        widths, densities: the grid (at least two of either to fit a slope along it).
        batch: (inputs, targets), or ``batch(seed)`` returning them; one fixed batch per seed.
        loss: ``loss(model(inputs), targets)``, a scalar.
        seeds: seeds 0..N-1; RMS is averaged over seeds. lr, steps, optimizer_class: the training.
        base_width: the base's width; ``build(base_width, 1.0, seed)`` is then trained too, to judge
            whether the LR is stable for the family itself (without it, the smallest width is judged).

    Returns {"verdict", "slopes", "measurements", "losses", "seconds"}; ``verdict[axis]["pass"]`` is True,
    False, or None where that axis has a single value or training was unstable (``reason``: ``UNSTABLE``).

    Example (after ``import sparsemup.coord``)::

        def build(width, density, seed):
            model = Net(width)
            sparsemup.parameterize(model, base, scheme="supar", density=density, seed=seed)
            return model

        result = sparsemup.coord.check(build, [64, 128, 256], [1, 1 / 4, 1 / 16], (x, y), F.cross_entropy)
        assert result["verdict"]["density"]["pass"]
    """
    if seeds < 1 or steps < 1 or not widths or not densities:
        raise ValueError("check needs at least one width, one density, one seed and one step")
    return evaluate(_family_cases(build, widths, densities, batch, loss, seeds, base_width), optimizer_class, lr,
                    steps, progress)


def _family_cases(
    build: Callable[[int, float, int], nn.Module], widths: Sequence[int], densities: Sequence[float],
    batch: tuple[torch.Tensor, torch.Tensor] | Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], seeds: int, base_width: int | None,
) -> Iterator[Case]:
    """``check``'s cases: per seed, its batch, the base (with ``base_width``) and then the grid."""
    for seed in range(seeds):
        inputs, targets = batch(seed) if callable(batch) else batch
        if base_width is not None:
            yield Case(base_width, 1.0, seed, partial(build, base_width, 1.0, seed), inputs, targets, loss, base=True)
        for width in widths:
            for density in densities:
                yield Case(width, density, seed, partial(build, width, density, seed), inputs, targets, loss)


def averaged(rows: Sequence[GridMeasurement]) -> dict[tuple[str, str, str, int], dict[tuple[int, float], float]]:
    """Mean RMS over seeds: {(layer, role, quantity, step): {(width, density): rms}}."""
    sums: dict[tuple[str, str, str, int], dict[tuple[int, float], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        sums[(r["layer"], r["role"], r["quantity"], r["step"])][(r["width"], r["density"])].append(r["rms"])
    return {k: {g: float(np.mean(v)) for g, v in grid.items()} for k, grid in sums.items()}


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of log y against log x; None with fewer than two positive points."""
    points = [(x, y) for x, y in points if y > 0]
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def fit_slopes(rows: Sequence[GridMeasurement]) -> list[Fit]:
    """Log-log slopes of the seed-averaged RMS per (layer, quantity, step).

    ``width_slope`` is fitted across widths at the grid's highest density and
    ``density_slope`` across densities at its largest width: each axis where the
    other is closest to the large-width limit the theory describes (finite weights
    per neuron add corrections that vanish as width·density grows).
    ``density_slope_by_width`` gives the density slope at every width, to show that
    convergence. A slope is None when its axis has a single value.
    """
    fits: list[Fit] = []
    for (layer, role, quantity, step), grid in sorted(averaged(rows).items()):
        widths = sorted({w for w, _ in grid})
        densities = sorted({d for _, d in grid})
        by_width = {w: _slope([(d, grid[(w, d)]) for d in densities if (w, d) in grid]) for w in widths}
        fits.append({
            "layer": layer, "role": role, "quantity": quantity, "step": step,
            "width_slope": _slope([(w, grid[(w, densities[-1])]) for w in widths if (w, densities[-1]) in grid]),
            "density_slope": by_width[widths[-1]],
            "density_slope_by_width": {str(w): s for w, s in by_width.items()},
        })
    return fits


def unstable_cases(losses: Sequence[CaseLosses], tolerance: float = RISE_TOLERANCE) -> list[UnstableCase]:
    """Cases whose training diverged: a non-finite loss anywhere, or a base case (the base model itself,
    ``Case.base``; without one, the grid's smallest width) whose loss rises at any step by more than
    ``tolerance`` of the step before, or ends above its step-0 loss.

    On one fixed batch a stable Adam run lowers the loss at every step. A base that does not means
    the LR is too high for the model family itself, and non-finite values leave nothing to fit: no
    axis can be judged. A loss that rises only in wider or sparser models is what a scheme failed to
    transfer (SP's width failure): the slopes judge it.
    """
    if not losses:
        return []
    judged_base = [c for c in losses if c.get("base")]
    smallest = min(c["width"] for c in losses)
    found: list[UnstableCase] = []
    for case in losses:
        values = case["losses"]
        finite = all(math.isfinite(v) for v in values)
        is_base = case.get("base") if judged_base else case["width"] == smallest
        rises = any(b > a * (1 + tolerance) for a, b in zip(values, values[1:])) or values[-1] > values[0]
        if not finite or (is_base and rises):
            found.append({"width": case["width"], "density": case["density"], "seed": case["seed"],
                          "base": bool(case.get("base")), "first": values[0], "last": values[-1],
                          "worst_rise": _worst_rise(values), "finite": finite})
    return found


def _worst_rise(values: Sequence[float]) -> float | None:
    """The largest relative loss increase from one step to the next (None without two finite steps)."""
    rises = [b / a - 1 for a, b in zip(values, values[1:]) if math.isfinite(a) and math.isfinite(b) and a > 0]
    return max(rises) if rises else None


def verdict(fits: Sequence[Fit], threshold: float = THRESHOLD,
            unstable: Sequence[UnstableCase] = ()) -> dict[str, AxisVerdict]:
    """Pass/fail per axis: max |slope| over hidden layers, judged quantities and steps ≤ threshold.

    With ``unstable`` cases (``unstable_cases``) every axis is ``pass: None`` with the reason
    ``UNSTABLE``: a diverging run says nothing about width or density.
    """
    out: dict[str, AxisVerdict] = {}
    for axis, quantities in JUDGED.items():
        judged = [(abs(slope), fit) for fit in fits if fit["role"] == Role.HIDDEN.value
                  and fit["quantity"] in quantities and (slope := _axis_slope(fit, axis)) is not None]
        if not judged:
            out[axis] = {"pass": None, "max_abs_slope": None, "threshold": threshold, "worst": None}
        else:
            largest, worst = max(judged, key=lambda found: found[0])  # the first of equal maxima, as before
            out[axis] = {"pass": largest <= threshold, "max_abs_slope": largest, "threshold": threshold,
                         "worst": {"layer": worst["layer"], "quantity": worst["quantity"], "step": worst["step"]}}
        if unstable:
            out[axis]["pass"] = None
            out[axis]["reason"] = UNSTABLE
            out[axis]["unstable"] = list(unstable)
    if out["density"]["pass"] is not None:
        # The same maximum at every width: how the density dependence fades as width·density grows.
        hidden = [f["density_slope_by_width"] for f in fits
                  if f["role"] == Role.HIDDEN.value and f["quantity"] in JUDGED["density"]]
        out["density"]["max_abs_slope_by_width"] = {
            w: max((abs(s) for by_width in hidden if (s := by_width[w]) is not None), default=None)
            for w in (hidden[0] if hidden else {})
        }
    return out


def _axis_slope(fit: Fit, axis: str) -> float | None:
    return fit["width_slope"] if axis == "width" else fit["density_slope"]
