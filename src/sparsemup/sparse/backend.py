"""Execution backends for masked hidden weights: masked dense (every device) or block-sparse.

``sparsify`` swaps, after ``parameterize`` and before the optimizer and any DDP/FSDP wrapper,
each masked ``nn.Linear`` whose mask is made of whole b×b blocks for a ``BlockSparseLinear``
that stores and computes only those blocks. Names, roles, multipliers and masks stay the same,
so parameter groups, the coordinate check and the trainer work unchanged; weights and optimizer
state shrink to ρ of dense. The automatic choice is a pure function of (density, block, dtype,
device) from thresholds measured with ``sparsemup bench`` (docs/PERFORMANCE.md), hence the same
on every process of a job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core import hooks
from ..core.masks import block_layout
from ..core.record import RECORD_PREFIX, get_parameterization
from ..core.structure import unwrap
from ..core.vocab import BACKEND_CHOICES, BACKENDS, Backend, BackendChoice
from .blocksparse import BlockSparseLinear, BlockStorage, masked_dense_entries

__all__ = ["choose_backend", "sparsify", "get_backends", "to_masked_dense"]

_ATTR = RECORD_PREFIX + "backends"  # {weight name: backend} on the model sparsify was called on
_STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")

# {(dtype, block): highest density at or below which "blocks" beat masked dense of the same dtype
# in every row of the recorded benchmark (docs/perf/bench.json: fwd + bwd, layers 512² to
# 4096×1024, 512 and 4096 tokens, 2-core CPU); bench.derive_thresholds computes it from the file,
# and a test checks the two agree. Smaller blocks run slower GEMMs, so they must be sparser to pay.
CPU_THRESHOLDS: dict[tuple[str, int], float] = {
    ("bf16", 8): 1 / 128,
    ("bf16", 16): 1 / 64,
    ("bf16", 32): 1 / 32,
    ("bf16", 64): 1 / 8,
    ("fp32", 4): 1 / 128,
    ("fp32", 8): 1 / 64,
    ("fp32", 16): 1 / 16,
    ("fp32", 32): 1 / 8,
    ("fp32", 64): 1 / 4,
}
MIN_AUTO_NUMEL = 512 * 512  # smaller layers were not measured: auto keeps them masked dense


def choose_backend(density: float, block: int, dtype: torch.dtype, device: torch.device | str,
                   shape: tuple[int, ...]) -> Backend:
    """The measured-faster backend for one layer: a pure function, identical on every process.

    Off the CPU the block-sparse path is unmeasured, so it is masked dense there.
    """
    if torch.device(device).type != "cpu" or shape[0] * shape[1] < MIN_AUTO_NUMEL:
        return "masked_dense"
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype)
    limit = CPU_THRESHOLDS.get((name, block)) if name is not None else None
    return "blocks" if limit is not None and density <= limit else "masked_dense"


def get_backends(model: nn.Module) -> dict[str, str]:
    """{masked weight name: backend} chosen by ``sparsify`` (empty when it was not called)."""
    return dict(getattr(unwrap(model), _ATTR, {}))


def _convertible(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Linear] | None:
    """(parent, child name, linear) when the weight's owner is a plain nn.Linear called by its parent."""
    module_name, _, attr = name.rpartition(".")
    if attr != "weight":
        return None
    module = model.get_submodule(module_name)
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if type(module) is not nn.Linear or isinstance(parent, nn.MultiheadAttention):
        return None  # subclasses and MHA's out_proj are read directly, not called
    return parent, child, module


def sparsify(
    model: nn.Module,
    backend: BackendChoice | Mapping[str, Backend] = "auto",
    dtype: torch.dtype | None = None,
) -> dict[str, Backend]:
    """Run every masked hidden ``nn.Linear`` on its backend; returns {weight name: backend}.

    Args:
        model: a parameterized model, before its optimizer is built and before DDP/FSDP wrap it.
        backend: "auto" (per layer, by measured thresholds), "blocks" (every layer that can,
            an error for one that cannot), "masked_dense" (no change), or {name: backend} to
            replay an earlier choice (a checkpoint's).
        dtype: the compute dtype the thresholds assume (bf16 under autocast); default the weight's.

    Example::

        sparsemup.parameterize(model, base, density=1 / 16, mask_kind="blocks", block_size=32)
        sparsemup.sparsify(model)  # then build the optimizer
    """
    target = unwrap(model)
    if target is not model:
        raise ValueError("sparsify the plain model before wrapping it in DDP, FSDP or torch.compile")
    if getattr(target, _ATTR, None) is not None:
        raise ValueError("this model was already sparsified; build a fresh model to choose backends again")
    record = get_parameterization(target)
    if isinstance(backend, str) and backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {backend!r}; choose auto, {' or '.join(BACKENDS)}")
    masked = [info for info in record.params.values() if info.masked]
    if isinstance(backend, Mapping):
        wrong = {n: b for n, b in backend.items() if b not in BACKENDS}
        unknown = set(backend) - {info.name for info in masked}
        if wrong or unknown:
            raise ValueError(f"backend map: unknown backends {wrong} or weights {sorted(unknown)}; it must map "
                             f"masked weights to {' or '.join(BACKENDS)}")

    plan: dict[str, tuple[Backend, Any]] = {}
    for info in masked:
        place = _convertible(target, info.name) if len(info.names) == 1 else None
        layout = None
        if place is not None:
            layout = block_layout(getattr(place[2], info.name.rpartition(".")[2] + hooks.MASK_SUFFIX) != 0,
                                  record.block_size)
        wanted: Backend
        if isinstance(backend, Mapping):
            wanted = backend.get(info.name, "masked_dense")
        elif backend == "auto":
            weight = target.get_parameter(info.name)
            wanted = "masked_dense" if layout is None else choose_backend(
                info.density, record.block_size, dtype or weight.dtype, weight.device, info.shape)
        else:
            wanted = backend  # "masked_dense" or "blocks": "auto" was handled above
        if wanted == "blocks":
            if place is None:
                owner = type(target.get_submodule(info.name.rpartition(".")[0])).__name__
                raise ValueError(f"{info.name}: cannot run block-sparse: its owner is a {owner}, and only a plain "
                                 "nn.Linear (not tied, called by its parent) has a block-sparse twin; keep this "
                                 "model masked dense (backend='masked_dense') or use backend='auto', which does")
            if layout is None:
                raise ValueError(f"{info.name}: cannot run block-sparse: its mask is not made of whole "
                                 f"{record.block_size}x{record.block_size} blocks; parameterize with "
                                 "mask_kind='blocks' (and a block_size dividing the layer), or use backend='auto'")
            if any(getattr(place[2], attr) for attr in _STATE_HOOKS):
                raise ValueError(f"{info.name}: its module has state_dict hooks, written for a dense weight; "
                                 "remove them before sparsify (or keep this layer masked dense)")
        plan[info.name] = (wanted, (place, layout))

    # Validated everything; now swap modules.
    converted: set[str] = set()
    for name, (wanted, (place, layout)) in plan.items():
        if wanted != "blocks":
            continue
        parent, child, linear = place
        sparse = BlockSparseLinear.from_linear(linear, layout, record.block_size)
        hooks.move_hooks(linear, sparse)
        for key in [k for k, h in sparse._forward_pre_hooks.items() if isinstance(h, hooks.EnsureGradMask)]:
            del sparse._forward_pre_hooks[key]
        setattr(parent, child, sparse)
        converted.add(name)
    hooks.declare_storage(target, {name: BlockStorage.name for name in converted})
    choice = {name: wanted for name, (wanted, _) in plan.items()}
    target.__dict__[_ATTR] = choice
    return dict(choice)


def to_masked_dense(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A state_dict with every block-sparse weight expanded to a dense weight plus its ``*_mask``.

    Needs no model: block layouts travel in the ``weight_index``/``weight_shape`` buffers. The
    result loads into the same model parameterized with the masked-dense backend.
    """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".weight_index")]:
        weight_key = key[: -len("_index")]
        if weight_key + "_shape" not in out:
            raise ValueError(f"{weight_key}: a block-sparse entry without its {weight_key}_shape buffer; convert a "
                             "complete state_dict (or load it into the model, which knows the shapes)")
        out[weight_key], out[weight_key + hooks.MASK_SUFFIX] = masked_dense_entries(
            out.pop(weight_key), out.pop(key), int(out.pop(weight_key + "_shape")[1]))
    return out
