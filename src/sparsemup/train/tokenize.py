"""``sparsemup tokenize``: a local corpus as token files, through a byte-level BPE trained here or a local
``tokenizer.json`` (the ``tokenizers`` library, imported inside functions; ``sparsemup[hf]`` installs it)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import write_atomic, write_json_atomic
from .data import SPLITS, TOKENS_JSON, TokenFiles, corpus_files, token_files
from .schema import ConfigError

__all__ = ["TOKENIZER_FILE", "tokenize_corpus", "write_token_files", "load_tokenizer", "describe"]

TOKENIZER_FILE = "tokenizer.json"
_INSTALL = "pip install 'sparsemup[hf]' (or pip install tokenizers)"


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ConfigError(f"tokenizing needs the tokenizers library, which is not installed: {_INSTALL}") from None
    return tokenizers


def _train_bpe(texts: list[str], vocab: int) -> Any:
    """A byte-level BPE of ``vocab`` tokens (the 256 bytes, then merges) trained on ``texts``."""
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def write_token_files(out: Path, ids: dict[str, np.ndarray], vocab_size: int, tokenizer: str,
                      text_bytes: dict[str, int]) -> TokenFiles:
    """Write ``train.bin``/``val.bin`` (uint16, or uint32 above 65536 tokens) and ``tokens.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    for split in SPLITS:
        if len(ids[split]) == 0:
            raise ConfigError(f"the {split} split has no tokens: give more text or another --val-fraction")
        write_atomic(out / f"{split}.bin", ids[split].astype(dtype).tofile)
    files = TokenFiles(out, vocab_size, dtype, tokenizer, {s: text_bytes[s] / len(ids[s]) for s in SPLITS},
                       {s: len(ids[s]) for s in SPLITS})
    write_json_atomic(out / TOKENS_JSON, files.to_json())
    return files


def tokenize_corpus(corpus: str, out: Path, vocab: int | None = None, tokenizer: Path | None = None,
                    val_fraction: float = 0.1) -> TokenFiles:
    """Split ``corpus`` (a text file, a folder of .txt files, or Shakespeare when empty) as training does (the last
    ``val_fraction`` of every file is validation), train a byte-level BPE of ``vocab`` tokens on the training split
    or load ``tokenizer`` (a tokenizer.json), and write the token files and the tokenizer into ``out``."""
    if (vocab is None) == (tokenizer is None):
        raise ConfigError("give either --vocab N (train a byte-level BPE here) or --tokenizer FILE (a tokenizer.json)")
    if vocab is not None and vocab < 256:
        raise ConfigError(f"--vocab {vocab}: a byte-level BPE has at least the 256 bytes; give 256 or more")
    if not 0.0 < val_fraction <= 0.5:
        raise ConfigError(f"--val-fraction {val_fraction}: must be in (0, 0.5]")
    if token_files(corpus) is not None:
        raise ConfigError(f"{corpus!r} holds token files already; give the text they came from")
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for file in corpus_files(corpus):
        data = file.read_bytes()
        cut = len(data) - int(len(data) * val_fraction)
        try:
            parts["train"].append(data[:cut].decode("utf-8"))
            parts["val"].append(data[cut:].decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ConfigError(f"{file} is not UTF-8 text ({error}); give text files") from None
    if tokenizer is not None:
        model = _tokenizers().Tokenizer.from_file(str(tokenizer))
    else:
        assert vocab is not None  # one of the two, checked above
        model = _train_bpe(parts["train"], vocab)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and Path(tokenizer).resolve() != (out / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    elif tokenizer is None:
        model.save(str(out / TOKENIZER_FILE))
    ids = {s: np.array([i for text in parts[s] for i in model.encode(text).ids], dtype=np.int64) for s in SPLITS}
    text_bytes = {s: sum(len(text.encode("utf-8")) for text in parts[s]) for s in SPLITS}
    return write_token_files(out, ids, model.get_vocab_size(), TOKENIZER_FILE, text_bytes)


def load_tokenizer(files: TokenFiles) -> Any:
    """The tokenizer that wrote ``files`` (a ``tokenizers.Tokenizer``)."""
    if not files.tokenizer:
        raise ConfigError(f"{files.folder / TOKENS_JSON} records no tokenizer file, so text cannot be encoded or "
                          "decoded; write the token files with `sparsemup tokenize`")
    return _tokenizers().Tokenizer.from_file(str(files.folder / files.tokenizer))


def describe(files: TokenFiles) -> str:
    """One line about written token files."""
    return (f"wrote {files.folder}: vocabulary {files.vocab_size} ({files.dtype}), "
            + ", ".join(f"{s} {files.tokens[s]} tokens ({files.bytes_per_token[s]:.3f} bytes/token)" for s in SPLITS))


