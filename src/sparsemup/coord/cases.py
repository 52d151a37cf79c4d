"""The reference models' coordinate-check grids: model, fixed synthetic batch and loss per case.

The batch depends only on the seed, so every width and density of one seed sees the
same data; the seed also draws the model's init and masks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..core.vocab import BackendChoice, MaskKind
from ..models import GPTConfig, build_gpt, build_mlp
from ..sparse.backend import sparsify
from .measurement import Case

__all__ = ["LMSizes", "ModelDefaults", "COORD_DEFAULTS", "MLP_DEFAULTS", "GPT_DEFAULTS", "HF_DEFAULTS", "mlp_cases",
           "gpt_cases", "hf_cases", "teacher_batch", "markov_tokens"]


class LMSizes(TypedDict):
    """A language model's sizes in the check and its fixed batch of ``batch_size`` × ``seq_len`` tokens."""

    batch_size: int
    seq_len: int
    vocab_size: int
    depth: int
    head_dim: int
    init_std: float


class ModelDefaults(TypedDict):
    """A reference model's default grid and training, and how coord.json describes its batch and data."""

    widths: list[int]
    densities: list[float]
    lr: float
    base_width: int
    batch: str  # formatted with the batch size
    data: str


# Sizes of the reference models and their fixed batches; see docs/COORD_CHECK.md.
MLP_DEFAULTS: dict[str, int] = {"batch_size": 256, "in_features": 32, "classes": 10, "depth": 2}
GPT_DEFAULTS: LMSizes = {"batch_size": 2, "seq_len": 64, "vocab_size": 256, "depth": 2, "head_dim": 16,
                                "init_std": 0.02}
# A transformers causal LM (``--model hf:TYPE``): the GPT's batch, its config's own fields but these.
HF_DEFAULTS: LMSizes = {"batch_size": 2, "seq_len": 64, "vocab_size": 256, "depth": 2, "head_dim": 64,
                               "init_std": 0.02}

# CLI defaults per model. The GPT grid reaches width 2048 because its density slopes carry a
# finite weights-per-neuron correction that only fades at large width·density (docs/COORD_CHECK.md).
COORD_DEFAULTS: dict[str, ModelDefaults] = {
    "mlp": {
        "widths": [64, 128, 256, 512], "densities": [1.0, 0.25, 0.0625, 0.015625], "lr": 2**-7, "base_width": 64,
        "batch": "{} samples, one fixed batch",
        "data": "Gaussian inputs (32 features) labelled by a random linear teacher (10 classes)",
    },
    "gpt": {
        "widths": [256, 512, 1024, 2048], "densities": [1.0, 0.25, 0.0625], "lr": 2**-7, "base_width": 64,
        "batch": "{} sequences x 64 tokens, one fixed batch",
        "data": "tokens of a random first-order Markov chain over 256 symbols",
    },
    # An untuned transformers model diverges at the reference GPT's 2^-7 (loss up by step 3); 2^-10 is stable.
    "hf": {
        "widths": [256, 512, 1024], "densities": [1.0, 0.25, 0.0625], "lr": 2**-10, "base_width": 256,
        "batch": "{} sequences x 64 tokens, one fixed batch",
        "data": "tokens of a random first-order Markov chain over 256 symbols",
    },
}


def teacher_batch(seed: int, n: int, in_features: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=gen)
    teacher = torch.randn(in_features, classes, generator=gen)
    return x, (x @ teacher).argmax(dim=1)


def markov_tokens(seed: int, batch: int, length: int, vocab: int) -> torch.Tensor:
    """Token sequences from a random first-order Markov chain (learnable, unlike uniform noise)."""
    gen = torch.Generator().manual_seed(seed)
    transition = torch.softmax(2.0 * torch.randn(vocab, vocab, generator=gen), dim=1)
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(vocab, (batch,), generator=gen)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(transition[tokens[:, t - 1]], 1, generator=gen).squeeze(1)
    return tokens


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _built(build: Callable[[], tuple[nn.Module, object]], backend: BackendChoice) -> nn.Module:
    """The model of a (model, config) builder, its masked layers on ``backend``."""
    return _model_built(lambda: build()[0], backend)


def _model_built(build: Callable[[], nn.Module], backend: BackendChoice) -> nn.Module:
    """The model of a builder, its masked layers on ``backend`` (masked dense: recorded, unchanged)."""
    model = build()
    sparsify(model, backend)
    return model


def _with_base(widths: Sequence[int], densities: Sequence[float],
               base_width: int) -> Iterator[tuple[int, float, bool]]:
    """(width, density, is_base) of one seed: first the dense base itself, trained only to judge whether
    the LR is stable (``measurement.unstable_cases``), then the grid."""
    yield base_width, 1.0, True
    for width in widths:
        for density in densities:
            yield width, density, False


class MaskOptions(TypedDict, total=False):
    """Block masks' keyword arguments of the builders (none: row masks)."""

    mask_kind: MaskKind
    block_size: int


def _mask_options(block: int | None) -> MaskOptions:
    return {"mask_kind": "blocks", "block_size": block} if block else {}


def mlp_cases(
    scheme: str, widths: Sequence[int], densities: Sequence[float], seeds: int, base_width: int,
    batch_size: int | None = None, block: int | None = None, backend: BackendChoice = "masked_dense",
) -> Iterator[Case]:
    """Cases for the reference MLP (ReLU, σ_base = sqrt(2/base_width) so activations start near 1).

    ``block``: block masks of that size (else rows masks); the sparse cases run on ``backend`` (see
    ``sparsemup.sparsify``), the dense base on masked dense.
    """
    d = MLP_DEFAULTS
    for seed in range(seeds):
        x, y = teacher_batch(seed, batch_size or d["batch_size"], d["in_features"], d["classes"])
        for width, density, base in _with_base(widths, densities, base_width):
            build = partial(build_mlp, d["in_features"], width, d["classes"], base_width, depth=d["depth"],
                            scheme=scheme, density=density, seed=seed, init_std=math.sqrt(2 / base_width),
                            **_mask_options(None if base else block))
            yield Case(width, density, seed, partial(_built, build, "masked_dense" if base else backend), x, y,
                       F.cross_entropy, base)


def gpt_cases(
    scheme: str, widths: Sequence[int], densities: Sequence[float], seeds: int, base_width: int,
    batch_size: int | None = None, block: int | None = None, backend: BackendChoice = "masked_dense",
) -> Iterator[Case]:
    """Cases for the reference GPT on Markov-chain tokens (head_dim fixed, heads grow with width).

    ``block``: block masks of that size (else rows masks); the sparse cases run on ``backend`` (see
    ``sparsemup.sparsify``), the dense base on masked dense.
    """
    d = GPT_DEFAULTS
    for seed in range(seeds):
        tokens = markov_tokens(seed, batch_size or d["batch_size"], d["seq_len"] + 1, d["vocab_size"])
        for width, density, base in _with_base(widths, densities, base_width):
            blocks = None if base else block
            cfg = GPTConfig(vocab_size=d["vocab_size"], width=width, depth=d["depth"],
                            head_dim=d["head_dim"], context=d["seq_len"], ffn_multiple=blocks or 8)
            build = partial(build_gpt, cfg, base_width, scheme=scheme, density=density, seed=seed,
                            init_std=d["init_std"], **_mask_options(blocks))
            yield Case(width, density, seed, partial(_built, build, "masked_dense" if base else backend),
                       tokens[:, :-1], tokens[:, 1:], _lm_loss, base)


def _logits_loss(output: Any, targets: torch.Tensor) -> torch.Tensor:
    return _lm_loss(output.logits, targets)


def hf_cases(
    spec: str, scheme: str, widths: Sequence[int], densities: Sequence[float], seeds: int, base_width: int,
    batch_size: int | None = None, depth: int | None = None, head_dim: int | None = None,
    backend: BackendChoice = "masked_dense",
) -> Iterator[Case]:
    """Cases for a transformers causal LM: ``spec`` is a model type (``llama``) or a config.json, built by
    ``sparsemup.hf.build`` at every width with vocab 256, ``depth`` layers and a fixed head dim, on the
    reference GPT's Markov-chain batch; the sparse cases run on ``backend``, the dense base on masked dense."""
    from .. import hf  # needs sparsemup[hf]; its error names the extra

    d = HF_DEFAULTS
    template = hf.small_config(spec, d["vocab_size"], depth or d["depth"])
    for seed in range(seeds):
        tokens = markov_tokens(seed, batch_size or d["batch_size"], d["seq_len"] + 1, d["vocab_size"])
        for width, density, base in _with_base(widths, densities, base_width):
            build = partial(hf.build, template, width, base_width, head_dim=head_dim or d["head_dim"],
                            scheme=scheme, density=density, seed=seed, init_std=d["init_std"])
            yield Case(width, density, seed, partial(_model_built, build, "masked_dense" if base else backend),
                       tokens[:, :-1], tokens[:, 1:], _logits_loss, base)
