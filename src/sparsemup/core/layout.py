"""Weight layouts as data: which dims of a module's weight are its fan-out and its fan-in.

Role inference, width multipliers (m_d, m_out), masks (exact fan-in per output neuron) and
the choice of forward-multiplier owners all read a weight through its owner's ``Layout``. The
built-in table covers torch's linear, bilinear, embedding and (transposed) conv modules;
``register_layout`` adds any other module whose output is linear in its weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Layout", "register_layout", "layout_of", "group_count", "neurons_view", "from_neurons", "neurons_shape"]


@dataclass(frozen=True)
class Layout:
    """Where a weight keeps its fan-out (output neurons) and fan-in, as dims of the weight tensor.

    ``groups`` names the module attribute holding a group count (convs). ``group_dim`` is the
    fan-in dim that the groups split, when the weight does not already hold one group's fan-in
    per neuron (ConvTranspose: weight (in, out/g, k...), in-channels split into g groups).
    ``hookable``: the output is linear in the weight (plus a bias) and the input comes first, so a
    forward multiplier can be a hook on the input or output (false for nn.MultiheadAttention).
    """

    fan_out: tuple[int, ...]
    fan_in: tuple[int, ...]
    groups: str | None = None
    group_dim: int | None = None
    hookable: bool = True

    def __post_init__(self) -> None:
        dims = self.fan_out + self.fan_in
        if not self.fan_out or not self.fan_in or len(set(dims)) != len(dims) or min(dims) < 0:
            raise ValueError(
                "a layout needs non-empty, disjoint, non-negative fan_out and fan_in dims; "
                f"got fan_out={self.fan_out}, fan_in={self.fan_in}"
            )
        if sorted(dims) != list(range(len(dims))):
            raise ValueError(f"fan_out {self.fan_out} and fan_in {self.fan_in} must cover dims 0..{len(dims) - 1} "
                             "of the weight, each once")
        if self.group_dim is not None and (self.groups is None or self.group_dim not in self.fan_in):
            raise ValueError(f"group_dim {self.group_dim} must be one of the fan_in dims {self.fan_in}, "
                             "with groups set")

    @property
    def ndim(self) -> int:
        return len(self.fan_out) + len(self.fan_in)


def _conv(ndim: int) -> Layout:
    return Layout(fan_out=(0,), fan_in=tuple(range(1, ndim)), groups="groups")


def _conv_transpose(ndim: int) -> Layout:
    return Layout(fan_out=(1,), fan_in=(0, *range(2, ndim)), groups="groups", group_dim=0)


_LAYOUTS: dict[type[nn.Module], Layout] = {
    nn.Linear: Layout(fan_out=(0,), fan_in=(1,)),
    nn.Bilinear: Layout(fan_out=(0,), fan_in=(1, 2)),
    nn.MultiheadAttention: Layout(fan_out=(0,), fan_in=(1,), hookable=False),  # in_proj_weight and q/k/v_proj_weight
    nn.Embedding: Layout(fan_out=(1,), fan_in=(0,)),
    nn.EmbeddingBag: Layout(fan_out=(1,), fan_in=(0,)),
    nn.Conv1d: _conv(3),
    nn.Conv2d: _conv(4),
    nn.Conv3d: _conv(5),
    nn.ConvTranspose1d: _conv_transpose(3),
    nn.ConvTranspose2d: _conv_transpose(4),
    nn.ConvTranspose3d: _conv_transpose(5),
}


def register_layout(
    module_type: type[nn.Module],
    *,
    fan_in: Sequence[int],
    fan_out: Sequence[int],
    groups: str | None = None,
    group_dim: int | None = None,
) -> Layout:
    """Tell sparsemup how ``module_type`` lays out its ``weight``: which dims are fan-in and fan-out.

    The module's output must be linear in its weight (plus an optional bias) and take its input
    as the first argument, like linear and conv layers: forward multipliers are applied as hooks
    on its input or output and folded into the weight on export. The layout applies to every
    parameter of two or more dims that the module owns directly; subclasses inherit it.

    Example (transformers' GPT-2 ``Conv1D`` keeps its weight as (in, out))::

        sparsemup.register_layout(Conv1D, fan_in=(0,), fan_out=(1,))
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layout takes an nn.Module subclass, got {module_type!r}")
    layout = Layout(tuple(fan_out), tuple(fan_in), groups, group_dim)
    _LAYOUTS[module_type] = layout
    return layout


def layout_of(module: nn.Module) -> Layout | None:
    """The layout registered for ``module``'s class or its nearest registered base class."""
    for cls in type(module).__mro__:
        if cls in _LAYOUTS:
            return _LAYOUTS[cls]
    return None


def group_count(module: nn.Module, layout: Layout) -> int:
    """The module's group count (1 for layouts without groups)."""
    if not layout.groups:
        return 1
    value = getattr(module, layout.groups, None)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"the layout of {type(module).__name__} reads its group count from attribute "
                         f"{layout.groups!r}, which is {value!r}; register the layout with the right groups=")
    return value


def _split_dims(shape: Sequence[int], layout: Layout, groups: int) -> tuple[list[int], list[int], list[int]]:
    """The weight's shape with ``group_dim`` split into (groups, size/groups), and the dims (in that
    split shape) of the neurons and of their fan-in."""
    split: list[int] = []
    position: dict[int, int] = {}  # weight dim -> dim of the split shape
    group_pos: list[int] = []  # the dim of the split shape that indexes groups: a fan-out dim
    for d, size in enumerate(shape):
        if d == layout.group_dim and groups > 1:
            if size % groups:
                raise ValueError(f"dim {d} of a weight of shape {tuple(shape)} does not split into {groups} groups")
            group_pos.append(len(split))
            split += [groups, size // groups]
        else:
            split.append(size)
        position[d] = len(split) - 1
    return split, group_pos + [position[d] for d in layout.fan_out], [position[d] for d in layout.fan_in]


def neurons_shape(shape: Sequence[int], layout: Layout, groups: int = 1) -> tuple[int, int]:
    """(output neurons, fan-in per neuron) of a weight of ``shape``."""
    split, out, fan_in = _split_dims(shape, layout, groups)
    return math.prod(split[d] for d in out), math.prod(split[d] for d in fan_in)


def neurons_view(weight: torch.Tensor, layout: Layout, groups: int = 1) -> torch.Tensor:
    """``weight`` as (output neurons, fan-in): row i holds every entry feeding output neuron i."""
    if weight.dim() != layout.ndim:
        raise ValueError(f"a weight of shape {tuple(weight.shape)} does not fit a layout of {layout.ndim} dims")
    split, out, fan_in = _split_dims(weight.shape, layout, groups)
    rows = math.prod(split[d] for d in out)
    return weight.reshape(split).permute(*out, *fan_in).reshape(rows, -1)


def from_neurons(rows: torch.Tensor, shape: Sequence[int], layout: Layout, groups: int = 1) -> torch.Tensor:
    """The inverse of ``neurons_view``: a (neurons, fan-in) tensor back in the weight's ``shape``."""
    split, neuron_dims, fan_in_dims = _split_dims(shape, layout, groups)
    if neuron_dims + fan_in_dims == list(range(len(split))):  # already (neurons, fan-in) order: a plain reshape
        return rows.reshape(tuple(shape))
    index = neurons_view(torch.arange(math.prod(shape)).reshape(tuple(shape)), layout, groups)
    flat = rows.new_empty(math.prod(shape))
    flat[index.reshape(-1)] = rows.reshape(-1)
    return flat.reshape(tuple(shape))
