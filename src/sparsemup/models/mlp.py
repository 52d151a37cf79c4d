"""The reference MLP, built only on the public API."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.parameterize import parameterize
from ..core.record import Parameterization

__all__ = ["MLP", "build_mlp"]


class MLP(nn.Module):
    """in → width → … → width → out with ReLU; ``depth`` hidden (width × width) layers."""

    def __init__(self, in_features: int, width: int, out_features: int, depth: int = 2, bias: bool = True) -> None:
        super().__init__()
        self.input = nn.Linear(in_features, width, bias=bias)
        self.hidden = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in range(depth))
        self.readout = nn.Linear(width, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.input(x))
        for layer in self.hidden:
            x = F.relu(layer(x))
        out: torch.Tensor = self.readout(x)
        return out


def build_mlp(
    in_features: int,
    width: int,
    out_features: int,
    base_width: int,
    depth: int = 2,
    device: torch.device | str = "cpu",
    **options: object,
) -> tuple[MLP, Parameterization]:
    """An MLP parameterized against its base (built on the meta device)."""
    with torch.device("meta"):
        base = MLP(in_features, base_width, out_features, depth)
        delta = MLP(in_features, 2 * base_width, out_features, depth)
    with torch.device(device):
        model = MLP(in_features, width, out_features, depth)
    record = parameterize(model, base, delta=delta, **options)  # type: ignore[arg-type]
    return model, record
