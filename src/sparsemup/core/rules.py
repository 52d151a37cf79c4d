"""The parameterization rules as pure functions (no torch).

Every rule is a function of a parameter's role, the scheme, and its multipliers
(width m_d, fan-out m_out, density m_ρ). This module is the single place where
SP, µP and SµPar differ; ``sparsemup.parameterize`` only applies what it returns.
See docs/RULES.md for the table these functions implement (arXiv 2405.15743, Table 1 and App. D.3.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from .vocab import WEIGHT_DECAY_MODES, SchemeName, WeightDecayMode, check_choice

__all__ = [
    "Role",
    "Family",
    "Scheme",
    "Multipliers",
    "SCHEMES",
    "get_scheme",
    "init_std",
    "lr_multiplier",
    "weight_decay_multiplier",
    "forward_multiplier",
    "attention_scale",
]


class Role(str, Enum):
    """What a parameter does in the network, which decides how it scales."""

    INPUT = "input"  # embedding / first layer: only its fan-out grows with width
    HIDDEN = "hidden"  # fan-in and fan-out both grow; the only role that is sparsified
    OUTPUT = "output"  # readout / unembedding: only its fan-in grows
    VECTOR = "vector"  # biases, norm gains, anything with at most one width dimension


class Family(str, Enum):
    """Optimizer families with a known rule (paper Table 1 for Adam, App. D.3.1 for SGD)."""

    ADAM = "adam"  # entry-wise normalised updates: Adam, AdamW, RMSprop, Adagrad, ...
    SGD = "sgd"  # raw-gradient updates: SGD with or without momentum


@dataclass(frozen=True)
class Scheme:
    """A parameterization: µP width scaling plus SµPar's two density corrections.

    The corrections are separate switches so the paper's ablation (Figs. 13-14:
    init correction alone, LR correction alone) is expressible.
    """

    name: str
    width: bool
    density_init: bool
    density_lr: bool

    def __post_init__(self) -> None:
        if (self.density_init or self.density_lr) and not self.width:
            raise ValueError(
                f"scheme {self.name!r}: SµPar's density corrections are defined on top of µP; "
                "set width=True or turn the density corrections off"
            )


SCHEMES: dict[SchemeName, Scheme] = {
    "sp": Scheme("sp", width=False, density_init=False, density_lr=False),
    "mup": Scheme("mup", width=True, density_init=False, density_lr=False),
    "supar": Scheme("supar", width=True, density_init=True, density_lr=True),
    # Ablations (paper Figs. 13-14): µP with only one of SµPar's corrections.
    "mup+density_init": Scheme("mup+density_init", width=True, density_init=True, density_lr=False),
    "mup+density_lr": Scheme("mup+density_lr", width=True, density_init=False, density_lr=True),
}


def get_scheme(scheme: str | Scheme) -> Scheme:
    """Look a scheme up by name; a Scheme passes through unchanged."""
    if isinstance(scheme, Scheme):
        return scheme
    check_choice(scheme, tuple(SCHEMES), "scheme")
    return SCHEMES[scheme]  # type: ignore[index]


@dataclass(frozen=True)
class Multipliers:
    """Size of a parameter relative to its counterpart in the base model.

    width: m_d, the multiplier of the dimension that scales. For hidden and output
        weights it is the fan-in multiplier; for input weights and vectors, the
        multiplier of their one width dimension (1 when there is none).
    fan_out: m_out, the fan-out multiplier of a hidden weight (SGD's rule uses it).
    density: m_ρ = ρ / ρ_base with realised densities (1 for dense parameters).
    """

    width: float = 1.0
    fan_out: float = 1.0
    density: float = 1.0

    def __post_init__(self) -> None:
        for field, value in (("width", self.width), ("fan_out", self.fan_out), ("density", self.density)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"multiplier {field} must be a positive finite number, got {value!r}")


def _role(role: Role | str) -> Role:
    return role if isinstance(role, Role) else Role(role)


def _family(family: Family | str) -> Family:
    return family if isinstance(family, Family) else Family(family)


def _hidden_scale(scheme: Scheme, m: Multipliers, with_density: bool) -> float:
    """m_d · m_ρ as far as the scheme turns them on (1 under SP)."""
    return (m.width if scheme.width else 1.0) * (m.density if with_density else 1.0)


def init_std(role: Role | str, scheme: Scheme | str, m: Multipliers, base_std: float) -> float:
    """Std of the normal init of a parameter's nonzero entries.

    Hidden weights: σ_base / sqrt(m_d · m_ρ) under SµPar (sqrt(m_d) under µP,
    σ_base under SP). Input and output weights keep σ_base in every scheme.
    Vectors have no width-dependent init (their module's own init is kept).
    """
    role, scheme = _role(role), get_scheme(scheme)
    if role is Role.HIDDEN:
        return base_std / math.sqrt(_hidden_scale(scheme, m, scheme.density_init))
    return base_std


def lr_multiplier(
    role: Role | str, scheme: Scheme | str, m: Multipliers, family: Family | str
) -> float:
    """Factor on η_base for this parameter's learning rate.

    Adam family: hidden 1/(m_d · m_ρ) under SµPar, 1/m_d under µP; all else 1.
    SGD family (µP's MuSGD rule, paper App. D.3.1): hidden m_out/m_d · 1/m_ρ,
    input, output and vectors m_d; everything 1 under SP.
    """
    role, scheme, family = _role(role), get_scheme(scheme), _family(family)
    density = m.density if scheme.density_lr else 1.0
    if family is Family.ADAM:
        if role is Role.HIDDEN:
            return 1.0 / _hidden_scale(scheme, m, scheme.density_lr)
        return 1.0
    if role is Role.HIDDEN:
        width = m.fan_out / m.width if scheme.width else 1.0
        return width / density
    return m.width if scheme.width else 1.0


def weight_decay_multiplier(
    role: Role | str,
    lr_mult: float,
    mode: WeightDecayMode = "independent",
    decay_vectors: bool = False,
) -> float:
    """Factor on the base weight decay for this parameter.

    ``independent`` keeps lr·wd (the decay PyTorch applies per step) equal to
    η_base·wd_base in every layer, so a decay tuned on the base transfers.
    ``coupled`` leaves wd as is, so decay shrinks with the layer's LR (the
    official SµPar code). Vectors get no decay unless ``decay_vectors``.
    """
    role = _role(role)
    check_choice(mode, WEIGHT_DECAY_MODES, "weight-decay mode")
    if role is Role.VECTOR and not decay_vectors:
        return 0.0
    return 1.0 / lr_mult if mode == "independent" else 1.0


def forward_multiplier(
    role: Role | str,
    scheme: Scheme | str,
    m: Multipliers,
    input_alpha: float = 1.0,
    output_alpha: float = 1.0,
) -> float:
    """Constant multiplying a layer's input (readout) or output (embedding) in the forward.

    Input: α_input. Output: α_output / m_d under µP and SµPar, α_output under SP.
    Hidden layers and vectors: 1. With α = 1, SP is the textbook parameterization.
    """
    role, scheme = _role(role), get_scheme(scheme)
    if role is Role.INPUT:
        return input_alpha
    if role is Role.OUTPUT:
        return output_alpha / (m.width if scheme.width else 1.0)
    return 1.0


def attention_scale(scheme: Scheme | str, head_dim: int, base_head_dim: int) -> float:
    """Scale on attention logits QᵀK: 1/sqrt(d_head) under SP, sqrt(d_head,base)/d_head otherwise.

    The two agree at d_head = d_head,base, so µP equals SP at the base shape exactly.
    """
    scheme = get_scheme(scheme)
    if head_dim <= 0 or base_head_dim <= 0:
        raise ValueError(f"head dims must be positive, got head_dim={head_dim}, base_head_dim={base_head_dim}")
    if scheme.width:
        return math.sqrt(base_head_dim) / head_dim
    return 1.0 / math.sqrt(head_dim)
