"""The weight layouts of transformers' own layers, registered when ``sparsemup.hf`` is imported."""

from __future__ import annotations

from transformers.pytorch_utils import Conv1D

from ..core.layout import register_layout

__all__ = ["Conv1D"]

register_layout(Conv1D, fan_in=(0,), fan_out=(1,))  # GPT-2's linear layer: weight (in, out), y = x @ W + b
