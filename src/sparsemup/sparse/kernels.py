"""The arithmetic of the two sparse formats, y = x Wᵀ with its fused backward: the native CPU kernels of ``native``
where they apply, plain torch with the same results elsewhere (other devices, no compiler, ``SPARSEMUP_NATIVE=0``).

Both formats give the autograd function of ``sparselinear`` the same three calls: ``forward(x, values, index)`` →
(y, tensors to save, plan), ``backward(saved, plan, grad_y, need_dx, need_dw)`` → (dX or None, dvalues or None),
where the plan records which path ran. ``ROWS``: a weight keeping k entries in every row, ``values`` (out, k) at the
sorted columns ``index`` (out, k). ``BLOCKS``: b×b blocks, ``values`` (out/b, k, b, b) at the block-columns
``index`` (out/b, k). Without the native kernels, rows scatter the weight into a dense matrix for dense GEMMs;
blocks run one small GEMM per block on strided views of the activations on the CPU, and batched GEMMs over
block-rows on gathered input blocks elsewhere (and for short bf16 batches).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from . import native

__all__ = ["FormatKernels", "ROWS", "BLOCKS", "rows_dense"]

Saved = tuple[torch.Tensor, ...]


class FormatKernels(Protocol):
    """Forward and backward of y = x Wᵀ for one storage format (2-D contiguous x; dtypes already matched)."""

    def forward(self, x: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, Saved, Any]:
        """(y, the tensors backward needs, a plan naming the path taken)."""
        ...

    def backward(self, saved: Saved, plan: Any, grad_y: torch.Tensor, need_dx: bool,
                 need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(dL/dx, dL/dvalues), each None where not needed."""
        ...


def rows_dense(values: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense (out, in) weight holding row-sparse ``values`` at ``index`` and zeros elsewhere."""
    return values.new_zeros(values.shape[0], in_features).scatter_(1, index.long(), values)


class _Rows:
    """Row-sparse W: native kernels (dX and dW fused in one pass), else the dense scatter and dense GEMMs."""

    def forward(self, x: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, Saved, Any]:
        module = native.kernels_for(x, values)
        if module is not None:
            y = module.rows_forward(x.contiguous(), values.contiguous(), index.to(torch.int32).contiguous())
        else:
            y = x @ rows_dense(values, index, x.shape[1]).t()
        return y, (x, values, index), None

    def backward(self, saved: Saved, plan: Any, grad_y: torch.Tensor, need_dx: bool,
                 need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, values, index = saved
        module = native.kernels_for(grad_y, x, values)
        if module is not None:
            dx, dw = module.rows_backward(grad_y.contiguous(), x.contiguous(), values.contiguous(),
                                          index.to(torch.int32).contiguous(), bool(need_dx), bool(need_dw))
            return (dx if need_dx else None), (dw if need_dw else None)
        dx = grad_y @ rows_dense(values, index, x.shape[1]) if need_dx else None
        dw = (grad_y.t() @ x).gather(1, index.long()) if need_dw else None
        return dx, dw


class _Blocks:
    """Block-sparse W: native microkernels (dX through the transposed block index), else per-block GEMMs on strided
    views ("loop") or batched GEMMs on gathered input blocks ("gather")."""

    def forward(self, x: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, Saved, Any]:
        module = native.kernels_for(x, values)
        if module is not None:
            x, values, index32 = x.contiguous(), values.contiguous(), index.to(torch.int32).contiguous()
            return module.blocks_forward(x, values, index32), (x, values, index32), ("native", module)
        if _use_loop(x, values):
            columns = index.tolist()
            return _loop_forward(x, values, columns), (x, values), ("loop", columns)
        y, gathered = _gather_forward(x, values, index)
        return y, (gathered, values, index), ("gather", x.shape[1])

    def backward(self, saved: Saved, plan: Any, grad_y: torch.Tensor, need_dx: bool,
                 need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        path, detail = plan
        if path == "native":
            x, values, index32 = saved
            dx, dw = detail.blocks_backward(grad_y.to(x.dtype), x, values, index32, need_dx, need_dw)
            return (dx if need_dx else None), (dw if need_dw else None)
        if path == "loop":
            x, values = saved
            return _loop_backward(x, values, detail, grad_y, need_dx, need_dw)
        gathered, values, index = saved
        return _gather_backward(gathered, values, index, detail, grad_y, need_dx, need_dw)


def _use_loop(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Per-block GEMMs on strided views (no copies) or batched GEMMs on gathered blocks.

    Measured on a 2-core CPU (docs/PERFORMANCE.md): the loop wins in fp32 and for bf16 at
    ≥ 2048 tokens; below that, bf16's per-call overhead favours the batched path, as does
    every GPU (one launch instead of hundreds).
    """
    return x.device.type == "cpu" and (values.dtype == torch.float32 or x.shape[0] >= 2048)


def _loop_forward(x: torch.Tensor, values: torch.Tensor, columns: list[list[int]]) -> torch.Tensor:
    rows, k, block, _ = values.shape
    y = x.new_empty(x.shape[0], rows * block)
    for r, row in enumerate(columns):
        out = y[:, r * block:(r + 1) * block]
        for j, c in enumerate(row):
            part = x[:, c * block:(c + 1) * block]
            if j == 0:
                torch.mm(part, values[r, j].t(), out=out)
            else:
                out.addmm_(part, values[r, j].t())
    return y


def _loop_backward(x: torch.Tensor, values: torch.Tensor, columns: list[list[int]], grad_y: torch.Tensor,
                   need_dx: bool, need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    block = values.shape[2]
    grad_x = torch.zeros_like(x) if need_dx else None
    grad_values = torch.empty_like(values) if need_dw else None
    for r, row in enumerate(columns):
        g = grad_y[:, r * block:(r + 1) * block]
        for j, c in enumerate(row):
            if grad_x is not None:
                grad_x[:, c * block:(c + 1) * block].addmm_(g, values[r, j])
            if grad_values is not None:
                torch.mm(g.t(), x[:, c * block:(c + 1) * block], out=grad_values[r, j])
    return grad_x, grad_values


def _gather_forward(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, in_features = x.shape
    rows, k, block, _ = values.shape
    # Input blocks each block-row reads, laid out (tokens, rows, k·b): ρ·out/b copies of x.
    gathered = x.reshape(tokens, in_features // block, block).index_select(1, index.reshape(-1))
    gathered = gathered.view(tokens, rows, k * block)
    weight_t = values.transpose(2, 3).reshape(rows, k * block, block)  # [r, j·b + i, o] = W_r,j[o, i]
    y = x.new_empty(tokens, rows, block)
    torch.bmm(gathered.transpose(0, 1), weight_t, out=y.transpose(0, 1))
    return y.view(tokens, rows * block), gathered


def _gather_backward(gathered: torch.Tensor, values: torch.Tensor, index: torch.Tensor, in_features: int,
                     grad_y: torch.Tensor, need_dx: bool,
                     need_dw: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    rows, k, block, _ = values.shape
    tokens = grad_y.shape[0]
    grad_y = grad_y.view(tokens, rows, block).transpose(0, 1)  # (rows, tokens, b), strided
    fp32 = values.dtype == torch.float32
    grad_x = grad_values = None
    if need_dx:
        if not fp32:
            # CPU bf16 index_add over b-element chunks is slow: add whole (tokens, b) slabs per kept block.
            grad_xt = grad_y.new_zeros(in_features // block, tokens, block)
            for j in range(k):
                grad_xt.index_add_(0, index[:, j], torch.bmm(grad_y, values[:, j]))
            grad_x = grad_xt.transpose(0, 1).reshape(tokens, in_features)
        else:
            weight = values.permute(0, 2, 1, 3).reshape(rows, block, k * block)  # [r, o, j·b + i]
            partial = grad_y.new_empty(tokens, rows, k * block)
            torch.bmm(grad_y, weight, out=partial.transpose(0, 1))
            grad_x = grad_y.new_zeros(tokens, in_features // block, block)
            grad_x.index_add_(1, index.reshape(-1), partial.view(tokens, rows * k, block))
            grad_x = grad_x.view(tokens, in_features)
    if need_dw:
        lhs, rhs = gathered.transpose(0, 1), grad_y
        if not fp32:  # strided bf16 batched GEMMs miss the fast kernels; copying is cheaper
            lhs, rhs = lhs.contiguous(), rhs.contiguous()
        grad_t = torch.bmm(lhs.transpose(1, 2), rhs)  # (rows, k·b, b): [r, j·b + i, o]
        grad_values = grad_t.view(rows, k, block, block).transpose(2, 3).contiguous()
    return grad_x, grad_values


ROWS: FormatKernels = _Rows()
BLOCKS: FormatKernels = _Blocks()
