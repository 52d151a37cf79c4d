"""Base tuning at equal budgets: the random search against Optuna's TPE and CMA-ES (docs/RESULTS.md).

For each search store and each budget n, the best final validation loss among its first n trials
(trial order, training seed 0) and that trial's setting; then every pick is trained again on fresh
training seeds (a sweep into --out, resumable), because an adaptive sampler that exploits one
seed's noise looks better on seed 0 than it is. Writes --out/compare.md and compare.json.
Run from the repository root (after the three sweeps of docs/RESULTS.md):
    python scripts/search_compare.py
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from sparsemup.train.config import tomllib
from sparsemup.tuning.store import STORE_NAME, ResultStore
from sparsemup.tuning.sweep import load_sweep, parse_sweep, run_sweep

KEYS = ("optim.lr", "model.init_std", "model.input_alpha", "model.output_alpha")


def trials_in_order(store_dir: Path, plan: Path) -> list[dict[str, Any]]:
    """The store's records in trial order: a record's ``trial`` field, else its place in the sweep file's plan."""
    records = ResultStore(store_dir / STORE_NAME).records
    order = {point.id: n for n, point in enumerate(load_sweep(plan).points)}
    ranked = sorted(records.values(), key=lambda r: r.get("trial", order.get(r["id"], math.inf)))
    return [r for r in ranked if "trial" in r or r["id"] in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search", nargs=3, action="append", metavar=("NAME", "DIR", "SWEEP_FILE"),
                        help="a search store and the sweep file that made it (default: random, tpe and cmaes of "
                        "docs/RESULTS.md)")
    parser.add_argument("--budgets", default="30,60,130")
    parser.add_argument("--seeds", default="1,2", help="fresh training seeds of the re-evaluation")
    parser.add_argument("--out", type=Path, default=Path("results/tune-search-check"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    searches = args.search or [[name, f"results/{d}", f"experiments/{d}.toml"] for name, d in
                               (("random", "tune-base"), ("tpe", "tune-base-tpe"), ("cmaes", "tune-base-cmaes"))]
    budgets = [int(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    rows, picks = [], {}
    for name, store_dir, plan in searches:
        trials = trials_in_order(Path(store_dir), Path(plan))
        for n in budgets:
            if len(trials) < n:
                raise SystemExit(f"{store_dir} holds {len(trials)} trials, fewer than the budget {n}: run its sweep")
            done = [t for t in trials[:n] if t["final_val_loss"] is not None]
            best = min(done, key=lambda t: t["final_val_loss"])
            pick = tuple(best["overrides"][k] for k in KEYS)
            picks[pick] = None
            rows.append({"search": name, "budget": n, "best_loss": best["final_val_loss"],
                         "trial": trials.index(best) + 1,
                         "diverged": n - len(done), **dict(zip(KEYS, pick))})

    base_file = Path(searches[0][2])
    base = tomllib.loads(base_file.read_text())["base"]
    check = parse_sweep({"base": base, "grid": {",".join(KEYS): [list(p) for p in picks], "train.seed": seeds}},
                        "search_compare re-evaluation", base_file.parent)
    run_sweep(check, args.out, workers=args.workers)
    fresh = ResultStore(args.out / STORE_NAME).records.values()
    for row in rows:
        losses = [r["final_val_loss"] for r in fresh
                  if all(r["overrides"][k] == row[k] for k in KEYS) and r["overrides"]["train.seed"] in seeds]
        row["fresh_losses"] = losses
        row["fresh_mean"] = statistics.fmean(losses) if len(losses) == len(seeds) and None not in losses else None

    lines = ["| search | trials | best loss found (seed 0) | at trial | log2 lr | σ_base | α_input | α_output | "
             f"re-evaluated, seeds {', '.join(map(str, seeds))} | mean |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fresh_text = " / ".join(f"{v:.4f}" for v in r["fresh_losses"])
        mean = "—" if r["fresh_mean"] is None else f"{r['fresh_mean']:.4f}"
        lines.append(f"| {r['search']} | {r['budget']} | {r['best_loss']:.4f} | {r['trial']} | "
                     f"{math.log2(r['optim.lr']):.2f} | {r['model.init_std']:.4f} | {r['model.input_alpha']:.3f} | "
                     f"{r['model.output_alpha']:.3f} | {fresh_text} | {mean} |")
    table = "\n".join(lines)
    (args.out / "compare.md").write_text(f"# Base tuning at equal budgets\n\n{table}\n")
    (args.out / "compare.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
