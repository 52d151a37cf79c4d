"""Analysis of a sweep's records: loss curves per setting, fitted optima, their drift, and transfer losses.

A *setting* is one value of every swept key except the x axis (η_base by default) and the seed;
losses are averaged over seeds before the optimum is fitted (an x where any seed diverged counts
as diverged). The optimum is the vertex of a parabola in log2 x through the grid minimum and its
two neighbours (kept within half a step of the grid minimum; no fit when the neighbours' spacings differ by
more than 2×); a minimum on the grid's edge or next to a diverged point is reported as an edge, not fitted.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..train.schema import run_identity, with_defaults

__all__ = ["fit_optimum", "curves", "analyze", "setting_label"]

SEED_KEY = "train.seed"
# Keys along which the optimum should not move; each gets a drift table when it varies (one table when
# width is set with density, as in an iso-parameter sweep).
DRIFT_AXES = ("model.density", "model.width")


def fit_optimum(xs: Sequence[float], losses: Sequence[float | None]) -> dict[str, Any] | None:
    """Best log2 x of one curve: ``{"log2_x", "loss", "edge"}`` with edge None, "low" or "high"; None if all diverged.

    ``xs`` are log2 values in increasing order; a None or non-finite loss is a diverged point and is excluded.
    """
    finite = [y is not None and math.isfinite(y) for y in losses]
    if not any(finite):
        return None
    ys = [y if ok and y is not None else math.inf for y, ok in zip(losses, finite)]  # floats: read only where finite
    i = min((k for k in range(len(xs)) if finite[k]), key=lambda k: ys[k])
    if i == 0 or not finite[i - 1]:  # first grid point, or next to a diverged one: the optimum may lie beyond
        return {"log2_x": xs[i], "loss": ys[i], "edge": "low"}
    if i == len(xs) - 1 or not finite[i + 1]:
        return {"log2_x": xs[i], "loss": ys[i], "edge": "high"}
    (x0, y0), (x1, y1), (x2, y2) = ((xs[k], ys[k]) for k in (i - 1, i, i + 1))
    if not 0.5 <= (x2 - x1) / (x1 - x0) <= 2:  # very uneven grid: no fit
        return {"log2_x": x1, "loss": y1, "edge": None}
    # Parabola through three points (Lagrange form); the vertex lies between x0 and x2 when y1 is the minimum.
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a <= 0:  # flat: no curvature to fit, keep the grid point
        return {"log2_x": x1, "loss": y1, "edge": None}
    vertex = min(max(-b / (2 * a), (x0 + x1) / 2), (x1 + x2) / 2)  # within half a step of x1
    c = y1 - a * x1 * x1 - b * x1
    return {"log2_x": vertex, "loss": a * vertex * vertex + b * vertex + c, "edge": None}


def setting_label(setting: dict[str, Any]) -> str:
    """``key=value, ...`` with the last part of each key; floats in the shortest form (0.5, 1)."""
    return ", ".join(f"{k.split('.')[-1]}={v:g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                     for k, v in setting.items())


def curves(records: Sequence[dict[str, Any]], axis: str = "optim.lr") -> list[dict[str, Any]]:
    """One curve per setting: seed-averaged loss at each log2 x (None where any seed diverged), and its optimum."""
    if not records:
        return []
    records = [{**r, "config": run_identity(with_defaults(r["config"]))} for r in records]
    keys = sorted({k for r in records for k in r["config"]})
    varying = [k for k in keys if k not in (axis, SEED_KEY) and len({repr(r["config"].get(k)) for r in records}) > 1]
    groups: dict[tuple, dict[float, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        setting = tuple(r["config"].get(k) for k in varying)
        loss = r["final_val_loss"] if r["status"] == "completed" else None
        groups[setting][r["config"][axis]].append(loss)
    out = []
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
                    "optimum": fit_optimum([math.log2(x) for x in xs], losses)})
    return out


def _interpolate(curve: dict[str, Any], x: float) -> float | None:
    """Seed-averaged loss at log2 x, linear between grid points; None when a neighbour diverged or x is outside."""
    xs, ys = curve["log2_x"], curve["loss"]
    for (xa, ya), (xb, yb) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if xa <= x <= xb:
            if ya is None or yb is None:
                return ya if x == xa else yb if x == xb else None
            return ya + (yb - ya) * (x - xa) / (xb - xa)
    return ys[0] if len(xs) == 1 and xs[0] == x else None


def _linked(found: list[dict[str, Any]]) -> bool:
    """Whether density and width vary together, one width per density (an iso-parameter sweep)."""
    pairs = {(c["setting"].get("model.density"), c["setting"].get("model.width")) for c in found}
    densities, widths = {d for d, _ in pairs}, {w for _, w in pairs}
    return None not in densities and None not in widths and len(pairs) == len(densities) == len(widths) > 1


def _drifts(found: list[dict[str, Any]], along: str, linked: str | None = None) -> list[dict[str, Any]]:
    """Groups of settings that differ only in ``along`` (and ``linked``, set with it): optima spread, transfer."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in found:
        if along in c["setting"]:
            rest = tuple((k, repr(v)) for k, v in c["setting"].items() if k not in (along, linked))
            groups[rest].append(c)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda c: c["setting"][along], reverse=along == "model.density")
        reference = members[0]  # densest (density) or narrowest (width): where the HPs are tuned
        optima = [c["optimum"] for c in members]
        fitted = [o["log2_x"] for o in optima if o is not None]
        ref_opt = reference["optimum"]
        rows = []
        for c in members:
            o = c["optimum"]
            at_ref = _interpolate(c, ref_opt["log2_x"]) if ref_opt is not None else None
            rows.append({along: c["setting"][along], **({linked: c["setting"][linked]} if linked else {}),
                         "best_log2_x": None if o is None else o["log2_x"],
                         "best_loss": None if o is None else o["loss"], "edge": None if o is None else o["edge"],
                         "loss_at_transferred": at_ref,
                         "transfer_gap": None if at_ref is None or o is None else at_ref - o["loss"],
                         "seed_spread": c["seed_spread"][0] if len(c["seed_spread"]) == 1 else None})
        rest_setting = {k: v for k, v in members[0]["setting"].items() if k not in (along, linked)}
        out.append({"along": along, "setting": rest_setting, "label": setting_label(rest_setting), "rows": rows,
                    "transferred_log2_x": None if ref_opt is None else ref_opt["log2_x"],
                    "drift_log2": max(fitted) - min(fitted) if len(fitted) >= 2 else None,
                    "edge_involved": any(o is None or o["edge"] for o in optima)})
    return out


def analyze(records: Sequence[dict[str, Any]], axis: str = "optim.lr") -> dict[str, Any]:
    """Curves, optima and drift tables of a sweep's records (JSON-serialisable)."""
    found = curves(records, axis)
    return {"axis": axis, "runs": len(records),
            "diverged": sum(r["status"] == "diverged" for r in records),
            "curves": found,
            "drifts": _drifts(found, "model.density", "model.width") if _linked(found)
            else [d for along in DRIFT_AXES for d in _drifts(found, along)]}
