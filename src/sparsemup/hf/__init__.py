"""SµPar for Hugging Face transformers causal LMs (``pip install sparsemup[hf]``).

``build`` scales a config's width (hidden size, FFN size at the config's own ratio, heads at a
fixed head dim) and parameterizes the model against a base built on the meta device;
``save_pretrained`` writes a directory plain transformers loads to the same function, and
``from_pretrained`` restores it for more SµPar training. Importing this subpackage registers
the weight layout of transformers' ``Conv1D`` (GPT-2's (in, out) linear layer).
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised by a test that hides transformers
    raise ImportError(
        "sparsemup.hf needs Hugging Face transformers, which is not installed: pip install 'sparsemup[hf]'"
    ) from error

from transformers.pytorch_utils import Conv1D

from ..core import register_layout
from .build import build
from .configs import causal_lm_types, load_config, scale_config
from .pretrained import from_pretrained, save_pretrained

register_layout(Conv1D, fan_in=(0,), fan_out=(1,))  # weight (in, out): y = x @ W + b

__all__ = ["build", "causal_lm_types", "from_pretrained", "load_config", "save_pretrained", "scale_config"]
