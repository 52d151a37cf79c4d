"""Validating a training configuration before any work: ranges, choices, divisibility, the corpus."""

from __future__ import annotations

import json
from typing import Any

from ..core.masks import nonzeros_per_row
from ..core.vocab import hf_model_spec
from ..sparse import Fixes, check_backend
from .data import corpus_files, data_vocab, token_files
from .schema import Config, ConfigError, ModelConfig, field_specs, flatten, run_identity, with_defaults

__all__ = ["validate", "TRANSFER_EXEMPT", "transfer_note"]

# Keys a transferred config may change without --allow: not hyperparameters (the seed) or not part of what a
# run computes (evaluation cadence and size, gradient accumulation, sharding). train.steps may grow (with a note).
TRANSFER_EXEMPT = frozenset({"train.seed", "train.eval_every", "train.eval_batches", "train.grad_accum", "dist.fsdp"})

CONFIG_FIXES = Fixes(block_masks="set model.mask_kind = 'blocks'", masked_dense="set model.backend = 'masked_dense'",
                     element_masks="set model.mask_kind = 'rows'")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choose(choices: tuple[str, ...]) -> str:
    return f"choose {choices[0]} or {choices[1]}" if len(choices) == 2 else f"choose one of {', '.join(choices)}"


def _proxy_settings(cfg: Config) -> dict[str, Any]:
    """The proxy's settings recorded by ``sparsemup transfer``, completed with defaults (keys it predates)."""
    try:
        proxy = json.loads(cfg.transfer.proxy_config)
    except json.JSONDecodeError as err:
        raise ConfigError(f"transfer.proxy_config is not JSON ({err}); write the config again with sparsemup "
                          "transfer") from None
    if not isinstance(proxy, dict):
        raise ConfigError("transfer.proxy_config must be a JSON object; write the config again with sparsemup transfer")
    return run_identity(with_defaults(proxy))


def _check_transfer(cfg: Config) -> None:
    """A config written by ``sparsemup transfer`` keeps every setting of its proxy but the allowed ones."""
    t = cfg.transfer
    if not t.proxy_config:
        return
    proxy = _proxy_settings(cfg)
    allowed = {k.strip() for k in t.allow.split(",") if k.strip()}
    for key, value in run_identity(flatten(cfg.to_dict())).items():
        if key in allowed or key in TRANSFER_EXEMPT or value == proxy.get(key):
            continue
        if key == "train.steps" and value > proxy[key]:
            continue  # allowed, with a note (transfer_note)
        raise ConfigError(
            f"{key} = {value!r} differs from the proxy's {proxy.get(key)!r} (transferred from {t.proxy}); the tuned "
            "values transfer only to a model that differs from its proxy in the keys the transfer allowed ("
            f"{', '.join(sorted(allowed)) or 'none'}). Keep the proxy's value, or write the config again with "
            f"sparsemup transfer {t.proxy} --out FILE ... --allow {key}"
        )


def transfer_note(cfg: Config) -> str | None:
    """A note when a transferred config trains longer than its proxy (µP does not promise transfer across steps)."""
    if not cfg.transfer.proxy_config or "train.steps" in cfg.transfer.allow.split(","):
        return None
    proxy_steps = _proxy_settings(cfg)["train.steps"]
    if cfg.train.steps <= proxy_steps:
        return None
    return (f"note: train.steps = {cfg.train.steps} is more than the proxy's {proxy_steps}; µP transfers across width "
            "and density, not across training length, so the tuned values may no longer be the best ones")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check choices, ranges, divisibility and that the corpus exists; raise ConfigError naming the key and the fix."""
    _check_transfer(cfg)
    values = flatten(cfg.to_dict())
    for key, spec in field_specs().items():
        choices = spec.metadata["choices"]
        _require(not choices or values[key] in choices, f"{key} = {values[key]!r}: {_choose(choices)}")
    hf_spec = _check_model(cfg)
    _check_optim_and_steps(cfg, world_size)
    _require(0.0 < cfg.data.val_fraction <= 0.5, f"data.val_fraction = {cfg.data.val_fraction}: must be in (0, 0.5]")
    _check_sparsity(cfg)
    if token_files(cfg.data.path, cfg.data.format) is None:  # token files are checked against their JSON there
        corpus_files(cfg.data.path)  # raises ConfigError when missing
    if hf_spec is not None:
        _check_hf(cfg, hf_spec)


def _check_model(cfg: Config) -> str | None:
    """The model section (and the backend rule); returns the transformers model type it names, if any."""
    m = cfg.model
    try:
        hf_spec = hf_model_spec(m.arch)
    except ValueError as error:
        raise ConfigError(f"model.arch: {error}") from None
    _require(m.arch == "gpt" or hf_spec is not None,
             f"model.arch = {m.arch!r}: use gpt or hf:TYPE (a transformers model type such as hf:llama, or "
             "hf:path/to/config.json)")
    for key in ("width", "base_width", "depth", "head_dim"):
        _require(getattr(m, key) >= 1, f"model.{key} = {getattr(m, key)}: must be at least 1")
    _require(m.base_width <= m.width,
             f"model.base_width = {m.base_width} is wider than model.width = {m.width}: the base is the small proxy "
             "the hyperparameters are tuned on and the model the (wider) one trained with them; the two look "
             "swapped, set model.base_width <= model.width")
    for key in ("width", "base_width"):
        _require(getattr(m, key) % m.head_dim == 0,
                 f"model.{key} = {getattr(m, key)} is not a multiple of model.head_dim = {m.head_dim}; "
                 "change one of them")
    for key in ("density", "base_density"):
        value = getattr(m, key)
        _require(0.0 < value <= 1.0, f"model.{key} = {value}: must be in (0, 1] (1 is dense; 0.25 keeps a quarter)")
    for key in ("init_std", "input_alpha", "output_alpha"):
        _require(getattr(m, key) > 0, f"model.{key} = {getattr(m, key)}: must be positive")
    _check_depth_rule(cfg)
    try:
        check_backend(m.backend, m.mask_kind, cfg.sparsity.method, CONFIG_FIXES)
    except ValueError as error:
        raise ConfigError(f"model.backend = {m.backend!r}, model.mask_kind = {m.mask_kind!r}, sparsity.method = "
                          f"{cfg.sparsity.method!r}: {error}") from None
    _require(m.density < 1 or m.backend in ("masked_dense", "auto") or cfg.sparsity.method != "static",
             f"model.backend = {m.backend!r} runs masked weights on sparse storage, but model.density = 1 masks none: "
             "every layer would train dense on masked_dense; set model.backend = 'masked_dense' or a model.density "
             "below 1")
    if m.mask_kind == "blocks":
        _check_blocks(m)
    return hf_spec


def _check_blocks(m: ModelConfig) -> None:
    """Block masks: the block size divides the widths and every density keeps a block per row."""
    _require(m.block_size >= 1 and m.width % m.block_size == 0
             and (m.base_density == 1 or m.base_width % m.block_size == 0),
             f"model.block_size = {m.block_size} must divide model.width = {m.width} (and model.base_width = "
             f"{m.base_width} when model.base_density < 1); pick a power of two such as 16 or 32")
    for key, width in (("density", m.width), ("base_density", m.base_width)):
        rho = getattr(m, key)
        _require(rho >= 1 or nonzeros_per_row(rho, width // m.block_size) >= 1,
                 f"model.{key} = {rho:g} keeps no {m.block_size}x{m.block_size} block per row at width "
                 f"{width}; lower model.block_size to at most {key}·width = {rho * width:g}")


def _check_optim_and_steps(cfg: Config, world_size: int) -> None:
    """The optimizer and the train section: ranges, and the batch split over processes and micro-steps."""
    o, t = cfg.optim, cfg.train
    _require(o.lr > 0, f"optim.lr = {o.lr}: must be positive")
    _require(o.weight_decay >= 0, f"optim.weight_decay = {o.weight_decay}: must be non-negative")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    _require(o.eps > 0 and o.momentum >= 0, "optim.eps must be positive and optim.momentum non-negative")
    _require(0 <= o.warmup_steps <= t.steps,
             f"optim.warmup_steps = {o.warmup_steps}: must be between 0 and train.steps = {t.steps}")
    _require(0.0 <= o.final_lr_fraction <= 1.0, f"optim.final_lr_fraction = {o.final_lr_fraction}: must be in [0, 1]")
    _require(o.grad_clip >= 0, f"optim.grad_clip = {o.grad_clip}: must be non-negative (0 turns clipping off)")
    for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches"):
        _require(getattr(t, key) >= 1, f"train.{key} = {getattr(t, key)}: must be at least 1")
    for key in ("eval_every", "checkpoint_every", "threads", "seed"):
        _require(getattr(t, key) >= 0, f"train.{key} = {getattr(t, key)}: must be non-negative")
    shards = world_size * t.grad_accum
    _require(t.batch_size % shards == 0,
             f"train.batch_size = {t.batch_size} does not divide into {world_size} process(es) × "
             f"train.grad_accum = {t.grad_accum}; make it a multiple of {shards}")


def _check_depth_rule(cfg: Config) -> None:
    """model.depth_alpha is 0 (none) or in [1/2, 1], with a positive model.base_depth exactly when it is set, and
    an Adam-family optimizer (no SGD depth rule is derived)."""
    m = cfg.model
    if m.depth_alpha == 0:
        _require(m.base_depth == 0, f"model.base_depth = {m.base_depth} is set but model.depth_alpha = 0 (no depth "
                 "rule); set model.depth_alpha (1 for CompleteP, 0.5 for depth-µP) or model.base_depth = 0")
        return
    _require(0.5 <= m.depth_alpha <= 1.0, f"model.depth_alpha = {m.depth_alpha:g}: use 0 (no depth rule), 1 "
             "(CompleteP), 0.5 (depth-µP) or a value between 0.5 and 1")
    _require(m.base_depth >= 1, "model.depth_alpha needs model.base_depth: the number of blocks of the base (proxy) "
             "model the hyperparameters were tuned on (at least 1)")
    _require(cfg.optim.name != "sgd", "model.depth_alpha: the depth rule is derived for AdamW only; set "
             "optim.name = 'adamw' or model.depth_alpha = 0")


def _check_hf(cfg: Config, spec: str) -> None:
    """The transformers model of ``model.arch`` exists and scales to both widths, with block sizes that
    divide its layers (before any work)."""
    from .. import hf  # needs sparsemup[hf]; its error names the extra

    m = cfg.model
    try:
        template = hf.small_config(spec, data_vocab(cfg.data.path, cfg.data.format), m.depth, cfg.train.seq_len)
        scaled = [hf.scale_config(template, width, m.head_dim) for width in (m.width, m.base_width)]
    except ValueError as error:
        raise ConfigError(f"model.arch = {m.arch!r}: {error}") from None
    if m.mask_kind == "blocks":
        for config in scaled:
            for name, size in hf.layer_sizes(config, m.head_dim).items():
                _require(size % m.block_size == 0,
                         f"model.block_size = {m.block_size} does not divide {name} = {size} of {m.arch} at width "
                         f"{config.hidden_size}; pick a block size dividing it (or a width that makes it divide)")


def stop_step(cfg: Config) -> int:
    """The step after which dynamic masks stop changing: round(sparsity.stop_fraction · train.steps)."""
    return int(cfg.sparsity.stop_fraction * cfg.train.steps + 0.5)


def _check_sparsity(cfg: Config) -> None:
    """The [sparsity] section: fractions in range, and a dynamic method only where it can run and update."""
    s, m = cfg.sparsity, cfg.model
    for key in ("update_fraction", "stop_fraction", "start_density"):
        value = getattr(s, key)
        _require(0.0 < value <= 1.0, f"sparsity.{key} = {value}: must be in (0, 1]")
    _require(s.update_every >= 1, f"sparsity.update_every = {s.update_every}: must be at least 1")
    if s.method == "static":
        return
    method = f"sparsity.method = {s.method!r}"
    _require(m.density < 1.0, f"{method} needs a target model.density below 1 (got {m.density:g}); set model.density "
             "(e.g. 0.25) or sparsity.method = 'static'")
    _require(not cfg.dist.fsdp, f"{method} is not supported with FSDP yet; train with DDP (dist.fsdp = false)")
    stop = stop_step(cfg)
    first = s.update_every if s.method == "gmp" else s.update_every + 1
    _require(stop >= first, f"{method}: no mask update before the stop step: updates every {s.update_every} steps "
             f"but masks stop changing at step {stop} (sparsity.stop_fraction · train.steps); lower "
             "sparsity.update_every or raise sparsity.stop_fraction or train.steps")
    if s.method == "gmp":
        _require(s.start_density > m.density, f"sparsity.start_density = {s.start_density:g} must be above the target "
                 f"model.density = {m.density:g} (GMP prunes from one to the other)")
