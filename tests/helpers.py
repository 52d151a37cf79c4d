"""Small models shared by the tests."""

import torch
import torch.nn.functional as F
from torch import nn

import sparsemup as smp
from sparsemup.models import GPTConfig, build_gpt, build_mlp


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


def lm_loss(model, x):
    """Next-token cross-entropy of a GPT on token batch x (fp32 logits, also under autocast)."""
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


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
            bad += int((model.get_parameter(name).detach()[smp.get_mask(model, name) == 0] != 0).sum())
    return bad


def tokens(batch=4, seq=16, vocab=50, seed=0):
    return torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


__all__ = ["smp", "tiny_gpt", "tiny_mlp", "TwoLayer", "tokens", "block_gpt", "lm_loss", "train_steps",
           "masked_zero_violations"]
