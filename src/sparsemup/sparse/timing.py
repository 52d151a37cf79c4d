"""Timing one sparse layer's training step on a backend: what the calibrated ``auto`` choice decides on, and the
layer benchmark's building blocks (``sparsemup.benchmark`` adds its grid, memory readings and torch's CSR).

A layer step is forward and backward (dX and the weight gradient on the mask only) of one layer built from a
random mask of the requested kind; the first repetition is a warm-up, the median of the rest is reported.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from ..core.masks import block_columns, random_mask
from ..core.vocab import Backend, MaskKind
from .blocksparse import block_sparse_linear, to_blocks
from .calibration import TOKENS, LayerCase
from .rowsparse import row_columns, row_sparse_linear

__all__ = ["DTYPES", "LayerStep", "Memory", "NoMemory", "masked_weight", "layer_step", "time_step", "time_case", "sync"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (forward, after backward, bytes of weights + AdamW state + mask or indices)
LayerStep = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], None], int]


class Memory(Protocol):
    """A peak-memory reading around one step: ``start`` before it, ``peak_mb`` after (None: not measured)."""

    def start(self) -> None: ...

    def peak_mb(self) -> float | None: ...


class NoMemory:
    """No memory reading: calibration only times."""

    def start(self) -> None:
        pass

    def peak_mb(self) -> None:
        return None


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def masked_weight(shape: tuple[int, int], density: float, dtype: torch.dtype, device: torch.device,
                  kind: MaskKind = "rows", block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, boolean mask) of a timed layer: a fixed random ``kind`` mask, Gaussian weights of std 1/√fan_in."""
    mask = random_mask(shape, density, 0, "bench", kind, block) if density < 1 else torch.ones(shape, dtype=torch.bool)
    mask = mask.to(device)
    return (torch.randn(shape) / math.sqrt(shape[1])).to(device, dtype) * mask, mask


def layer_step(backend: Backend, shape: tuple[int, int], density: float, dtype: torch.dtype, block: int,
               device: torch.device, kind: MaskKind | None = None) -> LayerStep:
    """One layer of ``shape`` at ``density`` on ``backend`` (``kind``: its mask; default blocks for the blocks
    backend, rows otherwise): (forward, after-backward, bytes it keeps)."""
    weight, mask = masked_weight(shape, density, dtype, device, kind or ("blocks" if backend == "blocks" else "rows"),
                                 block)
    if backend == "masked_dense":
        param = weight.requires_grad_()
        mask_t = mask.to(dtype)
        state = 4 * param.numel() * param.element_size()  # weight, mask, exp_avg, exp_avg_sq

        def mask_grad() -> None:
            assert param.grad is not None
            param.grad.mul_(mask_t)

        return (lambda x: F.linear(x, param)), mask_grad, state
    if backend == "rows":
        columns = row_columns(mask)
        assert columns is not None  # a rows mask
        kept = weight.gather(1, columns.long()).requires_grad_()
        return (lambda x: row_sparse_linear(x, kept, columns)), lambda: None, \
            3 * kept.numel() * kept.element_size() + columns.numel() * columns.element_size()
    index = block_columns(mask, block)
    assert index is not None  # a blocks mask
    values = to_blocks(weight, index, block).requires_grad_()
    return (lambda x: block_sparse_linear(x, values, index)), lambda: None, \
        3 * values.numel() * values.element_size() + index.numel() * 8


def time_step(forward: Callable[[torch.Tensor], torch.Tensor], after: Callable[[], None], x: torch.Tensor,
              grad_y: torch.Tensor, repeats: int, memory: Memory) -> tuple[float, float, float | None]:
    """(median forward ms, median backward ms, the warm-up's peak memory MB) over ``repeats`` timed steps."""
    fwd, bwd = [], []
    peak = None
    for i in range(repeats + 1):  # the first is a warm-up (and the memory measurement)
        if i == 0:
            memory.start()
        sync(x.device)
        t0 = time.perf_counter()
        y = forward(x)
        sync(x.device)
        t1 = time.perf_counter()
        y.backward(grad_y)
        after()
        sync(x.device)
        t2 = time.perf_counter()
        if i == 0:
            peak = memory.peak_mb()
        else:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
        del y
        x.grad = None
    return statistics.median(fwd) * 1e3, statistics.median(bwd) * 1e3, peak


def time_case(case: LayerCase, backend: Backend, tokens: int = TOKENS, repeats: int = 2) -> float | None:
    """Median fwd + bwd ms of one layer case on ``backend`` (None where it cannot run): what ``auto`` decides on."""
    try:
        forward, after, _ = layer_step(backend, case.shape, case.density, DTYPES[case.dtype], case.block,
                                       torch.device("cpu"), "blocks" if case.block else "rows")
        x = torch.randn(tokens, case.shape[1]).to(DTYPES[case.dtype]).requires_grad_()
        grad_y = torch.randn(tokens, case.shape[0]).to(DTYPES[case.dtype])
        fwd, bwd, _ = time_step(forward, after, x, grad_y, repeats, NoMemory())
    except (RuntimeError, NotImplementedError):
        return None
    return fwd + bwd
