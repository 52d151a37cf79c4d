"""The training loop: parameterized GPT, scheduled optimizer, logging, validation, checkpoints, divergence.

One process or many (torchrun): the global batch of each step is a function of
(seed, step) and is split across processes and accumulation micro-steps, so the
loss curve does not depend on how the work is laid out, and resuming is exact.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.atomic import append_atomic, make_dirs, write_json_atomic, write_text_atomic
from ..core.optim import make_optimizer
from ..core.record import dense_gradients, get_mask, get_parameterization
from ..core.rules import Multipliers, Role, init_std
from ..core.shards import clip_grad_norm
from ..core.structure import match
from ..dynamic import kept_weight_stats
from ..sparse import get_backends
from . import checkpoint, distributed
from .build import build_model, dynamic_sparsity, fsdp_units, logits_of
from .checkpoint import ConfigOrigin
from .config import to_toml, to_yaml
from .data import bits_per_byte, load_corpus, train_batch
from .evaluate import validation_loss
from .schema import OPTIMIZERS, Config, ConfigError
from .validate import transfer_note, validate

__all__ = ["Schedule", "MetricsLog", "Trainer", "train", "METRIC_COLUMNS", "Completed", "Diverged", "TrainResult"]

METRIC_COLUMNS = ("step", "train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s")


class MetricsRow(TypedDict, total=False):
    """One row of metrics.csv (``val_loss`` only on validation steps)."""

    step: int
    train_loss: float
    val_loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float


@dataclass(frozen=True, kw_only=True)
class Completed:
    """The result of a run that reached ``train.steps`` (result.json holds ``to_json()``)."""

    status: Literal["completed"] = "completed"
    final_val_loss: float
    steps: int
    final_val_bits_per_byte: float | None
    mean_tokens_per_s: float | None  # None when resumed at the last step (no step ran)
    world_size: int
    device: str
    fsdp: bool
    mask_sha256: str
    kept_weights: dict[str, dict[str, float]]  # per masked weight: Trainer._kept_weights
    backends: dict[str, int]  # {backend: number of masked layers on it}

    def to_json(self) -> dict[str, object]:
        """result.json's object (the fields, in their order)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class Diverged:
    """The result of a run stopped by a non-finite loss or gradient norm (result.json holds ``to_json()``)."""

    status: Literal["diverged"] = "diverged"
    diverged_at_step: int
    final_val_loss: None = None
    steps: int  # the steps completed before the diverging one
    loss_at_divergence: str  # repr of the non-finite value
    grad_norm_at_divergence: str
    last_checkpoint_step: int | None
    world_size: int
    device: str

    def to_json(self) -> dict[str, object]:
        """result.json's object (the fields, in their order)."""
        return dataclasses.asdict(self)


TrainResult = Completed | Diverged


class Schedule:
    """LR factor of step k: linear warm-up to 1, then decay to ``final`` at the last step, linear or by half a cosine
    (nanoGPT's); or constant 1. Every group's LR is its initial LR times this factor, so the ratios between groups
    (the parameterization's multipliers) hold at every step."""

    def __init__(self, kind: str, warmup: int, total: int, final: float) -> None:
        self.kind, self.warmup, self.total, self.final = kind, warmup, total, final

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - 1 - self.warmup))
        if self.kind == "cosine":
            return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - self.final) * progress


class MetricsLog:
    """metrics.csv (one row per step) and, optionally, TensorBoard scalars; rank 0 only."""

    def __init__(self, out: Path, start_step: int, tensorboard: bool) -> None:
        self.path = out / "metrics.csv"
        kept: list[dict[str, str]] = []
        if start_step and self.path.exists():  # rows past the checkpoint are redone after resuming
            kept = [row for row in self._readable_rows() if int(row["step"]) <= start_step]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomic(self.path, buffer.getvalue())
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _readable_rows(self) -> list[dict[str, str]]:
        """The rows of metrics.csv up to an unreadable tail (a kill or crash mid-append, NUL bytes left by the
        filesystem), which is dropped with a note, as results.jsonl's torn last line is; an unreadable row
        followed by readable ones is an error naming its line."""
        with self.path.open(newline="", errors="replace") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
        good = [_is_metrics_row(row) for _, row in rows]
        if all(good):
            return [row for _, row in rows]
        first = good.index(False)
        if any(good[first:]):
            raise ConfigError(f"{self.path}, line {rows[first][0]}: not a metrics row ({rows[first][1]}); the file "
                              "was edited or corrupted: fix or delete that line, then resume")
        print(f"sparsemup: repaired {self.path}: dropped {len(rows) - first} unreadable line(s) at its end "
              "(the steps after the checkpoint are redone)", file=sys.stderr)
        return [row for _, row in rows[:first]]

    def log(self, row: MetricsRow) -> None:
        buffer = io.StringIO()
        values: dict[str, object] = dict(row)
        csv.DictWriter(buffer, METRIC_COLUMNS, lineterminator="\n").writerow(
            {k: ("" if values.get(k) is None else values[k]) for k in METRIC_COLUMNS})
        append_atomic(self.path, buffer.getvalue().encode(), sync=False)
        if self.tb is not None:
            for key in ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s"):
                if values.get(key) is not None:
                    self.tb.add_scalar(key, values[key], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _is_metrics_row(row: dict[str | Any, str | Any]) -> bool:
    """Whether a row read from metrics.csv has exactly the columns and an integer step."""
    return None not in row and None not in row.values() and str(row.get("step", "")).isdigit()


class Trainer:
    """Sets up (validating everything before any work) and runs one training run writing into ``out``."""

    def __init__(self, cfg: Config, out: Path, resume: bool = False, config_format: str = "toml",
                 origin: ConfigOrigin | None = None) -> None:
        self.ctx = ctx = distributed.init(cfg.train.device)
        validate(cfg, ctx.world)
        note = transfer_note(cfg)
        if note is not None and ctx.main:
            print(note, file=sys.stderr)
        self.cfg, self.out = cfg, Path(out)
        state = self._saved_state(resume, origin or ConfigOrigin())
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.corpus = load_corpus(cfg.data.path, cfg.data.val_fraction, cfg.train.seq_len, cfg.data.format)
        self._build(state)
        self.last_checkpoint = self.step if state is not None else None
        self.val_loss: float | None = None
        self.metrics: MetricsLog | None = None
        self.bar: tqdm | None = None
        self.tokens_per_s: list[float] = []
        self.result: TrainResult | None = None
        if ctx.main:
            self._open_outputs(config_format)

    def _saved_state(self, resume: bool, origin: ConfigOrigin) -> checkpoint.Checkpoint | None:
        """The checkpoint to resume from (checked against this config), or None for a fresh run; refuses to
        start over a finished or checkpointed run without ``resume``."""
        cfg, ckpt_file = self.cfg, self.out / checkpoint.CHECKPOINT_NAME
        killed_early = not ckpt_file.exists() and (self.out / "metrics.csv").exists()
        if resume and killed_early:
            raise ConfigError(f"{self.out} holds a run killed before its first checkpoint: there is nothing to "
                              "resume; run again without --resume to start it over")
        if resume:
            state = checkpoint.load(ckpt_file)
            checkpoint.check_compatible(state["config"], cfg, ckpt_file, origin)
            if state["step"] > cfg.train.steps:
                raise ConfigError(f"{ckpt_file} is at step {state['step']}, beyond train.steps = {cfg.train.steps}; "
                                  f"set train.steps to at least {state['step']}")
            return state
        if ckpt_file.exists():
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose another --out")
        if killed_early and self.ctx.main:  # its metrics.csv and config are rewritten below
            print(f"sparsemup: {self.out} holds a run killed before its first checkpoint; starting it over",
                  file=sys.stderr)
        return None

    def _build(self, state: checkpoint.Checkpoint | None) -> None:
        """Model (masks checked equal on every rank), dynamic sparsity, optimizer and LR schedule, restored from
        ``state`` when resuming."""
        cfg, ctx, o, t = self.cfg, self.ctx, self.cfg.optim, self.cfg.train
        model = build_model(cfg, ctx.device, backends=state.get("backends") if state is not None else None)
        self.dynamic = dynamic_sparsity(cfg, model)
        if state is not None:
            checkpoint.restore_model(model, state, self.out / checkpoint.CHECKPOINT_NAME)
        self.inner = model  # unwrapped: the parameterization and the masks live here
        self.mask_digests = distributed.gather_mask_digests(model, ctx)
        distributed.check_same_masks(self.mask_digests)
        self.model = distributed.wrap(model, ctx, cfg.dist.fsdp, fsdp_units(model))
        extra = {"betas": (o.beta1, o.beta2), "eps": o.eps} if o.name == "adamw" else {"momentum": o.momentum}
        self.optimizer = make_optimizer(model, OPTIMIZERS[o.name], o.lr, o.weight_decay,
                                        o.weight_decay_mode, **extra)
        if self.dynamic is not None:
            self.dynamic.attach(self.optimizer)
        self.schedule = Schedule(o.schedule, o.warmup_steps, t.steps, o.final_lr_fraction)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.step = 0
        torch.manual_seed(t.seed)
        if state is not None:
            checkpoint.restore_training_state(self.model, self.optimizer, self.scheduler, state, ctx)
            self.step = int(state["step"])
            # Loading the scheduler restores the saved Schedule's fields; train.steps may have been
            # extended, so put this run's schedule back and set the next step's LRs from it.
            self.schedule = Schedule(o.schedule, o.warmup_steps, t.steps, o.final_lr_fraction)
            self.scheduler.lr_lambdas = [self.schedule] * len(self.optimizer.param_groups)
            self._set_lrs()

    def _open_outputs(self, config_format: str) -> None:
        """Rank 0: the run directory, its config file, metrics.csv and the progress bar."""
        make_dirs(self.out)
        checkpoint.remove_stale_temps(self.out)
        text = to_yaml(self.cfg) if config_format == "yaml" else to_toml(self.cfg)
        write_text_atomic(self.out / f"config.{config_format}", text)
        t = self.cfg.train
        self.metrics = MetricsLog(self.out, self.step, t.tensorboard)
        self.bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                        disable=not t.progress, dynamic_ncols=True)

    def _set_lrs(self) -> None:
        """The LR of the next step in every group: its initial LR times the schedule (as the scheduler sets it)."""
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.schedule(self.step)

    def _local_rows(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg.train
        x, y = train_batch(self.corpus.train, t.batch_size, t.seq_len, t.seed, step)
        share = t.batch_size // self.ctx.world
        rows = slice(self.ctx.rank * share, (self.ctx.rank + 1) * share)
        return x[rows].to(self.ctx.device), y[rows].to(self.ctx.device)

    def _sync(self, last: bool) -> contextlib.AbstractContextManager[object]:
        """Reduce gradients only on the last micro-step."""
        if not self.ctx.distributed:
            return contextlib.nullcontext()
        wrapped: Any = self.model  # an FSDP2 module or a DistributedDataParallel
        if self.cfg.dist.fsdp:
            wrapped.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else wrapped.no_sync()

    def train_step(self) -> bool:
        """One optimizer step with logging, and validation/checkpoint when due; False when the run diverged."""
        t, ctx = self.cfg.train, self.ctx
        start = time.perf_counter()
        lr = self.cfg.optim.lr * self.schedule(self.step)
        dense = self.dynamic is not None and self.dynamic.wants_gradients(self.step + 1)
        train_loss, gradients = self._backward(dense)
        clip = self.cfg.optim.grad_clip
        grad_norm = clip_grad_norm(self.model.parameters(), clip if clip > 0 else math.inf)
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            self._finish_diverged(self.step + 1, train_loss, grad_norm)
            return False
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.dynamic is not None and self.dynamic.update(self.step, self.optimizer, gradients, self.scheduler):
            self._set_lrs()
            if ctx.distributed:  # decisions come from identical inputs; check that they were identical
                distributed.check_same_masks(distributed.gather_mask_digests(self.inner, ctx))
        elapsed = time.perf_counter() - start
        self.tokens_per_s.append(t.batch_size * t.seq_len / elapsed)
        row: MetricsRow = {"step": self.step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                           "tokens_per_s": round(self.tokens_per_s[-1], 1), "elapsed_s": round(elapsed, 4)}
        return self._finish_step(row)

    def _backward(self, dense: bool) -> tuple[float, dict[str, torch.Tensor] | None]:
        """Gradients of this step's batch over the accumulation micro-steps: the mean loss over all ranks and,
        when ``dense``, the dense gradients the dynamic sparsity asked for."""
        t, ctx = self.cfg.train, self.ctx
        x, y = self._local_rows(self.step)
        micro = len(x) // t.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=ctx.device)
        with dense_gradients(self.inner) if dense else contextlib.nullcontext():
            for i in range(t.grad_accum):
                rows = slice(i * micro, (i + 1) * micro)
                with self._sync(i == t.grad_accum - 1):
                    logits = logits_of(self.model(x[rows]))
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), y[rows].flatten()) / t.grad_accum
                    loss.backward()
                total += loss.detach()
        gradients = self.dynamic.take_gradients() if dense and self.dynamic is not None else None
        return float(distributed.all_mean(total, ctx)), gradients

    def _finish_step(self, row: MetricsRow) -> bool:
        """Validation and checkpoint when due, then the metrics row and the progress bar; False when the
        validation loss is not finite (the run diverged)."""
        t = self.cfg.train
        last = self.step == t.steps
        if last or (t.eval_every and self.step % t.eval_every == 0):
            row["val_loss"] = self.val_loss = self._validate()
            if not math.isfinite(self.val_loss):
                self._finish_diverged(self.step, self.val_loss, row["grad_norm"])
                return False
        if last or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
            checkpoint.save(self.out / checkpoint.CHECKPOINT_NAME, self.model, self.optimizer, self.scheduler,
                            self.step, self.cfg, self.ctx)
            self.last_checkpoint = self.step
        if self.metrics is not None:
            self.metrics.log(row)
        if self.bar is not None:
            postfix = {"loss": f"{row['train_loss']:.3f}"}
            if self.val_loss is not None:
                postfix["val"] = f"{self.val_loss:.3f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        return True

    def _validate(self) -> float:
        t = self.cfg.train
        return validation_loss(self.model, self.corpus.val, t.eval_batches * t.batch_size, t.seq_len,
                               t.batch_size // (self.ctx.world * t.grad_accum), self.ctx)

    def _kept_weights(self) -> dict[str, dict[str, float]]:
        """Per masked weight at the end: density, RMS and excess kurtosis of the kept entries, and RMS over the init
        std SµPar gives that layer at its final density, with the layer's own init factor (GPT-2's 1/√(2·depth) on
        residual projections): what dynamic masks may move away from. The ratio is stored as
        ``rms_over_layer_supar_std``; records before it hold ``rms_over_supar_std``, which left the factor out."""
        record = get_parameterization(self.inner)
        scales = record.options.init_scale or {}
        reference = {}
        for name, info in record.params.items():
            mask = get_mask(self.inner, name)
            if mask is not None:
                m, density = info.multipliers, float(mask.count_nonzero()) / mask.numel()
                pattern = match(scales, info.names)
                reference[name] = init_std(Role.HIDDEN, "supar", Multipliers(m.width, m.fan_out,
                                                                             density / info.base_density),
                                           self.cfg.model.init_std) * (scales[pattern] if pattern is not None else 1.0)
        stats = kept_weight_stats(self.inner, reference)
        return {name: {**{k: v for k, v in s.items() if k != "rms_over_supar_std"}, "layer_supar_std": reference[name],
                       "rms_over_layer_supar_std": s["rms_over_supar_std"]} for name, s in stats.items()}

    def _write_result(self, result: TrainResult) -> TrainResult:
        self.result = result
        if self.ctx.main:
            write_json_atomic(self.out / "result.json", result.to_json())
        return result

    def _finish_diverged(self, step: int, loss: float, grad_norm: float) -> None:
        self._write_result(Diverged(diverged_at_step=step, steps=self.step, loss_at_divergence=repr(loss),
                                    grad_norm_at_divergence=repr(grad_norm), last_checkpoint_step=self.last_checkpoint,
                                    world_size=self.ctx.world, device=self.ctx.device.type))

    def fit(self) -> TrainResult:
        """Train to ``train.steps`` (or divergence), write result.json and return it."""
        try:
            while self.step < self.cfg.train.steps:
                if not self.train_step():
                    assert self.result is not None  # _finish_diverged set it
                    return self.result
            if self.val_loss is None:  # resumed at the last step: nothing ran, validate the checkpoint
                self.val_loss = self._validate()
            return self._write_result(Completed(
                final_val_loss=self.val_loss, steps=self.step,
                final_val_bits_per_byte=bits_per_byte(self.val_loss, self.corpus),
                mean_tokens_per_s=(sum(self.tokens_per_s) / len(self.tokens_per_s)) if self.tokens_per_s else None,
                world_size=self.ctx.world, device=self.ctx.device.type, fsdp=self.cfg.dist.fsdp,
                mask_sha256=distributed.mask_digest(self.inner) if self.dynamic else self.mask_digests[0],
                kept_weights=self._kept_weights(),
                backends=dict(Counter(get_backends(self.model).values())),
            ))
        finally:
            self.close()

    def close(self) -> None:
        """Close the log files and the progress bar."""
        if self.metrics is not None:
            self.metrics.close()
        if self.bar is not None:
            self.bar.close()


def train(cfg: Config, out: Path, resume: bool = False, config_format: str = "toml",
          origin: ConfigOrigin | None = None) -> TrainResult:
    """Run (or resume) a training run in ``out`` on this process or the torchrun group; returns its result
    (result.json holds ``to_json()``).
    ``origin`` (the CLI's) names the config's sources in the error when a resume's config differs."""
    try:
        return Trainer(cfg, out, resume, config_format, origin).fit()
    finally:
        distributed.shutdown()
