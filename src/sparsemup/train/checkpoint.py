"""Training checkpoints: model (with masks), optimizer, scheduler, RNG states, step and config in one file.

State dicts are taken with ``torch.distributed.checkpoint.state_dict`` and gathered into full
(unsharded) tensors keyed by parameter name (``core.shards``: plain collectives), so one format serves
one process, DDP and FSDP2, and a checkpoint from any of them resumes into any other. Rank 0 writes it to a
temp file and renames it over the old one: a kill at any moment leaves a loadable file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    OptimizerStateType,
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.optim.lr_scheduler import LRScheduler

from ..core.atomic import write_atomic
from ..core.shards import full_state
from ..core.vocab import Backend
from ..sparse import get_backends
from .build import dynamic_sparsity
from .distributed import Context
from .schema import RESUMABLE_KEYS, Config, ConfigError, flatten, with_defaults

__all__ = ["CHECKPOINT_NAME", "FORMAT", "Checkpoint", "ConfigOrigin", "checkpoint_path", "save", "load",
           "check_compatible", "restore_model", "restore_training_state", "remove_stale_temps"]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1


class _Saved(TypedDict):
    format: int  # FORMAT
    step: int
    config: dict[str, dict[str, object]]  # Config.to_dict()
    world_size: int
    model: dict[str, torch.Tensor]  # full (unsharded) tensors by parameter name
    optimizer: OptimizerStateType  # full, keyed by parameter name
    scheduler: dict[str, object]
    rng: list[dict[str, torch.Tensor]]  # per rank: "torch" (and "cuda")


class Checkpoint(_Saved, total=False):
    """The contents of checkpoint.pt, as ``save`` writes them and ``load`` returns them."""

    backends: dict[str, Backend]  # the layers' backends, replayed on resume (absent in early checkpoints)


def checkpoint_path(path: Path) -> Path:
    """``path`` itself if it is a file, else ``path/checkpoint.pt``."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete temp files left by a save that was killed (SIGKILL skips the cleanup); returns them."""
    stale = sorted(Path(out).glob(f".{CHECKPOINT_NAME}.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _gather_rng(ctx: Context) -> list[dict[str, torch.Tensor]]:
    mine = {"torch": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(ctx.device).cpu()
    if not ctx.distributed:
        return [mine]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, mine)
    return out


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, step: int, cfg: Config,
         ctx: Context) -> None:
    """Gather the full state on every rank (a collective) and write it atomically from rank 0."""
    sharded = StateDictOptions(full_state_dict=False)  # gathered by full_state: see core.shards for why
    state: Checkpoint = {
        "format": FORMAT,
        "step": step,
        "config": cfg.to_dict(),
        "world_size": ctx.world,
        "model": full_state(get_model_state_dict(model, options=sharded)),
        "optimizer": full_state(get_optimizer_state_dict(model, optimizer, options=sharded)),
        "scheduler": scheduler.state_dict(),
        "rng": _gather_rng(ctx),
        "backends": get_backends(model),  # replayed on resume, so a run keeps its layers' storage
    }
    if ctx.main:
        write_atomic(Path(path), lambda f: torch.save(state, f))
    if ctx.distributed:
        dist.barrier()


def load(path: Path) -> Checkpoint:
    """Read a checkpoint onto the CPU; a missing or unreadable file is a clear error."""
    file = checkpoint_path(path)
    if not file.is_file():
        raise ConfigError(f"no checkpoint at {str(file)!r}; give a run directory that holds {CHECKPOINT_NAME} or "
                          "the checkpoint file itself")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ConfigError(f"{file} is not a readable sparsemup checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{file} is not a sparsemup training checkpoint (format {FORMAT})")
    return cast(Checkpoint, state)


@dataclass(frozen=True)
class ConfigOrigin:
    """Where a run's config came from on the command line: the ``--config`` file given (None: none) and the keys
    of the ``--set`` items."""

    config_file: Path | None = None
    set_keys: tuple[str, ...] = ()


def check_compatible(saved: Mapping[str, Mapping[str, object]], cfg: Config, file: Path,
                     origin: ConfigOrigin = ConfigOrigin()) -> None:
    """Refuse to resume with settings that change the computation (any key not flagged resumable), naming
    each differing key and, from ``origin``, the option that brought the difference; keys the checkpoint
    predates take their defaults."""
    new = flatten(cfg.to_dict())
    old = with_defaults(flatten(saved))
    resumable = set(RESUMABLE_KEYS)
    if old.get("sparsity.method", "static") != "static":  # a dynamic schedule is laid out over train.steps
        resumable.discard("train.steps")
    differing = [k for k in sorted(set(old) | set(new)) if k not in resumable and old.get(k) != new.get(k)]
    if differing:
        diffs = "; ".join(f"{k}: checkpoint {old.get(k)!r}, config {new.get(k)!r}" for k in differing)
        raise ConfigError(f"cannot resume from {file}: the config differs in {diffs}. "
                          f"{_resume_fix(differing, origin)}, or start a new --out")


def _resume_fix(differing: list[str], origin: ConfigOrigin) -> str:
    """How to resume with the run's own settings, naming the sources of the config that were used."""
    fixes = []
    if origin.config_file is not None:
        fixes.append(f"drop --config {origin.config_file} (--resume alone continues with the run directory's "
                     "config)")
    overridden = [k for k in differing if k in origin.set_keys]
    if overridden:
        fixes.append("drop " + " ".join(f"--set {k}=..." for k in overridden))
    if not fixes:
        return "Resume with the run's own config (the config file in the run directory)"
    return "To resume, " + " and ".join(fixes)


def restore_model(model: nn.Module, state: Checkpoint, file: Path) -> None:
    """Load weights and masks into the parameterized, not yet wrapped model; under a dynamic ``[sparsity]``
    method the load check expects the masks the schedule has at the checkpoint's step."""
    dynamic = dynamic_sparsity(Config.from_dict(state["config"], str(file)), model)
    if dynamic is not None:
        dynamic.expect_step(int(state["step"]))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{file} does not fit this model: {err}") from None


def restore_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                           state: Checkpoint, ctx: Context) -> None:
    """Load optimizer and scheduler state (after wrapping) and this rank's RNG state."""
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"][ctx.rank] if len(state["rng"]) == ctx.world else state["rng"][0]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], ctx.device)
