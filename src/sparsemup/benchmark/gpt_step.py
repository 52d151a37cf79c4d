"""``sparsemup bench``: the layer benchmark (``layers``) and a reference-GPT training step.

The GPT step times one AdamW step of the parameterized reference GPT with masked dense,
block-sparse (block masks) and row-sparse (the paper's unstructured masks) layers, fp32 and bf16
autocast, side by side in one process.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypedDict

import torch
import torch.nn.functional as F

from ..core.atomic import write_text_atomic
from ..core.optim import make_optimizer
from ..core.vocab import Backend, MaskKind
from ..models import GPTConfig, build_gpt
from ..sparse.backend import sparsify
from ..sparse.machine import cpu_facts
from ..sparse.timing import sync
from .layers import Grid, block_for, derive_thresholds, main_table, run_layers

__all__ = ["GPTStepRow", "run_gpt_step", "run"]


class _GPTStepRowBase(TypedDict):
    model: str
    tokens: int
    density: float
    block: int | None
    mask: str
    dtype: str
    backend: str
    step_ms: float
    param_mb: float


class GPTStepRow(_GPTStepRowBase, total=False):
    """One training step of the reference GPT on one backend and dtype; its speedup once all are measured."""

    speedup_vs_fastest_dense: float


def run_gpt_step(grid: Grid, density: float = 1 / 16, steps: int = 3,
                 device: torch.device | str = "cpu") -> list[GPTStepRow]:
    """One AdamW training step of the reference GPT: masked dense vs block- and row-sparse, fp32 and bf16 autocast."""
    batch, context = grid.gpt_tokens
    width = grid.gpt_width
    block = block_for(density, width)
    cfg = GPTConfig(width=width, depth=2, head_dim=64 if width >= 64 else width, context=context,
                    ffn_multiple=block)
    device = torch.device(device)
    tokens = torch.randint(0, cfg.vocab_size, (batch, context + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    rows: list[GPTStepRow] = []
    runs: tuple[tuple[Backend, MaskKind], ...] = (("masked_dense", "blocks"), ("blocks", "blocks"), ("rows", "rows"))
    for backend, mask_kind in runs:
        model, _ = build_gpt(cfg, base_width=cfg.head_dim, scheme="supar", density=density, mask_kind=mask_kind,
                             block_size=block)
        sparsify(model, backend)
        model.to(device)
        optimizer = make_optimizer(model, torch.optim.AdamW, lr=1e-3, weight_decay=0.1)
        state = sum(p.numel() * p.element_size() for p in model.parameters())
        for dtype_name in ("fp32", "bf16"):
            times = []
            for i in range(steps + 1):
                sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype_name == "bf16"):
                    logits = model(tokens[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
                torch.autograd.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
                if i:
                    times.append(time.perf_counter() - t0)
            rows.append({"model": f"gpt width {width} depth 2", "tokens": batch * context, "density": density,
                         "block": block if mask_kind == "blocks" else None, "mask": mask_kind, "dtype": dtype_name,
                         "backend": backend,
                         "step_ms": round(statistics.median(times) * 1e3, 2),
                         "param_mb": round(state / 2**20, 2)})
    fastest = min(r["step_ms"] for r in rows if r["backend"] == "masked_dense")
    for r in rows:
        r["speedup_vs_fastest_dense"] = round(fastest / r["step_ms"], 3)
    return rows


def run(grid: Grid, json_path: Path | None, threads: int | None, show: Callable[[str], None] = print,
        device: str = "cpu") -> dict[str, Any]:
    """The whole benchmark: layer table, GPT step, JSON (written atomically) with machine facts."""
    if threads:
        torch.set_num_threads(threads)
    gpu = torch.cuda.get_device_name(device) if device == "cuda" else None
    cpu = cpu_facts()
    show(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu['model']} ({cpu['cores']} cores)"
         + (f", {gpu}" if gpu else ""))
    layers = run_layers(grid, device=device, progress=lambda r: show(
        f"  {r['shape']} tokens {r['tokens']} 1/{round(1 / r['density'])} {r['dtype']} {r['mask']} mask "
        f"{r['backend']}: {r['total_ms'] if r['total_ms'] is not None else 'unsupported'} ms"))
    show(main_table(layers))
    show(f"crossovers (dtype, backend) -> highest density beating masked dense in every row: "
         f"{derive_thresholds(layers)} (documentation: auto times each model's own layers)")
    gpt = run_gpt_step(grid, device=device) if grid.gpt_step else []
    for r in gpt:
        show(f"GPT step ({r['model']}, {r['tokens']} tokens, density 1/{round(1 / r['density'])}, "
             f"{r['mask']} masks" + (f" of block {r['block']}" if r["block"] else "") + f") {r['dtype']} "
             f"{r['backend']}: {r['step_ms']} ms "
             f"({r['speedup_vs_fastest_dense']}x the fastest dense), parameters {r['param_mb']} MB")
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "cpu": cpu, "device": device, "gpu": gpu, "grid": asdict(grid),
              "layers": layers, "gpt_step": gpt}
    if json_path is not None:
        write_text_atomic(Path(json_path), json.dumps(result, indent=1) + "\n")
        show(f"wrote {json_path}")
    return result
