"""Extension points for hidden weights stored other than as a dense tensor beside a mask buffer.

The core itself knows one storage, masked dense. A subpackage that stores a masked weight another
way (``sparsemup.sparse``'s block-sparse layers, later compressed rows) plugs in here instead of
being imported by the core: its modules subclass ``SparseStorage`` (so ``get_mask``, ``apply_masks``
and ``export`` handle them), and it registers a ``StorageFormat`` (so a state_dict converts between
storages when it is loaded, and checkpoints move freely between backends).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["SparseStorage", "StorageFormat", "register_storage", "storage_formats"]


class SparseStorage(nn.Module, ABC):
    """A module whose hidden ``weight`` is sparse by storage: it keeps only its mask's entries."""

    @abstractmethod
    def mask(self) -> torch.Tensor:
        """The logical (out, in) boolean mask."""

    @abstractmethod
    def to_dense_module(self) -> nn.Module:
        """A plain module computing the same function with a dense weight (exact zeros off the mask)."""


class StorageFormat(ABC):
    """How one storage writes a masked weight into a state_dict, and how it converts from masked dense."""

    name: str  # the backend name that selects this storage

    @abstractmethod
    def holds(self, state_dict: Mapping[str, torch.Tensor], key: str) -> bool:
        """Whether ``state_dict`` stores the weight ``key`` in this format."""

    @abstractmethod
    def to_masked_dense(self, state_dict: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> None:
        """Replace this format's entries for ``key`` by a dense weight ``key`` and its ``key + '_mask'``."""

    @abstractmethod
    def from_masked_dense(self, state_dict: dict[str, torch.Tensor], key: str, owner: nn.Module, name: str) -> None:
        """Replace a masked-dense ``key`` and ``key + '_mask'`` by this format's entries for ``owner``;
        raise ValueError naming ``name`` when the mask is not ``owner``'s sparsity pattern or weights lie off it."""

    @abstractmethod
    def check_pattern(self, state_dict: Mapping[str, torch.Tensor], key: str, owner: nn.Module, name: str) -> None:
        """Raise ValueError naming ``name`` when ``state_dict``'s entries for ``key`` are not ``owner``'s pattern."""


_FORMATS: dict[str, StorageFormat] = {}


def register_storage(fmt: StorageFormat) -> None:
    """Make ``fmt`` known to the load-time checks (registering the same name again replaces it)."""
    _FORMATS[fmt.name] = fmt


def storage_formats() -> Mapping[str, StorageFormat]:
    """The registered formats by name."""
    return _FORMATS
