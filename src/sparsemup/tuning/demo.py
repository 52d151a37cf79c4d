"""``sparsemup demo``: a coordinate check and a small LR × density sweep for SP and SµPar (its time: the README).

It shows the library's claim at a size two CPU cores can afford: under SµPar the best learning
rate stays put as the model gets sparser, under SP it moves. Everything is a sweep, so an
interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..coord import THRESHOLD, CheckSettings, run_check, write_check
from ..coord.reference import verdict_summary
from ..core.atomic import make_dirs, write_json_atomic, write_text_atomic
from .report import write_report
from .sweep import parse_sweep, run_sweep

__all__ = ["DemoPlan", "run_demo"]


@dataclass
class DemoPlan:
    """What the demo runs; the defaults aim at ten minutes on two idle cores (measured: docs/SWEEPS.md)."""

    schemes: list[str] = field(default_factory=lambda: ["sp", "supar"])
    densities: list[float] = field(default_factory=lambda: [1.0, 0.25, 0.125])
    log2_lrs: list[int] = field(default_factory=lambda: list(range(-10, -4)))
    # The reference GPT at width 128 (m_d = 2 over a width-64 base), ≥ 16 weights per neuron at ρ = 1/8.
    base: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "model": {"width": 128, "base_width": 64, "depth": 2, "head_dim": 64},
        "optim": {"warmup_steps": 15},
        "train": {"steps": 150, "batch_size": 16, "seq_len": 128, "eval_every": 0, "checkpoint_every": 50,
                  "eval_batches": 4, "tensorboard": False},
    })
    coord_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    coord_densities: list[float] = field(default_factory=lambda: [1.0, 0.25, 0.0625, 0.015625])
    coord_seeds: int = 2
    workers: int = 2


def _coord_check(plan: DemoPlan, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """The MLP coordinate check (seconds) for each scheme: density and width verdicts."""
    found = {}
    for scheme in plan.schemes:
        settings = CheckSettings.resolve("mlp", scheme, plan.coord_widths, plan.coord_densities, seeds=plan.coord_seeds)
        result = run_check(settings)
        write_check(result, out / f"coord-{scheme}")
        found[scheme] = {axis: {"pass": v["pass"], "max_abs_slope": v["max_abs_slope"]}
                         for axis, v in result["verdict"].items()}
        log("coordinate check (MLP, widths " + ",".join(map(str, plan.coord_widths)) + f"), {scheme}: "
            + verdict_summary(found[scheme]))
    return found


def _summary(result: dict[str, Any], plan: DemoPlan) -> dict[str, Any]:
    schemes: dict[str, Any] = {}
    for drift in result["drifts"]:
        if drift["along"] != "model.density":
            continue
        scheme = drift["setting"].get("model.scheme", "all")
        schemes[scheme] = {  # what the user pays first: the regret of keeping the dense LR
            "worst_regret": drift["worst_regret"],
            "regret_by_density": {f"{r['model.density']:g}": {"regret": r["regret"], "interval": r["regret_interval"]}
                                  for r in drift["rows"][1:]},
            "shift_log2_by_density": {f"{r['model.density']:g}": {"shift": r["shift"], "interval": r["shift_interval"]}
                                      for r in drift["rows"][1:]},
            "best_lr_by_density": {f"{r['model.density']:g}": None if r["best_log2_x"] is None
                                   else 2 ** r["best_log2_x"] for r in drift["rows"]},
            "best_log2_lr_by_density": {f"{r['model.density']:g}": r["best_log2_x"] for r in drift["rows"]},
            "on_grid_edge": {f"{r['model.density']:g}": r["edge"] for r in drift["rows"]},
            "best_loss_by_density": {f"{r['model.density']:g}": r["best_loss"] for r in drift["rows"]},
            "loss_at_dense_lr_by_density": {f"{r['model.density']:g}": r["loss_at_transferred"]
                                            for r in drift["rows"]},
            "flat": drift["flat"], "drift_log2": drift["drift_log2"], "edge_involved": drift["edge_involved"],
        }
    return {"schemes": schemes, "densities": plan.densities, "log2_lrs": plan.log2_lrs}


def _conclusion(summary: dict[str, Any]) -> str:
    """What keeping the dense LR costs each scheme (its worst regret, 95 % interval), then the drift of the optima."""
    costs, drifts = [], []
    for scheme, s in summary["schemes"].items():
        worst = s["worst_regret"] or {}
        cost = "n/a" if worst.get("regret") is None else f"{worst['regret']:.3f}" + (
            "" if worst["interval"] is None else f" [{worst['interval'][0]:.3f}, {worst['interval'][1]:.3f}]")
        costs.append(f"{scheme} {cost}")
        drift = "n/a" if s["drift_log2"] is None else f"{'≥ ' if s['edge_involved'] else ''}{s['drift_log2']:.2f}"
        drifts.append(f"{scheme} {drift}" + (f" (flat, no optimum, at {', '.join(format(v, 'g') for v in s['flat'])})"
                                             if s["flat"] else ""))
    densities = summary["densities"]
    span = f"{max(densities):g} … {min(densities):g}"
    return (f"keeping the dense LR costs at most (nats, 95 % interval) across densities {span}: {', '.join(costs)}; "
            f"best-LR drift across densities {span} (log2 units, 1 = a factor 2): {', '.join(drifts)}")


def run_demo(out: Path, plan: DemoPlan | None = None,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Run (or resume) the demo into ``out``; writes report.md and summary.json and returns the summary."""
    plan = plan or DemoPlan()
    out = Path(out)
    make_dirs(out)
    start = time.perf_counter()
    log(f"sparsemup demo → {out} (1/3: coordinate check)")
    coord_found = _coord_check(plan, out, log)
    runs = len(plan.schemes) * len(plan.densities) * len(plan.log2_lrs)
    log(f"2/3: LR × density sweep, {runs} runs of the reference GPT (resumable: rerun the same command)")
    spec = parse_sweep({"base": plan.base, "grid": {
        "model.scheme": plan.schemes, "model.density": plan.densities,
        "optim.lr": [f"2**{k}" for k in plan.log2_lrs]}}, "demo")
    run_sweep(spec, out / "sweep", workers=plan.workers, log=log)
    log("3/3: analysis")
    result, tables = write_report(out / "sweep", title="Demo sweep")
    summary = {**_summary(result, plan), "coord_check": coord_found,
               "seconds": round(time.perf_counter() - start, 1)}
    conclusion = _conclusion(summary)
    summary["conclusion"] = conclusion
    write_json_atomic(out / "summary.json", summary)
    figures = [Path(p).relative_to(out) for p in result["files"] if p.endswith(".png")]
    coord_lines = [f"- {scheme}: " + ", ".join(f"{axis} {'pass' if v['pass'] else 'FAIL'} "
                                               f"(max |log-log slope| {v['max_abs_slope']:.2f}, threshold {THRESHOLD})"
                                               for axis, v in found.items())
                   for scheme, found in coord_found.items()]
    base = plan.base
    write_text_atomic(out / "report.md", "\n".join([
        "# sparsemup demo", "", f"**{conclusion}.**", "",
        "## 1. Coordinate check (reference MLP, 5 Adam steps, widths "
        f"{', '.join(map(str, plan.coord_widths))}, densities {', '.join(f'{d:g}' for d in plan.coord_densities)})",
        "", "Do activations, gradients and updates of hidden layers keep their size as the model gets wider and "
        "sparser? SµPar should pass both; SP fails both (docs/COORD_CHECK.md).", "", *coord_lines, "",
        *[f"![{s} vs density](coord-{s}/density.png)" for s in plan.schemes], "",
        "## 2. LR × density sweep (reference GPT)", "",
        f"Width {base['model']['width']} over a dense base of {base['model']['base_width']}, "
        f"{base['model']['depth']} blocks, {base['train']['steps']} steps of batch {base['train']['batch_size']} × "
        f"{base['train']['seq_len']} bytes of Shakespeare, one seed, untuned σ_base = 0.02 and α = 1; η_base = "
        f"2^{min(plan.log2_lrs)} … 2^{max(plan.log2_lrs)}. The loss at the transferred LR uses the dense model's "
        "optimum; the regret is the loss there minus the density's best. One seed, so the 95 % intervals use the "
        "default per-run noise, measured on 300-step runs of the tuned base: this untuned 150-step setting is noisier "
        "(docs/SWEEPS.md), so read its intervals as lower bounds.", "",
        tables, *[f"![sweep]({p})" for p in figures], "",
        f"Wall time of this invocation (runs already stored are not redone): {summary['seconds']:.0f} s.", ""]))
    log(f"wrote {out / 'report.md'} and {out / 'summary.json'} in {summary['seconds']:.0f} s")
    log(conclusion)
    return summary

