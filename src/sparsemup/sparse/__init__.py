"""Execution backends for masked hidden weights: block-sparse layers, backend choice and swapping,
state-dict conversion between storages, and the layer benchmark.

Importing it registers the block-sparse storage with the core (``sparsemup.core.storage``).
"""

from .backend import choose_backend, get_backends, sparsify, to_masked_dense
from .blocksparse import BlockSparseLinear, block_sparse_linear

__all__ = ["BlockSparseLinear", "block_sparse_linear", "choose_backend", "get_backends", "sparsify",
           "to_masked_dense"]
