"""Execution backends for masked hidden weights: block- and row-sparse layers (``blocksparse``, ``rowsparse``) with
their storage formats, the arithmetic both run on (``kernels``: the native CPU kernels of ``native``, built on first
use, or plain torch), the backend rule and swapping (``backend``; ``sparsify`` is public as ``sparsemup.sparsify``),
and the calibrated ``auto`` choice (``calibration``, timed by ``timing``).

Importing it registers the block- and row-sparse storages with the core (``sparsemup.core.storage``). Dynamic
sparsity moved to ``sparsemup.dynamic``; its names here are deprecated aliases, kept for one release.
"""

import warnings
from typing import Any

from .backend import Fixes, auto_choice, check_backend, get_backends, to_masked_dense
from .blocksparse import BlockSparseLinear, block_sparse_linear
from .rowsparse import RowSparseLinear, row_sparse_linear

__all__ = ["BlockSparseLinear", "Fixes", "RowSparseLinear", "auto_choice", "block_sparse_linear", "check_backend",
           "get_backends", "row_sparse_linear", "to_masked_dense"]

_MOVED = ("GMP", "SET", "RigL", "DynamicSparsity")  # to sparsemup.dynamic


def __getattr__(name: str) -> Any:
    """``sparsemup.sparse.GMP`` and the other dynamic-sparsity names: sparsemup.dynamic's, with a warning."""
    if name in _MOVED:
        import sparsemup.dynamic

        warnings.warn(f"sparsemup.sparse.{name} moved to sparsemup.dynamic.{name}; the old name goes in the next "
                      "release", DeprecationWarning, stacklevel=2)
        return getattr(sparsemup.dynamic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
