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
only the kept blocks of each hidden layer. The rule functions are in ``sparsemup.rules``; masks,
hooks and the plan in ``sparsemup.core``; backends in ``sparsemup.sparse``; the trainer in
``sparsemup.train``; sweeps in ``sparsemup.tuning`` (see the README's package structure section).
"""

from . import rules
from .core.attention import DotProductAttention
from .core.explain import explain
from .core.export import export
from .core.layout import register_layout
from .core.optim import make_optimizer, param_groups, set_optimizer_guard
from .core.parameterize import parameterize
from .core.record import Parameterization, ParamInfo, get_parameterization
from .core.rules import SCHEMES, Role, Scheme
from .sparse.backend import sparsify

__version__ = "0.1.0"

__all__ = [
    "DotProductAttention",
    "ParamInfo",
    "Parameterization",
    "Role",
    "SCHEMES",
    "Scheme",
    "explain",
    "export",
    "get_parameterization",
    "make_optimizer",
    "param_groups",
    "parameterize",
    "register_layout",
    "rules",
    "set_optimizer_guard",
    "sparsify",
]
