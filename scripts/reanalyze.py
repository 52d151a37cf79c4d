"""Every store behind docs/RESULTS.md, DYNAMIC.md and MODELS.md re-read with the one estimator
(sparsemup.tuning.estimate): the old reading (parabola through the grid minimum and its two neighbours; loss at the
transferred value by linear interpolation minus the fitted best) beside the new one (optima with intervals and flat
flags, the transfer regret and the signed shift), run times per run and per throughput, and (f)'s kept-weight
ratios against the init std each layer got. Writes docs/REANALYSIS.md, and regenerates each store's committed report
(report.md, report.json, figures; (f)'s through scripts/dynamic_report.py). Run from the repository root:

    python scripts/reanalyze.py      # ≈ 1 min
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from dynamic_report import combined, kept_table

from sparsemup.core.atomic import write_text_atomic
from sparsemup.tuning.analysis import analyze
from sparsemup.tuning.estimate import point_estimate
from sparsemup.tuning.report import merge_records, optimum_cell, with_interval, write_report

R = Path("results")
# (label, stores merged, axis): the readings compared; "+" merges stores as `sparsemup report A --with B` does.
READINGS = [
    ("(a) seed 0", ["a-lr-density"], "optim.lr"),
    ("(a) seed 1", ["a-lr-density-seed1"], "optim.lr"),
    ("(a) both seeds", ["a-lr-density-seed1", "a-lr-density"], "optim.lr"),
    ("(a′) untuned", ["a-lr-density-untuned"], "optim.lr"),
    ("(a′-hf) Llama", ["hf-llama-lr-density"], "optim.lr"),
    ("(b) init std", ["b-init-density"], "model.init_std"),
    ("(d) iso-parameter, H100", ["d-iso-parameter-gpu"], "optim.lr"),
    ("(d) iso-parameter, CPU", ["d-iso-parameter"], "optim.lr"),
    ("(e) ablation + (a)", ["e-ablation", "a-lr-density"], "optim.lr"),
]
# The committed reports, regenerated as the docs' commands write them: (store, --with stores, axis).
REPORTS = [("a-lr-density", [], "optim.lr"), ("a-lr-density-seed1", ["a-lr-density"], "optim.lr"),
           ("a-lr-density-untuned", [], "optim.lr"), ("hf-llama-lr-density", [], "optim.lr"),
           ("b-init-density", [], "model.init_std"), ("c-loss-density", [], "optim.lr"),
           ("d-iso-parameter-gpu", [], "optim.lr"), ("d-iso-parameter", [], "optim.lr"),
           ("e-ablation", ["a-lr-density"], "optim.lr")]
# Stores whose run times the docs quote: (store, runs at a time when they ran).
TIMED = [("a-lr-density", 2), ("a-lr-density-seed1", 8), ("a-lr-density-untuned", 2), ("b-init-density", 2),
         ("c-loss-density", 2), ("d-iso-parameter", 2), ("d-iso-parameter-gpu", 8), ("e-ablation", None),
         ("f-dynamic", 2), ("f-static-kept", 2), ("hf-llama-lr-density", 2)]


def old_reading(drift: dict[str, Any], curves: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The estimator before issue 27 on one drift group: three-point parabola optima, max − min drift, and the gap
    (linear interpolation at the reference's optimum minus the fitted best)."""
    along = drift["along"]
    optima, gaps = [], []
    reference = None
    for row in drift["rows"]:
        c = curves[_key(drift, row)]
        o = point_estimate(c["log2_x"], c["loss"], window=0)
        optima.append(o)
        if reference is None:
            reference = None if o is None else o["log2_x"]
        at = None if reference is None else _linear(c, reference)
        gaps.append(None if o is None or at is None else at - o["loss"])
    fitted = [o["log2_x"] for o in optima if o is not None]
    return {"rows": [{along: r[along], "optimum": o, "gap": g} for r, o, g in zip(drift["rows"], optima, gaps)],
            "drift": max(fitted) - min(fitted) if len(fitted) > 1 else None,
            "edge": any(o is None or o["edge"] for o in optima)}


def _key(drift: dict[str, Any], row: dict[str, Any]) -> str:
    setting = {**drift["setting"], drift["along"]: row[drift["along"]]}
    if "model.width" in row and drift["along"] != "model.width":
        setting["model.width"] = row["model.width"]
    return repr(sorted(setting.items()))


def _linear(curve: dict[str, Any], x: float) -> float | None:
    xs, ys = curve["log2_x"], curve["loss"]
    for (xa, ya), (xb, yb) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if xa <= x <= xb:
            if ya is None or yb is None:
                return ya if x == xa else yb if x == xb else None
            return ya + (yb - ya) * (x - xa) / (xb - xa)
    return None


def _opt_old(o: dict[str, Any] | None) -> str:
    if o is None:
        return "—"
    return (f"{'≥' if o['edge'] == 'high' else '≤'} {o['log2_x']:.2f}" if o["edge"] else f"{o['log2_x']:.2f}")


def _drift(value: float | None, edge: bool) -> str:
    return "—" if value is None else ("≥ " if edge else "") + f"{value:.2f}"


def reading_tables(label: str, result: dict[str, Any]) -> list[str]:
    """Per drift group: old | new drift and worst regret, then per density old | new optimum, gap | regret, shift."""
    curves = {repr(sorted(c["setting"].items())): c for c in result["curves"]}
    axis = result["axis"].split(".")[-1]
    n = result["noise"]
    lines = [f"### {label}", "", f"Per-run noise: median seed difference {n['pair_median']:.4f} nats "
             f"({n['source']}). Log2 {axis}; old: three-point parabola, gap by linear interpolation; new: "
             "estimate.py (± standard error, [95 % interval]).", ""]
    for d in result["drifts"]:
        old = old_reading(d, curves)
        along = d["along"].split(".")[-1]
        worst_old = max((r["gap"] for r in old["rows"][1:] if r["gap"] is not None), default=None)
        worst = d["worst_regret"] or {}
        lines += [f"**{d['label'] or 'all'}** across {along}: drift old {_drift(old['drift'], old['edge'])} | new "
                  f"{_drift(d['drift_log2'], d['edge_involved'])}"
                  + (f" (flat, left out: {', '.join(format(v, 'g') for v in d['flat'])})" if d["flat"] else "")
                  + f"; worst cost of the reference's value: old gap "
                  f"{'—' if worst_old is None else format(worst_old, '.3f')}"
                  f" | new regret {with_interval(worst.get('regret'), worst.get('interval'), '.3f')}", "",
                  f"| {along} | optimum old | optimum new | gap old | regret new | shift new |",
                  "|---|---|---|---|---|---|"]
        for k, (r, o) in enumerate(zip(d["rows"], old["rows"])):
            value = f"{r[d['along']]:g}" + (f" (w {r['model.width']})" if "model.width" in r
                                             and d["along"] != "model.width" else "")
            lines.append(f"| {value} | {_opt_old(o['optimum'])} | {optimum_cell(r)} | "
                         + ("reference | reference | 0 |" if k == 0 else
                            f"{'—' if o['gap'] is None else format(o['gap'], '.3f')} | "
                            f"{with_interval(r['regret'], r['regret_interval'], '.3f')} | "
                            f"{'—' if r['flat'] else with_interval(r['shift'], r['shift_interval'], '+.2f')} |"))
        lines.append("")
    return lines


def times() -> list[str]:
    """Median wall time of a run per store (per device where a store mixes them), and per throughput."""
    lines = ["| store | device | runs | median s a run | runs at a time | s per run of throughput |",
             "|---|---|---|---|---|---|"]
    for store, parallel in TIMED:
        records, _ = merge_records([R / store])
        by_device: dict[str, list[float]] = {}
        for r in records:
            if r.get("seconds"):
                by_device.setdefault(r.get("device") or "cpu (unrecorded)", []).append(r["seconds"])
        for device, secs in sorted(by_device.items()):
            at_once = parallel or (8 if device == "cuda" else 2)
            median = statistics.median(secs)
            lines.append(f"| {store} | {device} | {len(secs)} | {_seconds(median)} | {at_once} | "
                         f"{_seconds(median / at_once)} |")
    return lines


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def main() -> None:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    body = ["# Re-analysis of the stores with the one estimator (issue 27)", "",
            "Generated by `python scripts/reanalyze.py` (no training: the committed stores re-read; the machine that "
            f"read them: {model}). The estimator, its choice and its test: docs/SWEEPS.md, \"How optima are "
            "estimated\". Old: the parabola through the grid minimum and its two neighbours, the cost of the "
            "transferred value as the loss by linear interpolation minus the fitted best. New: a least-squares "
            "quadratic over the points within 0.1 nats of the minimum, intervals from a parametric bootstrap with "
            "the stores' heavy-tailed per-run noise, flat curves flagged and left out of the drift, the regret "
            "(loss at the reference's optimum from the same quadratic, minus the best) and the signed shift.", "",
            "## Optima, drift, regret and shift", ""]
    for label, stores, axis in READINGS:
        records, _ = merge_records([R / s for s in stores])
        body += reading_tables(label, analyze(records, axis))
    body += ["### (f) dynamic sparsity, with (a)'s static runs (scripts/dynamic_report.py)", ""]
    f_result = analyze(combined(R / "f-dynamic", R / "a-lr-density"))
    body += reading_tables("(f) GMP, RigL and static", f_result)[2:]
    kept_records = merge_records([R / "f-dynamic"])[0] + merge_records([R / "f-static-kept"])[0]
    kept, rows = kept_table(kept_records, f_result)
    body += ["## (f): kept-weight RMS over the init std each layer got", "",
             "The stored ratio (`rms_over_supar_std`) divided the kept RMS by σ_base/√(m_d·m_ρ), without the "
             "1/√(2·depth) = 1/2 the residual projections attn.proj and mlp.proj got at init; recomputed from the "
             "stored RMS (each stored ratio is checked to be RMS over the factor-free std first). New runs store the "
             "corrected ratio as `rms_over_layer_supar_std`.", "", kept,
             "## Run times: per run and per throughput", "",
             "A run's wall time (`seconds` in its record) with others running beside it; per run of throughput: "
             "that divided by the runs at a time (2 on the CPU's 2 cores, 8 on the H100, as the docs state).", "",
             *times(), ""]
    write_text_atomic(Path("docs/REANALYSIS.md"), "\n".join(body) + "\n")
    for store, merge, axis in REPORTS:
        write_report(R / store, axis=axis, merge=[R / m for m in merge])
    subprocess.run([sys.executable, "scripts/dynamic_report.py"], check=True, capture_output=True)
    print(f"wrote docs/REANALYSIS.md and the reports of {len(REPORTS) + 1} stores ({len(rows)} kept-weight rows)")


if __name__ == "__main__":
    main()
