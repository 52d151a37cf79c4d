"""transformers' ``Trainer`` for a parameterized model: sparsemup's optimizer groups, saves that keep the
multipliers, exact resume, and dynamic sparsity as part of the loop (docs/MODELS.md, "With transformers' Trainer").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from torch import nn

from ..core.optim import make_optimizer
from ..core.record import dense_gradients, get_parameterization
from ..core.structure import unwrap
from ..core.vocab import WeightDecayMode
from ..dynamic import DynamicSparsity
from .pretrained import load_into, save_into

__all__ = ["Trainer", "TRAINER_OPTIMIZERS"]

# TrainingArguments.optim names whose optimizer is a torch class sparsemup has a rule for, with the extra arguments.
TRAINER_OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adamw_torch": (torch.optim.AdamW, {}),
    "adamw_torch_fused": (torch.optim.AdamW, {"fused": True}),
    "sgd": (torch.optim.SGD, {}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
}


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` for a model parameterized by sparsemup (``sparsemup.hf.build``/``from_pretrained``).

    - The optimizer is ``sparsemup.make_optimizer`` over the scheme's groups, with the arguments' ``learning_rate``
      (η_base), ``weight_decay`` (wd_base), ``adam_beta1/2`` and ``adam_epsilon``; ``optim`` is one of
      ``TRAINER_OPTIMIZERS`` (others are refused). Its own ``optimizers=`` must not be given.
    - Every checkpoint and ``save_model`` write what ``sparsemup.hf.save_pretrained`` writes (plain transformers
      loads it; masks and the record ride along); ``train(resume_from_checkpoint=...)`` restores the masks and the
      unfolded weights, so the resumed run continues as the uninterrupted one.
    - ``dynamic``: a ``DynamicSparsity`` on the model (GMP, SET, RigL) run after each optimizer step, RigL's
      backward of an update step keeping dense gradients.
    """

    def __init__(self, *args: Any, dynamic: DynamicSparsity | None = None,
                 weight_decay_mode: WeightDecayMode = "independent", **kwargs: Any) -> None:
        optimizers = kwargs.get("optimizers") or (None, None)
        if optimizers[0] is not None or kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("sparsemup.hf.Trainer builds the optimizer itself from sparsemup.param_groups and the "
                             "TrainingArguments (learning_rate, weight_decay, adam_beta1/2, adam_epsilon, optim); "
                             "do not pass optimizers= or optimizer_cls_and_kwargs=")
        super().__init__(*args, **kwargs)
        if self.model is None:
            raise ValueError("sparsemup.hf.Trainer needs model=, a parameterized model (model_init is not supported)")
        self.parameterized: nn.Module = unwrap(self.model)
        get_parameterization(self.parameterized)  # a clear error when the model is not parameterized
        self.dynamic, self.weight_decay_mode = dynamic, weight_decay_mode
        self._dense_grads: dict[str, torch.Tensor] | None = None
        if dynamic is not None:
            self.add_callback(_DynamicCallback(self))

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """sparsemup's groups with the arguments' hyperparameters (and the dynamic sparsity attached)."""
        if self.optimizer is None:
            name = str(getattr(self.args.optim, "value", self.args.optim))
            if name not in TRAINER_OPTIMIZERS:
                raise ValueError(f"optim = {name!r} is not an optimizer sparsemup.hf.Trainer builds; use one of "
                                 f"{', '.join(TRAINER_OPTIMIZERS)}")
            cls, extra = TRAINER_OPTIMIZERS[name]
            if cls is torch.optim.AdamW:
                extra = {**extra, "betas": (self.args.adam_beta1, self.args.adam_beta2), "eps": self.args.adam_epsilon}
            target = self.parameterized if model is None else model
            self.optimizer = make_optimizer(target, cls, self.args.learning_rate, self.args.weight_decay,
                                            self.weight_decay_mode, **extra)
            if self.dynamic is not None:
                self.dynamic.attach(self.optimizer)
        return self.optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Transformers' step; on a step whose mask update regrows by gradient, backward keeps dense gradients,
        taken (and masked) after the last micro-batch, before clipping."""
        if self.dynamic is None or not self.dynamic.wants_gradients(self.state.global_step + 1):
            return super().training_step(model, inputs, num_items_in_batch)
        with dense_gradients(self.parameterized):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            self._dense_grads = self.dynamic.take_gradients()
        return loss

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """Transformers' save (processing class, training arguments) with the model written by ``save_into``."""
        with _saving_with_sparsemup(self.parameterized):
            super()._save(output_dir, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_into(self.parameterized if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        assert self.state.best_model_checkpoint is not None  # transformers calls it only when there is one
        load_into(self.parameterized, self.state.best_model_checkpoint)


@contextlib.contextmanager
def _saving_with_sparsemup(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model.save_pretrained(directory, ...)`` (refused on a parameterized model) writes what
    ``sparsemup.hf.save_pretrained`` writes, into the directory."""
    guard = model.__dict__.get("save_pretrained")

    def save(directory: str, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("is_main_process", True):
            save_into(model, directory)

    model.__dict__["save_pretrained"] = save
    try:
        yield
    finally:
        if guard is None:
            del model.__dict__["save_pretrained"]
        else:
            model.__dict__["save_pretrained"] = guard


class _DynamicCallback(transformers.TrainerCallback):
    """Runs the trainer's mask update after each optimizer step (and before that step's checkpoint)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = self.trainer
        assert trainer.dynamic is not None  # added only with one
        # accelerate wraps both: the density-dependent LRs (GMP) are set on the torch optimizer and scheduler inside
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        scheduler = getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)
        trainer.dynamic.update(state.global_step, optimizer, trainer._dense_grads, scheduler)
        trainer._dense_grads = None
