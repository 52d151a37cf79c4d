"""The Ray engine's overhead against the local process pool on the demo's LR × density sweep, side by side.

Runs the demo's 36-run sweep (``sparsemup.tuning.demo.DemoPlan``) twice into fresh directories, with the
local engine then the Ray engine (a private instance, started and stopped inside the timing), the same
``--workers``; prints both wall times, their ratio, whether the records agree bitwise, and ``lscpu``.

    python scripts/ray_overhead.py --workers 2 --out /tmp/ray-overhead
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

from sparsemup.tuning.demo import DemoPlan
from sparsemup.tuning.sweep import parse_sweep, run_sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ray-overhead"))
    args = parser.parse_args()
    plan = DemoPlan()
    spec = parse_sweep({"base": plan.base, "grid": {
        "model.scheme": plan.schemes, "model.density": plan.densities,
        "optim.lr": [f"2**{k}" for k in plan.log2_lrs]}}, "demo")
    seconds, losses = {}, {}
    for engine in ("local", "ray"):
        out = args.out / engine
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        counts = run_sweep(spec, out, workers=args.workers, log=lambda s: None, engine=engine)
        seconds[engine] = time.perf_counter() - start
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        losses[engine] = {r["id"]: r["final_val_loss"] for r in records}
        print(f"{engine}: {counts.completed} runs completed in {seconds[engine]:.1f} s", flush=True)
    print(f"ray / local wall time: {seconds['ray'] / seconds['local']:.3f} "
          f"(+{seconds['ray'] - seconds['local']:.1f} s over {len(spec.points)} runs); "
          f"records bitwise equal: {losses['ray'] == losses['local']}")
    print(subprocess.run(["lscpu"], capture_output=True, text=True).stdout)


if __name__ == "__main__":
    main()
