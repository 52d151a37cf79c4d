"""``sparsemup demo``: a coordinate check and a small LR × density sweep for SP and SµPar (its time: the README).

It shows the library's claim at a size two CPU cores can afford: under SµPar the dense model's learning
rate stays right as the model gets sparser, under SP keeping it costs loss. It ends in a verdict that is a
category fixed in advance (``verdict``), with the numbers and their 95 % intervals beside it. Everything is a
sweep, so an interrupted demo resumes where it stopped.
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
from .analysis import Analysis
from .report import write_report
from .sweep import SweepSpec, parse_sweep, run_sweep

__all__ = ["KEEP", "PAYS", "VERDICTS", "DemoPlan", "run_demo", "summarize", "sweep_spec", "verdict"]


# The demo's verdict, defined before any of its runs: a category, not a number, so that no CPU, thread count or
# seed pair can flip it. Transfer is what a user pays for keeping the dense model's LR: the regret (nats).
KEEP = 0.05  # SµPar transfers when its worst regret's 95 % upper bound is below this (≈ 5× the per-run noise)
PAYS = 0.05  # SP does not when its worst regret's 95 % lower bound is above it
VERDICTS = {
    "transfers": "SµPar keeps the dense LR and SP does not",
    "inconclusive": "the criteria are not all met (the summary names which)",
}


@dataclass
class DemoPlan:
    """What the demo runs; the defaults aim at ten minutes on two idle cores (measured: docs/SWEEPS.md).

    The reference GPT at width 128 over a dense base of 64 (m_d = 2), from the tuned dense base the project
    ships (experiments/presets/base.toml: σ_base, α_input, α_output tuned on 300-step runs of the width-64 base),
    150 steps — past the early plateau that untuned settings sit on, where neighbouring LRs land on either side
    of an escape — at densities 1 and 1/16 (8 weights per neuron), two seeds, half-octave LRs in a window per
    scheme and density around where its optima lie (SµPar's stay near the base's η; SP's move up as it gets sparser).
    """

    schemes: list[str] = field(default_factory=lambda: ["sp", "supar"])
    densities: list[float] = field(default_factory=lambda: [1.0, 0.0625])
    # log2 η_base per scheme and density: around each curve's optimum in a one-seed pilot (SP's moves up by about
    # four octaves at ρ = 1/16, so its sparse curve also spans the dense optimum's interval, down to 2^-10, where the
    # regret is read: with 2^-9 as its lowest point a dense optimum at 2^-9.005 fell off it and SP's regret was n/a).
    log2_lrs: dict[str, dict[float, list[float]]] = field(default_factory=lambda: {
        "sp": {1.0: [-10.0, -9.5, -9.0, -8.5, -8.0, -7.5], 0.0625: [-10.0, -9.0, -8.0, -7.0, -6.0, -5.5, -5.0, -4.5]},
        "supar": {1.0: [-9.0, -8.5, -8.0, -7.5, -7.0, -6.5], 0.0625: [-9.0, -8.5, -8.0, -7.5, -7.0, -6.5]},
    })
    seed: int = 0  # the first of the two seeds
    threads: int = 1  # torch threads per run; runs go two at a time with one thread, one at a time with more
    base: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "model": {"width": 128, "base_width": 64, "depth": 2, "head_dim": 64,
                  "init_std": 0.0722, "input_alpha": 1.013, "output_alpha": 2.544},
        "optim": {"warmup_steps": 15},
        "train": {"steps": 150, "batch_size": 16, "seq_len": 128, "eval_every": 0, "checkpoint_every": 50,
                  "eval_batches": 4, "tensorboard": False},
    })
    coord_widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    coord_densities: list[float] = field(default_factory=lambda: [1.0, 0.25, 0.0625, 0.015625])
    coord_seeds: int = 2
    cores: int = 2

    @property
    def seeds(self) -> list[int]:
        return [self.seed, self.seed + 1]

    @property
    def workers(self) -> int:
        return max(1, self.cores // self.threads)


def sweep_spec(plan: DemoPlan, seeds: list[int] | None = None) -> SweepSpec:
    """The demo's LR × density sweep (over ``seeds``, default the plan's two)."""
    triples = [[scheme, density, f"2**{k:g}"] for scheme in plan.schemes for density in plan.densities
               for k in plan.log2_lrs[scheme][density]]
    base = {**plan.base, "train": {**plan.base["train"], "threads": plan.threads}}
    return parse_sweep({"base": base, "grid": {"model.scheme, model.density, optim.lr": triples,
                                               "train.seed": seeds or plan.seeds}}, "demo")


def _coord_check(plan: DemoPlan, out: Path,
                 log: Callable[[str], None]) -> dict[str, dict[str, dict[str, bool | float | None]]]:
    """The MLP coordinate check (seconds) for each scheme: density and width verdicts."""
    found: dict[str, dict[str, dict[str, bool | float | None]]] = {}
    for scheme in plan.schemes:
        settings = CheckSettings.resolve("mlp", scheme, widths=plan.coord_widths, densities=plan.coord_densities,
                                         seeds=plan.coord_seeds)
        result = run_check(settings)
        write_check(result, out / f"coord-{scheme}")
        found[scheme] = {axis: {"pass": v["pass"], "max_abs_slope": v["max_abs_slope"]}
                         for axis, v in result["verdict"].items()}
        log("coordinate check (MLP, widths " + ",".join(map(str, plan.coord_widths)) + f"), {scheme}: "
            + verdict_summary(result["verdict"]))
    return found


def summarize(result: Analysis, plan: DemoPlan) -> dict[str, Any]:
    """The regret, shifts and optima per scheme of an analysed demo sweep, and its verdict."""
    summary = _summary(result, plan)
    summary["verdict"] = verdict(summary)
    return summary


def _summary(result: Analysis, plan: DemoPlan) -> dict[str, Any]:
    schemes: dict[str, Any] = {}
    for drift in result["drifts"]:
        if drift["along"] != "model.density":
            continue
        scheme = str(drift["setting"].get("model.scheme", "all"))
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
    log2_lrs = {scheme: {f"{d:g}": lrs for d, lrs in by_density.items()}
                for scheme, by_density in plan.log2_lrs.items()}
    return {"schemes": schemes, "densities": plan.densities, "log2_lrs": log2_lrs}


def verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """The category of ``VERDICTS`` with every criterion's numbers: SµPar's worst regret below ``KEEP`` (upper 95 %
    bound), SP's above ``PAYS`` (lower bound), and their optimum shifts at the sparsest density apart (intervals
    not overlapping)."""
    schemes = summary["schemes"]
    sparsest = f"{min(summary['densities']):g}"

    def bound(scheme: str, side: int) -> float | None:
        worst = (schemes.get(scheme) or {}).get("worst_regret") or {}
        interval = worst.get("interval")
        return None if interval is None else float(interval[side])

    def shift(scheme: str) -> list[float] | None:
        found = ((schemes.get(scheme) or {}).get("shift_log2_by_density") or {}).get(sparsest) or {}
        return found.get("interval")

    supar_high, sp_low = bound("supar", 1), bound("sp", 0)
    shifts = {"supar": shift("supar"), "sp": shift("sp")}
    apart = None
    if shifts["supar"] is not None and shifts["sp"] is not None:
        apart = shifts["supar"][1] < shifts["sp"][0] or shifts["sp"][1] < shifts["supar"][0]
    criteria: dict[str, dict[str, Any]] = {
        "supar_keeps": {"regret_upper_95": supar_high, "below": KEEP,
                        "met": supar_high is not None and supar_high < KEEP},
        "sp_pays": {"regret_lower_95": sp_low, "above": PAYS, "met": sp_low is not None and sp_low > PAYS},
        "shifts_apart": {"density": float(sparsest), "supar_interval": shifts["supar"], "sp_interval": shifts["sp"],
                         "met": bool(apart)},
    }
    category = "transfers" if all(c["met"] for c in criteria.values()) else "inconclusive"
    return {"category": category, "meaning": VERDICTS[category], "criteria": criteria}


def _conclusion(summary: dict[str, Any]) -> str:
    """The verdict first, then what keeping the dense LR costs each scheme and how far its optimum moves."""
    found = summary["verdict"]
    failed = [name for name, c in found["criteria"].items() if not c["met"]]
    head = f"verdict: {found['category']} ({found['meaning']}" + (f"; not met: {', '.join(failed)})" if failed
                                                                    else ")")
    costs, shifts = [], []
    sparsest = f"{min(summary['densities']):g}"
    for scheme, s in summary["schemes"].items():
        worst = s["worst_regret"] or {}
        cost = "n/a (no loss at the dense optimum: it lies off this density's LR grid or beside a diverged run)" if \
            worst.get("regret") is None else f"{worst['regret']:.3f}" + (
            "" if worst["interval"] is None else f" [{worst['interval'][0]:.3f}, {worst['interval'][1]:.3f}]")
        costs.append(f"{scheme} {cost}")
        moved = (s["shift_log2_by_density"] or {}).get(sparsest) or {}
        shift = "n/a" if moved.get("shift") is None else f"{moved['shift']:+.2f}" + (
            "" if moved.get("interval") is None else f" [{moved['interval'][0]:+.2f}, {moved['interval'][1]:+.2f}]")
        shifts.append(f"{scheme} {shift}")
    return (f"{head}. Keeping the dense LR costs at most (nats, 95 % interval; SµPar must stay below {KEEP}, SP "
            f"above {PAYS}): {', '.join(costs)}; the optimum's shift at density {sparsest} (log2 LR, 1 = a factor "
            f"2): {', '.join(shifts)}")


def run_demo(out: Path, plan: DemoPlan | None = None,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Run (or resume) the demo into ``out``; writes report.md and summary.json and returns the summary."""
    plan = plan or DemoPlan()
    out = Path(out)
    make_dirs(out)
    start = time.perf_counter()
    log(f"sparsemup demo → {out} (1/3: coordinate check)")
    coord_found = _coord_check(plan, out, log)
    spec = sweep_spec(plan)
    log(f"2/3: LR × density sweep, {len(spec.points)} runs of the reference GPT, seeds {plan.seeds[0]} and "
        f"{plan.seeds[1]}, {plan.threads} thread(s) each (resumable: rerun the same command)")
    run_sweep(spec, out / "sweep", workers=plan.workers, log=log)
    log("3/3: analysis")
    result, tables = write_report(out / "sweep", title="Demo sweep")
    summary = {**summarize(result, plan), "coord_check": coord_found, "seeds": plan.seeds, "threads": plan.threads,
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
        f"{base['train']['seq_len']} bytes of Shakespeare, seeds {plan.seeds[0]} and {plan.seeds[1]}, the tuned dense "
        "base (σ_base, α_input, α_output of experiments/presets/base.toml); half-octave η_base per scheme: "
        + "; ".join(f"{scheme} at ρ = {d:g}: 2^{min(v):g} … 2^{max(v):g}"
                    for scheme, by_density in plan.log2_lrs.items() for d, v in by_density.items())
        + f". {plan.threads} torch thread(s) per run. The regret is the loss at the dense model's optimum minus the "
        "density's best (what keeping the dense LR costs); intervals are 95 %, with the per-run noise from the seed "
        f"pairs. The verdict was fixed before the runs: **transfers** when SµPar's worst regret stays below {KEEP} "
        f"nats (upper bound), SP's exceeds {PAYS} (lower bound) and their optimum shifts at the sparsest density do "
        "not overlap; otherwise **inconclusive**, naming the criterion not met.", "",
        tables, *[f"![sweep]({p})" for p in figures], "",
        f"Wall time of this invocation (runs already stored are not redone): {summary['seconds']:.0f} s.", ""]))
    log(f"wrote {out / 'report.md'} and {out / 'summary.json'} in {summary['seconds']:.0f} s")
    return summary

