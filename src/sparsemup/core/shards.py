"""Whole tensors and norms of FSDP2 shards through plain, synchronous ``torch.distributed`` collectives.

DTensor's own gathers (``full_tensor``, ``redistribute``, and so ``get_model_state_dict(full_state_dict=True)``
and ``clip_grad_norm_`` over shards) run on functional collectives. On gloo (CPU) in torch 2.13 these abort
the process now and then when the machine is busy: "terminate called without an active exception" at exit,
or "double free" in the middle of a gather (2-process loops with the other core busy; a plain
``dist.all_gather`` in the same loop never did). FSDP2 shards a tensor along dim 0 the way ``torch.chunk``
does, so the whole tensor is the ranks' padded chunks gathered and cut back to length.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["full_tensor", "full_state", "clip_grad_norm"]


def _sharded(tensor: Any) -> bool:
    """A DTensor on a 1-D mesh, sharded or replicated (the placements FSDP2 makes)."""
    if not hasattr(tensor, "device_mesh") or tensor.device_mesh.ndim != 1:
        return False
    return all(p.is_shard() or p.is_replicate() for p in tensor.placements)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it); a plain tensor as it is."""
    if not hasattr(tensor, "to_local"):
        return tensor
    shard: Any = tensor  # a DTensor
    if not _sharded(shard):
        whole: torch.Tensor = shard.full_tensor()  # other meshes: DTensor's own gather
        return whole
    import torch.distributed as dist

    local: torch.Tensor = shard.to_local()
    placement = shard.placements[0]
    if placement.is_replicate():
        return local
    mesh = shard.device_mesh
    dim, length, world = placement.dim, tensor.shape[placement.dim], mesh.size()
    chunk = math.ceil(length / world)
    padded = local.new_zeros((*local.shape[:dim], chunk, *local.shape[dim + 1:]))
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=mesh.get_group())
    return torch.cat(parts, dim).narrow(dim, 0, length).contiguous()


def full_state(state: Any) -> Any:
    """A (nested) state dict with every DTensor gathered whole and every tensor on the CPU: what
    ``full_state_dict=True, cpu_offload=True`` gives, without functional collectives."""
    if isinstance(state, dict):
        return {key: full_state(value) for key, value in state.items()}
    if isinstance(state, list):
        return [full_state(value) for value in state]
    if isinstance(state, tuple):
        return tuple(full_state(value) for value in state)
    if isinstance(state, torch.Tensor):
        return full_tensor(state).cpu()
    return state


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) returning the total norm as a float. Over FSDP2 shards the
    same arithmetic as DTensor's (the local shards' 2-norm, squared, summed over ranks, square root) with one
    plain ``all_reduce``."""
    params = [p for p in parameters if p.grad is not None]
    grads: list[Any] = [p.grad for p in params]
    if not grads or not all(_sharded(g) and all(q.is_shard() for q in g.placements) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    import torch.distributed as dist

    local = [g.to_local() for g in grads]
    squares = torch.stack(torch._foreach_norm(local, 2.0)) ** 2.0  # each tensor's norm, whole over the ranks
    dist.all_reduce(squares, group=grads[0].device_mesh.get_group())
    total = torch.linalg.vector_norm(squares ** (1.0 / 2.0), 2.0)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in local:
        g.mul_(coefficient)
    return float(total)
