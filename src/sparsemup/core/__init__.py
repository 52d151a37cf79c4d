"""The parameterization itself: rules, masks, planning and applying, optimizer groups, export.

Imports nothing else of sparsemup. Other subpackages extend it through ``storage``
(weights stored other than masked dense), ``optim.register_optimizer`` and
``layout.register_layout`` (module types whose weight layout is not built in).
"""

from .attention import DotProductAttention
from .explain import explain, explain_rows
from .export import export
from .layout import Layout, register_layout
from .optim import make_optimizer, param_groups, register_optimizer, set_optimizer_guard
from .parameterize import parameterize
from .record import Parameterization, ParamInfo, apply_masks, get_mask, get_parameterization, is_parameterized
from .rules import SCHEMES, Family, Multipliers, Role, Scheme, get_scheme

__all__ = [
    "DotProductAttention", "Family", "Layout", "Multipliers", "ParamInfo", "Parameterization", "Role", "SCHEMES",
    "Scheme",
    "apply_masks", "explain", "explain_rows", "export", "get_mask", "get_parameterization", "get_scheme",
    "is_parameterized", "make_optimizer", "param_groups", "parameterize", "register_layout",
    "register_optimizer", "set_optimizer_guard",
]
