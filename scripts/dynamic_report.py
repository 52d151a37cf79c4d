"""Experiment (f)'s report (docs/RESULTS.md, section (f)): best LR per density and its drift for static, GMP
and RigL masks under SP and SµPar, and the kept weights' statistics against SµPar's Gaussian.

The static curves are experiment (a)'s (results/a-lr-density); a dynamic method at density 1 is the static
dense run, so (a)'s dense runs are every method's ρ = 1 point. Kept-weight statistics come from the runs'
records: the dynamic runs of results/f-dynamic and the static reruns of results/f-static-kept.

    python scripts/dynamic_report.py   # results/f-dynamic/report.md, report.json, loss-vs-lr-{gmp,rigl,static}.png
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

from sparsemup.core.atomic import write_json_atomic, write_text_atomic
from sparsemup.tuning.analysis import analyze
from sparsemup.tuning.report import load_records, plot_curves, tables

SCHEMES = ("sp", "supar")
DENSITIES = (1.0, 0.25, 0.0625)
METHODS = ("static", "gmp", "rigl")
KEPT_LR = 2**-7


def combined(dynamic: Path, static: Path) -> list[dict[str, Any]]:
    """(f)'s records plus (a)'s static SP/SµPar runs at its densities, the dense ones also as each method's ρ = 1."""
    out = list(load_records(dynamic))
    for r in load_records(static):
        c = r["config"]
        if c["model.scheme"] not in SCHEMES or c["model.density"] not in DENSITIES:
            continue
        for method in ("static", "gmp", "rigl") if c["model.density"] == 1.0 else ("static",):
            out.append({**r, "config": {**c, "sparsity.method": method}})
    return out


def summary(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """One table: best log2 LR per density, drift, and the sign of the shift (over-correction: sparser lower)."""
    lines = ["| method | scheme | ρ=1 | 1/4 | 1/16 | drift | shift 1 → 1/16 | loss at dense LR − best, 1/4; 1/16 |",
             "|---|---|---|---|---|---|---|---|"]
    found: dict[str, Any] = {}
    for method in METHODS:
        for scheme in SCHEMES:
            drift = next((d for d in result["drifts"] if d["setting"].get("sparsity.method") == method
                          and d["setting"].get("model.scheme") == scheme), None)
            if drift is None:
                continue
            rows = {r["model.density"]: r for r in drift["rows"]}
            cells = []
            for rho in DENSITIES:
                r = rows.get(rho)
                if r is None or r["best_log2_x"] is None:
                    cells.append("—")
                else:
                    cells.append(("≥ " if r["edge"] == "high" else "≤ " if r["edge"] == "low" else "")
                                 + f"{r['best_log2_x']:.2f}")
            dense, sparse = rows.get(1.0), rows.get(0.0625)
            shift = (None if dense is None or sparse is None or None in (dense["best_log2_x"], sparse["best_log2_x"])
                     else sparse["best_log2_x"] - dense["best_log2_x"])
            gaps = [rows[rho]["transfer_gap"] if rho in rows else None for rho in (0.25, 0.0625)]
            edge = "≥ " if drift["edge_involved"] else ""
            lines.append(f"| {method} | {scheme} | " + " | ".join(cells)
                         + f" | {edge}{drift['drift_log2']:.2f} | "
                         + ("—" if shift is None else f"{shift:+.2f}") + " | "
                         + "; ".join("—" if g is None else f"{g:.3f}" for g in gaps) + " |")
            found[f"{method}/{scheme}"] = {"rows": drift["rows"], "drift_log2": drift["drift_log2"],
                                           "edge_involved": drift["edge_involved"], "shift_1_to_1_16": shift}
    return "\n".join(lines) + "\n", found


def _layer_kind(name: str) -> str:
    return name.split(".")[-2]  # qkv, proj, up / gate, down: the module's own name


def kept_table(records: list[dict[str, Any]], result: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Mean over hidden layers (and range) of the kept weights' RMS / SµPar's std and excess kurtosis, at 2⁻⁷
    and at each curve's best grid LR."""
    best_lr = {}
    for c in result["curves"]:
        points = [(y, x) for x, y in zip(c["log2_x"], c["loss"]) if y is not None]
        if points:
            best_lr[(c["setting"].get("sparsity.method"), c["setting"].get("model.scheme"),
                     c["setting"].get("model.density"))] = 2 ** min(points)[1]
    rows = []
    for r in records:
        if not r.get("kept_weights"):
            continue
        c = r["config"]
        key = (c.get("sparsity.method", "static"), c["model.scheme"], c["model.density"])
        lr = c["optim.lr"]
        at = "2⁻⁷" if math.isclose(lr, KEPT_LR) else "best" if math.isclose(lr, best_lr.get(key, -1)) else None
        if at is None:
            continue
        stats = r["kept_weights"].values()
        ratio = [s["rms_over_supar_std"] for s in stats]
        kurt = [s["excess_kurtosis"] for s in stats]
        rows.append({"method": key[0], "scheme": key[1], "density": key[2], "lr": lr, "at": at,
                     "final_val_loss": r["final_val_loss"],
                     "rms_over_supar_std": statistics.fmean(ratio), "rms_range": [min(ratio), max(ratio)],
                     "excess_kurtosis": statistics.fmean(kurt), "kurtosis_range": [min(kurt), max(kurt)],
                     "per_layer": r["kept_weights"]})
    rows.sort(key=lambda x: (x["at"] != "2⁻⁷", METHODS.index(x["method"]), x["scheme"], -x["density"]))
    lines = ["| at LR | method | scheme | ρ | log2 LR | RMS / σ_SµPar(ρ): mean (range) "
             "| excess kurtosis: mean (range) |",
             "|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['at']} | {x['method']} | {x['scheme']} | {x['density']:g} | {math.log2(x['lr']):.0f} | "
                     f"{x['rms_over_supar_std']:.2f} ({x['rms_range'][0]:.2f}–{x['rms_range'][1]:.2f}) | "
                     f"{x['excess_kurtosis']:+.2f} ({x['kurtosis_range'][0]:+.2f}–{x['kurtosis_range'][1]:+.2f}) |")
    return "\n".join(lines) + "\n", rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dynamic", type=Path, default=Path("results/f-dynamic"))
    parser.add_argument("--static", type=Path, default=Path("results/a-lr-density"))
    parser.add_argument("--static-kept", type=Path, default=Path("results/f-static-kept"))
    args = parser.parse_args()
    records = combined(args.dynamic, args.static)
    result = analyze(records)
    head, found = summary(result)
    kept_records = list(load_records(args.dynamic))
    if (args.static_kept / "results.jsonl").exists():
        kept_records += load_records(args.static_kept)
    kept, kept_rows = kept_table(kept_records, result)
    # One figure per method, in the order of the curves (plot_curves groups them so): named after it.
    methods = list(dict.fromkeys(c["setting"]["sparsity.method"] for c in result["curves"]))
    figures = []
    for method, path in zip(methods, plot_curves(result, args.dynamic), strict=True):
        figures.append(path.replace(path.with_name(f"loss-vs-lr-{method}.png")))
    body = ["# Experiment (f): dynamic sparsity, LR × density (scripts/dynamic_report.py)", "",
            f"Runs: {len(load_records(args.dynamic))} dynamic (results/f-dynamic) with the static SP/SµPar runs of "
            f"{args.static} at ρ = 1, 1/4, 1/16 (ρ = 1 shared by every method).", "",
            "Best log2 LR (quadratic fit around the grid minimum; ≥/≤: on the grid's edge), drift across densities, "
            "shift of the optimum from ρ = 1 to 1/16 (negative: sparser wants a lower LR), and the loss lost by "
            "keeping the dense optimum:", "", head,
            "Kept weights at the end (hidden layers): RMS over the init std SµPar gives the layer at its final "
            "density (σ_base/√(m_d·m_ρ)), and excess kurtosis (0 for a Gaussian):", "", kept,
            "All curves:", "", tables(result), ""]
    body += [f"![{p.stem}]({p.name})" for p in figures]
    write_text_atomic(args.dynamic / "report.md", "\n".join(body) + "\n")
    write_json_atomic(args.dynamic / "report.json", {"summary": found, "kept_weights": kept_rows, **result})
    print(head)
    print(kept)
    print(f"wrote {args.dynamic / 'report.md'}, {args.dynamic / 'report.json'}, " + ", ".join(map(str, figures)))


if __name__ == "__main__":
    main()
