"""Residual branches for the depth rule (CompleteP): found or declared, then checked on a probe batch.

Shapes cannot tell a branch's closing projection from its opening one (Llama's ``q_proj`` and ``o_proj`` are
both width × width), so branches come from the model's behaviour: a residual block computes
``x_out = x_in + Σ_i b_i``, where each ``b_i`` is the output of a branch's closing module. One probe batch
records every block's input and output and the outputs of the candidates, and a block's branches are
accepted only where ``x_out − x_in`` equals the sum of their outputs to rounding. Multiplying each ``b_i``
by m_L^(−α) (a forward hook on its module) is then exactly x ← x + m_L^(−α)·branch(x), whatever the
order of the branches in the block (a pre-LN block's second branch reads the stream the first updated).

Blocks are the numbered children of a ``nn.ModuleList`` (``blocks.3``, ``model.layers.3``): the block of a
module is its name's longest prefix ending in a number.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .export import Probe, first_tensor, token_probe
from .structure import match, named_modules, unwrap

__all__ = ["block_of", "residual_blocks", "residual_branches"]

MAX_BRANCHES = 4  # branches per block tried when finding them (attention + MLP, plus parallel or extra ones)


def block_of(module_name: str) -> str | None:
    """The residual block holding ``module_name``: its longest prefix ending in a numbered component."""
    parts = module_name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if parts[end - 1].isdigit():
            return ".".join(parts[:end])
    return None


def _override_hint() -> str:
    return ("declare the closing modules of the residual branches with residual_branches=[module name patterns], "
            "e.g. ['model.layers.*.self_attn.o_proj', 'model.layers.*.mlp.down_proj']")


def residual_blocks(modules: Mapping[str, nn.Module]) -> list[str]:
    """The numbered children of the outermost ``nn.ModuleList`` that holds parameters (the residual blocks)."""
    lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and len(m)
             and any(True for _ in m.parameters())]
    outer = [n for n in lists if not any(n != o and n.startswith(o + ".") for o in lists)]
    if len(outer) != 1:
        found = f"{len(outer)} outermost ModuleLists ({', '.join(outer[:4])})" if outer else "no ModuleList"
        raise ValueError(f"depth_alpha: sparsemup looks for the residual blocks in one nn.ModuleList and found "
                         f"{found}; {_override_hint()}")
    prefix = outer[0] + "." if outer[0] else ""
    return [prefix + str(i) for i in range(len(modules[outer[0]]))]  # type: ignore[arg-type]


def _candidates(modules: Mapping[str, nn.Module], blocks: Sequence[str]) -> dict[str, str]:
    """Leaf modules with a matrix weight inside a block: {module name: block name}."""
    out: dict[str, str] = {}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        block = block_of(name)
        if block is not None and block in blocks and not any(True for _ in module.children()) \
                and isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            out[name] = block
    return out


def _record(model: nn.Module, modules: Mapping[str, nn.Module], blocks: Sequence[str], branches: Sequence[str],
            probe: Probe | None) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """Each block's (input, output) and each branch candidate's output on the probe batch, in eval mode."""
    ends: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    outputs: dict[str, torch.Tensor] = {}

    def on_block(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: object) -> None:
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            if isinstance(x, torch.Tensor):
                ends.setdefault(name, (x.detach().clone(), first_tensor(output).detach().clone()))
        return hook

    def on_branch(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: object) -> None:
            outputs.setdefault(name, first_tensor(output).detach().clone())
        return hook

    handles = [modules[b].register_forward_hook(on_block(b), with_kwargs=True) for b in blocks]
    handles += [modules[b].register_forward_hook(on_branch(b)) for b in branches]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            (probe or token_probe)(model)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return ends, outputs


def _sums_to(update: torch.Tensor, x_in: torch.Tensor, parts: Sequence[torch.Tensor]) -> bool:
    """Whether ``update`` (x_out − x_in) equals the sum of ``parts`` to the rounding of the block's additions:
    each of the len(parts) + 1 additions rounds by at most eps·(|x_in| + Σ|b_i|), and the subtraction once more."""
    if any(p.shape != update.shape for p in parts):
        return False
    magnitude = x_in.abs() + sum((p.abs() for p in parts), torch.zeros_like(update))
    eps = torch.finfo(update.dtype).eps
    bound = 2 * (len(parts) + 2) * eps * magnitude + torch.finfo(update.dtype).tiny
    total = sum(parts, torch.zeros_like(update))
    return bool(((update - total).abs() <= bound).all())


def _ends(block: str, ends: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's input and output on the probe batch, both finite (else an error naming the block)."""
    if block not in ends:
        raise ValueError(f"the probe batch did not run block {block!r} (or its input is not a tensor); "
                         "pass probe=lambda m: m(example_inputs)")
    _check_finite(block, ends)
    return ends[block]


def _check_finite(block: str, ends: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in ends[block]):
        raise ValueError(f"block {block!r} gave non-finite values on the probe batch (uninitialised weights, e.g. "
                         "after to_empty?); initialise the model's weights before parameterizing it with depth_alpha")


def residual_branches(model: nn.Module, patterns: Sequence[str] | None, probe: Probe | None) -> dict[str, str]:
    """{closing module of each residual branch: its block}, declared by ``patterns`` or found, checked on a probe.

    Found: in each block, the unique smallest set (up to ``MAX_BRANCHES``) of leaf modules with a matrix weight
    whose outputs sum to the block's update. Declared: every module matching a pattern, each pattern matching
    one at least. Either way a block whose update is not the sum of its branches' outputs is refused by name.
    """
    target = unwrap(model)
    modules = named_modules(target)
    if patterns is not None:
        declared = {p: None for p in patterns}
        if not declared:
            raise ValueError(f"residual_branches is empty; {_override_hint()}, or leave it out to have them found")
        chosen = [n for n in modules if n and match(declared, (n,)) is not None]
        for pattern in declared:
            if not any(match({pattern: None}, (n,)) for n in chosen):
                raise ValueError(f"residual_branches pattern {pattern!r} matches no module; check the name")
        homeless = [n for n in chosen if block_of(n) is None]
        if homeless:
            raise ValueError(f"residual branch {homeless[0]!r} is in no numbered block (a nn.ModuleList's child), so "
                             "its block's update cannot be checked; declare modules inside the residual blocks")
        owner = {n: str(block_of(n)) for n in chosen}
        blocks = sorted(set(owner.values()), key=lambda b: [int(p) if p.isdigit() else p for p in b.split(".")])
        try:
            every = residual_blocks(modules)
        except ValueError:  # no single block list to compare with: the declared blocks are the blocks
            every = blocks
        uncovered = [b for b in every if b not in blocks]
        if uncovered:  # L would be counted short, and those blocks' branches left unscaled
            raise ValueError(f"residual_branches cover {len(blocks)} of the model's {len(every)} residual blocks "
                             f"(none in {', '.join(uncovered[:4])}); declare patterns matching every block's "
                             "branches, e.g. with * for the block number")
        ends, outputs = _record(target, modules, blocks, chosen, probe)
        for block in blocks:
            x_in, x_out = _ends(block, ends)
            mine = [n for n in chosen if owner[n] == block]
            missing = [n for n in mine if n not in outputs]
            if missing or not _sums_to(x_out - x_in, x_in, [outputs[n] for n in mine]):
                problem = (f"did not run on the probe batch ({', '.join(missing)})" if missing else
                           "do not sum to its output minus its input (a branch missing, one that is not a closing "
                           "projection, or a norm after the addition)")
                raise ValueError(f"block {block!r}: the declared residual branches {mine} {problem}; "
                                 f"{_override_hint()}")
        return owner
    blocks = residual_blocks(modules)
    candidates = _candidates(modules, blocks)
    ends, outputs = _record(target, modules, blocks, list(candidates), probe)
    found: dict[str, str] = {}
    for block in blocks:
        x_in, x_out = _ends(block, ends)
        update = x_out - x_in
        mine = [n for n, b in candidates.items() if b == block and n in outputs and outputs[n].shape == update.shape]
        matches: list[tuple[str, ...]] = []
        for size in range(1, min(MAX_BRANCHES, len(mine)) + 1):
            matches = [c for c in itertools.combinations(mine, size)
                       if _sums_to(update, x_in, [outputs[n] for n in c])]
            if matches:
                break
        if len(matches) != 1:
            what = "no set" if not matches else f"{len(matches)} sets ({matches[:3]})"
            raise ValueError(f"block {block!r}: {what} of its projections sum to its output minus its input, so "
                             f"sparsemup cannot tell its residual branches; {_override_hint()}")
        found.update({n: block for n in matches[0]})
    return found
