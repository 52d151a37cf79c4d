"""The PyTorch hooks that apply a parameterization at run time.

They are small picklable classes (not closures) so a parameterized model survives
``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` with its behaviour intact.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["OutputMultiplier", "InputMultiplier", "GradMask", "EnsureGradMask", "CheckMaskOnLoad", "HOOK_TYPES"]


class OutputMultiplier:
    """Forward hook: multiply a module's output by a constant (α_input on the embedding)."""

    def __init__(self, multiplier: float) -> None:
        self.multiplier = multiplier

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.multiplier


class InputMultiplier:
    """Forward pre-hook: multiply a module's first input by a constant (α_output/m_d on the readout)."""

    def __init__(self, multiplier: float) -> None:
        self.multiplier = multiplier

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * self.multiplier, *args[1:])


class GradMask:
    """Post-accumulate-grad hook: zero a masked weight's gradient outside its mask.

    With a zero gradient and a zero weight, Adam-family and SGD steps (momentum,
    weight decay, clipping included) leave masked entries exactly zero, at the cost
    of one in-place multiply per step.
    """

    def __init__(self, module: nn.Module, mask_name: str) -> None:
        self.module = module
        self.mask_name = mask_name

    def __call__(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            param.grad.mul_(getattr(self.module, self.mask_name))


class EnsureGradMask:
    """Forward pre-hook that (re)attaches ``GradMask`` to the module's current weight.

    Tensor hooks are lost when a parameter is copied (deepcopy, pickle, loading with
    ``assign=True``); module hooks are not, so this one re-attaches the mask hook on
    the first forward of a copy.
    """

    def __init__(self, attr: str, mask_name: str) -> None:
        self.attr = attr
        self.mask_name = mask_name
        self._hooked: weakref.ref | None = None

    def attach(self, module: nn.Module) -> None:
        param = getattr(module, self.attr)
        if self._hooked is not None and self._hooked() is param:
            return
        param.register_post_accumulate_grad_hook(GradMask(module, self.mask_name))
        self._hooked = weakref.ref(param)

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling():
            self.attach(module)

    def __getstate__(self) -> dict[str, Any]:
        return {"attr": self.attr, "mask_name": self.mask_name, "_hooked": None}

    def __deepcopy__(self, memo: dict[int, Any]) -> EnsureGradMask:
        return EnsureGradMask(self.attr, self.mask_name)


class CheckMaskOnLoad:
    """Load-state-dict post-hook: refuse a checkpoint whose mask or zeros disagree with the model.

    A loaded mask with another nonzero count would silently change the layer's
    density (and so its SµPar multipliers); nonzero weights outside the mask would
    silently make the layer dense.
    """

    def __init__(self, name: str, attr: str, mask_name: str, nnz: int) -> None:
        self.name = name
        self.attr = attr
        self.mask_name = mask_name
        self.nnz = nnz

    def __call__(self, module: nn.Module, incompatible_keys: Any) -> None:
        mask = getattr(module, self.mask_name)
        weight = getattr(module, self.attr)
        nnz = int(mask.count_nonzero())
        if nnz != self.nnz:
            raise ValueError(
                f"{self.name}: the loaded mask has {nnz} nonzeros but this model was parameterized with "
                f"{self.nnz}; parameterize the model with the checkpoint's density before loading it"
            )
        stray = int((weight.detach() * (mask == 0)).count_nonzero())
        if stray:
            raise ValueError(
                f"{self.name}: the loaded weight has {stray} nonzero entries outside its mask (a dense or "
                "differently masked checkpoint?); load a checkpoint saved from a model with the same masks "
                "(its state_dict holds them as *_mask buffers)"
            )


HOOK_TYPES = (OutputMultiplier, InputMultiplier, EnsureGradMask, CheckMaskOnLoad)
