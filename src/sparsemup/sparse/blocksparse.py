"""Block-sparse linear layers: only the kept b×b blocks of a weight are stored and computed.

A weight of logical shape (out, in) with a ``blocks`` mask is stored as ``values`` of shape
(out/b, k, b, b) (block-row r keeps k blocks) and ``index`` (out/b, k), the block-columns they
sit in. Forward and both backward products run only on the kept blocks (``kernels.BLOCKS``: the
native microkernels on the CPU, plain torch elsewhere), so the work is ρ of a dense layer's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..core.hooks import MASK_SUFFIX
from ..core.masks import block_columns
from ..core.storage import StorageFormat, register_storage
from .kernels import BLOCKS
from .sparselinear import SparseLinear, sparse_linear

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
    """Block values of a masked-dense (weight, mask) for the kept block-columns ``index``, checking mask and zeros."""
    kept = block_columns(mask != 0, block)
    if kept is None or not torch.equal(kept.cpu(), index.cpu()):
        raise ValueError(f"{name}: the state_dict's mask is not this layer's {block}x{block} block pattern; load a "
                         "checkpoint of the same model (same seed, density, mask_kind and block_size)")
    stray = int((weight * (mask == 0)).count_nonzero())
    if stray:
        raise ValueError(f"{name}: the state_dict's weight has {stray} nonzero entries outside its mask")
    return to_blocks(weight, index.to(weight.device), block)


def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a block-sparse weight (values, index); any leading dims, autocast-aware."""
    return sparse_linear(BLOCKS, "block_sparse_linear", x, values, index, bias)


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

    def holds(self, state_dict: Mapping[str, torch.Tensor], key: str) -> bool:
        return key + "_index" in state_dict and key in state_dict and state_dict[key].dim() == 4

    def to_masked_dense(self, state_dict: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> None:
        state_dict.pop(key + "_shape", None)
        state_dict[key], state_dict[key + MASK_SUFFIX] = masked_dense_entries(
            state_dict.pop(key), state_dict.pop(key + "_index"), shape[1])

    def from_masked_dense(self, state_dict: dict[str, torch.Tensor], key: str, owner: nn.Module, name: str) -> None:
        assert isinstance(owner, BlockSparseLinear)  # only its weights are declared stored as "blocks"
        mask = state_dict.pop(key + MASK_SUFFIX)
        state_dict[key] = from_masked_dense(state_dict[key], mask, owner.weight_index, owner.block, name)
        state_dict[key + "_index"] = owner.weight_index.clone()
        state_dict[key + "_shape"] = owner.weight_shape.clone()

    def check_pattern(self, state_dict: Mapping[str, torch.Tensor], key: str, owner: nn.Module, name: str) -> None:
        assert isinstance(owner, BlockSparseLinear)
        if not torch.equal(state_dict[key + "_index"].cpu(), owner.weight_index.cpu()):
            raise ValueError(f"{name}: the state_dict's blocks sit elsewhere than this layer's (another seed, "
                             "density or block_size?); load a checkpoint of the same model")


register_storage(BlockStorage())
