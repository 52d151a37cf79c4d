"""Save a parameterized causal LM for plain transformers, and restore it for more SµPar training.

``save_pretrained`` writes ``sparsemup.export(model)`` (forward multipliers folded into the weights,
masks and hooks gone, tied weights untied when their factors differ) with transformers' own
``save_pretrained``, plus ``sparsemup.json`` (how it was parameterized, its base config) and
``sparsemup_masks.safetensors``. ``from_pretrained`` rebuilds and re-parameterizes the model from
those, then loads the weights with the multipliers divided out again, so they are applied once.

``sparsemup.json`` records each masked weight's density as its mask has it now (GMP prunes after init), so a
dynamically pruned model restores at any step. ``from_pretrained`` checks ``sparsemup.json`` (keys, types, the
parameter list against the model) and the masks file before building anything, each problem named with its file.
A save interrupted by a kill leaves its hidden staging (``.NAME.XXXXXXXX.tmp``) or old (``.NAME.old.XXXXXXXX``)
directory beside the target; the next save to that target removes them.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ..core.atomic import current_umask, make_dirs, writing
from ..core.export import export_with_folds
from ..core.options import Options
from ..core.parameterize import parameterize
from ..core.record import Parameterization, get_mask, get_parameterization, set_mask
from ..core.rules import SCHEMES, Role, Scheme
from ..core.structure import unwrap
from .build import HF_RECORD, from_config

__all__ = ["save_pretrained", "save_into", "from_pretrained", "load_into", "SPARSEMUP_JSON", "MASKS_FILE"]

SPARSEMUP_JSON = "sparsemup.json"
MASKS_FILE = "sparsemup_masks.safetensors"
FORMAT = 1
# The JSON type(s) of each key of sparsemup.json and of its "options" (a tuple: any of them; None: null allowed).
_NUMBER = (int, float)
_META_TYPES: dict[str, tuple[type | None, ...]] = {
    "format": (int,), "sparsemup_version": (str,), "scheme": (str,), "options": (dict,), "base_config": (dict,),
    "delta_config": (dict, None), "tie_word_embeddings": (bool,), "params": (dict,),
}
_OPTION_TYPES: dict[str, tuple[type | None, ...]] = {
    "scheme": (str, dict), "density": (*_NUMBER, dict), "base_density": _NUMBER, "init_std": _NUMBER,
    "role_init_std": (dict, None), "init_scale": (dict, None), "input_alpha": _NUMBER, "output_alpha": _NUMBER,
    "zero_readout": (bool,), "roles": (dict, None), "mask_kind": (str,), "block_size": (int,), "seed": (int,),
    "forward_multipliers": (str,), "mask_dense": (bool,), "depth_alpha": _NUMBER, "base_depth": (int,),
    "residual_branches": (list,),
}
_PARAM_TYPES: dict[str, tuple[type | None, ...]] = {
    "role": (str,), "density": _NUMBER, "masked": (bool,), "forward_multipliers": (dict,), "shape": (list,),
}


def _options_json(options: Options) -> dict[str, Any]:
    """The JSON form of ``parameterize``'s arguments (delta and masks travel separately)."""
    out = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
           if f.name not in ("delta", "masks", "probe")}
    for key in ("depth_alpha", "base_depth", "residual_branches"):  # written only with a depth rule: older files
        if out[key] is None:                                          # stay as they were
            del out[key]
    scheme = options.scheme
    if isinstance(scheme, Scheme):  # a named scheme by name, a custom one by its switches
        out["scheme"] = scheme.name if scheme in SCHEMES.values() else dataclasses.asdict(scheme)
    for key in ("density", "role_init_std", "init_scale"):
        if isinstance(out[key], Mapping):
            out[key] = dict(out[key])
    if out["roles"] is not None:
        out["roles"] = {k: (v.value if isinstance(v, Role) else str(v)) for k, v in out["roles"].items()}
    return out


def _options_from_json(fields: dict[str, Any]) -> dict[str, Any]:
    scheme = fields["scheme"]
    return {**fields, "scheme": Scheme(**scheme) if isinstance(scheme, dict) else scheme}


def _tied(model: PreTrainedModel) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def save_pretrained(
    model: torch.nn.Module,
    directory: str | Path,
    *,
    base_config: PretrainedConfig | None = None,
    delta_config: PretrainedConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads to the same
    function, and that ``sparsemup.hf.from_pretrained`` restores for more SµPar training.

    ``base_config`` (and ``delta_config``, when the model has the base's shapes) are needed only
    for a model not made by ``sparsemup.hf.build``. The directory is written beside its final
    place and moved there whole: an error or a kill while writing leaves the old directory as it was.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise ValueError(f"{directory} exists and is not an empty directory; pass overwrite=True to replace it")
    make_dirs(directory.parent)
    _remove_leftovers(directory)
    with writing(directory):
        staging = _staging(directory.parent, f".{directory.name}.")
        try:
            _write(model, staging, base_config, delta_config)
            _replace_dir(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return directory


def save_into(model: torch.nn.Module, directory: str | Path) -> Path:
    """What ``save_pretrained`` writes, written into ``directory`` beside what it already holds (a training run's
    checkpoint folders, an optimizer's state): each file is written in full before it replaces the old one."""
    directory = Path(directory)
    make_dirs(directory)
    with writing(directory):
        staging = _staging(directory, ".sparsemup-save.")
        try:
            _write(model, staging, None, None)
            for file in staging.iterdir():
                os.replace(file, directory / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _staging(parent: Path, prefix: str) -> Path:
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp"))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700; give the directory the usual permissions
    return staging


def _write(model: torch.nn.Module, directory: Path, base_config: PretrainedConfig | None,
           delta_config: PretrainedConfig | None) -> None:
    """Write the plain model, its masks and ``sparsemup.json`` into the existing ``directory``."""
    target = unwrap(model)
    if not isinstance(target, PreTrainedModel):
        raise ValueError(
            f"sparsemup.hf.save_pretrained takes a transformers PreTrainedModel, got a {type(target).__name__}; "
            "save sparsemup.export(model) with torch.save instead"
        )
    record = get_parameterization(target)  # a clear error when it is not parameterized
    configs = dict(target.__dict__.get(HF_RECORD) or {})
    if base_config is not None:
        configs["base_config"] = base_config.to_dict()
    if delta_config is not None:
        configs["delta_config"] = delta_config.to_dict()
    if "base_config" not in configs:
        raise ValueError(
            "this model was not built by sparsemup.hf.build, so its base is unknown; pass base_config=<the base "
            "model's config> (and delta_config=, if it has the base's width)"
        )
    plain, folds = export_with_folds(target)
    assert isinstance(plain, PreTrainedModel)  # export keeps the class
    if not _tied(plain):
        plain.config.tie_word_embeddings = False  # export untied them to give each its own multiplier
    masks = {name: (mask != 0).to(torch.uint8).contiguous() for name, mask in _masks(target, record).items()}
    meta = {
        "format": FORMAT,
        "sparsemup_version": importlib.metadata.version("sparsemup"),
        "scheme": record.scheme.name,
        # with a depth rule the branches found are written by name, so a reload checks the same ones
        "options": {**_options_json(record.options), **({"residual_branches": list(record.residual_multipliers)}
                                                         if record.residual_multipliers else {})},
        "base_config": configs["base_config"],
        "delta_config": configs.get("delta_config"),
        "tie_word_embeddings": _tied(target),
        "params": {
            name: {"role": info.role.value, "shape": list(info.shape), "base_shape": list(info.base_shape),
                   "density": _density_now(info.density, masks.get(name)), "base_density": info.base_density,
                   "masked": info.masked,
                   "forward_multipliers": dict(info.forward_multipliers)}
            for name, info in record.params.items()
        },
    }
    if folds:  # attention scales folded into weights (written only when there are any: older files stay as they were)
        meta["attention_folds"] = folds
    type(plain).save_pretrained(plain, directory)  # the class's own: not an instance attribute a caller put there
    save_file(masks, str(directory / MASKS_FILE))
    (directory / SPARSEMUP_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))


def _density_now(density: float, mask: torch.Tensor | None) -> float:
    """A weight's density as its mask has it now (as ``parameterize`` realises it from a given mask), else the
    recorded one."""
    return density if mask is None else float(mask.sum()) / mask.numel()


def _leftover_pattern(directory: Path) -> re.Pattern[str]:
    """Names of the staging and old directories a killed save of ``directory`` leaves (mkdtemp's 8 characters)."""
    return re.compile(rf"\.{re.escape(directory.name)}\.([a-z0-9_]{{8}}\.tmp|old\.[a-z0-9_]{{8}})")


def _remove_leftovers(directory: Path) -> None:
    """Remove what killed saves of ``directory`` left beside it: a live save's are not ours to race (one writer
    per directory, as for any save)."""
    pattern = _leftover_pattern(directory)
    for entry in directory.parent.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)


def _masks(model: torch.nn.Module, record: Parameterization) -> dict[str, torch.Tensor]:
    return {name: mask.detach().cpu() for name in record.params if (mask := get_mask(model, name)) is not None}


def _replace_dir(staging: Path, directory: Path) -> None:
    """Move ``staging`` to ``directory``; an existing ``directory`` is removed only once the new one is in place
    (a kill in the instant between the two renames leaves it beside, as ``.NAME.old.*``)."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old."))
    os.rmdir(old)  # a fresh name, free for the rename
    os.replace(directory, old)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(old, directory)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def from_pretrained(directory: str | Path, *, device: torch.device | str | None = None) -> PreTrainedModel:
    """The parameterized model saved by ``sparsemup.hf.save_pretrained`` in ``directory``: same
    parameterization, masks and weights, forward multipliers applied once (by sparsemup's hooks)."""
    directory = Path(directory)
    meta, masks = _read_saved(directory)
    meta_path = directory / SPARSEMUP_JSON
    plain_config = _read_config(directory)
    config_class = type(plain_config)
    config = copy.deepcopy(plain_config)
    config.tie_word_embeddings = meta["tie_word_embeddings"]
    try:
        base = from_config(config_class.from_dict(meta["base_config"]), "meta")
        delta = from_config(config_class.from_dict(meta["delta_config"]), "meta") if meta["delta_config"] else None
        model = from_config(config, device)
        record = parameterize(model, base, delta=delta, masks=masks or None, **_options_from_json(meta["options"]))
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{meta_path}: its options and configs do not rebuild the model ({type(err).__name__}: "
                         f"{err}); the file was edited or written by another sparsemup version") from None
    saved = _load_weights(directory, plain_config)
    _check_same_record(record, meta["params"], meta_path, masks)
    _load_unfolded(model, record, saved, meta_path, meta.get("attention_folds", {}))
    model.__dict__[HF_RECORD] = {"base_config": meta["base_config"], "delta_config": meta["delta_config"]}
    return model


def load_into(model: torch.nn.Module, directory: str | Path) -> None:
    """Restore what ``save_pretrained`` wrote in ``directory`` into ``model``, parameterized as the saved one was
    (a training run resuming): its masks (dynamic sparsity changes them), then its weights with the multipliers
    divided out again."""
    directory = Path(directory)
    meta, masks = _read_saved(directory)
    meta_path = directory / SPARSEMUP_JSON
    target = unwrap(model)
    record = get_parameterization(target)
    _check_same_record(record, meta["params"], meta_path, masks)
    for name, mask in masks.items():
        set_mask(target, name, mask)
    saved = _load_weights(directory, _read_config(directory))
    _load_unfolded(target, record, saved, meta_path, meta.get("attention_folds", {}))


def _read_saved(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``sparsemup.json`` and the masks of a directory ``save_pretrained`` wrote, both checked."""
    meta_path = directory / SPARSEMUP_JSON
    if not meta_path.is_file():
        raise ValueError(
            f"{directory} has no {SPARSEMUP_JSON}: it was not written by sparsemup.hf.save_pretrained. "
            "Load it with transformers.AutoModelForCausalLM.from_pretrained (its weights are plain)"
        )
    meta = _read_meta(meta_path)
    return meta, _read_masks(directory / MASKS_FILE, meta["params"])


def _read_config(directory: Path) -> PretrainedConfig:
    """The saved ``config.json``, or an error naming it."""
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise ValueError(f"{directory / 'config.json'} cannot be read ({type(err).__name__}: {err}); the directory "
                         "is damaged: save the model again") from None
    return config


def _wrong_types(data: Mapping[str, Any], types: Mapping[str, tuple[type | None, ...]]) -> str | None:
    """The first key of ``data`` missing or of a type not in ``types`` (bool is no number), described; else None."""
    for key, allowed in types.items():
        if key not in data:
            return f"key {key!r} is missing"
        value = data[key]
        ok = (value is None and None in allowed) or any(
            isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in allowed if t is not None)
        if not ok:
            names = " or ".join("null" if t is None else t.__name__ for t in allowed)
            return f"{key!r} is {json.dumps(value)[:40]}, not {names}"
    return None


def _read_meta(path: Path) -> dict[str, Any]:
    """``sparsemup.json`` parsed and checked: its keys and their types, the options, every parameter's entry."""
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file was truncated or edited: save the model "
                         "again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds {type(meta).__name__}, not a JSON object; save the model again")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT}, the one this sparsemup reads")
    problem = _wrong_types(meta, _META_TYPES)
    unknown = sorted(set(meta["options"]) - set(_OPTION_TYPES)) if problem is None else []
    if problem is None and unknown:
        problem = f"unknown option(s) {unknown} in 'options'"
    if problem is None:
        problem = _wrong_types(meta["options"], {k: v for k, v in _OPTION_TYPES.items() if k in meta["options"]})
        problem = problem and f"in 'options': {problem}"
    if problem is None and not isinstance(meta.get("attention_folds", {}), dict):
        problem = "'attention_folds' is not an object"
    if problem is None and not meta["params"]:
        problem = "'params' is empty: it lists every parameterized parameter, the check that the model rebuilds"
    for name, entry in meta["params"].items() if problem is None else ():
        problem = (f"params[{name!r}] is not an object" if not isinstance(entry, dict)
                   else _wrong_types(entry, _PARAM_TYPES))
        if problem is not None:
            problem = f"in params[{name!r}]: {problem}" if isinstance(entry, dict) else problem
            break
    if problem is not None:
        raise ValueError(f"{path}: {problem}; the file was edited or written by another sparsemup version")
    return meta


def _read_masks(path: Path, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The masks file read and checked against ``sparsemup.json``: one mask of the saved shape per masked weight."""
    try:
        masks = {name: mask.bool() for name, mask in load_file(str(path)).items()}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}); the file is missing or damaged: "
                         "save the model again") from None
    expected = {name for name, entry in params.items() if entry["masked"]}
    if set(masks) != expected:
        raise ValueError(f"{path} holds masks for {sorted(set(masks))[:4]}, but {SPARSEMUP_JSON} lists masked "
                         f"weights {sorted(expected)[:4]}; the directory was edited: save the model again")
    for name, mask in masks.items():
        if list(mask.shape) != params[name]["shape"]:
            raise ValueError(f"{path}: the mask of {name} has shape {list(mask.shape)}, the weight "
                             f"{params[name]['shape']}; the directory was edited: save the model again")
    return masks


def _load_weights(directory: Path, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    try:
        plain = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - safetensors and transformers raise several types for damaged weights
        files = ", ".join(p.name for p in sorted(directory.glob("model*.safetensors"))) or "none found"
        raise ValueError(f"{directory}: the weights ({files}) cannot be read ({type(err).__name__}: {err}); the "
                         "file is missing or damaged: save the model again") from None
    return {name: p.detach() for name, p in plain.named_parameters(remove_duplicate=False)}


def _check_same_record(record: Parameterization, params: Mapping[str, Mapping[str, object]], path: Path,
                       masks: Mapping[str, torch.Tensor]) -> None:
    """The saved ``params`` are the model's, each weight's density read from the mask it gets (GMP prunes the masks
    while the record keeps the density at parameterization)."""
    missing = sorted(set(record.params) - set(params))
    if missing:
        raise ValueError(f"{path}: 'params' lacks {missing[:4]}, parameters the model has; the file was edited or "
                         "written by another sparsemup version")
    for name, saved in params.items():
        info = record.params.get(name)
        if info is None or info.role.value != saved["role"] or \
                _density_now(info.density, masks.get(name)) != saved["density"] or \
                dict(info.forward_multipliers) != saved["forward_multipliers"]:
            raise ValueError(f"{path}: parameter {name!r} does not re-parameterize as it was saved; the directory "
                             "was edited or written by another sparsemup version")


@torch.no_grad()
def _load_unfolded(model: torch.nn.Module, record: Parameterization, saved: Mapping[str, torch.Tensor],
                   path: Path, attention_folds: Mapping[str, float]) -> None:
    """Copy the saved weights in, dividing out the multipliers and attention scale factors ``export`` folded into
    them."""
    divisor: dict[str, float] = {}
    source: dict[str, str] = {}
    for info in record.params.values():
        if info.forward_multipliers:  # read one usage (a tied weight: its embedding) and divide its factor out
            usage = next((u for u in info.forward_multipliers if info.usage_roles[u] is Role.INPUT),
                         next(iter(info.forward_multipliers)))
            source[info.name], divisor[info.name] = usage, info.forward_multipliers[usage]
        for usage, factor in info.forward_multipliers.items():
            if info.usage_roles[usage] is Role.INPUT and f"{usage.rpartition('.')[0]}.bias" in saved:
                divisor[f"{usage.rpartition('.')[0]}.bias"] = factor  # export scaled the embedding's bias too
    for name, info in record.params.items():
        value = saved[source.get(name, name)] / divisor.get(name, 1.0) / attention_folds.get(name, 1.0)
        param = model.get_parameter(name)
        if info.masked:
            mask = get_mask(model, name)
            assert mask is not None  # the record says it is masked
            if bool((value[~mask.detach().cpu().bool()] != 0).any()):
                raise ValueError(f"{path}: {name} has nonzero weights outside its mask; the directory was edited")
        param.copy_(value.to(param.dtype))

