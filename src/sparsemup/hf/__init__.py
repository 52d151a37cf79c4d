"""SµPar for Hugging Face transformers causal LMs (``pip install sparsemup[hf]``).

``build`` scales a config's width (hidden size, FFN size at the config's own ratio, heads at a
fixed head dim) and parameterizes the model against a base built on the meta device;
``save_pretrained`` writes a directory plain transformers loads to the same function, and
``from_pretrained`` restores it for more SµPar training. Importing this subpackage registers
the weight layout of transformers' ``Conv1D`` (GPT-2's (in, out) linear layer).
"""

from __future__ import annotations

from ._extra import MissingExtraError  # first: without transformers, its error names the extra
from .build import build
from .configs import causal_lm_types, layer_sizes, load_config, scale_config, small_config
from .layouts import Conv1D
from .pretrained import from_pretrained, save_pretrained

__all__ = ["Conv1D", "MissingExtraError", "build", "causal_lm_types", "from_pretrained", "layer_sizes",
           "load_config", "save_pretrained", "scale_config", "small_config"]
