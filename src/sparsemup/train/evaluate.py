"""Validation loss and bits per byte, during training and for a saved checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .build import build_model, logits_of
from .checkpoint import Checkpoint, checkpoint_path, load, restore_model
from .data import bits_per_byte, load_corpus, val_windows
from .distributed import Context, all_sum
from .schema import Config

__all__ = ["validation_loss", "load_trained", "evaluate_checkpoint", "Evaluation"]


@dataclass(frozen=True)
class Evaluation:
    """A checkpoint's validation loss on its own config's validation split (``sparsemup eval --json`` prints
    ``to_json()``)."""

    checkpoint: str  # the checkpoint file
    step: int
    val_loss: float  # nats per token (per byte on text)
    bits_per_byte: float | None
    val_tokens: int  # validation tokens the loss averages over
    data: str  # the corpus: its path, or "shakespeare"

    def to_json(self) -> dict[str, object]:
        """The fields as a JSON object, in their order."""
        return dataclasses.asdict(self)


@torch.no_grad()
def validation_loss(model: nn.Module, data: torch.Tensor, windows: int | None, seq_len: int, batch: int,
                    ctx: Context) -> float:
    """Mean next-token cross-entropy (nats) over evenly spread validation windows, shared across ranks."""
    x, y = val_windows(data, windows, seq_len)
    count = len(x) - len(x) % ctx.world  # equal shares: FSDP needs every rank in every forward
    share = count // ctx.world
    x, y = x[ctx.rank * share:(ctx.rank + 1) * share], y[ctx.rank * share:(ctx.rank + 1) * share]
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for i in range(0, share, batch):
        logits = logits_of(model(x[i:i + batch].to(ctx.device)))
        total += F.cross_entropy(logits.flatten(0, 1).float(), y[i:i + batch].to(ctx.device).flatten(),
                                 reduction="sum").double()
    model.train(was_training)
    return float(all_sum(total, ctx)) / (count * seq_len)


def load_trained(path: Path) -> tuple[nn.Module, Config, Checkpoint, Path]:
    """The model of a checkpoint (a run directory or the file), its config, its state and the file, on the CPU."""
    file = checkpoint_path(path)
    state = load(file)
    cfg = Config.from_dict(state["config"], str(file))
    model = build_model(cfg, backends=state.get("backends"))
    restore_model(model, state, file)
    return model, cfg, state, file


def evaluate_checkpoint(path: Path, windows: int | None = None, batch: int = 32) -> Evaluation:
    """Validation loss (nats per token: per byte on text) and bits per byte of a checkpoint, on its own config's
    validation split."""
    model, cfg, state, file = load_trained(path)
    corpus = load_corpus(cfg.data.path, cfg.data.val_fraction, cfg.train.seq_len, cfg.data.format)
    ctx = Context(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    loss = validation_loss(model, corpus.val, windows, cfg.train.seq_len, batch, ctx)
    used = len(val_windows(corpus.val, windows, cfg.train.seq_len)[0])
    return Evaluation(checkpoint=str(file), step=state["step"], val_loss=loss,
                      bits_per_byte=bits_per_byte(loss, corpus),
                      val_tokens=used * cfg.train.seq_len, data=cfg.data.path or "shakespeare")
