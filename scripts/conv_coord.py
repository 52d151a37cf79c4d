"""Coordinate check of a conv net built from plain torch.nn, for docs/MODELS.md.

A conv stem (3 → width), a 3×3 conv, a grouped 3×3 conv (4 groups: hidden, fan-in (width/4)·9),
a depthwise 3×3 conv (groups = width: vector-like), global average pooling and a linear readout,
on 8×8 Gaussian images labelled by a random conv teacher. Every scheme is checked with
``sparsemup.coord.check`` (5 Adam steps at --lr, default 2^-10); the verdicts are printed and each
result is written to OUT/conv-<scheme>/coord.json.

    python scripts/conv_coord.py                                         # about 1 minute on 2 CPU cores
    python scripts/conv_coord.py --lr 0.0078125 --out docs/coord/conv-lr-2-7
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparsemup as smp
from sparsemup import coord

BASE_WIDTH = 64


class ConvNet(nn.Module):
    """A small conv net whose channel count is the width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.grouped = nn.Conv2d(width, width, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.conv(h))
        h = F.relu(self.grouped(h))
        h = F.relu(self.depthwise(h))
        return self.head(h.mean(dim=(2, 3)))


def build(scheme: str, width: int, density: float, seed: int) -> nn.Module:
    with torch.device("meta"):
        base, delta = ConvNet(BASE_WIDTH), ConvNet(2 * BASE_WIDTH)
    model = ConvNet(width)
    smp.parameterize(model, base, delta=delta, scheme=scheme, density=density, seed=seed,
                     init_std=(2 / (BASE_WIDTH * 9)) ** 0.5)  # He init of the base's 3×3 convs
    return model


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, 8, 8, generator=gen)
    teacher = torch.randn(10, 3, 8, 8, generator=gen)
    return x, torch.einsum("nchw,kchw->nk", x, teacher).argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/coord"))
    parser.add_argument("--lr", type=float, default=2**-10)
    args = parser.parse_args()
    for scheme in ("sp", "mup", "supar"):
        result = coord.check(lambda w, d, s, scheme=scheme: build(scheme, w, d, s), [64, 128, 256],
                             [1.0, 0.25, 0.0625], batch, F.cross_entropy, seeds=2, lr=args.lr,
                             base_width=BASE_WIDTH)
        out = args.out / f"conv-{scheme}"  # OUT/conv-sp, OUT/conv-mup, OUT/conv-supar
        out.mkdir(parents=True, exist_ok=True)
        (out / "coord.json").write_text(json.dumps({"scheme": scheme, **result}))
        for axis, v in result["verdict"].items():
            state = v.get("reason") or ("PASS" if v["pass"] else "FAIL")
            worst = v["worst"]
            print(f"conv {scheme:5s} {axis:8s} {state}  max |slope| {v['max_abs_slope']:.3f} "
                  f"(worst: {worst['layer']} {worst['quantity']} step {worst['step']})")
        roles = smp.get_parameterization(build(scheme, 128, 0.25, 0))
        if scheme == "supar":
            print("roles:", {n: i.role.value for n, i in roles.params.items() if n.endswith("weight")})


if __name__ == "__main__":
    main()
