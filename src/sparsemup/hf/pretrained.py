"""Save a parameterized causal LM for plain transformers, and restore it for more SµPar training.

``save_pretrained`` writes ``sparsemup.export(model)`` (forward multipliers folded into the weights,
masks and hooks gone, tied weights untied when their factors differ) with transformers' own
``save_pretrained``, plus ``sparsemup.json`` (how it was parameterized, its base config) and
``sparsemup_masks.safetensors``. ``from_pretrained`` rebuilds and re-parameterizes the model from
those, then loads the weights with the multipliers divided out again, so they are applied once.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ..core import get_mask, get_parameterization, parameterize
from ..core.atomic import current_umask
from ..core.export import export_with_folds
from ..core.record import Options, Parameterization, set_mask
from ..core.rules import SCHEMES, Role, Scheme
from ..core.structure import unwrap
from .build import HF_RECORD, from_config

__all__ = ["save_pretrained", "save_into", "from_pretrained", "load_into", "SPARSEMUP_JSON", "MASKS_FILE"]

SPARSEMUP_JSON = "sparsemup.json"
MASKS_FILE = "sparsemup_masks.safetensors"
FORMAT = 1


def _options_json(options: Options) -> dict[str, Any]:
    """The JSON form of ``parameterize``'s arguments (delta and masks travel separately)."""
    out = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name not in ("delta", "masks")}
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
    directory.parent.mkdir(parents=True, exist_ok=True)
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
    directory.mkdir(parents=True, exist_ok=True)
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
        "options": _options_json(record.options),
        "base_config": configs["base_config"],
        "delta_config": configs.get("delta_config"),
        "tie_word_embeddings": _tied(target),
        "params": {
            name: {"role": info.role.value, "shape": list(info.shape), "base_shape": list(info.base_shape),
                   "density": info.density, "base_density": info.base_density, "masked": info.masked,
                   "forward_multipliers": dict(info.forward_multipliers)}
            for name, info in record.params.items()
        },
    }
    if folds:  # attention scales folded into weights (written only when there are any: older files stay as they were)
        meta["attention_folds"] = folds
    type(plain).save_pretrained(plain, directory)  # the class's own: not an instance attribute a caller put there
    save_file(masks, str(directory / MASKS_FILE))
    (directory / SPARSEMUP_JSON).write_text(json.dumps(meta, indent=1, sort_keys=True))


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
    meta, meta_path = _read_meta(directory)
    plain_config = AutoConfig.from_pretrained(directory)
    config_class = type(plain_config)
    config = copy.deepcopy(plain_config)
    config.tie_word_embeddings = meta["tie_word_embeddings"]
    base = from_config(config_class.from_dict(meta["base_config"]), "meta")
    delta = from_config(config_class.from_dict(meta["delta_config"]), "meta") if meta["delta_config"] else None
    masks = {name: mask.bool() for name, mask in load_file(str(directory / MASKS_FILE)).items()}
    model = from_config(config, device)
    record = parameterize(model, base, delta=delta, masks=masks or None, **_options_from_json(meta["options"]))
    saved = _load_weights(directory, plain_config)
    _check_same_record(record, meta, meta_path)
    _load_unfolded(model, record, saved, meta_path, meta.get("attention_folds", {}))
    model.__dict__[HF_RECORD] = {"base_config": meta["base_config"], "delta_config": meta["delta_config"]}
    return model


def load_into(model: torch.nn.Module, directory: str | Path) -> None:
    """Restore what ``save_pretrained`` wrote in ``directory`` into ``model``, parameterized as the saved one was
    (a training run resuming): its masks (dynamic sparsity changes them), then its weights with the multipliers
    divided out again."""
    directory = Path(directory)
    meta, meta_path = _read_meta(directory)
    target = unwrap(model)
    record = get_parameterization(target)
    _check_same_record(record, meta, meta_path)
    for name, mask in load_file(str(directory / MASKS_FILE)).items():
        set_mask(target, name, mask.bool())
    saved = _load_weights(directory, AutoConfig.from_pretrained(directory))
    _load_unfolded(target, record, saved, meta_path, meta.get("attention_folds", {}))


def _read_meta(directory: Path) -> tuple[dict[str, Any], Path]:
    meta_path = directory / SPARSEMUP_JSON
    if not meta_path.is_file():
        raise ValueError(
            f"{directory} has no {SPARSEMUP_JSON}: it was not written by sparsemup.hf.save_pretrained. "
            "Load it with transformers.AutoModelForCausalLM.from_pretrained (its weights are plain)"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT}, the one this sparsemup reads")
    return meta, meta_path


def _load_weights(directory: Path, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=torch.float32)
    return {name: p.detach() for name, p in plain.named_parameters(remove_duplicate=False)}


def _check_same_record(record: Parameterization, meta: dict[str, Any], path: Path) -> None:
    for name, saved in meta["params"].items():
        info = record.params.get(name)
        if info is None or info.role.value != saved["role"] or info.density != saved["density"] or \
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

