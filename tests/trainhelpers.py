"""Tiny training configurations and corpora for the trainer tests."""

import csv
import random
from pathlib import Path

from sparsemup.config import Config, apply_overrides

WORDS = ("the king and queen of denmark speak to the ghost while horatio waits by the castle wall at night "
         "to be or not to be that is the question whether tis nobler in the mind to suffer").split()


def write_corpus(folder: Path, files: int = 2, words: int = 3000, seed: int = 0) -> Path:
    """A small deterministic pseudo-English corpus of ``files`` .txt files."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(words // 8)]
        (folder / f"part{i}.txt").write_text("\n".join(lines) + "\n")
    return folder


TINY = [
    "model.width=32", "model.base_width=16", "model.depth=1", "model.head_dim=16", "model.density=0.25",
    "train.steps=8", "train.batch_size=4", "train.seq_len=16", "train.eval_every=4", "train.eval_batches=2",
    "train.checkpoint_every=3", "train.tensorboard=false", "train.progress=false", "optim.warmup_steps=2",
    "optim.lr=2**-6",
]


def tiny_overrides(corpus: Path, *overrides: str) -> list[str]:
    """``--set`` items of a model and run small enough for a test: width 32, one block, 16-byte sequences."""
    return [*TINY, f"data.path={corpus}", *overrides]


def tiny_config(corpus: Path, *overrides: str) -> Config:
    """The tiny configuration as a Config."""
    return apply_overrides(Config(), tiny_overrides(corpus, *overrides))


def read_metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def curve(rows: list[dict[str, str]], keys=("step", "train_loss", "val_loss", "lr", "grad_norm")) -> list[tuple]:
    """The deterministic columns of metrics.csv (timings excluded)."""
    return [tuple(row[k] for k in keys) for row in rows]
