"""Why a depth rule passes or fails the check across depth: the stream's change split into its parts.

Trains one model per depth (one seed, one density) as ``sparsemup coord-check --depths`` does (Adam from
``make_optimizer``, the Markov-chain batch, dropout off) and prints per step, with the log-log slope against depth:

- ``act0``, ``emb0``: RMS of the last block's output and of the embedding (the first block's input) at step 0;
- ``act``, ``delta``, ``block_delta``: the check's quantities (docs/COORD_CHECK.md, "Across depth");
- ``sum_own``: RMS of Σ_k Δu_k, the sum of the blocks' own updates (each re-run on its step-0 input);
- ``coh``: sum_own / block_delta, 1 when the blocks' own updates point the same way;
- ``prop``: RMS of delta's vector minus Σ_k Δu_k: the later blocks' response to their changed inputs.

Example (docs/COORD_CHECK.md):
    PYTHONPATH=src python docs/coord/depth-diagnosis/diagnose.py --model llama --alpha 1 --steps 3 \\
        --opts '{"role_init_std": {"input": 0.2}}'
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from sparsemup import hf
from sparsemup.coord import depth as D
from sparsemup.coord.cases import GPT_DEFAULTS, markov_tokens
from sparsemup.core import make_optimizer
from sparsemup.core.export import first_tensor
from sparsemup.core.residual import residual_blocks
from sparsemup.core.structure import named_modules
from sparsemup.models import GPTConfig, build_gpt


def build(args: argparse.Namespace, depth: int, seed: int, options: dict[str, Any]) -> torch.nn.Module:
    """The reference GPT or a transformers model at ``depth`` with the depth rule of ``args`` (alpha 0: none)."""
    rule = {"depth_alpha": args.alpha, "base_depth": args.base_depth} if args.alpha > 0 else {}
    if args.model == "gpt":
        cfg = GPTConfig(vocab_size=256, width=args.width, depth=depth, head_dim=GPT_DEFAULTS["head_dim"], context=64)
        return build_gpt(cfg, args.base_width, scheme="supar", density=args.density, seed=seed, init_std=0.02,
                         **rule, **options)[0]
    model = hf.build(hf.small_config(args.model, 256, depth), args.width, args.base_width, head_dim=64,
                     scheme="supar", density=args.density, seed=seed, init_std=0.02, **rule, **options)
    return D._measurable(lambda: model)


def measure(args: argparse.Namespace, model: torch.nn.Module, tokens: torch.Tensor) -> list[dict[str, float]]:
    """One row per step: step 0 {act0, emb0, loss0}; later steps the quantities of the module docstring."""
    optimizer = make_optimizer(model, torch.optim.Adam, lr=args.lr)
    modules = named_modules(model)
    blocks = residual_blocks(modules)
    calls: dict[str, Any] = {}
    last: list[torch.Tensor] = []

    def keep(name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            calls.setdefault(name, (tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in inputs), kwargs))
            if name == blocks[-1]:
                last[:] = [first_tensor(output).detach()]
        return hook

    for block in blocks:
        modules[block].register_forward_hook(keep(block), with_kwargs=True)
    rows: list[dict[str, float]] = []
    first: dict[str, torch.Tensor] = {}
    for step in range(args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        out = model(tokens[:, :-1])
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        now = last[0]  # before the re-runs below, which call the last block's hook again
        model.eval()
        with torch.no_grad():
            own = {b: first_tensor(modules[b](*calls[b][0], **calls[b][1])) - D._stream_input(*calls[b])
                   for b in blocks}
        model.train()
        if step == 0:
            first = {**own, "last": now.clone()}
            rows.append({"act0": D._rms(now), "emb0": D._rms(D._stream_input(*calls[blocks[0]])),
                         "loss0": loss.item()})
        else:
            changes = [own[b] - first[b] for b in blocks]
            summed = sum(changes, torch.zeros_like(now))
            row = {"act": D._rms(now), "delta": D._rms(now - first["last"]),
                   "prop": D._rms(now - first["last"] - summed),
                   "block_delta": len(blocks) * float(np.mean([D._rms(c) for c in changes])),
                   "sum_own": D._rms(summed), "loss": loss.item()}
            row["coh"] = row["sum_own"] / row["block_delta"]
            rows.append(row)
        if step < args.steps:
            optimizer.step()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama", help="gpt (the reference GPT) or a transformers model type")
    p.add_argument("--alpha", type=float, default=1.0, help="depth_alpha; 0 for no depth rule")
    p.add_argument("--depths", default="2,4,8,16")
    p.add_argument("--base-depth", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--base-width", type=int, default=256)
    p.add_argument("--density", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2**-10)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--opts", default="{}", help="more sparsemup.parameterize options, as JSON")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    options = json.loads(args.opts)
    depths = [int(d) for d in args.depths.split(",")]
    start = time.time()
    rows: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        tokens = markov_tokens(seed, 2, 65, 256)
        for depth in depths:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = build(args, depth, seed, options)
                rows += [{"depth": depth, "seed": seed, "step": s, **r} for s, r in enumerate(measure(args, model,
                                                                                                      tokens))]
    print(f"# {vars(args)}  {time.time() - start:.0f}s")
    for step in range(args.steps + 1):
        keys = ["act0", "emb0", "loss0"] if step == 0 else ["act", "delta", "block_delta", "sum_own", "prop", "coh",
                                                              "loss"]
        for key in keys:
            ys = [float(np.mean([r[key] for r in rows if r["depth"] == d and r["step"] == step])) for d in depths]
            slope = np.polyfit(np.log(depths), np.log(ys), 1)[0] if all(y > 0 for y in ys) else float("nan")
            print(f"step {step} {key:12s} slope {slope:+.3f}  " + " ".join(f"{d}:{y:.4f}" for d, y in zip(depths, ys)))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f)


if __name__ == "__main__":
    main()
