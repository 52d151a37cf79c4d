"""Execution backends for masked hidden weights: block- and row-sparse layers (on native CPU kernels
built on first use, ``native``), backend choice and swapping,
state-dict conversion between storages, the layer benchmark, and dynamic sparsity (GMP, SET, RigL mask
updates: ``dynamic`` holds the rules, ``mask_updates`` applies them).

Importing it registers the block- and row-sparse storages with the core (``sparsemup.core.storage``).
"""

from .backend import auto_choice, get_backends, sparsify, to_masked_dense
from .blocksparse import BlockSparseLinear, block_sparse_linear
from .dynamic import GMP, SET, RigL
from .mask_updates import DynamicSparsity
from .rowsparse import RowSparseLinear, row_sparse_linear

__all__ = ["GMP", "SET", "BlockSparseLinear", "DynamicSparsity", "RigL", "RowSparseLinear", "block_sparse_linear",
           "auto_choice", "get_backends", "row_sparse_linear", "sparsify", "to_masked_dense"]
