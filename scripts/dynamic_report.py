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
from sparsemup.core.rules import Multipliers, Role, init_std
from sparsemup.core.structure import match
from sparsemup.models.gpt import GPTConfig, gpt_init_scale
from sparsemup.tuning.analysis import analyze
from sparsemup.tuning.report import load_records, optimum_cell, plot_curves, tables, with_interval

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
    """One table: what keeping the dense LR costs (regret), the signed shift of the optimum from ρ = 1 to 1/16
    (negative: sparser wants a lower LR, the paper's over-correction), the optima and their drift."""
    lines = ["| method | scheme | regret at the dense LR, 1/4; 1/16 (nats) [95 %] | shift 1 → 1/16 [95 %] "
             "| ρ=1 | 1/4 | 1/16 | drift |", "|---|---|---|---|---|---|---|---|"]
    found: dict[str, Any] = {}
    for method in METHODS:
        for scheme in SCHEMES:
            drift = next((d for d in result["drifts"] if d["setting"].get("sparsity.method") == method
                          and d["setting"].get("model.scheme") == scheme), None)
            if drift is None:
                continue
            rows = {r["model.density"]: r for r in drift["rows"]}
            sparse = rows.get(0.0625)
            regrets = "; ".join(with_interval(rows[rho]["regret"], rows[rho]["regret_interval"], ".3f") if rho in rows
                                else "—" for rho in (0.25, 0.0625))
            shift = ("—" if sparse is None or sparse["flat"]
                     else with_interval(sparse["shift"], sparse["shift_interval"], "+.2f"))
            edge = "≥ " if drift["edge_involved"] else ""
            moved = "—" if drift["drift_log2"] is None else f"{edge}{drift['drift_log2']:.2f}"
            optima = " | ".join(optimum_cell(rows[rho]) if rho in rows else "—" for rho in DENSITIES)
            lines.append(f"| {method} | {scheme} | {regrets} | {shift} | {optima} | {moved} |")
            found[f"{method}/{scheme}"] = {"rows": drift["rows"], "drift_log2": drift["drift_log2"],
                                           "edge_involved": drift["edge_involved"], "flat": drift["flat"],
                                           "shift_1_to_1_16": None if sparse is None else sparse["shift"],
                                           "shift_1_to_1_16_interval": None if sparse is None
                                           else sparse["shift_interval"]}
    return "\n".join(lines) + "\n", found


def layer_supar_std(config: dict[str, Any], name: str, density: float) -> float:
    """The init std SµPar gives hidden weight ``name`` of the reference GPT at ``density``, with the init factor the
    layer really got (GPT-2's 1/√(2·depth) on the residual projections attn.proj and mlp.proj)."""
    def fan_in(width: int) -> int:  # the residual FFN projection reads the FFN's hidden units, the rest the width
        shape = GPTConfig(width=width, head_dim=config["model.head_dim"],
                          ffn_multiple=config["model.block_size"] if config["model.mask_kind"] == "blocks" else 8)
        return shape.ffn_hidden if name.endswith("mlp.proj.weight") else width

    m = Multipliers(width=fan_in(config["model.width"]) / fan_in(config["model.base_width"]),
                    density=density / config["model.base_density"])
    pattern = match(gpt_init_scale(config["model.depth"]), (name,))
    factor = gpt_init_scale(config["model.depth"])[pattern] if pattern is not None else 1.0
    return init_std(Role.HIDDEN, "supar", m, config["model.init_std"]) * factor


def layer_ratios(record: dict[str, Any]) -> dict[str, float]:
    """Per hidden weight, kept RMS over ``layer_supar_std``: as stored by runs after the trainer's fix
    (``rms_over_layer_supar_std``), else recomputed from the stored RMS. A record's old ratio (``rms_over_supar_std``,
    no depth factor) is checked to be the stored RMS over the factor-free std before it is replaced."""
    out = {}
    for name, s in record["kept_weights"].items():
        if "rms_over_layer_supar_std" in s:
            out[name] = s["rms_over_layer_supar_std"]
            continue
        std = layer_supar_std(record["config"], name, s["density"])
        factor_free = std / (gpt_init_scale(record["config"]["model.depth"]).get(
            match(gpt_init_scale(record["config"]["model.depth"]), (name,)) or "", 1.0))
        if not math.isclose(s["rms"] / s["rms_over_supar_std"], factor_free, rel_tol=1e-6):
            raise ValueError(f"{record['id']} {name}: stored ratio implies std {s['rms'] / s['rms_over_supar_std']}, "
                             f"not {factor_free}")
        out[name] = s["rms"] / std
    return out


def kept_table(records: list[dict[str, Any]], result: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Mean over hidden layers (and range) of the kept weights' RMS over the init std SµPar gives each layer
    (``layer_supar_std``; beside it the stored ratio without the depth factor, where a record has one) and their excess
    kurtosis, at 2⁻⁷ and at each curve's best grid LR."""
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
        ratio = list(layer_ratios(r).values())
        old = [s["rms_over_supar_std"] for s in r["kept_weights"].values() if "rms_over_supar_std" in s]
        kurt = [s["excess_kurtosis"] for s in r["kept_weights"].values()]
        rows.append({"method": key[0], "scheme": key[1], "density": key[2], "lr": lr, "at": at,
                     "final_val_loss": r["final_val_loss"],
                     "rms_over_layer_supar_std": statistics.fmean(ratio), "rms_range": [min(ratio), max(ratio)],
                     "old_rms_over_supar_std": statistics.fmean(old) if old else None,
                     "excess_kurtosis": statistics.fmean(kurt), "kurtosis_range": [min(kurt), max(kurt)],
                     "per_layer": r["kept_weights"]})
    rows.sort(key=lambda x: (x["at"] != "2⁻⁷", METHODS.index(x["method"]), x["scheme"], -x["density"]))
    lines = ["| at LR | method | scheme | ρ | log2 LR | RMS / layer's SµPar std: mean (range) | old ratio, no depth "
             "factor: mean | excess kurtosis: mean (range) |",
             "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        old_mean = "—" if x["old_rms_over_supar_std"] is None else f"{x['old_rms_over_supar_std']:.2f}"
        lines.append(f"| {x['at']} | {x['method']} | {x['scheme']} | {x['density']:g} | {math.log2(x['lr']):.0f} | "
                     f"{x['rms_over_layer_supar_std']:.2f} ({x['rms_range'][0]:.2f}–{x['rms_range'][1]:.2f}) | "
                     f"{old_mean} | "
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
            "What keeping the dense optimum costs (regret: loss at the dense LR − best, 95 % interval), the shift of "
            "the optimum from ρ = 1 to 1/16 (negative: sparser wants a lower LR), and the optima (± standard error; "
            "flat: no optimum within noise; ≥/≤: on the grid's edge) with the drift of the located ones "
            "(sparsemup.tuning.estimate):", "", head,
            "Kept weights at the end (hidden layers): RMS over the init std SµPar gives the layer at its final "
            "density, σ_base/√(m_d·m_ρ) times the layer's own init factor (1/√(2·depth) on attn.proj and mlp.proj), "
            "beside the stored ratio that left that factor out; and excess kurtosis (0 for a Gaussian):", "", kept,
            "All curves:", "", tables(result), ""]
    body += [f"![{p.stem}]({p.name})" for p in figures]
    write_text_atomic(args.dynamic / "report.md", "\n".join(body) + "\n")
    write_json_atomic(args.dynamic / "report.json", {"summary": found, "kept_weights": kept_rows, **result})
    print(head)
    print(kept)
    print(f"wrote {args.dynamic / 'report.md'}, {args.dynamic / 'report.json'}, " + ", ".join(map(str, figures)))


if __name__ == "__main__":
    main()
