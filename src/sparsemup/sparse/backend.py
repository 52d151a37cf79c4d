"""Execution backends for masked hidden weights: masked dense (every device), block-sparse or row-sparse.

``sparsify`` swaps, after ``parameterize`` and before the optimizer and any DDP/FSDP wrapper,
each masked ``nn.Linear`` whose mask is made of whole b×b blocks for a ``BlockSparseLinear``
that stores and computes only those blocks, or one whose mask keeps k entries in every row (the
paper's unstructured masks) for a ``RowSparseLinear`` that stores and computes only those.
Names, roles, multipliers and masks stay the same, so parameter groups, the coordinate check and
the trainer work unchanged; weights and optimizer state shrink to ρ of dense. The automatic
choice is timed on the machine it runs on (``calibration``: cached per machine, decided by rank 0
for every process of a job); the recorded ``sparsemup bench`` files are documentation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..core import hooks
from ..core.masks import block_columns
from ..core.record import RECORD_PREFIX, get_parameterization
from ..core.storage import storage_formats
from ..core.structure import unwrap
from ..core.vocab import BACKEND_CHOICES, BACKENDS, Backend, BackendChoice
from .blocksparse import BlockSparseLinear
from .calibration import LayerCase, broadcast_choice, calibrated
from .rowsparse import RowSparseLinear, row_columns
from .timing import time_case

__all__ = ["Fixes", "PYTHON_FIXES", "auto_choice", "check_backend", "sparsify", "get_backends", "to_masked_dense"]

_ATTR = RECORD_PREFIX + "backends"  # {weight name: backend} on the model sparsify was called on
_STATE_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                "_load_state_dict_post_hooks")


@dataclass(frozen=True)
class Fixes:
    """How a caller tells its user to mend each part of the backend rule, in the caller's own words
    (config keys, command-line flags or Python arguments)."""

    block_masks: str  # the blocks backend without block masks
    masked_dense: str  # a dynamic method on another backend
    element_masks: str  # a dynamic method on block masks


PYTHON_FIXES = Fixes(
    block_masks="parameterize with mask_kind='blocks' (and a block_size dividing the layers), or use backend='auto'",
    masked_dense="keep the model masked dense (sparsify(model, 'masked_dense'), or no sparsify)",
    element_masks="parameterize with mask_kind='rows'",
)


def check_backend(backend: str, mask_kind: str, method: str = "static", fixes: Fixes = PYTHON_FIXES) -> None:
    """The backend rule, checked once for the trainer, the coordinate check and ``sparsify``: the blocks backend
    runs block masks only; a dynamic method (gmp, set, rigl) drops and regrows single weights of masked-dense
    layers. Raises ValueError naming the broken part and the fix in ``fixes``."""
    if backend == "blocks" and mask_kind != "blocks":
        raise ValueError(f"the blocks backend runs block masks only (these are {mask_kind!r} masks); "
                         f"{fixes.block_masks}")
    if method != "static" and backend != "masked_dense":
        raise ValueError(f"dynamic sparsity ({method}) updates masked-dense weights only, not the {backend} "
                         f"backend's; {fixes.masked_dense}")
    if method != "static" and mask_kind != "rows":
        raise ValueError(f"dynamic sparsity ({method}) drops and regrows single weights, not {mask_kind}; "
                         f"{fixes.element_masks}")


def auto_choice(target: nn.Module, candidates: Mapping[str, tuple[Backend, ...]], dtype: torch.dtype | None,
                measure: Callable[[LayerCase, Backend], float | None] | None = None) -> dict[str, Backend]:
    """{weight name: backend} of ``sparsify(model, "auto")`` for the masked weights in ``candidates`` (each with the
    sparse backends its layer can run on, none for a layer without a sparse twin): calibrated on this machine
    (``calibration``) for CPU layers with a sparse twin, masked dense elsewhere (sparse kernels are not calibrated
    on GPUs yet). Only rank 0 of a process group measures; every process gets its choice."""
    record = get_parameterization(target)
    cases: dict[str, LayerCase] = {}
    for name, possible in candidates.items():
        weight = target.get_parameter(name)
        if not possible or weight.device.type != "cpu":
            continue
        dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype or weight.dtype)
        if dtype_name is None:
            continue
        info = record.info(name)
        shape = (int(info.shape[0]), int(info.shape[1]))
        cases[name] = LayerCase(shape, info.density, dtype_name, possible,
                                record.block_size if "blocks" in possible else 0)
    choice: dict[str, Backend] = {name: "masked_dense" for name in candidates}
    if cases and _rank() == 0:
        decided = calibrated(sorted(set(cases.values()), key=LayerCase.key), measure or time_case)
        choice.update({name: decided[case] for name, case in cases.items()})
    return broadcast_choice(choice) if cases else choice


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_backends(model: nn.Module) -> dict[str, Backend]:
    """{masked weight name: backend} chosen by ``sparsify`` (empty when it was not called)."""
    return dict(getattr(unwrap(model), _ATTR, {}))


@dataclass(frozen=True)
class _Place:
    """Where a masked weight's plain nn.Linear sits (None: it has no sparse twin) and its mask's layout on each
    sparse backend (None where the mask does not fit that backend)."""

    parent: nn.Module | None
    child: str
    linear: nn.Linear | None
    layouts: Mapping[Backend, torch.Tensor | None]

    def candidates(self) -> tuple[Backend, ...]:
        """The sparse backends this weight can run on."""
        sparse: tuple[Backend, ...] = ("blocks", "rows")
        return tuple(b for b in sparse if self.layouts.get(b) is not None)


def _place(model: nn.Module, name: str, tied: bool, block_size: int) -> _Place:
    """The ``_Place`` of a masked weight: a sparse twin only for a plain, untied nn.Linear called by its parent."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    # subclasses and MHA's out_proj are read directly, not called
    if tied or attr != "weight" or type(module) is not nn.Linear or isinstance(parent, nn.MultiheadAttention):
        return _Place(None, child, None, {"blocks": None, "rows": None})
    assert isinstance(module, nn.Linear)
    mask = getattr(module, attr + hooks.MASK_SUFFIX) != 0
    return _Place(parent, child, module, {"blocks": block_columns(mask, block_size), "rows": row_columns(mask)})


def sparsify(
    model: nn.Module,
    backend: BackendChoice | Mapping[str, Backend] = "auto",
    dtype: torch.dtype | None = None,
) -> dict[str, Backend]:
    """Run every masked hidden ``nn.Linear`` on its backend; returns {weight name: backend}.

    Args:
        model: a parameterized model, before its optimizer is built and before DDP/FSDP wrap it.
        backend: "auto" (per layer, timed on this machine: ``sparsemup.sparse.calibration``), "blocks"
            or "rows" (every layer that can, an error for one that cannot), "masked_dense" (no change, recorded
            as {} so that a second call is refused like any other),
            or {name: backend} to replay an earlier choice (a checkpoint's).
        dtype: the compute dtype to time "auto" in (bf16 under autocast); default the weight's.

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
    if isinstance(backend, str):
        check_backend(backend, record.mask_kind)
    if backend == "masked_dense":  # a recorded no-op: nothing swapped, and the record stays {} as before
        target.__dict__[_ATTR] = {}
        return {}
    masked = [info for info in record.params.values() if info.masked]
    if isinstance(backend, Mapping):
        wrong = {n: b for n, b in backend.items() if b not in BACKENDS}
        unknown = set(backend) - {info.name for info in masked}
        if wrong or unknown:
            raise ValueError(f"backend map: unknown backends {wrong} or weights {sorted(unknown)}; it must map "
                             f"masked weights to {' or '.join(BACKENDS)}")
    places = {info.name: _place(target, info.name, len(info.names) != 1, record.block_size) for info in masked}
    choice = _choice(target, backend, places, dtype)
    for name, wanted in choice.items():
        _check_place(target, name, places[name], wanted, record.block_size)
    # Validated everything; now swap modules.
    _swap(target, {name: places[name] for name, wanted in choice.items() if wanted != "masked_dense"}, choice,
          record.block_size)
    target.__dict__[_ATTR] = choice
    return dict(choice)


def _choice(target: nn.Module, backend: BackendChoice | Mapping[str, Backend], places: Mapping[str, _Place],
            dtype: torch.dtype | None) -> dict[str, Backend]:
    """{weight name: backend} for every masked weight: replayed from a map, timed ("auto") or the one asked for."""
    if isinstance(backend, Mapping):
        return {name: backend.get(name, "masked_dense") for name in places}
    if backend == "auto":
        automatic = auto_choice(target, {name: place.candidates() for name, place in places.items()}, dtype)
        return {name: automatic[name] for name in places}
    assert backend != "masked_dense"  # sparsify handled it
    return {name: backend for name in places}  # "blocks" or "rows"


def _check_place(target: nn.Module, name: str, place: _Place, wanted: Backend, block_size: int) -> None:
    """Refuse a weight that cannot run on the ``wanted`` backend, naming why and the fix."""
    if wanted == "masked_dense":
        return
    if place.linear is None:
        owner = type(target.get_submodule(name.rpartition(".")[0])).__name__
        raise ValueError(f"{name}: cannot run on the {wanted} backend: its owner is a {owner}, and only a "
                         "plain nn.Linear (not tied, called by its parent) has a sparse twin; keep this "
                         "model masked dense (backend='masked_dense') or use backend='auto', which does")
    if place.layouts[wanted] is None:
        raise ValueError(f"{name}: cannot run block-sparse: its mask is not made of whole "
                         f"{block_size}x{block_size} blocks; parameterize with "
                         "mask_kind='blocks' (and a block_size dividing the layer), or use backend='auto'"
                         if wanted == "blocks" else
                         f"{name}: cannot run row-sparse: its mask keeps different numbers of weights "
                         "in different rows (or none); parameterize with mask_kind='rows' (or 'blocks'), "
                         "or use backend='masked_dense'")
    if any(getattr(place.linear, attr) for attr in _STATE_HOOKS):
        raise ValueError(f"{name}: its module has state_dict hooks, written for a dense weight; "
                         "remove them before sparsify (or keep this layer masked dense)")


def _swap(target: nn.Module, places: Mapping[str, _Place], choice: Mapping[str, Backend], block_size: int) -> None:
    """Replace each checked linear in ``places`` by its sparse twin, moving its hooks, and declare the storage."""
    converted: dict[str, str] = {}
    for name, place in places.items():
        wanted, linear, layout = choice[name], place.linear, place.layouts[choice[name]]
        assert place.parent is not None and linear is not None and layout is not None  # _check_place
        sparse: nn.Module = (BlockSparseLinear.from_linear(linear, layout, block_size) if wanted == "blocks"
                             else RowSparseLinear.from_linear(linear, layout))
        hooks.move_hooks(linear, sparse)
        for key in [k for k, h in sparse._forward_pre_hooks.items() if isinstance(h, hooks.EnsureGradMask)]:
            del sparse._forward_pre_hooks[key]
        setattr(place.parent, place.child, sparse)
        converted[name] = wanted
    hooks.declare_storage(target, converted)


def to_masked_dense(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict with every block- or row-sparse weight expanded to a dense weight plus its ``*_mask``.

    Needs no model: layouts travel in the ``weight_index``/``weight_shape`` buffers. The result
    loads into the same model parameterized with the masked-dense backend.
    """
    out = dict(state_dict)
    for key in [k for k in state_dict if k.endswith(".weight_index")]:
        weight_key = key[: -len("_index")]
        if weight_key + "_shape" not in out:
            raise ValueError(f"{weight_key}: a sparse entry without its {weight_key}_shape buffer; convert a "
                             "complete state_dict (or load it into the model, which knows the shapes)")
        fmt = next((f for f in storage_formats().values() if f.holds(out, weight_key)), None)
        if fmt is None:
            raise ValueError(f"{weight_key}: its entries are in no registered storage format (values of shape "
                             f"{tuple(out[weight_key].shape)})")
        fmt.to_masked_dense(out, weight_key, tuple(int(n) for n in out[weight_key + "_shape"]))
    return out
