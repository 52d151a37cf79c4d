"""The reference GPT, built only on the public API.

It follows the paper's choices (arXiv 2405.15743, §4): pre-LN, ALiBi positions (no
position parameters, so nothing but the token embedding is an input weight),
SwiGLU feed-forward with hidden size 8/3·width rounded up to a multiple of 8 (or of ``ffn_multiple``),
no biases, and an unembedding tied to the embedding. Heads are added with width
(head_dim fixed), as in the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import DotProductAttention
from ..core.parameterize import parameterize
from ..core.record import Parameterization

__all__ = ["GPT", "GPTConfig", "gpt_init_scale", "build_gpt", "GPT_RESIDUAL_BRANCHES", "gpt_probe"]

# The closing projections of the two residual branches of every block (the depth rule scales their outputs).
GPT_RESIDUAL_BRANCHES = ("blocks.*.attn.proj", "blocks.*.mlp.proj")


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the reference GPT. Width must be a multiple of head_dim."""

    vocab_size: int = 256
    width: int = 256
    depth: int = 2
    head_dim: int = 64
    context: int = 128
    ffn_multiple: int = 8  # the FFN hidden size is rounded up to this (a block size, for block masks)

    def __post_init__(self) -> None:
        if self.width % self.head_dim:
            raise ValueError(f"width {self.width} must be a multiple of head_dim {self.head_dim}")

    @property
    def n_heads(self) -> int:
        return self.width // self.head_dim

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_multiple * math.ceil(8 * self.width / 3 / self.ffn_multiple)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al. 2022), interpolated for non-powers of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    closest = 2 ** math.floor(math.log2(n_heads))
    extra = power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(power_of_two(closest) + extra)


class CausalSelfAttention(nn.Module):
    alibi: torch.Tensor

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.core = DotProductAttention(cfg.head_dim)
        pos = torch.arange(cfg.context)
        distance = (pos[None, :] - pos[:, None]).float()  # j - i: <= 0 on and below the diagonal
        bias = alibi_slopes(cfg.n_heads)[:, None, None] * distance
        bias = bias.masked_fill(distance > 0, float("-inf"))
        self.register_buffer("alibi", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = self.core(q, k, v, attn_bias=self.alibi[:, :t, :t].to(q.dtype))
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(b, t, d))
        return out


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.width, 2 * cfg.ffn_hidden, bias=False)
        self.proj = nn.Linear(cfg.ffn_hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        out: torch.Tensor = self.proj(F.silu(gate) * up)
        return out


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width, bias=False)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class GPT(nn.Module):
    """A nanoGPT-like decoder: tied embedding, pre-LN blocks, ALiBi, SwiGLU."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width, bias=False)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab) for token ids of shape (batch, seq)."""
        if idx.shape[1] > self.cfg.context:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's context {self.cfg.context}")
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        out: torch.Tensor = self.lm_head(self.ln_f(x))
        return out

    def fsdp_units(self) -> list[nn.Module]:
        """The submodules FSDP shards one by one (then the root): whole blocks, never a masked Linear
        alone, so a block's all-gather runs before its layers' gradient-mask hooks attach."""
        return list(self.blocks)


def gpt_init_scale(depth: int) -> dict[str, float]:
    """GPT-2's 1/sqrt(2·depth) init factor on residual output projections (kept under µP/SµPar)."""
    factor = 1.0 / math.sqrt(2 * depth)
    return {"blocks.*.attn.proj.weight": factor, "blocks.*.mlp.proj.weight": factor}


def gpt_probe(model: nn.Module) -> object:
    """Random token ids through a GPT: the probe batch on which the residual branches are checked."""
    assert isinstance(model, GPT)  # build_gpt passes it for its own models only
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, min(16, model.cfg.context)), generator=gen)
    return model(tokens.to(model.wte.weight.device))


def build_gpt(
    cfg: GPTConfig,
    base_width: int,
    base_head_dim: int | None = None,
    device: torch.device | str = "cpu",
    **options: object,
) -> tuple[GPT, Parameterization]:
    """A GPT parameterized against its base (built on the meta device) with ``sparsemup.parameterize``.

    ``options`` go to ``parameterize`` (scheme, density, init_std, alphas, seed, depth_alpha, base_depth, ...);
    GPT-2's depth factor is added to ``init_scale`` unless given: 1/sqrt(2·depth), or 1/sqrt(2·base_depth) with a
    depth rule, whose m_L^(−α) on the branches already corrects for depth (it would be corrected twice). With a
    depth rule the residual branches default to ``GPT_RESIDUAL_BRANCHES``, checked on ``gpt_probe``.
    """
    with torch.device("meta"):
        base = GPT(replace(cfg, width=base_width, head_dim=base_head_dim or cfg.head_dim))
        delta = GPT(replace(cfg, width=2 * base_width, head_dim=base_head_dim or cfg.head_dim))
    with torch.device(device):
        model = GPT(cfg)
    if options.get("depth_alpha") is not None:
        base_depth = options.get("base_depth")
        if not isinstance(base_depth, int):
            raise ValueError(f"depth_alpha needs base_depth=<the base model's number of blocks>, got {base_depth!r}")
        options.setdefault("init_scale", gpt_init_scale(base_depth))
        options.setdefault("residual_branches", GPT_RESIDUAL_BRANCHES)
        options.setdefault("probe", gpt_probe)
    options.setdefault("init_scale", gpt_init_scale(cfg.depth))
    record = parameterize(model, base, delta=delta, **options)  # type: ignore[arg-type]
    return model, record
