"""Multi-process training under torchrun: process groups, mask identity across ranks, DDP and FSDP2 wrapping.

The parameterization (masks, init, multipliers, hooks) is applied to the plain model
first; wrapping comes after, so every rank holds the same masks and the gradient-mask
hooks act on full (unsharded) gradients before they are reduced.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.record import get_mask, get_parameterization
from ..sparse import get_backends

__all__ = [
    "Context", "init", "shutdown", "exit_process", "mask_digest", "check_same_masks", "gather_mask_digests", "wrap",
    "all_mean", "all_sum",
]


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world size and device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: str = "auto") -> Context:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but no CUDA device is visible; use train.device=cpu or auto")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        _JOINED.append(True)
    return Context(rank, world, local_rank, dev)


_JOINED: list[bool] = []  # non-empty once this process has joined a process group


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(status: int) -> None:
    """End a command-line process that joined a process group with ``status`` and without Python's finalization
    (``os._exit`` after flushing); return if it never joined one.

    gloo's worker threads (torch 2.13) release a finished collective's tensors a moment after the caller sees it
    finish. If the interpreter is finalizing by then, the thread blocks on the GIL, Python ends it from inside
    a noexcept destructor, and the process aborts ("terminate called without an active exception", SIGABRT)
    after all its work is done and written: seen in about one 2-process run in five with the other core busy.
    A process that skips finalization cannot meet it.
    """
    if not _JOINED:
        return
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def mask_digest(model: nn.Module) -> str:
    """sha256 over every mask's name and bytes and the layers' backends: equal digests mean identical masks."""
    record = get_parameterization(model)
    digest = hashlib.sha256()
    for name, info in sorted(record.params.items()):
        if info.masked:
            mask = get_mask(model, name)
            assert mask is not None  # info.masked
            digest.update(name.encode())
            digest.update(mask.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes())
    backends = get_backends(model)
    if backends:  # and how each layer runs
        digest.update(repr(sorted(backends.items())).encode())
    return digest.hexdigest()


def check_same_masks(digests: list[str]) -> None:
    """Raise when ranks disagree on the masks (they would train different sparse models)."""
    if len(set(digests)) > 1:
        groups = {d: [r for r, x in enumerate(digests) if x == d] for d in digests}
        detail = "; ".join(f"ranks {ranks}: {d[:12]}" for d, ranks in groups.items())
        raise RuntimeError(
            f"the sparse masks differ across ranks ({detail}); every rank must build the model with the same "
            "model.* settings and train.seed, and the same sparsemup and torch versions"
        )


def gather_mask_digests(model: nn.Module, ctx: Context) -> list[str]:
    """Every rank's ``mask_digest`` (a one-element list for one process)."""
    mine = mask_digest(model)
    if not ctx.distributed:
        return [mine]
    out: list[str] = [""] * ctx.world
    dist.all_gather_object(out, mine)
    return out


def wrap(model: nn.Module, ctx: Context, fsdp: bool, units: Sequence[nn.Module]) -> nn.Module:
    """DDP, or FSDP2 with one shard group per unit of ``units`` (the model's policy, e.g. ``GPT.fsdp_units()``)
    plus the root; the model itself for one process."""
    if not ctx.distributed:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world,))
        # Units must hold whole masked Linear layers, never shard one alone: a unit's all-gather then
        # runs before each Linear's forward pre-hook, so the gradient-mask hook is attached to the
        # unsharded weight and masks full gradients before reduce-scatter.
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    # Masks are fixed buffers checked identical at start: no need to sync them every forward
    # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers).
    ddp = nn.parallel.DistributedDataParallel
    # Nor at start for the layouts' integer buffers (the row-sparse index is int16, which gloo cannot send):
    # they follow from the masks, whose digest every rank has just compared.
    ddp._set_params_and_buffers_to_ignore_for_model(
        model, [name for name, buffer in model.named_buffers() if not buffer.is_floating_point()])
    no_sync: dict[str, Any] = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else "broadcast_buffers": False}
    return ddp(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None, **no_sync)


def all_sum(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum a tensor over ranks (in place; returned for chaining)."""
    if ctx.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_mean(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Mean of a tensor over ranks."""
    return all_sum(value, ctx) / ctx.world
