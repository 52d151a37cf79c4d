"""How far apart two sweep stores' losses are for the same runs, beside the seed-to-seed spread.

Runs pair up by id (same swept keys and values: same config, seed, masks and batches) and by full
config; the typical use is the same sweep run on the CPU and on a GPU (docs/RESULTS.md, "Runs on a
GPU"). With --seeds, also the difference between seeds 0 and 1 of the same setting in one store,
the noise any conclusion must clear. Run from the repository root:
    python scripts/compare_stores.py results/d-iso-parameter results/d-iso-parameter-gpu --seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sparsemup.tuning.store import STORE_NAME


def _losses(directory: Path) -> dict[tuple[str, str], dict]:
    """Completed runs by (id, config), read only: a store a running sweep appends to is left as it is."""
    records = []
    for line in (directory / STORE_NAME).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being appended right now
            continue
    return {(r["id"], repr(sorted(r["config"].items()))): r for r in records if r["status"] == "completed"}


def _summary(name: str, diffs: list[float]) -> str:
    if not diffs:
        return f"{name}: no pairs"
    small = sum(d <= 1e-3 for d in diffs)
    return (f"{name}: {len(diffs)} pairs; |Δ loss| median {statistics.median(diffs):.5f}, "
            f"mean {statistics.fmean(diffs):.4f}, max {max(diffs):.4f}; {small} within 0.001")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path, help="a sweep directory")
    parser.add_argument("second", type=Path, help="another sweep directory with some of the same runs")
    parser.add_argument("--seeds", action="store_true", help="also seed 0 vs seed 1 within the second store")
    parser.add_argument("--lr-split", type=float, default=2**-6,
                        help="also summarise the pairs at LR below this and at or above it (default 2^-6)")
    args = parser.parse_args()
    first, second = _losses(args.first), _losses(args.second)
    pairs = [(first[k], second[k]) for k in first.keys() & second.keys()]
    diffs = [abs(a["final_val_loss"] - b["final_val_loss"]) for a, b in pairs]
    devices = {(a.get("device") or "unrecorded", b.get("device") or "unrecorded") for a, b in pairs}
    print(f"{args.first} vs {args.second} (devices {', '.join(f'{x} / {y}' for x, y in sorted(devices))})")
    print(_summary("same runs", diffs))
    low = [d for d, (a, _) in zip(diffs, pairs) if a["config"]["optim.lr"] < args.lr_split]
    high = [d for d, (a, _) in zip(diffs, pairs) if a["config"]["optim.lr"] >= args.lr_split]
    print(_summary(f"  at lr < {args.lr_split:g}", low))
    print(_summary(f"  at lr >= {args.lr_split:g}", high))
    if args.seeds:
        by_setting: dict[str, dict[int, float]] = {}
        for record in second.values():
            config = dict(record["config"])
            seed = config.pop("train.seed")
            by_setting.setdefault(repr(sorted(config.items())), {})[seed] = record["final_val_loss"]
        seed_diffs = [abs(s[0] - s[1]) for s in by_setting.values() if 0 in s and 1 in s]
        print(_summary(f"seed 0 vs seed 1 in {args.second}", seed_diffs))


if __name__ == "__main__":
    main()
