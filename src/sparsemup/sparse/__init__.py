"""Execution backends for masked hidden weights: block-sparse layers, backend choice and swapping,
state-dict conversion between storages, the layer benchmark, and dynamic sparsity (GMP, SET, RigL mask
updates: ``dynamic`` holds the rules, ``mask_updates`` applies them).

Importing it registers the block-sparse storage with the core (``sparsemup.core.storage``).
"""

from .backend import choose_backend, get_backends, sparsify, to_masked_dense
from .blocksparse import BlockSparseLinear, block_sparse_linear
from .dynamic import GMP, SET, RigL
from .mask_updates import DynamicSparsity

__all__ = ["GMP", "SET", "BlockSparseLinear", "DynamicSparsity", "RigL", "block_sparse_linear", "choose_backend",
           "get_backends", "sparsify", "to_masked_dense"]
