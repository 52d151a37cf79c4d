"""Small models, tiny training configurations and corpora shared by the tests (fixtures: conftest.py)."""

import csv
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

import sparsemup as smp
from sparsemup.models import GPTConfig, build_gpt, build_mlp
from sparsemup.train import Config
from sparsemup.train.config import apply_overrides
from tolerances import model_rtol

T = TypeVar("T")


def known(value: T | None) -> T:
    """``value``, which the test knows is there (a gradient after backward, a mask it made): fails loudly if not,
    and tells mypy so."""
    assert value is not None
    return value


def mask_of(model: nn.Module, name: str) -> torch.Tensor:
    """The mask of the masked weight ``name`` (an error if it has none)."""
    return known(smp.core.get_mask(model, name))


def tiny_gpt(width=64, base_width=32, density=0.25, scheme="supar", **kw):
    cfg = GPTConfig(vocab_size=50, width=width, depth=2, head_dim=16, context=32)
    return build_gpt(cfg, base_width, scheme=scheme, density=density, **kw)[0]


def tiny_mlp(width=64, base_width=32, density=0.25, scheme="supar", **kw):
    return build_mlp(8, width, 5, base_width, depth=2, scheme=scheme, density=density, **kw)[0]


class TwoLayer(nn.Module):
    """A user model not from sparsemup, for structure tests."""

    def __init__(self, width: int, extra: bool = False):
        super().__init__()
        self.emb = nn.Embedding(10, width)
        self.mid = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)
        if extra:
            self.more = nn.Linear(width, width)

    def forward(self, idx):
        return self.head(torch.relu(self.mid(self.emb(idx))))


def block_gpt(backend=None, density=0.25, block=16, width=128, seed=1):
    """A GPT with b×b block masks over a base of 64, sparsified to ``backend`` if given."""
    cfg = GPTConfig(vocab_size=64, width=width, depth=2, head_dim=32, context=16, ffn_multiple=block)
    model, _ = build_gpt(cfg, 64, scheme="supar", density=density, mask_kind="blocks", block_size=block, seed=seed)
    if backend:
        smp.sparsify(model, backend)
    return model


def rows_gpt(backend=None, density=0.25, width=128, seed=1, mask_kind="rows"):
    """A GPT with the paper's row-exact masks over a base of 64, sparsified to ``backend`` if given."""
    cfg = GPTConfig(vocab_size=64, width=width, depth=2, head_dim=32, context=16)
    model, _ = build_gpt(cfg, 64, scheme="supar", density=density, mask_kind=mask_kind, seed=seed)
    if backend:
        smp.sparsify(model, backend)
    return model


def lm_loss(model, x):
    """Next-token cross-entropy of a GPT on token batch x (fp32 logits, also under autocast)."""
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


def assert_state_dicts_convert_both_ways(build):
    """``build(backend, seed)`` → a GPT; its sparse state_dict loads into masked dense, back, and via
    ``to_masked_dense`` without a model, computing the same loss every time."""
    dense, sparse = build(None, 3), build("sparse", 3)
    with torch.no_grad():
        for p in sparse.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    x = tokens(batch=2, seq=17, vocab=64)
    want = lm_loss(sparse, x)
    dense.load_state_dict(sparse.state_dict())  # sparse entries into a masked-dense model
    torch.testing.assert_close(lm_loss(dense, x), want, rtol=1e-5, atol=1e-6)
    again = build("sparse", 3)
    again.load_state_dict(dense.state_dict())  # and back
    torch.testing.assert_close(lm_loss(again, x), want, rtol=1e-5, atol=1e-6)
    offline = smp.sparse.to_masked_dense(sparse.state_dict())  # without a model
    assert "blocks.0.mlp.fc.weight_mask" in offline and "blocks.0.mlp.fc.weight_index" not in offline
    fresh = build(None, 3)
    fresh.load_state_dict(offline)
    torch.testing.assert_close(lm_loss(fresh, x), want, rtol=1e-5, atol=1e-6)
    return x


def train_steps(model, opt, steps, x, clip=None, autocast=None):
    """``steps`` optimizer steps on batch x, with gradient clipping and bf16 autocast on the device
    type ``autocast`` if given; returns the last loss."""
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(autocast or "cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            loss = lm_loss(model, x)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return loss


def masked_zero_violations(model):
    """How many masked-out entries of the model's sparse weights are not exactly zero."""
    bad = 0
    for name, info in smp.get_parameterization(model).params.items():
        if info.masked:
            bad += int((model.get_parameter(name).detach()[smp.core.get_mask(model, name) == 0] != 0).sum())
    return bad


def tokens(batch=4, seq=16, vocab=50, seed=0):
    return torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


__all__ = ["smp", "tiny_gpt", "tiny_mlp", "TwoLayer", "tokens", "block_gpt", "rows_gpt", "lm_loss", "train_steps",
           "masked_zero_violations"]


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


# Loss curves of the tiny config computed in two summation orders (one process against two, one storage against
# another): 8 steps of a one-block GPT, 7 products on its forward path and as many back, inner dimensions up to
# 176 (the SwiGLU at width 64). Measured differences are ~1e-7; a wrong reduction or mask is off by percents.
TINY_RTOL = model_rtol(2 * 7, 176, steps=8)


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


def sweep_base(corpus: Path, steps: int = 4) -> dict:
    """The tiny trainer config as a sweep file's [base] tables."""
    items = [*TINY, f"train.steps={steps}", "train.checkpoint_every=2", "train.eval_every=0", "optim.warmup_steps=1"]
    cfg = apply_overrides(Config(), items)
    base: dict = {"data": {"path": str(corpus)}}
    for key in dict.fromkeys(item.split("=", 1)[0] for item in items):
        section, name = key.split(".")
        base.setdefault(section, {})[name] = getattr(getattr(cfg, section), name)
    return base


def torchrun(args: list[str], where: Path, env: dict[str, str] | None = None, nproc: int = 2,
               timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone`` with ``args`` on ``nproc`` processes (one thread each); each
    rank's stdout and stderr go to files in a new folder under ``where``, and a failure's message holds every rank's
    tail (torchrun's own output names only the rank that died, not why)."""
    logs = Path(tempfile.mkdtemp(prefix="torchrun-logs-", dir=where))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--log-dir", str(logs), "--redirects", "3", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode != 0:
        ranks = "".join(f"\n--- {path.relative_to(logs)} ---\n{path.read_text(errors='replace')[-3000:]}"
                        for path in sorted(logs.rglob("*.log")))
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stdout[-1500:]}{proc.stderr[-2500:]}{ranks}")
    return proc
