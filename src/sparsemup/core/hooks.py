"""The PyTorch hooks that apply a parameterization at run time.

They are small picklable classes (not closures) so a parameterized model survives
``copy.deepcopy``, ``pickle`` and ``torch.save(model)`` with its behaviour intact.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .storage import SparseStorage, storage_formats

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = ()  # type: ignore[assignment,misc]

__all__ = ["DENSE_GRAD_ATTR", "OutputMultiplier", "InputMultiplier", "GradMask", "EnsureGradMask", "EnsureAllGradMasks",
           "CheckStateOnLoad", "WatchCopies", "HOOK_TYPES", "MASK_SUFFIX", "SIGNATURE", "declare_storage", "move_hooks"]

MASK_SUFFIX = "_mask"  # a masked weight ``w`` keeps its mask in the buffer ``w_mask`` beside it
# An owner module with this attribute set keeps its weights' gradients dense (``record.dense_gradients``).
DENSE_GRAD_ATTR = "_sparsemup_dense_grad"
SIGNATURE = "_sparsemup_signature"  # root buffer: digest of the parameterization


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
    of one in-place multiply per step. Skipped while the owner carries ``DENSE_GRAD_ATTR`` (RigL reads
    the dense gradient, then masks it itself).
    """

    def __init__(self, module: nn.Module, mask_name: str) -> None:
        # A weak reference: a strong one would tie the module to its own parameter's hook, a cycle
        # through C++ that Python's collector cannot free (the model would never be released).
        self.module = weakref.ref(module)
        self.mask_name = mask_name

    def __call__(self, param: torch.Tensor) -> None:
        module = self.module()
        if param.grad is not None and module is not None and not module.__dict__.get(DENSE_GRAD_ATTR, False):
            param.grad.mul_(getattr(module, self.mask_name))


class EnsureGradMask:
    """Forward pre-hook that (re)attaches ``GradMask`` to the module's current weight.

    Tensor hooks are lost when a parameter is copied (deepcopy, pickle, loading with
    ``assign=True``); module hooks are not, so this one re-attaches the mask hook on
    the first forward of a copy.
    """

    def __init__(self, attr: str, mask_name: str) -> None:
        self.attr = attr
        self.mask_name = mask_name
        self._hooked: weakref.ref[torch.Tensor] | None = None

    def attach(self, module: nn.Module) -> None:
        param = getattr(module, self.attr)
        if isinstance(param, DTensor):
            # A sharded FSDP2 parameter: its gradient arrives reduce-scattered from the
            # unsharded one, which is masked when its owner runs (block-level sharding).
            return
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


class EnsureAllGradMasks:
    """Forward pre-hook on the root model: (re)attach the mask hook of every masked weight.

    The owners' own pre-hooks miss weights whose owner is never called (e.g.
    ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly).
    """

    def __init__(self, entries: list[tuple[nn.Module, EnsureGradMask]]) -> None:
        self.entries = entries

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling():
            for owner, ensure in self.entries:
                ensure.attach(owner)


class CheckStateOnLoad:
    """Load-state-dict pre-hook on the root model: refuse, before anything is copied, a state_dict
    made under another parameterization or whose masks or zeros disagree with this model.

    Scheme, roles and multipliers are not visible in the weights, so the root holds a
    ``_sparsemup_signature`` buffer (a digest of them) that travels in the state_dict. A
    mask with another nonzero count would silently change a layer's density; nonzero
    weights outside the mask would silently make it dense.

    A checkpoint in another storage (a registered ``StorageFormat``: block-sparse into masked
    dense, or back) is converted on the way in, so checkpoints move freely between backends.
    """

    def __init__(self, masked: list[tuple[str, int]]) -> None:
        self.masked = masked  # (weight name, nonzero count of its mask) of masked-dense weights
        self.stored: dict[str, str] = {}  # weight name -> storage format, for weights sparse by storage

    def expect(self, name: str, nnz: int) -> None:
        """Expect ``nnz`` nonzeros in the mask of weight ``name`` from now on (a dynamic mask changed)."""
        self.masked = [(n, nnz if n == name else count) for n, count in self.masked]

    def _convert(self, module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
        formats = storage_formats()
        for name, _ in self.masked:  # another storage's entries into a masked-dense weight
            key = prefix + name
            for fmt in formats.values():
                if key in state_dict and fmt.holds(state_dict, key):
                    fmt.to_masked_dense(state_dict, key, tuple(module.get_parameter(name).shape))
        for name, storage in self.stored.items():  # a masked-dense weight into this layer's storage
            key, fmt = prefix + name, formats[storage]
            owner = module.get_submodule(name.rpartition(".")[0])
            for other in formats.values():  # a third storage's entries go through masked dense
                if other is not fmt and other.holds(state_dict, key) and not fmt.holds(state_dict, key):
                    assert isinstance(owner, SparseStorage)  # declare_storage names only such modules
                    other.to_masked_dense(state_dict, key, tuple(owner.mask().shape))
            if fmt.holds(state_dict, key):
                fmt.check_pattern(state_dict, key, owner, name)
            elif key + MASK_SUFFIX in state_dict and key in state_dict:
                fmt.from_masked_dense(state_dict, key, owner, name)

    def __call__(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + SIGNATURE
        if key not in state_dict:  # dropped on purpose: load across parameterizations
            state_dict[key] = getattr(module, SIGNATURE)
        elif not torch.equal(state_dict[key].cpu(), getattr(module, SIGNATURE).cpu()):
            raise ValueError(
                "this state_dict was saved from a model parameterized differently (scheme, roles, width or "
                "density multipliers, or α's differ); call sparsemup.parameterize with the checkpoint's "
                f"arguments before loading, or drop state_dict[{key!r}] to load the weights anyway"
            )
        self._convert(module, state_dict, prefix)
        for name, nnz in self.masked:
            weight_key, mask_key = prefix + name, prefix + name + MASK_SUFFIX
            mask = state_dict.get(mask_key)
            if mask is not None and int(mask.count_nonzero()) != nnz:
                raise ValueError(
                    f"{name}: the state_dict's mask has {int(mask.count_nonzero())} nonzeros but this model was "
                    f"parameterized with {nnz}; parameterize the model with the checkpoint's density before loading"
                )
            if weight_key in state_dict:
                if mask is None:
                    mask = module.get_buffer(name + MASK_SUFFIX)
                stray = int((state_dict[weight_key].detach() * (mask.to(state_dict[weight_key].device) == 0))
                            .count_nonzero())
                if stray:
                    raise ValueError(
                        f"{name}: the state_dict's weight has {stray} nonzero entries outside its mask (a dense or "
                        "differently masked checkpoint?); load a state_dict saved from a model with the same "
                        "masks (it holds them as *_mask buffers)"
                    )


class WatchCopies:
    """Forward pre-hook on the root model: hand the module it runs on to the optimizer guard (``watch``), so that
    a deep copy of a parameterized model, which carries its hooks but not its place in the guard's registry, is
    watched from its first forward."""

    def __init__(self, watch: Callable[[nn.Module], None]) -> None:
        self.watch = watch

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling():
            self.watch(module)


HOOK_TYPES = (OutputMultiplier, InputMultiplier, EnsureGradMask, EnsureAllGradMasks, CheckStateOnLoad, WatchCopies)

_MOVED_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def move_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` the forward and backward hooks of ``source``: the same dicts, so the user's
    hook handles still remove them (used when a layer is swapped for another storage and back)."""
    for attr in _MOVED_HOOKS:
        setattr(target, attr, getattr(source, attr))


def declare_storage(model: nn.Module, stored: Mapping[str, str]) -> None:
    """Tell the root's hooks that the masked weights ``stored`` ({name: storage format}) were swapped into
    modules that are sparse by storage: their masked-dense hooks are forgotten, their loads converted."""
    unknown = sorted(set(stored.values()) - set(storage_formats()))
    if unknown:
        raise ValueError(f"storage format(s) {unknown} are not registered; register them with "
                         "sparsemup.core.storage.register_storage before declaring weights stored in them")
    modules = {id(m) for m in model.modules()}
    for hook in model._forward_pre_hooks.values():
        if isinstance(hook, EnsureAllGradMasks):
            hook.entries = [(owner, ensure) for owner, ensure in hook.entries if id(owner) in modules]
    for hook in model._load_state_dict_pre_hooks.values():
        check = getattr(hook, "hook", hook)
        if isinstance(check, CheckStateOnLoad):
            check.masked = [(name, nnz) for name, nnz in check.masked if name not in stored]
            check.stored = {**check.stored, **stored}
