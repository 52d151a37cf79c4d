"""SµPar for Hugging Face transformers causal LMs (``pip install sparsemup[hf]``).

``build`` scales a config's width (hidden size, FFN size at the config's own ratio, heads at a
fixed head dim) and parameterizes the model against a base built on the meta device;
``save_pretrained`` writes a directory plain transformers loads to the same function, and
``from_pretrained`` restores it for more SµPar training. Importing this subpackage registers
the weight layout of transformers' ``Conv1D`` (GPT-2's (in, out) linear layer). ``Trainer`` is transformers'
Trainer for such a model (sparsemup's optimizer groups, saves and exact resume, dynamic sparsity), imported on
first use (it needs accelerate, also in the extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._extra import MissingExtraError  # first: without transformers, its error names the extra
from .build import build
from .configs import causal_lm_types, layer_sizes, load_config, scale_config, small_config
from .layouts import Conv1D
from .pretrained import from_pretrained, load_into, save_into, save_pretrained

if TYPE_CHECKING:  # imported lazily at run time (``__getattr__``): the type checker sees them as they are
    from .trainer import TRAINER_OPTIMIZERS, Trainer

__all__ = ["TRAINER_OPTIMIZERS", "Conv1D", "MissingExtraError", "Trainer", "build", "causal_lm_types",
           "from_pretrained", "layer_sizes", "load_config", "load_into", "save_into", "save_pretrained", "scale_config",
           "small_config"]


def __getattr__(name: str) -> object:
    """``Trainer`` and ``TRAINER_OPTIMIZERS`` on first use: transformers' trainer module is slow to import."""
    if name in ("Trainer", "TRAINER_OPTIMIZERS"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
