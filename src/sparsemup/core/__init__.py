"""The parameterization itself: rules, masks, planning and applying, optimizer groups, export.

Imports nothing else of sparsemup. Other subpackages extend it through ``storage``
(weights stored other than masked dense), ``optim.register_optimizer`` and
``layout.register_layout`` (module types whose weight layout is not built in).

Its names public as ``sparsemup.X`` (``parameterize``, ``Role``, ...) or ``sparsemup.rules.X`` are not repeated
here: one import path per public name. Code inside sparsemup imports them from their defining module.
"""

from .explain import explain_rows
from .layout import Layout
from .optim import register_optimizer
from .record import apply_masks, get_mask, is_parameterized

__all__ = ["Layout", "apply_masks", "explain_rows", "get_mask", "is_parameterized", "register_optimizer"]
