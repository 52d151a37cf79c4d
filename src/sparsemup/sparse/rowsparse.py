"""Row-sparse linear layers: the paper's unstructured masks stored compressed, computed on the kept weights only.

A weight of logical shape (out, in) whose mask keeps the same number k of entries in every row
(``rows`` masks: exactly round(ρ·fan_in) per neuron; ``blocks`` masks too) is stored as ``values``
(out, k) and ``index`` (out, k), the sorted columns they sit in (int16 when the layer has at most
32767 inputs, else int32). Forward, dX and dW run in the native kernels of ``rowkernels`` (or its
plain-torch path where they cannot be built), so work and memory are ρ of a dense layer's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.hooks import MASK_SUFFIX
from ..core.storage import SparseStorage, StorageFormat, register_storage
from .rowkernels import rows_backward, rows_forward

__all__ = ["RowSparseLinear", "RowStorage", "row_layout", "row_sparse_linear", "index_dtype"]


def index_dtype(in_features: int) -> torch.dtype:
    """The narrowest integer type that holds every column of a layer with ``in_features`` inputs."""
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def row_layout(mask: torch.Tensor) -> torch.Tensor | None:
    """(out, k) sorted kept columns of a boolean mask with k ≥ 1 entries in every row; None when counts differ."""
    counts = mask.sum(dim=1)
    if mask.dim() != 2 or counts.numel() == 0 or int(counts.min()) != int(counts.max()) or int(counts[0]) == 0:
        return None
    columns = mask.nonzero()[:, 1]  # row-major, so each row's columns come out sorted
    return columns.view(mask.shape[0], int(counts[0])).to(index_dtype(mask.shape[1]))


def _dense(values: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    return values.new_zeros(values.shape[0], in_features).scatter_(1, index.long(), values)


def _mask(index: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    ones = torch.ones(index.shape, dtype=dtype, device=index.device)
    return torch.zeros(index.shape[0], in_features, dtype=dtype, device=index.device).scatter_(1, index.long(), ones)


class _RowSparseMatmul(torch.autograd.Function):
    """y = x Wᵀ for row-sparse W; dX and dW (on the kept entries) in one fused pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, values, index)
        return rows_forward(x, values, index)

    @staticmethod
    @once_differentiable  # the saved inputs carry no history: a second derivative would be wrong
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, values, index = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x, grad_values = rows_backward(grad_y.contiguous(), x, values, index, need_dx, need_dw)
        return (grad_x if need_dx else None), (grad_values if need_dw else None), None


def row_sparse_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a row-sparse weight (values, index); any leading dims, autocast-aware."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, values = x.to(dtype), values.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif x.dtype != values.dtype:
        raise TypeError(f"row_sparse_linear: input dtype {x.dtype} differs from the weight's {values.dtype}")
    lead = x.shape[:-1]
    with torch.autocast(device, enabled=False):
        y = _RowSparseMatmul.apply(x.reshape(-1, x.shape[-1]).contiguous(), values, index.to(torch.int32))
    y = y.view(*lead, y.shape[-1])
    return y if bias is None else y + bias


class RowSparseLinear(SparseStorage):
    """An ``nn.Linear`` whose weight keeps only its mask's k entries per row (memory and work ∝ ρ).

    ``weight`` holds the kept values, (out, k); the ``weight_index`` buffer their columns and
    ``weight_shape`` the logical (out, in), so a state_dict converts back to a dense weight without
    the model (``sparsemup.sparse.to_masked_dense``).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_index: torch.Tensor
    weight_shape: torch.Tensor

    def __init__(self, in_features: int, out_features: int, index: torch.Tensor, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if index.dim() != 2 or index.shape[0] != out_features or not 1 <= index.shape[1] <= in_features:
            raise ValueError(f"RowSparseLinear: index {tuple(index.shape)} does not fit a ({out_features}, "
                             f"{in_features}) weight; it must be (out, k) with 1 ≤ k ≤ in")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(index.shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("weight_index", index.to(device=device, dtype=index_dtype(in_features)))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, index: torch.Tensor) -> RowSparseLinear:
        """A row-sparse copy of ``linear`` keeping the columns of ``index`` (weights outside are dropped)."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, index, linear.bias is not None, weight.device,
                     weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight.gather(1, module.weight_index.long()))
            if linear.bias is not None and module.bias is not None:
                module.bias.copy_(linear.bias)
        module.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None and module.bias is not None:
            module.bias.requires_grad_(linear.bias.requires_grad)
        return module.train(linear.training)

    def dense_weight(self) -> torch.Tensor:
        """The logical (out, in) weight, zero off the mask."""
        return _dense(self.weight.detach(), self.weight_index, self.in_features)

    def mask(self) -> torch.Tensor:
        """The logical (out, in) boolean mask."""
        return _mask(self.weight_index, self.in_features, torch.bool)

    @torch.no_grad()
    def to_dense_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the logical weight (exact zeros off the mask)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight.copy_(self.dense_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"RowSparseLinear: input has {x.shape[-1]} features, the layer takes {self.in_features}")
        return row_sparse_linear(x, self.weight, self.weight_index, self.bias)

    def extra_repr(self) -> str:
        k = self.weight_index.shape[1]
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={k}, "
                f"density={k / self.in_features:g}, bias={self.bias is not None}")


class RowStorage(StorageFormat):
    """Row-sparse weights in a state_dict: ``key`` holds the kept values (out, k), ``key_index`` their columns and
    ``key_shape`` the logical (out, in), so a checkpoint converts back without the model."""

    name = "rows"

    def holds(self, state_dict: Mapping[str, Any], key: str) -> bool:
        return key + "_index" in state_dict and key in state_dict and state_dict[key].dim() == 2

    def to_masked_dense(self, state_dict: dict[str, Any], key: str, shape: tuple[int, ...]) -> None:
        state_dict.pop(key + "_shape", None)
        index = state_dict.pop(key + "_index").to(state_dict[key].device)
        values = state_dict.pop(key)
        state_dict[key] = _dense(values, index, shape[1])
        state_dict[key + MASK_SUFFIX] = _mask(index, shape[1], values.dtype)

    def from_masked_dense(self, state_dict: dict[str, Any], key: str, owner: nn.Module, name: str) -> None:
        assert isinstance(owner, RowSparseLinear)  # only its weights are declared stored as "rows"
        mask = state_dict.pop(key + MASK_SUFFIX) != 0
        layout = row_layout(mask)
        if layout is None or not torch.equal(layout.cpu().long(), owner.weight_index.cpu().long()):
            raise ValueError(f"{name}: the state_dict's mask is not this layer's (another seed or density?); load a "
                             "checkpoint of the same model")
        weight = state_dict[key]
        stray = int((weight * ~mask.to(weight.device)).count_nonzero())
        if stray:
            raise ValueError(f"{name}: the state_dict's weight has {stray} nonzero entries outside its mask")
        state_dict[key] = weight.gather(1, owner.weight_index.to(weight.device).long())
        state_dict[key + "_index"] = owner.weight_index.clone()
        state_dict[key + "_shape"] = owner.weight_shape.clone()

    def check_layout(self, state_dict: Mapping[str, Any], key: str, owner: nn.Module, name: str) -> None:
        assert isinstance(owner, RowSparseLinear)
        if not torch.equal(state_dict[key + "_index"].cpu().long(), owner.weight_index.cpu().long()):
            raise ValueError(f"{name}: the state_dict's kept entries sit elsewhere than this layer's (another seed "
                             "or density?); load a checkpoint of the same model")


register_storage(RowStorage())
