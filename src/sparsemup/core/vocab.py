"""The names sparsemup accepts, defined once: every API, config field and CLI choice reads them from here.

Each is a ``Literal`` alias (for type checkers) and a tuple of its values (for validation and
``argparse`` choices), derived from the alias so the two cannot disagree. A new scheme, mask kind,
backend or weight-decay mode is added here and nowhere else.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "SchemeName", "SCHEME_NAMES", "MaskKind", "MASK_KINDS", "Backend", "BACKENDS", "BackendChoice",
    "BACKEND_CHOICES", "WeightDecayMode", "WEIGHT_DECAY_MODES", "ForwardMultipliers", "FORWARD_MULTIPLIERS",
    "check_choice",
]

# SP, µP, SµPar and the paper's ablations (arXiv 2405.15743, Figs. 13-14): µP with one density correction.
SchemeName = Literal["sp", "mup", "supar", "mup+density_init", "mup+density_lr"]
# rows: exactly round(ρ·fan_in) nonzeros per row; bernoulli: ρ in expectation; blocks: random b×b tiles.
MaskKind = Literal["rows", "bernoulli", "blocks"]
# How a masked hidden weight is stored and computed: a dense weight times its mask, only the kept b×b
# blocks, or only the kept entries of each row (masks with the same count in every row).
Backend = Literal["masked_dense", "blocks", "rows"]
# What a user may ask for: a backend, or "auto" (per layer, by measured thresholds).
BackendChoice = Literal["auto", "masked_dense", "blocks", "rows"]
# independent: lr·wd per layer held at the base's; coupled: PyTorch's lr·wd as is.
WeightDecayMode = Literal["independent", "coupled"]
# hooks: sparsemup installs the forward multipliers; manual: the model applies them itself.
ForwardMultipliers = Literal["hooks", "manual"]

# A model named "hf:TYPE" (coord-check --model, model.arch) is a transformers causal LM of that type or config.json.
HF_MODEL_PREFIX = "hf:"


def hf_model_spec(name: str) -> str | None:
    """TYPE of an ``hf:TYPE`` model name (None for any other name); a bare ``hf:`` is an error."""
    if not name.startswith(HF_MODEL_PREFIX):
        return None
    spec = name[len(HF_MODEL_PREFIX):]
    if not spec:
        raise ValueError(f"{name!r} names no transformers model: write hf:TYPE, e.g. hf:llama or hf:path/config.json")
    return spec


SCHEME_NAMES: tuple[SchemeName, ...] = get_args(SchemeName)
MASK_KINDS: tuple[MaskKind, ...] = get_args(MaskKind)
BACKENDS: tuple[Backend, ...] = get_args(Backend)
BACKEND_CHOICES: tuple[BackendChoice, ...] = get_args(BackendChoice)
WEIGHT_DECAY_MODES: tuple[WeightDecayMode, ...] = get_args(WeightDecayMode)
FORWARD_MULTIPLIERS: tuple[ForwardMultipliers, ...] = get_args(ForwardMultipliers)


def check_choice(value: object, choices: tuple[str, ...], what: str) -> None:
    """Raise ValueError naming ``what`` and the valid ``choices`` unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
