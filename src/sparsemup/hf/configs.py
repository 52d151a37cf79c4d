"""Causal-LM configs at any width: the common transformers field names, scaled at a fixed head dim."""

from __future__ import annotations

import copy
import difflib
import json
import math
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = ["causal_lm_types", "load_config", "small_config", "scale_config", "head_dim_of", "layer_sizes"]

# FFN sizes: Llama-style configs call it intermediate_size, GPT-2-style ones n_inner (None: 4 x hidden),
# OPT-style ones ffn_dim. A config needs one of them (as an attribute) for its FFN to scale with width.
_FFN_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")


def causal_lm_types() -> list[str]:
    """Every transformers ``model_type`` with a causal-LM class."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def load_config(config: PretrainedConfig | str | Path, **overrides: object) -> PretrainedConfig:
    """A config from an instance, a ``model_type`` (``llama``, ``gpt2``, ...) or a local config.json
    (or a directory holding one), with ``overrides`` set on it. Nothing is downloaded."""
    if isinstance(config, PretrainedConfig):
        loaded = copy.deepcopy(config)
    else:
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if path.suffix == ".json" or path.exists():
            if not path.is_file():
                raise ValueError(f"config file {str(path)!r} does not exist")
            fields = json.loads(path.read_text())
            kind = fields.pop("model_type", None)
            if kind is None:
                raise ValueError(f"{path} has no 'model_type'; write the transformers model type into it")
            _check_type(kind)
            loaded = AutoConfig.for_model(kind, **fields)
        else:
            _check_type(str(config))
            loaded = AutoConfig.for_model(str(config))
    for key, value in overrides.items():
        setattr(loaded, key, value)
    return loaded


def _config_file(config: PretrainedConfig | str | Path) -> Path | None:
    """The config.json ``config`` names (a file, or a directory holding one); None for an instance or a type."""
    if isinstance(config, PretrainedConfig):
        return None
    path = Path(config)
    if path.is_dir():
        return path / "config.json"
    return path if path.suffix == ".json" or path.exists() else None


def small_config(config: PretrainedConfig | str | Path, vocab_size: int = 256, depth: int = 2,
                 context: int | None = None) -> PretrainedConfig:
    """``load_config`` with a small vocabulary, ``depth`` layers and (if given) ``context`` positions, token
    ids outside the vocabulary dropped: the template of sparsemup's coordinate checks and byte-level training.

    A model type's default config is a template and takes ``vocab_size`` and ``depth``; a config.json is used as
    written: a layer count or vocabulary that disagrees with ``depth`` or ``vocab_size`` is refused, naming both."""
    extra: dict[str, object] = {"max_position_embeddings": context} if context is not None else {}
    file = _config_file(config)
    if file is None:
        extra.update(vocab_size=vocab_size, num_hidden_layers=depth)
    loaded = load_config(config, **extra)
    if file is not None:
        layers, vocab = getattr(loaded, "num_hidden_layers", None), getattr(loaded, "vocab_size", None)
        if layers != depth:
            raise ValueError(
                f"{file} has num_hidden_layers = {layers} but the depth asked for is {depth} (model.depth in a "
                f"training config, --depth on the command line); a config.json is used as written, so set the depth "
                f"to {layers} or edit the file"
            )
        if vocab != vocab_size:
            raise ValueError(
                f"{file} has vocab_size = {vocab} but the data has {vocab_size} tokens (256 for bytes, a token "
                f"file's tokens.json gives its own); a config.json is used as written, so write \"vocab_size\": "
                f"{vocab_size} into it"
            )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(loaded, name, None)
        if isinstance(value, int) and value >= vocab_size:
            setattr(loaded, name, None)
    return loaded


def _check_type(kind: str) -> None:
    if kind not in CONFIG_MAPPING or kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        close = difflib.get_close_matches(kind, causal_lm_types(), n=3)
        if close:
            raise ValueError(f"{kind!r} is not a transformers model type with a causal LM; did you mean "
                             f"{' or '.join(map(repr, close))}? (sparsemup.hf.causal_lm_types() lists them all)")
        raise ValueError(
            f"{kind!r} is not a transformers model type with a causal LM; valid types: {', '.join(causal_lm_types())}"
        )


def _field(config: PretrainedConfig, name: str) -> int:
    value = getattr(config, name, None)
    if not isinstance(value, int):
        raise ValueError(
            f"a {type(config).__name__} has no integer {name!r} (got {value!r}); sparsemup.hf scales configs with "
            "the common field names hidden_size, num_attention_heads, intermediate_size, num_key_value_heads, "
            "head_dim. Build such a model yourself and call sparsemup.parameterize(model, base)"
        )
    return value


def head_dim_of(config: PretrainedConfig) -> int:
    """The attention head dim: ``head_dim`` where the config has one, else hidden_size / num_attention_heads."""
    head_dim = getattr(config, "head_dim", None)
    if isinstance(head_dim, int):
        return head_dim
    return _field(config, "hidden_size") // _field(config, "num_attention_heads")


def scale_config(config: PretrainedConfig, width: int, head_dim: int | None = None) -> PretrainedConfig:
    """``config`` at hidden size ``width``: heads = width / head_dim (head dim fixed), KV heads in the
    config's proportion, FFN size at the config's ratio to the hidden size."""
    hidden, heads = _field(config, "hidden_size"), _field(config, "num_attention_heads")
    given = head_dim is not None
    head_dim = head_dim or head_dim_of(config)
    if width <= 0 or width % head_dim:
        source = "given as head_dim=" if given else f"the {type(config).__name__}'s"
        raise ValueError(
            f"width {width} must be a positive multiple of the head dim {head_dim} ({source}); pick another width "
            "or pass a head dim dividing it as head_dim= (sparsemup.hf.build(..., head_dim=32); model.head_dim in "
            "a training config)"
        )
    new_heads = width // head_dim
    if not any(hasattr(config, name) for name in _FFN_FIELDS):
        raise ValueError(
            f"a {type(config).__name__} has none of the FFN size fields {', '.join(_FFN_FIELDS)}, so sparsemup.hf "
            "cannot scale its FFN with width; build such a model yourself and call sparsemup.parameterize(model, base)"
        )
    scaled = copy.deepcopy(config)
    scaled.hidden_size, scaled.num_attention_heads = width, new_heads
    if isinstance(getattr(config, "head_dim", None), int):
        scaled.head_dim = head_dim
    kv = getattr(config, "num_key_value_heads", None)
    if isinstance(kv, int):
        if (kv * new_heads) % heads or kv * new_heads // heads < 1:
            raise ValueError(
                f"num_key_value_heads {kv} of {heads} heads does not scale in proportion to {new_heads} heads "
                f"(width {width}); pick widths whose head count is a multiple of {heads // math.gcd(kv, heads)}"
            )
        scaled.num_key_value_heads = kv * new_heads // heads
    for name in _FFN_FIELDS:
        ffn = getattr(config, name, None)
        if isinstance(ffn, int):
            setattr(scaled, name, round(ffn * width / hidden))
    return scaled


def layer_sizes(config: PretrainedConfig, head_dim: int | None = None) -> dict[str, int]:
    """The widths of a scaled config's layers that a block size must divide: hidden size, attention and
    KV projections, FFN."""
    head_dim = head_dim or head_dim_of(config)
    sizes = {"hidden_size": _field(config, "hidden_size"),
             "num_attention_heads x head_dim": _field(config, "num_attention_heads") * head_dim}
    kv = getattr(config, "num_key_value_heads", None)
    if isinstance(kv, int):
        sizes["num_key_value_heads x head_dim"] = kv * head_dim
    for name in _FFN_FIELDS:
        if isinstance(getattr(config, name, None), int):
            sizes[name] = getattr(config, name)
    return sizes
