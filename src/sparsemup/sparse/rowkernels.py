"""Forward and fused backward of y = x Wᵀ for a row-exact sparse W given as ``values`` (out, k) and ``index`` (out, k).

Every row of W keeps exactly k entries, at the sorted, unique columns ``index[o]``. On CPU tensors the native
kernels of ``native`` run when they could be built; elsewhere (other devices, no compiler, ``SPARSEMUP_NATIVE=0``)
a plain-torch path computes the same results exactly: the weight is scattered into a dense (out, in) matrix and
multiplied with dense GEMMs, and dW is read off the dense gradient at the kept entries.
"""

from __future__ import annotations

import torch

from . import native

__all__ = ["rows_forward", "rows_backward", "dense_weight"]


def dense_weight(values: torch.Tensor, index: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense (out, in) weight holding ``values`` at ``index`` and zeros elsewhere."""
    return values.new_zeros(values.shape[0], in_features).scatter_(1, index.long(), values)


def rows_forward(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """y = x Wᵀ for x (T, in) and row-sparse W (values, index): native kernels where available, else plain torch."""
    module = native.kernels_for(x, values)
    if module is not None:
        return module.rows_forward(x.contiguous(), values.contiguous(), index.to(torch.int32).contiguous())
    return x @ dense_weight(values, index, x.shape[1]).t()


def rows_backward(grad_y: torch.Tensor, x: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                  need_dx: bool = True, need_dw: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dx or an empty tensor, dL/dvalues or an empty tensor) of y = x Wᵀ, computed in one fused pass."""
    module = native.kernels_for(grad_y, x, values)
    if module is not None:
        dx, dw = module.rows_backward(grad_y.contiguous(), x.contiguous(), values.contiguous(),
                                      index.to(torch.int32).contiguous(), bool(need_dx), bool(need_dw))
        return dx, dw
    empty = x.new_empty(0)
    dx = grad_y @ dense_weight(values, index, x.shape[1]) if need_dx else empty
    dw = (grad_y.t() @ x).gather(1, index.long()) if need_dw else values.new_empty(0)
    return dx, dw
