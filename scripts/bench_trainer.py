"""Step time of the sparsemup trainer against minimal hand-written PyTorch loops on the same masked GPT.

Three loops, interleaved round by round in one process so they see the same machine state:
  trainer   sparsemup.train.Trainer.train_step (batching, scheduler, clipping, divergence check,
            CSV + TensorBoard logging, progress bar)
  hand      a nanoGPT-style loop on the same parameterized model (sparsemup hooks and param groups)
  plain     the same loop on ``sparsemup.export(model)`` (plain modules, no hooks), masking the
            gradients by hand: what a user would write without sparsemup
Overheads are ratios of median step times. Run from the repository root:
    python scripts/bench_trainer.py [--rounds 5] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import sparsemup as smp
from sparsemup.train import Config, build_model
from sparsemup.train.config import apply_overrides
from sparsemup.train.data import load_corpus
from sparsemup.train.trainer import Trainer

README_RUN = ["model.width=256", "model.base_width=64", "model.depth=2", "model.head_dim=64", "model.density=1/4",
              "train.batch_size=16", "train.seq_len=128", "train.steps=100000", "train.eval_every=0",
              "train.checkpoint_every=0", "train.tensorboard=true", "train.progress=true"]


def hand_loop(model, optimizer, data, cfg, steps, masks=None):
    """Minimal loop: random windows, forward, cross-entropy, backward, (masking), clip, step."""
    t = cfg.train
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ix = torch.randint(len(data) - t.seq_len - 1, (t.batch_size,), generator=gen)
        chunk = torch.stack([data[i:i + t.seq_len + 1] for i in ix.tolist()]).long()
        x, y = chunk[:, :-1], chunk[:, 1:]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if masks is not None:
            for param, mask in masks:
                param.grad.mul_(mask)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per loop per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = apply_overrides(Config(), README_RUN)
    o = cfg.optim
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        data = load_corpus(cfg.data.path, cfg.data.val_fraction, cfg.train.seq_len).train

        model = build_model(cfg)
        optimizer = smp.make_optimizer(model, torch.optim.AdamW, o.lr, o.weight_decay, betas=(o.beta1, o.beta2))

        source = build_model(cfg)
        plain = smp.export(source)
        names = dict(plain.named_parameters())
        groups = [{"params": [names[n] for n in g["param_names"]], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                  for g in smp.param_groups(source, torch.optim.AdamW, o.lr, o.weight_decay)]
        grouped = {id(p) for g in groups for p in g["params"]}
        groups.append({"params": [p for p in plain.parameters() if id(p) not in grouped], "lr": o.lr})  # untied head
        plain_opt = torch.optim.AdamW(groups, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
        masks = [(names[n], smp.core.get_mask(source, n)) for n, i in smp.get_parameterization(source).params.items()
                 if i.masked]

        loops = {
            "trainer": lambda: [trainer.train_step() for _ in range(args.steps)],
            "hand": lambda: hand_loop(model, optimizer, data, cfg, args.steps),
            "plain": lambda: hand_loop(plain, plain_opt, data, cfg, args.steps, masks),
        }
        for run in loops.values():  # warm-up
            run()
        times: dict[str, list[float]] = {k: [] for k in loops}
        for _ in range(args.rounds):
            for name, run in loops.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / args.steps)
        trainer.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; width 256, base 64, depth 2, density 1/4, "
          f"batch 16 x 128 bytes; {args.rounds} rounds x {args.steps} steps per loop", file=sys.stderr)
    for name in loops:
        print(f"{name:8s} median {1000 * med[name]:7.1f} ms/step  (rounds: "
              + ", ".join(f"{1000 * v:.1f}" for v in times[name]) + ")")
    print(f"trainer vs hand loop on the same model:   {100 * (med['trainer'] / med['hand'] - 1):+.1f}%")
    print(f"trainer vs plain PyTorch (masks by hand): {100 * (med['trainer'] / med['plain'] - 1):+.1f}%")
    print(f"sparsemup model vs plain (hand loops):    {100 * (med['hand'] / med['plain'] - 1):+.1f}%")


if __name__ == "__main__":
    main()
