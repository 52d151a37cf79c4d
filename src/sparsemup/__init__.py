"""sparsemup: SµPar (sparse maximal update parameterization) for any PyTorch model.

Tune hyperparameters once on a small dense model, then train wider and sparser
models with the same learning rate and init. Typical use::

    import sparsemup as smp
    with torch.device("meta"):
        base = Model(width=64)
    model = Model(width=1024)
    smp.parameterize(model, base, scheme="supar", density=0.25, init_std=0.02)
    opt = smp.make_optimizer(model, torch.optim.AdamW, lr=3e-3, weight_decay=0.1)

With ``mask_kind="blocks"``, ``smp.sparsify(model)`` (before the optimizer) stores and computes
only the kept blocks of each hidden layer.
"""

from .attention import DotProductAttention
from .backend import get_backends, sparsify, to_masked_dense
from .blocksparse import BlockSparseLinear
from .explain import explain, explain_rows
from .export import export
from .optim import make_optimizer, optimizer_family, param_groups
from .parameterize import (
    Parameterization,
    ParamInfo,
    apply_masks,
    get_mask,
    get_parameterization,
    is_parameterized,
    parameterize,
)
from .rules import (
    SCHEMES,
    Family,
    Multipliers,
    Role,
    Scheme,
    attention_scale,
    forward_multiplier,
    get_scheme,
    init_std,
    lr_multiplier,
    weight_decay_multiplier,
)

__version__ = "0.1.0"

__all__ = [
    "BlockSparseLinear",
    "DotProductAttention",
    "Family",
    "Multipliers",
    "ParamInfo",
    "Parameterization",
    "Role",
    "SCHEMES",
    "Scheme",
    "apply_masks",
    "attention_scale",
    "explain",
    "explain_rows",
    "export",
    "forward_multiplier",
    "get_backends",
    "get_mask",
    "get_parameterization",
    "get_scheme",
    "init_std",
    "is_parameterized",
    "lr_multiplier",
    "make_optimizer",
    "optimizer_family",
    "param_groups",
    "parameterize",
    "sparsify",
    "to_masked_dense",
    "weight_decay_multiplier",
]
