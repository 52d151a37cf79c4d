"""The parameterization's rules as pure functions of (role, scheme, multipliers): ``sparsemup.rules``.

The public face of ``sparsemup.core.rules`` (where they are defined, and documented).
"""

from .core.rules import (
    SCHEMES,
    Family,
    Multipliers,
    Role,
    Scheme,
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

__all__ = ["SCHEMES", "Family", "Multipliers", "Role", "Scheme", "adam_eps_multiplier", "attention_scale",
           "depth_multiplier", "forward_multiplier", "get_scheme", "init_std", "lr_multiplier", "residual_multiplier",
           "weight_decay_multiplier"]
