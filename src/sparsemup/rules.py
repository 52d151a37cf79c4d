"""The parameterization's rules as pure functions of (role, scheme, multipliers): ``sparsemup.rules``.

The public face of ``sparsemup.core.rules`` (where they are defined, and documented). ``Role``, ``Scheme`` and
``SCHEMES``, which these functions take, are public as ``sparsemup.Role`` and so on.
"""

from .core.rules import (
    Family,
    Multipliers,
    adam_eps_multiplier,
    attention_scale,
    depth_multiplier,
    forward_multiplier,
    get_scheme,
    init_std,
    lr_multiplier,
    residual_multiplier,
    weight_decay_multiplier,
)

__all__ = ["Family", "Multipliers", "adam_eps_multiplier", "attention_scale", "depth_multiplier", "forward_multiplier",
           "get_scheme", "init_std", "lr_multiplier", "residual_multiplier", "weight_decay_multiplier"]
