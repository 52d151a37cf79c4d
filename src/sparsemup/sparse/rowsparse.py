"""Row-sparse linear layers: the paper's unstructured masks stored compressed, computed on the kept weights only.

A weight of logical shape (out, in) whose mask keeps the same number k of entries in every row
(``rows`` masks: exactly round(ρ·fan_in) per neuron; ``blocks`` masks too) is stored as ``values``
(out, k) and ``index`` (out, k), the sorted columns they sit in (int16 when the layer has at most
32767 inputs, else int32). Forward, dX and dW run in ``kernels.ROWS`` (the native kernels, or plain torch
where they cannot be built), so work and memory are ρ of a dense layer's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..core.hooks import MASK_SUFFIX
from ..core.storage import StorageFormat, register_storage
from .kernels import ROWS, rows_dense
from .sparselinear import SparseLinear, sparse_linear

__all__ = ["RowSparseLinear", "RowStorage", "row_columns", "row_sparse_linear", "index_dtype"]


def index_dtype(in_features: int) -> torch.dtype:
    """The narrowest integer type that holds every column of a layer with ``in_features`` inputs."""
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def row_columns(mask: torch.Tensor) -> torch.Tensor | None:
    """(out, k) sorted kept columns of a boolean mask with k ≥ 1 entries in every row; None when counts differ."""
    counts = mask.sum(dim=1)
    if mask.dim() != 2 or counts.numel() == 0 or int(counts.min()) != int(counts.max()) or int(counts[0]) == 0:
        return None
    columns = mask.nonzero()[:, 1]  # row-major, so each row's columns come out sorted
    return columns.view(mask.shape[0], int(counts[0])).to(index_dtype(mask.shape[1]))


def _mask(index: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    return rows_dense(torch.ones(index.shape, dtype=dtype, device=index.device), index, in_features)


def row_sparse_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a row-sparse weight (values, index); any leading dims, autocast-aware."""
    return sparse_linear(ROWS, "row_sparse_linear", x, values, index.to(torch.int32), bias)


class RowSparseLinear(SparseLinear):
    """An ``nn.Linear`` whose weight keeps only its mask's k entries per row (memory and work ∝ ρ).

    ``weight`` holds the kept values, (out, k); the ``weight_index`` buffer their columns and
    ``weight_shape`` the logical (out, in), so a state_dict converts back to a dense weight without
    the model (``sparsemup.sparse.to_masked_dense``).
    """

    def __init__(self, in_features: int, out_features: int, index: torch.Tensor, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if index.dim() != 2 or index.shape[0] != out_features or not 1 <= index.shape[1] <= in_features:
            raise ValueError(f"RowSparseLinear: index {tuple(index.shape)} does not fit a ({out_features}, "
                             f"{in_features}) weight; it must be (out, k) with 1 ≤ k ≤ in")
        self._store(in_features, out_features, tuple(index.shape), index.to(index_dtype(in_features)), bias,
                    device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, index: torch.Tensor) -> RowSparseLinear:
        """A row-sparse copy of ``linear`` keeping the columns of ``index`` (weights outside are dropped)."""
        module = cls(linear.in_features, linear.out_features, index, linear.bias is not None, linear.weight.device,
                     linear.weight.dtype)
        module.copy_from(linear)
        return module

    def dense_weight(self) -> torch.Tensor:
        """The logical (out, in) weight, zero off the mask."""
        return rows_dense(self.weight.detach(), self.weight_index, self.in_features)

    def compress(self, weight: torch.Tensor) -> torch.Tensor:
        """The entries of a dense (out, in) weight at this layer's columns."""
        return weight.gather(1, self.weight_index.long())

    def mask(self) -> torch.Tensor:
        """The logical (out, in) boolean mask."""
        return _mask(self.weight_index, self.in_features, torch.bool)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear`` on the row-sparse kernels."""
        return row_sparse_linear(x, self.weight, self.weight_index, self.bias)

    def extra_repr(self) -> str:
        k = self.weight_index.shape[1]
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={k}, "
                f"density={k / self.in_features:g}, bias={self.bias is not None}")


class RowStorage(StorageFormat):
    """Row-sparse weights in a state_dict: ``key`` holds the kept values (out, k), ``key_index`` their columns and
    ``key_shape`` the logical (out, in), so a checkpoint converts back without the model."""

    name = "rows"

    def holds(self, state_dict: Mapping[str, torch.Tensor], key: str) -> bool:
        return key + "_index" in state_dict and key in state_dict and state_dict[key].dim() == 2

    def to_masked_dense(self, state_dict: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> None:
        state_dict.pop(key + "_shape", None)
        index = state_dict.pop(key + "_index").to(state_dict[key].device)
        values = state_dict.pop(key)
        state_dict[key] = rows_dense(values, index, shape[1])
        state_dict[key + MASK_SUFFIX] = _mask(index, shape[1], values.dtype)

    def from_masked_dense(self, state_dict: dict[str, torch.Tensor], key: str, owner: nn.Module, name: str) -> None:
        assert isinstance(owner, RowSparseLinear)  # only its weights are declared stored as "rows"
        mask = state_dict.pop(key + MASK_SUFFIX) != 0
        kept = row_columns(mask)
        if kept is None or not torch.equal(kept.cpu().long(), owner.weight_index.cpu().long()):
            raise ValueError(f"{name}: the state_dict's mask is not this layer's (another seed or density?); load a "
                             "checkpoint of the same model")
        weight = state_dict[key]
        stray = int((weight * ~mask.to(weight.device)).count_nonzero())
        if stray:
            raise ValueError(f"{name}: the state_dict's weight has {stray} nonzero entries outside its mask")
        state_dict[key] = weight.gather(1, owner.weight_index.to(weight.device).long())
        state_dict[key + "_index"] = owner.weight_index.clone()
        state_dict[key + "_shape"] = owner.weight_shape.clone()

    def check_pattern(self, state_dict: Mapping[str, torch.Tensor], key: str, owner: nn.Module, name: str) -> None:
        assert isinstance(owner, RowSparseLinear)
        if not torch.equal(state_dict[key + "_index"].cpu().long(), owner.weight_index.cpu().long()):
            raise ValueError(f"{name}: the state_dict's kept entries sit elsewhere than this layer's (another seed "
                             "or density?); load a checkpoint of the same model")


register_storage(RowStorage())
