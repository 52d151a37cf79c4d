"""Scaled dot-product attention whose logit scale the parameterization sets."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DotProductAttention", "SCALING_ATTR"]

# The logit scale that transformers' attention modules keep and pass to every attention backend; sparsemup
# multiplies it by sqrt(d_head,base / d_head) where the head dim differs from the base's.
SCALING_ATTR = "scaling"


class DotProductAttention(nn.Module):
    """softmax(scale · QKᵀ + bias) V, with ``scale`` set by ``sparsemup.parameterize``.

    Before parameterization the scale is SP's 1/sqrt(head_dim); afterwards it is the
    scheme's (sqrt(d_head,base)/d_head under µP and SµPar). Using this module instead
    of a hard-coded scale is how a model lets sparsemup enforce the rule. It has no
    parameters.
    """

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.scale = 1.0 / math.sqrt(head_dim)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Attend over (..., seq, head_dim) tensors; ``attn_bias`` is added to the logits."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, is_causal=is_causal, scale=self.scale)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, scale={self.scale:.6g}"
