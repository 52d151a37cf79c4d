"""The parameterization rules as pure functions (no torch).

Every rule is a function of a parameter's role, the scheme, and its multipliers
(width m_d, fan-out m_out, density m_ρ, depth m_L), and of the depth rule's α (CompleteP, arXiv 2505.01618).
This module is the single place where SP, µP and SµPar differ; ``sparsemup.parameterize`` only applies what it returns.
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
    "check_depth_alpha",
    "depth_multiplier",
    "residual_multiplier",
    "adam_eps_multiplier",
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
    depth: m_L = L / L_base for a parameter inside a residual block, 1 outside them (embeddings, final norm,
        readout), whose number does not grow with depth.
    """

    width: float = 1.0
    fan_out: float = 1.0
    density: float = 1.0
    depth: float = 1.0

    def __post_init__(self) -> None:
        for field, value in (("width", self.width), ("fan_out", self.fan_out), ("density", self.density),
                             ("depth", self.depth)):
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


def check_depth_alpha(depth_alpha: float | None) -> None:
    """Refuse a depth rule's α outside [1/2, 1], the range CompleteP's analysis covers (None: no depth rule)."""
    if depth_alpha is None:
        return
    if isinstance(depth_alpha, bool) or not isinstance(depth_alpha, (int, float)) or not 0.5 <= depth_alpha <= 1.0:
        raise ValueError(f"depth_alpha must be None (no depth rule), 1 (CompleteP) or 0.5 (depth-µP), or between "
                         f"them, got {depth_alpha!r}")


def depth_multiplier(depth: int, base_depth: int) -> float:
    """m_L = L / L_base: the number of residual blocks over the base model's."""
    if isinstance(depth, bool) or isinstance(base_depth, bool) or not (
            isinstance(depth, int) and isinstance(base_depth, int) and depth > 0 and base_depth > 0):
        raise ValueError(f"depth and base_depth must be positive integers (numbers of residual blocks), got "
                         f"depth={depth!r}, base_depth={base_depth!r}")
    return depth / base_depth


def residual_multiplier(depth_alpha: float | None, m_depth: float) -> float:
    """m_L^(−α) on every residual branch's output (x ← x + m_L^(−α)·branch(x)); 1 without a depth rule.

    With α = 1 (CompleteP) the L branches' sum stays Θ(1) as L grows with every branch updating Θ(1/L)
    of the stream; with α = ½ (depth-µP) their random sum at init stays Θ(1).
    """
    check_depth_alpha(depth_alpha)
    return 1.0 if depth_alpha is None else float(m_depth ** -depth_alpha)


def lr_multiplier(
    role: Role | str, scheme: Scheme | str, m: Multipliers, family: Family | str,
    depth_alpha: float | None = None,
) -> float:
    """Factor on η_base for this parameter's learning rate.

    Adam family: hidden 1/(m_d · m_ρ) under SµPar, 1/m_d under µP; all else 1.
    With a depth rule, times m_L^(α−1) for every parameter in a residual block (``m.depth``; 1 outside).
    SGD family (µP's MuSGD rule, paper App. D.3.1): hidden m_out/m_d · 1/m_ρ,
    input, output and vectors m_d; everything 1 under SP. No depth rule is derived for SGD (refused).
    """
    role, scheme, family = _role(role), get_scheme(scheme), _family(family)
    check_depth_alpha(depth_alpha)
    density = m.density if scheme.density_lr else 1.0
    if family is Family.ADAM:
        depth = 1.0 if depth_alpha is None else float(m.depth ** (depth_alpha - 1.0))
        if role is Role.HIDDEN:
            return depth / _hidden_scale(scheme, m, scheme.density_lr)
        return depth
    if depth_alpha is not None:
        raise ValueError(
            "the depth rules (depth_alpha) are derived for Adam-family optimizers only (CompleteP, arXiv 2505.01618, "
            "gives no SGD rule); use an Adam-family optimizer, or depth_alpha=None with SGD"
        )
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


def adam_eps_multiplier(scheme: Scheme | str, m: Multipliers, depth_alpha: float | None) -> float:
    """Factor on Adam's ε for this parameter: (1/m_d)·m_L^(−α) with a depth rule, 1 without one (as before).

    ε must shrink as the gradients do, or it swamps their normalisation: a weight's gradient is a sum over
    tokens (not over width) of input × output gradient, the output gradient scales as 1/m_d (the readout's
    α_output/m_d) times m_L^(−α) inside a branch, and neither factor depends on density (SµPar keeps
    activations and activation gradients Θ(1) in m_ρ), so ε takes no m_ρ factor. The width factor is 1
    under SP.
    """
    scheme = get_scheme(scheme)
    check_depth_alpha(depth_alpha)
    if depth_alpha is None:
        return 1.0
    width = m.width if scheme.width else 1.0
    return float(m.depth ** -depth_alpha) / width


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
