"""Reference models built only on the public API: an MLP and the paper's GPT (with its FSDP units)."""

from .gpt import GPT, GPTConfig, build_gpt, gpt_init_scale
from .mlp import MLP, build_mlp

__all__ = ["GPT", "GPTConfig", "MLP", "build_gpt", "build_mlp", "gpt_init_scale"]
