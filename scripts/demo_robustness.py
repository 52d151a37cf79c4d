"""Can any seed pair or thread count flip the demo's verdict? Runs the demo's sweep (``sparsemup demo``'s defaults)
over seeds 0–3 with one thread per run, and over seeds 0–1 with two threads per run (another summation order, as
another CPU would have), then gives the verdict and its numbers for the seed pairs {0, 1}, {1, 2}, {2, 3} and for
{0, 1} at two threads. Both stores are resumable and committed; the table goes to docs/DEMO.md by hand.

    python scripts/demo_robustness.py [--out results/demo-robustness]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

from sparsemup.core.atomic import write_json_atomic
from sparsemup.tuning.analysis import analyze
from sparsemup.tuning.demo import DemoPlan, summarize, sweep_spec
from sparsemup.tuning.report import merge_records
from sparsemup.tuning.sweep import run_sweep


def cases() -> list[tuple[str, int, list[int]]]:
    """(store name, threads per run, seed pair) of every verdict asked for."""
    return [("threads1", 1, [0, 1]), ("threads1", 1, [1, 2]), ("threads1", 1, [2, 3]), ("threads2", 2, [0, 1])]


def one_line(summary: dict) -> dict:
    """The verdict and the numbers it rests on."""
    found = summary["verdict"]
    row = {"category": found["category"]}
    for name, scheme in (("supar", "supar"), ("sp", "sp")):
        worst = summary["schemes"][scheme]["worst_regret"] or {}
        row[f"{name}_worst_regret"] = worst.get("regret")
        row[f"{name}_worst_regret_interval"] = worst.get("interval")
        sparsest = f"{min(summary['densities']):g}"
        row[f"{name}_shift"] = (summary["schemes"][scheme]["shift_log2_by_density"].get(sparsest) or {}).get("shift")
    row["criteria"] = {k: v["met"] for k, v in found["criteria"].items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/demo-robustness"))
    args = parser.parse_args()
    seeds = {"threads1": [0, 1, 2, 3], "threads2": [0, 1]}
    for store, threads in (("threads1", 1), ("threads2", 2)):
        plan = DemoPlan(threads=threads)
        run_sweep(sweep_spec(plan, seeds[store]), args.out / store, workers=plan.workers)
    rows = []
    for store, threads, pair in cases():
        plan = DemoPlan(threads=threads, seed=pair[0])
        records, _ = merge_records([args.out / store])
        mine = [r for r in records if r["config"]["train.seed"] in pair]
        summary = summarize(analyze(mine, "optim.lr"), plan)
        rows.append({"store": store, "threads": threads, "seeds": pair, **one_line(summary)})
        print(json.dumps(rows[-1]))
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    write_json_atomic(args.out / "verdicts.json", {"rows": rows, "machine": platform.machine(), "lscpu": lscpu})


if __name__ == "__main__":
    main()
