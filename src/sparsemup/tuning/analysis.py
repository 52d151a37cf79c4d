"""Analysis of a sweep's records: loss curves per setting, their optima with intervals, the transfer regret and the
drift.

A *setting* is one value of every swept key except the x axis (η_base by default) and the seed; losses are averaged
over seeds before the optimum is estimated (an x where any seed diverged counts as diverged). Optima, intervals, the
flat and edge flags, the regret and the shift come from ``estimate`` (one estimator for the report, the demo and the
scripts); the per-run noise is pooled from the store's seed pairs near each curve's minimum, or the default.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from ..train.schema import run_identity, with_defaults
from .estimate import SEED, WINDOW, CurveEstimate, Noise, NoiseRecord, Optimum, TransferCost, estimate, transfer
from .store import ConfigValue, RunRecord

__all__ = ["DRIFT_AXES", "REFERENCE", "Curve", "Drift", "Analysis", "curves", "analyze", "pooled_noise",
           "setting_label"]

SEED_KEY = "train.seed"
# Keys along which the optimum should not move; each gets a drift table when it varies (one table when
# width is set with density, as in an iso-parameter sweep). Depth transfers only under a depth rule
# (model.depth_alpha): its table then says whether it does.
DRIFT_AXES = ("model.density", "model.width", "model.depth")
# Each axis's reference setting, where the hyperparameters are tuned: the densest, narrowest or shallowest.
REFERENCE = {"model.density": "densest", "model.width": "narrowest", "model.depth": "shallowest"}


class Curve(TypedDict):
    """One setting's loss curve along the x axis (``curves``), and its optimum once ``analyze`` estimated it."""

    setting: dict[str, ConfigValue]
    label: str
    log2_x: list[float]
    loss: list[float | None]  # seed-averaged; None where any seed diverged
    seed_spread: list[float | None]
    seeds: int
    seeds_at: list[int]
    seed_losses: list[list[float | None]]
    optimum: Optimum | None


class Drift(TypedDict):
    """Settings that differ only along a drift axis (``_drifts``). Its rows and worst regret are keyed by the
    axis itself (e.g. ``model.density``), so they are plain dicts."""

    along: str
    setting: dict[str, ConfigValue]
    label: str
    rows: list[dict[str, Any]]
    transferred_log2_x: float | None
    worst_regret: dict[str, Any] | None
    drift_log2: float | None
    edge_involved: bool
    flat: list[ConfigValue]


class _AnalysisBase(TypedDict):
    axis: str
    runs: int
    diverged: int
    noise: NoiseRecord
    regret: list[dict[str, Any]]  # per drift: its setting, axis and worst regret (keyed by the axis), drift_log2
    curves: list[Curve]
    drifts: list[Drift]


class Analysis(_AnalysisBase, total=False):
    """``analyze``'s result, report.json: ``merged_from`` when stores were merged; ``files`` (what was written)
    only in what ``write_report`` returns."""

    merged_from: list[str]
    files: list[str]


def setting_label(setting: Mapping[str, ConfigValue | None]) -> str:
    """``key=value, ...`` with the last part of each key; floats in the shortest form (0.5, 1)."""
    return ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in setting.items())


def curves(records: Sequence[RunRecord], axis: str = "optim.lr") -> list[Curve]:
    """One curve per setting: seed-averaged loss at each log2 x (None where any seed diverged), each seed's loss and
    the number of seeds at each x (the optimum is ``analyze``'s)."""
    if not records:
        return []
    configs = [run_identity(with_defaults(r["config"])) for r in records]
    keys = sorted({k for c in configs for k in c})
    varying = [k for k in keys if k not in (axis, SEED_KEY) and len({repr(c.get(k)) for c in configs}) > 1]
    groups: dict[tuple[Any, ...], dict[float, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for r, config in zip(records, configs):
        setting = tuple(config.get(k) for k in varying)
        loss = r["final_val_loss"] if r["status"] == "completed" else None
        groups[setting][config[axis]].append(loss)
    out: list[Curve] = []
    for setting, by_x in sorted(groups.items(), key=lambda kv: tuple(map(repr, kv[0]))):
        xs = sorted(by_x)
        losses: list[float | None] = []
        spreads: list[float | None] = []
        for x in xs:
            runs = [v for v in by_x[x] if v is not None and math.isfinite(v)]
            ok = len(runs) == len(by_x[x])
            losses.append(sum(runs) / len(runs) if ok else None)
            spreads.append(max(runs) - min(runs) if ok and len(runs) > 1 else None)  # across seeds: a point's noise
        labelled = dict(zip(varying, setting))
        out.append({"setting": labelled, "label": setting_label(labelled), "log2_x": [math.log2(x) for x in xs],
                    "loss": losses, "seed_spread": spreads, "seeds": max(len(v) for v in by_x.values()),
                    "seeds_at": [len(by_x[x]) for x in xs], "seed_losses": [by_x[x] for x in xs], "optimum": None})
    return out


def pooled_noise(found: Sequence[Curve]) -> Noise:
    """The per-run noise of a store: |differences| between the seeds of each point within ``WINDOW`` of its curve's
    minimum (where the optimum is read; the high-LR cliff's much larger differences stay out), or the default."""
    differences = []
    for c in found:
        finite = [y for y in c["loss"] if y is not None]
        if not finite:
            continue
        floor = min(finite)
        for y, runs in zip(c["loss"], c["seed_losses"]):
            if y is not None and y <= floor + WINDOW:
                differences += [abs(a - b) for k, a in enumerate(runs) for b in runs[k + 1:]
                                if a is not None and b is not None]  # all are: y is not None
    return Noise.pooled(differences)


def _linked(found: list[Curve]) -> bool:
    """Whether density and width vary together, one width per density (an iso-parameter sweep)."""
    pairs = {(c["setting"].get("model.density"), c["setting"].get("model.width")) for c in found}
    densities, widths = {d for d, _ in pairs}, {w for _, w in pairs}
    return None not in densities and None not in widths and len(pairs) == len(densities) == len(widths) > 1


def _drifts(found: list[Curve], fits: dict[int, CurveEstimate], along: str,
            linked: str | None = None) -> list[Drift]:
    """Groups of settings that differ only in ``along`` (and ``linked``, set with it): per member the regret of the
    reference's optimum and the shift of its own, with intervals; the drift of the located optima."""
    groups: dict[tuple[tuple[str, str], ...], list[int]] = defaultdict(list)
    for n, c in enumerate(found):
        if along in c["setting"]:
            rest = tuple((k, repr(v)) for k, v in c["setting"].items() if k not in (along, linked))
            groups[rest].append(n)
    out: list[Drift] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda n: found[n]["setting"][along], reverse=along == "model.density")
        reference = fits.get(members[0])  # REFERENCE[along]: where the HPs are tuned
        rows: list[dict[str, Any]] = []  # keyed by ``along`` (and ``linked``): no fixed keys
        for n in members:
            c, o = found[n], found[n]["optimum"]
            moved: TransferCost | dict[str, None] = (transfer(reference, fits[n]) if reference is not None and n in fits
                                                      else {})
            rows.append({along: c["setting"][along], **({linked: c["setting"][linked]} if linked else {}),
                         "best_log2_x": None if o is None else o["log2_x"],
                         "best_loss": None if o is None else o["loss"], "edge": None if o is None else o["edge"],
                         "flat": o is not None and o["flat"], "interval": None if o is None else o["interval"],
                         "se": None if o is None else o["se"],
                         "loss_at_transferred": moved.get("loss_at_reference"), "regret": moved.get("regret"),
                         "regret_interval": moved.get("regret_interval"), "regret_se": moved.get("regret_se"),
                         "shift": moved.get("shift"), "shift_interval": moved.get("shift_interval"),
                         "seed_spread": c["seed_spread"][0] if len(c["seed_spread"]) == 1 else None})
        located = [r["best_log2_x"] for r in rows if r["best_log2_x"] is not None and not r["flat"]]
        regrets = [r for r in rows[1:] if r["regret"] is not None]
        worst = max(regrets, key=lambda r: r["regret"]) if regrets else None
        rest_setting = {k: v for k, v in found[members[0]]["setting"].items() if k not in (along, linked)}
        ref_opt = found[members[0]]["optimum"]
        out.append({"along": along, "setting": rest_setting, "label": setting_label(rest_setting), "rows": rows,
                    "transferred_log2_x": None if ref_opt is None else ref_opt["log2_x"],
                    "worst_regret": None if worst is None else {
                        along: worst[along], "regret": worst["regret"], "interval": worst["regret_interval"]},
                    "drift_log2": max(located) - min(located) if len(located) >= 2 else None,
                    "edge_involved": any(r["best_log2_x"] is None or r["edge"] for r in rows),
                    "flat": [r[along] for r in rows if r["flat"]]})
    return out


def analyze(records: Sequence[RunRecord], axis: str = "optim.lr", noise: Noise | None = None) -> Analysis:
    """Curves, optima (with intervals), regret and drift tables of a sweep's records (JSON-serialisable).

    ``noise``: one run's loss noise; by default pooled from the records' seed pairs (``pooled_noise``)."""
    found = curves(records, axis)
    noise = noise or pooled_noise(found)
    rng = np.random.default_rng(SEED)
    fits: dict[int, CurveEstimate] = {}
    for n, c in enumerate(found):
        fitted = estimate(c["log2_x"], c["loss"], c["seeds_at"], noise, rng)
        if fitted is not None:
            fits[n] = fitted
        c["optimum"] = None if fitted is None else fitted.optimum
    drifts = (_drifts(found, fits, "model.density", "model.width") if _linked(found)
              else [d for along in DRIFT_AXES for d in _drifts(found, fits, along)])
    return {"axis": axis, "runs": len(records), "diverged": sum(r["status"] == "diverged" for r in records),
            "noise": noise.as_dict(),
            "regret": [{"setting": d["setting"], "along": d["along"], **(d["worst_regret"] or {}),
                        "drift_log2": d["drift_log2"]} for d in drifts],
            "curves": found, "drifts": drifts}
