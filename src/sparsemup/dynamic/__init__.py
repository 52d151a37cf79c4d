"""Dynamic sparsity: masks that change during training (GMP, SET, RigL).

``methods`` holds the mask-update rules as pure functions of tensors and the method objects that schedule
them; ``mask_updates`` applies a method to a parameterized model and its optimizer (``DynamicSparsity``).
Needs only the core: it works on masked-dense weights, the storage every backend starts from.
"""

from .mask_updates import REGROW_INITS, DynamicSparsity, RegrowInit, kept_weight_stats
from .methods import GMP, METHOD_NAMES, SET, Method, MethodName, RigL

__all__ = ["GMP", "METHOD_NAMES", "REGROW_INITS", "SET", "DynamicSparsity", "Method", "MethodName", "RegrowInit",
           "RigL", "kept_weight_stats"]
