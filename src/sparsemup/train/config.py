"""Loading the training configuration: defaults, a TOML or YAML file, then ``--set key=value`` overrides.

The schema (sections, fields, their flags) is ``sparsemup.train.schema``; validation is
``sparsemup.train.validate``.
"""

from __future__ import annotations

import ast
import json
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from .schema import Config, ConfigError, check_type, field_specs, field_type, section_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

__all__ = ["load_config", "apply_overrides", "typed_value", "to_toml", "to_yaml", "describe", "tomllib"]


_ARITH: dict[type[ast.AST], Callable[..., int | float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}


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
        section = section_of(cfg, section_name, "--set")
        setattr(section, name, _parse_value(text, field_type(section, section_name, name, "--set"), key))
    return cfg


def typed_value(key: str, value: Any, source: str) -> Any:
    """``value`` checked and converted for ``section.key`` (a string such as '2**-7' is parsed for a number key)."""
    section_name, dot, name = key.partition(".")
    if not dot:
        raise ConfigError(f"{source}: {key!r} is not a config key; write section.key, e.g. optim.lr")
    kind = field_type(section_of(Config(), section_name, source), section_name, name, source)
    if isinstance(value, str) and kind is not str:
        return _parse_value(value, kind, key)
    return check_type(value, kind, key, source)


def load_config(path: Path | None, overrides: Sequence[str] = ()) -> Config:
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

    text: str = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    return text


def describe() -> str:
    """Every key with its default and documentation (``sparsemup train --help-config``)."""
    return "\n".join(f"{key} = {_toml_value(f.default)}\n    {f.metadata['doc']}" for key, f in field_specs().items())
