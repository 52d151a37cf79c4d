"""What the compressed twins of ``nn.Linear`` share: a logical (out, in) weight kept as only its mask's entries.

``RowSparseLinear`` and ``BlockSparseLinear`` differ in how they lay out the kept entries and which kernels
multiply them (``kernels.ROWS``, ``kernels.BLOCKS``); the autograd function, copying from an ``nn.Linear`` and back,
autocast and the input checks are the same for both.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..core.storage import SparseStorage
from .kernels import FormatKernels

__all__ = ["SparseLinear", "sparse_linear"]


class SparseLinear(SparseStorage):
    """An ``nn.Linear`` storing only its mask's entries: ``weight`` (the subclass's storage), the ``weight_index``
    buffer (where they sit) and ``weight_shape`` (the logical (out, in))."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_index: torch.Tensor
    weight_shape: torch.Tensor

    def _store(self, in_features: int, out_features: int, stored: tuple[int, ...], index: torch.Tensor,
               bias: bool, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Create the parameters and buffers: ``stored`` is the shape of the kept values."""
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(stored, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("weight_index", index.to(device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))

    @abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The logical (out, in) weight, zero off the mask."""

    @abstractmethod
    def compress(self, weight: torch.Tensor) -> torch.Tensor:
        """This layer's kept values of a dense (out, in) weight (entries off the mask are dropped)."""

    @abstractmethod
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear`` with this layer's weight and bias on its kernels."""

    @torch.no_grad()
    def copy_from(self, linear: nn.Linear) -> SparseLinear:
        """Take ``linear``'s weights on the mask, its bias, its requires_grad flags and its train/eval mode."""
        self.weight.copy_(self.compress(linear.weight.detach()))
        self.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None and self.bias is not None:
            self.bias.copy_(linear.bias)
            self.bias.requires_grad_(linear.bias.requires_grad)
        return self.train(linear.training)

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
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, the layer takes "
                             f"{self.in_features}")
        return self.linear(x)


class _SparseMatmul(torch.autograd.Function):
    """y = x Wᵀ for a sparse W in the format of ``kernels``; dX and dW (on the kept entries only) in one backward."""

    @staticmethod
    def forward(ctx: Any, kernels: FormatKernels, x: torch.Tensor, values: torch.Tensor,
                index: torch.Tensor) -> torch.Tensor:
        y, saved, ctx.plan = kernels.forward(x, values, index)
        ctx.kernels = kernels
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    @once_differentiable  # the saved inputs carry no history: a second derivative would be wrong
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None, None]:
        need_dx, need_dw = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_x, grad_values = ctx.kernels.backward(ctx.saved_tensors, ctx.plan, grad_y.contiguous(), need_dx, need_dw)
        return None, grad_x, grad_values, None


# torch leaves Function.apply unannotated: name its signature once, so calls through it are checked.
_sparse_matmul: Callable[..., torch.Tensor] = _SparseMatmul.apply


def sparse_linear(kernels: FormatKernels, name: str, x: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for a sparse weight (``values`` at ``index`` in the format of ``kernels``) on inputs with any
    leading dims; under autocast both operands run in its dtype, elsewhere their dtypes must agree (``name`` says
    who refused)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        x, values = x.to(dtype), values.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif x.dtype != values.dtype:
        raise TypeError(f"{name}: input dtype {x.dtype} differs from the weight's {values.dtype}")
    lead = x.shape[:-1]
    with torch.autocast(device, enabled=False):
        y = _sparse_matmul(kernels, x.reshape(-1, x.shape[-1]).contiguous(), values, index)
    y = y.view(*lead, y.shape[-1])
    return y if bias is None else y + bias
