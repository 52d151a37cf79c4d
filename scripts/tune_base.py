"""Random search of η_base, σ_base, α_input, α_output on the dense base model.

The paper (arXiv 2405.15743) tuned these by random search on its dense base; the untuned
starting point is the official-code baseline's setting (docs/RESULTS.md).

SµPar's promise is that these, tuned once on the small dense base, transfer to the wider and
sparser model; this is how the trainer's defaults were chosen. Each trial trains the base
(width = base_width, density 1) with the trainer and reads its final validation loss.
Run from the repository root:
    python scripts/tune_base.py [--trials 16] [--steps 300] [--out tune-base]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from sparsemup.train import Config
from sparsemup.train.config import apply_overrides
from sparsemup.train.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="seed of the search (runs use train.seed 0)")
    parser.add_argument("--out", type=Path, default=Path("tune-base"))
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for every trial")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for trial in range(args.trials):
        point = {  # log-uniform ranges around the paper's tuned values (η 2^-6, σ 0.087, α_in 9, α_out 1.1)
            "optim.lr": 2 ** rng.uniform(-10, -4),
            "model.init_std": math.exp(rng.uniform(math.log(0.01), math.log(0.2))),
            "model.input_alpha": math.exp(rng.uniform(0, math.log(16))),
            "model.output_alpha": math.exp(rng.uniform(math.log(0.25), math.log(4))),
        }
        base = Config()
        cfg = apply_overrides(Config(), [f"model.width={base.model.base_width}", "model.density=1",
                                         f"train.steps={args.steps}", "train.eval_every=0", "train.checkpoint_every=0",
                                         "train.tensorboard=false", "train.progress=false", *args.set,
                                         *(f"{k}={v!r}" for k, v in point.items())])
        result = train(cfg, args.out / f"trial{trial:02d}")
        rows.append({**point, "val_loss": result["final_val_loss"], "status": result["status"]})
        print(json.dumps(rows[-1]), flush=True)
    rows.sort(key=lambda r: math.inf if r["val_loss"] is None else r["val_loss"])
    print(f"\n{'val_loss':>9s} {'log2 lr':>8s} {'init_std':>9s} {'alpha_in':>9s} {'alpha_out':>9s}")
    for r in rows:
        loss = "diverged" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        print(f"{loss:>9s} {math.log2(r['optim.lr']):8.2f} {r['model.init_std']:9.4f} {r['model.input_alpha']:9.3f} "
              f"{r['model.output_alpha']:9.3f}")


if __name__ == "__main__":
    main()
