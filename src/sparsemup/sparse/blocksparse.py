"""Block-sparse linear layers: only the kept b×b blocks of a weight are stored and computed.

A weight of logical shape (out, in) with a ``blocks`` mask is stored as ``values`` of shape
(out/b, k, b, b) (block-row r keeps k blocks) and ``index`` (out/b, k), the block-columns they
sit in. Forward and both backward products run only on the kept blocks, so the work is ρ of a
dense layer's. On the CPU (fp32, bf16) the native kernels of ``native`` run: one
register-blocked microkernel per phase over the whole layer, dX through the transposed block
index. Where they cannot be built, and on other devices, plain PyTorch ops compute the same
results: on the CPU one small GEMM per block on strided views of the activations, elsewhere
(and for short bf16 batches) batched GEMMs over block-rows on gathered input blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.hooks import MASK_SUFFIX
from ..core.masks import block_layout
from ..core.storage import StorageFormat, register_storage
from . import native
from .sparselinear import SparseLinear, autocast_linear

__all__ = ["BlockSparseLinear", "BlockStorage", "block_sparse_linear", "to_blocks", "to_dense", "from_masked_dense",
           "masked_dense_entries"]


def to_blocks(weight: torch.Tensor, index: torch.Tensor, block: int) -> torch.Tensor:
    """The kept blocks of a dense (out, in) weight, as (out/b, k, b, b) values."""
    rows, k = index.shape
    tiles = weight.reshape(rows, block, weight.shape[1] // block, block).permute(0, 2, 1, 3)
    return tiles[torch.arange(rows, device=index.device)[:, None], index].contiguous()


def to_dense(values: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense (out, in) weight of block values, zero outside the kept blocks."""
    rows, k, block, _ = values.shape
    tiles = values.new_zeros(rows, in_features // block, block, block)
    tiles[torch.arange(rows, device=index.device)[:, None], index] = values
    return tiles.permute(0, 2, 1, 3).reshape(rows * block, in_features)


def block_mask(values: torch.Tensor, index: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) mask of the kept blocks: one inside them, zero elsewhere, in ``dtype``."""
    return to_dense(torch.ones(values.shape, dtype=dtype, device=values.device), index.to(values.device), in_features)


def masked_dense_entries(values: torch.Tensor, index: torch.Tensor,
                         in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense weight, 0/1 mask in the weight's dtype) of a block-sparse state_dict entry."""
    return (to_dense(values, index.to(values.device), in_features),
            block_mask(values, index, in_features, values.dtype))


def from_masked_dense(weight: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, block: int,
                      name: str) -> torch.Tensor:
    """Block values of a masked-dense (weight, mask) for the layout ``index``, checking mask and zeros."""
    layout = block_layout(mask != 0, block)
    if layout is None or not torch.equal(layout.cpu(), index.cpu()):
        raise ValueError(f"{name}: the state_dict's mask is not this layer's {block}x{block} block layout; load a "
                         "checkpoint of the same model (same seed, density, mask_kind and block_size)")
    stray = int((weight * (mask == 0)).count_nonzero())
    if stray:
        raise ValueError(f"{name}: the state_dict's weight has {stray} nonzero entries outside its mask")
    return to_blocks(weight, index.to(weight.device), block)


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


def _loop_backward(ctx: Any, x: torch.Tensor, values: torch.Tensor, columns: list[list[int]],
                   grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    block = values.shape[2]
    grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
    grad_values = torch.empty_like(values) if ctx.needs_input_grad[1] else None
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


def _gather_backward(ctx: Any, gathered: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                     grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    rows, k, block, _ = values.shape
    tokens, in_features = grad_y.shape[0], ctx.in_features
    grad_y = grad_y.view(tokens, rows, block).transpose(0, 1)  # (rows, tokens, b), strided
    fp32 = values.dtype == torch.float32
    grad_x = grad_values = None
    if ctx.needs_input_grad[0]:
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
    if ctx.needs_input_grad[1]:
        lhs, rhs = gathered.transpose(0, 1), grad_y
        if not fp32:  # strided bf16 batched GEMMs miss the fast kernels; copying is cheaper
            lhs, rhs = lhs.contiguous(), rhs.contiguous()
        grad_t = torch.bmm(lhs.transpose(1, 2), rhs)  # (rows, k·b, b): [r, j·b + i, o]
        grad_values = grad_t.view(rows, k, block, block).transpose(2, 3).contiguous()
    return grad_x, grad_values


class _BlockSparseMatmul(torch.autograd.Function):
    """y = x Wᵀ for block-sparse W; dX and dW are computed only on the kept blocks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.in_features = x.shape[1]
        ctx.native = native.kernels_for(x, values)
        if ctx.native is not None:
            x, values, index32 = x.contiguous(), values.contiguous(), index.to(torch.int32).contiguous()
            ctx.save_for_backward(x, values, index32)
            return ctx.native.blocks_forward(x, values, index32)
        ctx.loop = _use_loop(x, values)
        if ctx.loop:
            ctx.columns = index.tolist()
            ctx.save_for_backward(x, values)
            return _loop_forward(x, values, ctx.columns)
        y, gathered = _gather_forward(x, values, index)
        ctx.save_for_backward(gathered, values, index)
        return y

    @staticmethod
    @once_differentiable  # the saved inputs carry no history: a second derivative would be wrong
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_y = grad_y.contiguous()
        if ctx.native is not None:
            x, values, index32 = ctx.saved_tensors
            need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_x, grad_values = ctx.native.blocks_backward(grad_y.to(x.dtype), x, values, index32, need_dx, need_dw)
            return grad_x if need_dx else None, grad_values if need_dw else None, None
        if ctx.loop:
            x, values = ctx.saved_tensors
            return (*_loop_backward(ctx, x, values, ctx.columns, grad_y), None)
        gathered, values, index = ctx.saved_tensors
        return (*_gather_backward(ctx, gathered, values, index, grad_y), None)


def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a block-sparse weight (values, index); any leading dims, autocast-aware."""
    return autocast_linear(_BlockSparseMatmul.apply, "block_sparse_linear", x, values, index, bias)


class BlockSparseLinear(SparseLinear):
    """An ``nn.Linear`` whose weight keeps only its mask's b×b blocks (memory and work ∝ ρ).

    ``weight`` holds the kept blocks, (out/b, k, b, b); the ``weight_index`` buffer their
    block-columns and ``weight_shape`` the logical (out, in), so a state_dict converts back to a
    dense weight without the model (``sparsemup.sparse.to_masked_dense``).
    """

    def __init__(self, in_features: int, out_features: int, index: torch.Tensor, block: int,
                 bias: bool = True, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if out_features % block or in_features % block or index.shape[0] != out_features // block:
            raise ValueError(f"BlockSparseLinear: block {block} and index {tuple(index.shape)} do not fit a "
                             f"({out_features}, {in_features}) weight")
        self.block = block
        rows, k = index.shape
        self._store(in_features, out_features, (rows, k, block, block), index.to(torch.int64), bias, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, index: torch.Tensor, block: int) -> BlockSparseLinear:
        """A block-sparse copy of ``linear`` keeping the blocks of ``index`` (weights outside are dropped)."""
        module = cls(linear.in_features, linear.out_features, index, block, linear.bias is not None,
                     linear.weight.device, linear.weight.dtype)
        module.copy_from(linear)
        return module

    def dense_weight(self) -> torch.Tensor:
        """The logical (out, in) weight, zero outside the kept blocks."""
        return to_dense(self.weight.detach(), self.weight_index, self.in_features)

    def compress(self, weight: torch.Tensor) -> torch.Tensor:
        """The kept b×b blocks of a dense (out, in) weight."""
        return to_blocks(weight, self.weight_index, self.block)

    def mask(self) -> torch.Tensor:
        """The logical (out, in) boolean mask."""
        return block_mask(self.weight, self.weight_index, self.in_features, torch.bool)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear`` on the block-sparse kernels."""
        return block_sparse_linear(x, self.weight, self.weight_index, self.bias)

    def extra_repr(self) -> str:
        rows, k = self.weight_index.shape
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"density={k * self.block / self.in_features:g}, bias={self.bias is not None}")


class BlockStorage(StorageFormat):
    """Block-sparse weights in a state_dict: ``key`` holds the kept blocks, ``key_index`` their block-columns
    and ``key_shape`` the logical (out, in), so a checkpoint converts back without the model."""

    name = "blocks"

    def holds(self, state_dict: Mapping[str, Any], key: str) -> bool:
        return key + "_index" in state_dict and key in state_dict and state_dict[key].dim() == 4

    def to_masked_dense(self, state_dict: dict[str, Any], key: str, shape: tuple[int, ...]) -> None:
        state_dict.pop(key + "_shape", None)
        state_dict[key], state_dict[key + MASK_SUFFIX] = masked_dense_entries(
            state_dict.pop(key), state_dict.pop(key + "_index"), shape[1])

    def from_masked_dense(self, state_dict: dict[str, Any], key: str, owner: nn.Module, name: str) -> None:
        assert isinstance(owner, BlockSparseLinear)  # only its weights are declared stored as "blocks"
        mask = state_dict.pop(key + MASK_SUFFIX)
        state_dict[key] = from_masked_dense(state_dict[key], mask, owner.weight_index, owner.block, name)
        state_dict[key + "_index"] = owner.weight_index.clone()
        state_dict[key + "_shape"] = owner.weight_shape.clone()

    def check_layout(self, state_dict: Mapping[str, Any], key: str, owner: nn.Module, name: str) -> None:
        assert isinstance(owner, BlockSparseLinear)
        if not torch.equal(state_dict[key + "_index"].cpu(), owner.weight_index.cpu()):
            raise ValueError(f"{name}: the state_dict's blocks sit elsewhere than this layer's (another seed, "
                             "density or block_size?); load a checkpoint of the same model")


register_storage(BlockStorage())
