"""Dynamic sparsity applied to a model: a method's mask updates on masked-dense weights and their optimizer.

``DynamicSparsity`` owns the plumbing the pure rules of ``sparsemup.dynamic.methods`` leave out: it
reads each masked weight as (output neurons, fan-in), writes the new mask into its ``<param>_mask``
buffer (``sparsemup.core.record.set_mask``: the weight is zeroed outside it and the load-time check
follows), starts regrown weights at zero or at the layer's init std, resets the optimizer state of
every changed entry, and keeps each hidden layer's LR at m_ρ(t) while GMP changes its density.

SµPar with a changing mask (docs/DYNAMIC.md): init uses the density at init (GMP from dense: m_ρ = 1);
the hidden LR (and, with ``independent`` decay, its weight decay) follows the current realised
density, recomputed at every update through the same rule (``core.rules.lr_multiplier``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from ..core.hooks import MASK_SUFFIX
from ..core.layout import Layout, from_neurons, group_count, neurons_shape, neurons_view
from ..core.masks import stable_seed
from ..core.optim import optimizer_rule
from ..core.record import ParamInfo, expect_mask_nonzeros, get_parameterization, set_mask
from ..core.rules import Family, Multipliers, lr_multiplier, weight_decay_multiplier
from ..core.shards import full_tensor
from ..core.storage import SparseStorage
from ..core.structure import unwrap, weight_layout
from ..core.vocab import WEIGHT_DECAY_MODES, WeightDecayMode, check_choice
from .methods import GMP, Method, random_scores

__all__ = ["DynamicSparsity", "RegrowInit", "REGROW_INITS", "kept_weight_stats"]

RegrowInit = Literal["zero", "normal"]
REGROW_INITS: tuple[RegrowInit, ...] = get_args(RegrowInit)


@dataclass
class _Target:
    """One masked-dense weight a method updates."""

    info: ParamInfo
    param: nn.Parameter
    mask: torch.Tensor  # the buffer of its first usage (every usage holds the same values)
    layout: Layout
    groups: int
    row_counts: torch.Tensor  # each output neuron's nonzeros at init

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        return neurons_view(tensor, self.layout, self.groups)

    def full(self, rows: torch.Tensor) -> torch.Tensor:
        return from_neurons(rows, self.info.shape, self.layout, self.groups)


class DynamicSparsity:
    """Applies ``method``'s mask updates to a parameterized model and the optimizer training it.

    Per optimizer step ``t`` (counting from 1, after ``optimizer.step()``), ``update(t, optimizer)``;
    for a method that regrows by gradient, backward of that step runs inside
    ``sparsemup.core.record.dense_gradients(model)`` and ``take_gradients()`` is called before the
    optimizer step. Decisions read weights, all-reduced gradients and (seed, name, step) only, so every
    process of a data-parallel job takes the same one.

    Example::

        dyn = DynamicSparsity(model, RigL(stop_step=750, update_every=100))
        opt = make_optimizer(model, torch.optim.AdamW, lr=3e-3); dyn.attach(opt)
        for t in range(1, steps + 1):
            with dense_gradients(model) if dyn.wants_gradients(t) else contextlib.nullcontext():
                loss(model).backward()
            grads = dyn.take_gradients() if dyn.wants_gradients(t) else None
            opt.step(); opt.zero_grad()
            dyn.update(t, opt, grads)
    """

    def __init__(self, model: nn.Module, method: Method, *, seed: int = 0, regrow_init: RegrowInit = "zero",
                 weight_decay_mode: WeightDecayMode = "independent") -> None:
        check_choice(regrow_init, REGROW_INITS, "regrow_init")
        check_choice(weight_decay_mode, WEIGHT_DECAY_MODES, "weight_decay_mode")
        self.model, self.method, self.seed = model, method, seed
        self.regrow_init, self.weight_decay_mode = regrow_init, weight_decay_mode
        self.record = get_parameterization(model)
        inner = unwrap(model)
        self.targets: dict[str, _Target] = {}
        for name, info in self.record.params.items():
            if not info.masked:
                continue
            module_name, _, attr = name.rpartition(".")
            owner = inner.get_submodule(module_name)
            if isinstance(owner, SparseStorage):
                raise ValueError(f"{name} is stored sparse ({type(owner).__name__}); dynamic sparsity updates "
                                 "masked-dense weights only: train on the masked_dense backend")
            layout = weight_layout(owner, name, len(info.shape))
            mask = owner.get_buffer(attr + MASK_SUFFIX)
            groups = group_count(owner, layout)
            rows = (neurons_view(mask, layout, groups) != 0).sum(dim=1).cpu()
            self.targets[name] = _Target(info, owner.get_parameter(attr), mask, layout, groups, rows)
        if not self.targets:
            raise ValueError("the model has no masked weights to update; parameterize it with density < 1, or with "
                             "mask_dense=True to start dense (GMP)")

    # -- schedule ---------------------------------------------------------------------------------------

    def wants_gradients(self, step: int) -> bool:
        """Whether step ``step``'s backward must keep dense gradients (RigL's regrowth reads them)."""
        return self.method.regrowth == "gradient" and self.method.is_update(step)

    def nonzeros(self, step: int) -> dict[str, int]:
        """Every updated weight's mask nonzeros once the updates up to ``step`` have run."""
        out = {}
        for name, t in self.targets.items():
            fan_in = neurons_shape(t.info.shape, t.layout, t.groups)[1]
            out[name] = self.method.nonzeros(t.row_counts, fan_in, step)
        return out

    def expect_step(self, step: int) -> None:
        """Make the load-time check expect the masks of a checkpoint saved after step ``step``: call on the
        freshly built model before loading a mid-schedule state_dict."""
        expect_mask_nonzeros(self.model, self.nonzeros(step))

    # -- optimizer --------------------------------------------------------------------------------------

    def _follows_density(self) -> bool:
        return isinstance(self.method, GMP) and self.record.scheme.density_lr

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Before any step (and before an LR scheduler wraps it): give every updated weight whose LR follows
        the density its own parameter group, so its LR can change alone. Keys ``static_lr`` and
        ``static_weight_decay`` keep the group's values at init (they travel in the optimizer's state_dict)."""
        if optimizer.state or any("initial_lr" in group for group in optimizer.param_groups):
            raise ValueError("attach the optimizer before its first step and before an LR scheduler wraps it")
        if not self._follows_density():
            return
        family = optimizer_rule(type(optimizer)).family
        ids = {id(t.param): name for name, t in self.targets.items()}
        kept: list[dict[str, Any]] = []
        own: list[dict[str, Any]] = []
        for group in optimizer.param_groups:
            names = list(group.get("param_names", [""] * len(group["params"])))
            rest = [(p, n) for p, n in zip(group["params"], names) if id(p) not in ids]
            for p in group["params"]:
                if id(p) in ids:
                    self._check_decay_mode(self.targets[ids[id(p)]], group, family)
                    own.append({**group, "params": [p], "param_names": [ids[id(p)]],
                                "static_lr": group["lr"], "static_weight_decay": group["weight_decay"]})
            if rest:
                kept.append({**group, "params": [p for p, _ in rest], "param_names": [n for _, n in rest]})
        optimizer.param_groups = kept + own

    def _check_decay_mode(self, t: _Target, group: Mapping[str, Any], family: Family) -> None:
        """The group's decay multiplier is the one ``weight_decay_mode`` gives (else the decay would drift)."""
        mult = lr_multiplier(t.info.role, self.record.scheme, t.info.multipliers, family,
                             self.record.options.depth_alpha)
        expected = weight_decay_multiplier(t.info.role, mult, self.weight_decay_mode)
        if "wd_mult" in group and not math.isclose(group["wd_mult"], expected, rel_tol=1e-12):
            raise ValueError(f"{t.info.name}: its parameter group's weight-decay multiplier {group['wd_mult']:g} is "
                             f"not the {self.weight_decay_mode!r} rule's {expected:g}; pass the optimizer's "
                             "weight_decay_mode to DynamicSparsity")

    def _set_lrs(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Each updated weight's group LR and decay from the rule at its mask's realised density."""
        family = optimizer_rule(type(optimizer)).family
        for index, group in enumerate(optimizer.param_groups):
            if "static_lr" not in group:
                continue
            t = self.targets[group["param_names"][0]]
            m = t.info.multipliers
            density = int(t.mask.count_nonzero()) / t.mask.numel()
            now = Multipliers(m.width, m.fan_out, density / t.info.base_density, m.depth)
            alpha = self.record.options.depth_alpha
            static_mult = lr_multiplier(t.info.role, self.record.scheme, m, family, alpha)
            mult = lr_multiplier(t.info.role, self.record.scheme, now, family, alpha)
            base_lr = group["static_lr"] / static_mult
            static_wd_mult = weight_decay_multiplier(t.info.role, static_mult, self.weight_decay_mode)
            wd_mult = weight_decay_multiplier(t.info.role, mult, self.weight_decay_mode)
            ratio = base_lr * mult / group.get("initial_lr", group["lr"])
            group["lr_mult"], group["wd_mult"] = mult, wd_mult
            group["weight_decay"] = group["static_weight_decay"] / static_wd_mult * wd_mult
            if "initial_lr" in group:
                group["initial_lr"] = base_lr * mult
            group["lr"] = group["lr"] * ratio
            if scheduler is not None:
                scheduler.base_lrs[index] = base_lr * mult

    # -- updates ----------------------------------------------------------------------------------------

    def take_gradients(self) -> dict[str, torch.Tensor]:
        """The dense gradients of the updated weights as (neurons, fan-in) copies; then mask the gradients in
        place, as the mask hooks would have (call after a backward inside ``dense_gradients``)."""
        out = {}
        for name, t in self.targets.items():
            grad = t.param.grad
            if grad is None:
                raise ValueError(f"{name} has no gradient: run backward (inside dense_gradients) first")
            out[name] = t.view(grad.detach()).clone()
            grad.mul_(t.mask)
        return out

    @torch.no_grad()
    def update(self, step: int, optimizer: torch.optim.Optimizer | None = None,
               gradients: Mapping[str, torch.Tensor] | None = None, scheduler: Any = None) -> dict[str, int]:
        """Run the update due after step ``step`` (none: returns {}); returns each weight's changed entries.

        Dropped entries are zeroed, regrown ones start at zero or N(0, init std²) drawn from
        (seed, name, step), and the optimizer state of both is reset. ``scheduler``'s ``base_lrs`` follow
        the groups' LRs."""
        if not self.method.is_update(step):
            return {}
        if optimizer is not None and self._follows_density() and scheduler is None and any(
                "initial_lr" in group for group in optimizer.param_groups):
            raise ValueError("an LR scheduler wraps the optimizer: pass it as scheduler=, so that its base LRs follow "
                             "the density (else its next step restores the old LRs)")
        if self.method.regrowth == "gradient" and gradients is None:
            raise ValueError(f"step {step} regrows by gradient: run its backward inside dense_gradients(model) and "
                             "pass take_gradients()")
        changed_counts = {}
        for name, t in self.targets.items():
            old = t.view(t.mask) != 0
            weight = t.view(t.param.detach())
            scores = None
            if self.method.regrowth == "gradient":
                assert gradients is not None
                scores = gradients[name].abs().to(weight.device)
            elif self.method.regrowth == "random":
                scores = random_scores(tuple(old.shape), self.seed, name, step).to(weight.device)
            new = self.method.new_mask(old.cpu(), weight.float().cpu(), None if scores is None else scores.cpu(),
                                       step)
            grown = t.full(new & ~old.cpu()).to(t.param.device)
            changed = t.full(new ^ old.cpu()).to(t.param.device)
            set_mask(self.model, name, t.full(new))
            if self.regrow_init == "normal" and t.info.init_std is not None and bool(grown.any()):
                seed = stable_seed(self.seed, f"regrow-init\x00{name}\x00{step}")
                values = torch.randn(t.info.shape, generator=torch.Generator(device="cpu").manual_seed(seed))
                values = (values * t.info.init_std).to(t.param.device, t.param.dtype)
                t.param.copy_(torch.where(grown, values, t.param))
            if optimizer is not None:
                for value in optimizer.state.get(t.param, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == t.param.shape:
                        value.masked_fill_(changed, 0)
            changed_counts[name] = int(changed.sum())
        if optimizer is not None and self._follows_density():
            self._set_lrs(optimizer, scheduler)
        return changed_counts


@torch.no_grad()
def kept_weight_stats(model: nn.Module, supar_std: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Per masked-dense weight: realised density, RMS of the kept entries, RMS over ``supar_std[name]`` (the
    Gaussian SµPar assumes at that density) and the kept entries' excess kurtosis (0 for a Gaussian).
    Under FSDP2 every rank must call it (sharded weights are gathered)."""
    record = get_parameterization(model)
    inner = unwrap(model)
    out = {}
    for name, info in record.params.items():
        if not info.masked or name not in supar_std:
            continue
        module_name, _, attr = name.rpartition(".")
        owner = inner.get_submodule(module_name)
        if isinstance(owner, SparseStorage):  # kept entries only: no mask buffer to read
            continue
        weight = owner.get_parameter(attr).detach()
        weight = full_tensor(weight)  # an FSDP2 shard gathered (a collective: every rank calls this)
        weight = weight.double()
        kept = weight[owner.get_buffer(attr + MASK_SUFFIX) != 0]
        rms = float(kept.pow(2).mean().sqrt())
        centred = kept - kept.mean()
        kurtosis = float(centred.pow(4).mean() / centred.pow(2).mean().pow(2)) - 3.0
        out[name] = {"density": kept.numel() / weight.numel(), "rms": rms, "rms_over_supar_std": rms / supar_std[name],
                     "excess_kurtosis": kurtosis}
    return out
