"""Static random sparsity masks, deterministic from (seed, parameter name).

Masks are drawn as (output neurons, fan-in) matrices, "rows" being output neurons;
``sparsemup.core.layout`` maps them to and from a weight's own shape. Masks are drawn on the CPU with a
generator seeded from a stable hash, so every process of a distributed job (and
every rebuild of a model) gets bit-identical masks without communicating.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

from .vocab import MASK_KINDS, MaskKind

__all__ = ["stable_seed", "random_mask", "row_nonzeros", "validate_mask", "nonzeros_per_row",
           "blocks_per_row", "block_columns", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 32  # b of "blocks" masks: b×b tiles are what lets a sparse kernel run dense GEMMs


def stable_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name) that is the same in every process and Python run.

    Python's ``hash()`` of a string is salted per process, so it cannot be used.
    """
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def nonzeros_per_row(density: float, fan_in: int) -> int:
    """round(ρ · fan_in): the exact nonzero count of every row of a ``rows`` mask."""
    return int(math.floor(density * fan_in + 0.5))


def _check_density(density: float, name: str) -> None:
    if not (0.0 < density <= 1.0):
        raise ValueError(f"{name}: density must be in (0, 1], got {density!r}")


def row_nonzeros(density: float, fan_in: int, name: str) -> int:
    """Nonzeros per row for a density, with a clear error if a row would be empty."""
    _check_density(density, name)
    k = nonzeros_per_row(density, fan_in)
    if k < 1:
        raise ValueError(
            f"{name}: density {density:g} leaves every row of fan-in {fan_in} with no weights "
            f"(round({density:g} x {fan_in}) = 0); use a density of at least 1/{fan_in} = {1 / fan_in:.3g}"
        )
    return k


def blocks_per_row(density: float, shape: Sequence[int], block: int, name: str) -> int:
    """Blocks kept per block-row of a ``blocks`` mask: round(ρ · fan_in / b), with clear errors."""
    if len(shape) != 2:
        raise ValueError(f"{name}: block masks need a 2-D weight, got shape {tuple(shape)}; use mask_kind 'rows'")
    if not isinstance(block, int) or block < 1 or shape[0] % block or shape[1] % block:
        raise ValueError(
            f"{name}: block size {block!r} must be a positive integer dividing both dims of {tuple(shape)}; "
            "pick a power of two such as 16 or 32"
        )
    _check_density(density, name)
    cols = int(shape[1]) // block
    k = nonzeros_per_row(density, cols)
    if k < 1:
        raise ValueError(
            f"{name}: density {density:g} keeps no {block}x{block} block of a row with fan-in {shape[1]} "
            f"(round({density:g} x {cols}) = 0); use a block size of at most density x fan_in = "
            f"{density * shape[1]:g} or a higher density"
        )
    return k


def random_mask(
    shape: Sequence[int], density: float, seed: int, name: str, kind: MaskKind = "rows", block: int = DEFAULT_BLOCK
) -> torch.Tensor:
    """A boolean mask of ``shape`` keeping a fraction ``density`` of each row.

    ``rows`` (default): exactly round(ρ·fan_in) nonzeros in every row, so every
    neuron has the same fan-in. ``bernoulli``: each entry kept independently with
    probability ρ (density only in expectation; an empty row is an error).
    ``blocks``: random b×b blocks, round(ρ·fan_in/b) per block-row, so every row
    again has the same fan-in (a multiple of b) and sparse kernels can use dense tiles.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"{name}: unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")
    if kind == "blocks":
        k = blocks_per_row(density, shape, block, name)
        rows, cols = int(shape[0]) // block, int(shape[1]) // block
        gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, name))
        keep = torch.rand(rows, cols, generator=gen).topk(k, dim=1, sorted=False).indices
        tiles = torch.zeros(rows, cols, dtype=torch.bool).scatter_(1, keep, True)
        return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)
    rows = int(shape[0])
    fan_in = math.prod(int(s) for s in shape[1:])
    k = row_nonzeros(density, fan_in, name)
    gen = torch.Generator(device="cpu").manual_seed(stable_seed(seed, name))
    scores = torch.rand(rows, fan_in, generator=gen)
    if kind == "rows":
        if k == fan_in:
            flat = torch.ones(rows, fan_in, dtype=torch.bool)
        else:
            keep = scores.topk(k, dim=1, sorted=False).indices
            flat = torch.zeros(rows, fan_in, dtype=torch.bool).scatter_(1, keep, True)
    else:
        flat = scores < density
        empty = int((flat.sum(dim=1) == 0).sum())
        if empty:
            raise ValueError(
                f"{name}: the Bernoulli mask at density {density:g} left {empty} row(s) of fan-in "
                f"{fan_in} with no weights; use mask kind 'rows' or a higher density"
            )
    return flat.reshape(tuple(int(s) for s in shape))


def validate_mask(
    mask: torch.Tensor,
    shape: Sequence[int],
    name: str,
    neurons: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Check a user-supplied mask (shape, values 0/1, no output neuron without inputs) and return it as bool.

    ``neurons`` views a weight as (output neurons, fan-in); by default dim 0 indexes neurons.
    """
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} does not match the weight's {tuple(shape)}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name}: a mask must hold only 0 and 1 (or be a bool tensor)")
        mask = mask != 0
    rows = neurons(mask) if neurons is not None else mask.reshape(mask.shape[0], -1)
    empty = int((rows.sum(dim=1) == 0).sum())
    if empty:
        raise ValueError(f"{name}: the mask leaves {empty} row(s) with no weights; every neuron needs a nonzero fan-in")
    return mask.detach().to("cpu")


def block_columns(mask: torch.Tensor, block: int) -> torch.Tensor | None:
    """The sorted kept block-columns of every block-row, (rows/b, k) int64 on ``mask``'s device, or
    None when ``mask`` is not made of whole b×b blocks with the same count in every block-row."""
    if mask.dim() != 2 or block < 1 or mask.shape[0] % block or mask.shape[1] % block:
        return None
    rows, cols = mask.shape[0] // block, mask.shape[1] // block
    tiles = mask.detach().to("cpu", torch.bool).reshape(rows, block, cols, block).permute(0, 2, 1, 3)
    full, empty = tiles.all(dim=(2, 3)), ~tiles.any(dim=(2, 3))
    if not bool((full | empty).all()):
        return None
    counts = full.sum(dim=1)
    if int(counts.min()) != int(counts.max()) or int(counts[0]) == 0:
        return None
    return full.nonzero()[:, 1].reshape(rows, int(counts[0])).to(mask.device)
