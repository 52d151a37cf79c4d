"""The options of ``sparsemup.parameterize``: declared once here, read by the plan (``core.plan``).

``parameterize`` takes them as keyword arguments (its signature is built from ``Options`` by
``takes_options``), and the ``Parameterization`` it records keeps them (without ``delta``,
``masks`` and ``probe``, which are not data to keep).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

import torch
from torch import nn

from .masks import DEFAULT_BLOCK
from .rules import Role, Scheme
from .vocab import ForwardMultipliers, MaskKind

__all__ = ["Options", "takes_options"]


@dataclass(frozen=True, kw_only=True)
class Options:
    """The keyword arguments of ``sparsemup.parameterize`` (after the model and the base).

    Attributes:
        scheme: "sp", "mup", "supar", or an ablation ("mup+density_init", "mup+density_lr").
        density: ρ of every hidden weight, or {name pattern: ρ} (first match wins;
            unmatched hidden weights stay dense). Only hidden weights can be sparse.
        base_density: ρ_base of the base model's hidden weights (m_ρ = ρ / ρ_base).
        init_std: σ_base; ``role_init_std`` overrides it per role ("input", "hidden", "output").
        init_scale: {name pattern: factor} on top of the scheme's init std (e.g. GPT-2's
            1/sqrt(2·n_layer) on residual output projections).
        input_alpha, output_alpha: α_input (embedding output) and α_output (readout input).
        zero_readout: initialise an untied readout to zero.
        roles: {name pattern: role} overriding inference.
        delta: the model at another width; needed only when ``model`` has the base's shapes.
        masks: {parameter name: 0/1 tensor} user masks for hidden weights (override density).
        mask_kind: "rows" (exactly round(ρ·fan_in) nonzeros per row), "bernoulli", or "blocks"
            (random block_size × block_size tiles, round(ρ·fan_in/b) per block-row: what the
            block-sparse backend, ``sparsemup.sparsify``, runs fast).
        block_size: b of "blocks" masks; it must divide both dims of every masked weight.
        seed: masks and init are drawn from (seed, canonical parameter name).
        forward_multipliers: "hooks" installs them on nn.Linear/nn.Embedding owners;
            "manual" installs none (apply ``ParamInfo.forward_multipliers`` yourself).
        mask_dense: give hidden weights at density 1 an all-ones mask too, so that dynamic sparsity
            (``sparsemup.dynamic.DynamicSparsity``, e.g. GMP starting dense) can prune them.
        depth_alpha: the depth rule (arXiv 2505.01618): None (none, the default), 1 (CompleteP) or 0.5
            (depth-µP). Each residual branch's output is multiplied by m_L^(−α), m_L = L / base_depth, and
            Adam's LRs and ε take the depth factors of docs/RULES.md.
        base_depth: L_base, the number of residual blocks of the model the hyperparameters were tuned on
            (the width base is built at the model's own depth, so it cannot tell).
        residual_branches: module name patterns of the residual branches' closing modules (e.g.
            ``["blocks.*.attn.proj", "blocks.*.mlp.proj"]``); None finds them. Either way each block's
            update is checked to be the sum of its branches' outputs on a probe batch.
        probe: runs the model on an example batch for that check (default: random token ids through a
            model with ``get_input_embeddings``).
    """

    scheme: str | Scheme = "supar"
    density: float | Mapping[str, float] = 1.0
    base_density: float = 1.0
    init_std: float = 0.02
    role_init_std: Mapping[str, float] | None = None
    init_scale: Mapping[str, float] | None = None
    input_alpha: float = 1.0
    output_alpha: float = 1.0
    zero_readout: bool = False
    roles: Mapping[str, Role | str] | None = None
    delta: nn.Module | None = None
    masks: Mapping[str, torch.Tensor] | None = None
    mask_kind: MaskKind = "rows"
    block_size: int = DEFAULT_BLOCK
    seed: int = 0
    forward_multipliers: ForwardMultipliers = "hooks"
    mask_dense: bool = False
    depth_alpha: float | None = None
    base_depth: int | None = None
    residual_branches: Sequence[str] | None = None
    probe: Callable[[nn.Module], object] | None = None


P = ParamSpec("P")
R = TypeVar("R")


def takes_options(
    options: Callable[P, Options],
) -> Callable[[Callable[[nn.Module, nn.Module, Options], R]], Callable[Concatenate[nn.Module, nn.Module, P], R]]:
    """Turn ``f(model, base, options)`` into ``f(model, base, **fields of Options)``, typed (mypy, IDEs) and shown
    (``help``) with those fields, so that they are written once, in ``Options``."""

    def decorate(
        function: Callable[[nn.Module, nn.Module, Options], R],
    ) -> Callable[Concatenate[nn.Module, nn.Module, P], R]:
        @functools.wraps(function)
        def call(model: nn.Module, base: nn.Module, /, *args: P.args, **kwargs: P.kwargs) -> R:
            if args:
                raise TypeError(f"{function.__name__}() takes the model and the base by position and the rest by "
                                f"keyword; got {len(args)} more positional argument(s)")
            try:
                chosen = options(*args, **kwargs)
            except TypeError as err:  # an unknown keyword: name the function that was called
                raise TypeError(f"{function.__name__}(): {err}") from None
            return function(model, base, chosen)

        own = list(inspect.signature(function).parameters.values())[:2]
        fields = inspect.signature(options).parameters.values()
        call.__signature__ = inspect.signature(function).replace(  # type: ignore[attr-defined]
            parameters=[p.replace(kind=inspect.Parameter.POSITIONAL_ONLY) for p in own] + list(fields))
        call.__doc__ = f"{function.__doc__}\n\n{inspect.getdoc(options)}"
        return call

    return decorate
