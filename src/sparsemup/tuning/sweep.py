"""Sweeps: a base training config plus a grid and/or a random search, run resumably into one results store.

A run's id is a hash of its overrides, so rerunning a sweep skips what is stored, resumes what
has a checkpoint and never duplicates a result. The file format is documented in docs/SWEEPS.md.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from ..core.atomic import WriteError, make_dirs, write_json_atomic
from ..train import Config, ConfigError, load_config, train, validate
from ..train.checkpoint import CHECKPOINT_NAME
from ..train.config import tomllib, typed_value
from ..train.schema import flatten, run_identity, with_defaults
from .lock import SweepLocked, driver_lock
from .search import SAMPLERS, Search, Study, require_sampler
from .store import FAILURES_NAME, STORE_NAME, ConfigValue, ResultStore, RunRecord, append_line

__all__ = ["ENGINES", "Point", "SweepSpec", "SweepCounts", "SweepError", "load_sweep", "parse_sweep", "run_sweep",
           "run_id"]


class SweepError(ConfigError):
    """A bad sweep file or output directory; raised before any run starts, naming the key and the fix."""


@dataclass(frozen=True)
class Point:
    """One run of a sweep: its id and the config keys it sets on top of the base."""

    id: str
    overrides: dict[str, ConfigValue]
    trial: int | None = None  # its number in the sweep's search ([random]), recorded with its result


@dataclass
class SweepSpec:
    """A parsed sweep file: base config, the planned points and the sweep options.

    With an adaptive search (``search``: an Optuna sampler) the trials are proposed while the sweep
    runs: ``points`` is empty and each of ``grid_parts`` gets its own study.
    """

    base: Config
    points: list[Point]
    keep_checkpoints: bool = False
    source: str = "sweep"
    search: Search | None = None
    grid_parts: list[dict[str, ConfigValue]] = field(default_factory=lambda: [{}])


def run_id(overrides: Mapping[str, ConfigValue]) -> str:
    """Deterministic 12-hex-digit id of a run: sha256 of its overrides as sorted JSON."""
    return hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:12]


def _grid_axes(grid: dict[str, Any], source: str) -> list[tuple[list[str], list[tuple[ConfigValue, ...]]]]:
    axes = []
    for axis, values in flatten(grid).items():
        keys = [k.strip() for k in axis.split(",")]
        if not isinstance(values, list) or not values:
            raise SweepError(f"{source}: grid axis {axis!r} is empty or not a list; give a list of at least one "
                             "value, e.g. \"optim.lr\" = [\"2**-8\", \"2**-7\"]")
        rows = []
        for value in values:
            row = value if len(keys) > 1 else [value]
            if not isinstance(row, list) or len(row) != len(keys):
                raise SweepError(f"{source}: grid axis {axis!r} links {len(keys)} keys; each value must be a list "
                                 f"of {len(keys)}, got {value!r}")
            rows.append(tuple(typed_value(k, v, source) for k, v in zip(keys, row)))
        axes.append((keys, rows))
    return axes


def _random_table(table: dict[str, Any], source: str) -> tuple[list[dict[str, ConfigValue]], Search | None]:
    """The [random] section: (samples drawn once from the seed, None) for the random sampler, else ([], the search)."""
    unknown = set(table) - {"seed", "samples", "log_uniform", "sampler", "batch"}
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {sorted(unknown)} in [random]; it takes seed, samples, sampler, "
                         "batch and [random.log_uniform]")
    samples, seed = table.get("samples"), table.get("seed", 0)
    if not isinstance(samples, int) or samples < 1 or not isinstance(seed, int):
        raise SweepError(f"{source}: [random] needs samples = N (N ≥ 1) and an integer seed")
    sampler, batch = table.get("sampler", "random"), table.get("batch", 1)
    if sampler not in SAMPLERS:
        raise SweepError(f"{source}: [random] sampler = {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if not isinstance(batch, int) or batch < 1 or (batch != 1 and sampler == "random"):
        raise SweepError(f"{source}: [random] batch = {batch!r}: an integer ≥ 1, the trials an Optuna sampler "
                         "proposes together (set it to --workers); the random sampler takes none")
    ranges = flatten(table.get("log_uniform", {}))
    if not ranges:
        raise SweepError(f"{source}: [random.log_uniform] is empty; give ranges such as \"optim.lr\" = "
                         "[\"2**-10\", \"2**-4\"]")
    bounds = {}
    for key, pair in sorted(ranges.items()):
        if not isinstance(pair, list) or len(pair) != 2:
            raise SweepError(f"{source}: random range {key!r} must be [low, high], got {pair!r}")
        values = [typed_value(key, v, source) for v in pair]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise SweepError(f"{source}: random range {key!r} = {pair!r} is not numeric; [random.log_uniform] "
                             "samples number keys such as optim.lr: give choices like these in [grid]")
        low, high = (float(v) for v in values)
        if not 0 < low <= high:
            raise SweepError(f"{source}: random range {key!r} = [{low}, {high}]: need 0 < low ≤ high (log-uniform)")
        bounds[key] = (low, high)
    if sampler != "random":
        try:
            require_sampler(sampler)
        except ValueError as error:
            raise SweepError(f"{source}: {error}") from None
        return [], Search(sampler, seed, samples, batch, bounds)
    rng = random.Random(seed)
    logs = {k: (math.log(lo), math.log(hi)) for k, (lo, hi) in bounds.items()}
    return [{k: math.exp(rng.uniform(lo, hi)) for k, (lo, hi) in logs.items()} for _ in range(samples)], None


def parse_sweep(data: dict[str, Any], source: str = "sweep", root: Path = Path(".")) -> SweepSpec:
    """Build the plan from a parsed sweep file (``root``: its folder); every point's config is validated."""
    unknown = set(data) - {"sweep", "base", "grid", "random"}
    if unknown:
        raise SweepError(f"{source}: unknown table(s) {sorted(unknown)}; a sweep file has [sweep], [base.*], "
                         "[grid] and [random]")
    options = data.get("sweep", {})
    if set(options) - {"keep_checkpoints", "preset"}:
        raise SweepError(f"{source}: unknown key(s) {sorted(set(options) - {'keep_checkpoints', 'preset'})} in "
                         "[sweep]; it takes keep_checkpoints and preset")
    if not isinstance(options.get("keep_checkpoints", False), bool) or not isinstance(options.get("preset", ""), str):
        raise SweepError(f"{source}: [sweep] keep_checkpoints must be true or false and preset a file path string")
    if "grid" not in data and "random" not in data:
        raise SweepError(f"{source}: nothing to sweep; add a [grid] table (and/or [random])")
    tables = data.get("base", {})
    if "preset" in options:  # a tuned config file under the [base] tables, e.g. written by report --preset
        preset = Path(root, options["preset"])
        if not preset.is_file():
            raise SweepError(f"{source}: preset {str(preset)!r} does not exist; write it first with "
                             "`sparsemup report TUNING_DIR --preset FILE` (see docs/SWEEPS.md)")
        merged = load_config(preset).to_dict()
        for section, values in tables.items():
            merged.setdefault(section, {}).update(values if isinstance(values, dict) else {})
        tables = merged
    base = Config.from_dict(tables, f"{source} [base]")
    if "tensorboard" not in tables.get("train", {}):  # keep run folders small unless asked for
        base.train.tensorboard = False
    axes = _grid_axes(data.get("grid", {}), source)
    if "grid" in data and not axes:
        raise SweepError(f"{source}: [grid] is empty; give at least one axis, e.g. \"optim.lr\" = [\"2**-8\"]")
    samples, search = _random_table(data["random"], source) if "random" in data else ([{}], None)
    grid_parts = [{k: v for (keys, _), row in zip(axes, combo) for k, v in zip(keys, row)}
                  for combo in itertools.product(*(rows for _, rows in axes))]
    points, seen = [], set()
    for grid_part in grid_parts:
        for trial, sample in enumerate(samples):
            overrides = {**grid_part, **sample}
            point = Point(run_id(overrides), overrides, trial if "random" in data else None)
            if point.id not in seen:
                seen.add(point.id)
                points.append(point)
    if search is not None:  # trials are proposed as the search goes: check the ranges' corners now
        points = []
        for grid_part in grid_parts:
            for corner in (0, 1):
                validate(resolve(base, Point("", {**grid_part, **{k: b[corner] for k, b in search.bounds.items()}}),
                                 1))
    for point in points:
        validate(resolve(base, point, 1))
    return SweepSpec(base, points, bool(options.get("keep_checkpoints", False)), source, search, grid_parts)


def load_sweep(path: Path) -> SweepSpec:
    """Read and plan a TOML sweep file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist; check the path given to --config")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SweepError(f"{path}: invalid TOML: {err}") from None
    return parse_sweep(data, str(path), path.parent)


def resolve(base: Config, point: Point, workers: int) -> Config:
    """The full config of one run: base, the point's overrides, quiet output and its share of the cores."""
    cfg = Config.from_dict(base.to_dict())
    for key, value in point.overrides.items():
        section, _, name = key.partition(".")
        setattr(getattr(cfg, section), name, value)
    cfg.train.progress = False
    cfg.train.threads = max(1, (os.cpu_count() or 1) // workers)
    return cfg


def _identity(cfg: Config) -> dict[str, ConfigValue]:
    """The flat config without its incidental keys: a sweep's base in sweep.json, a run's config in its record."""
    return run_identity(flatten(cfg.to_dict()))


def _execute(config: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Train (or resume) one run in a worker; returns result.json plus wall seconds, or the error."""
    out = Path(run_dir)
    start = time.perf_counter()
    try:
        resume = (out / CHECKPOINT_NAME).is_file()
        if not resume and out.exists():  # killed before its first checkpoint: start over
            shutil.rmtree(out)
        result = train(Config.from_dict(config), out, resume=resume)
    except WriteError as err:  # the parent stops the sweep with this message: the next runs would fail the same way
        return {"error": str(err), "unwritable": [str(err.path), err.errno]}
    except Exception:  # noqa: BLE001 - reported by the parent, the run stays unrecorded and is retried
        return {"error": traceback.format_exc()}
    return {**result.to_json(), "seconds": round(time.perf_counter() - start, 2), "resumed": resume}


def _finished_result(run_dir: Path, steps: int) -> dict[str, Any] | None:
    """result.json of a run that finished but was not yet recorded (the sweep was killed in between)."""
    path = run_dir / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if result.get("status") == "diverged" or (result.get("status") == "completed" and result.get("steps") == steps):
        return {**result, "seconds": None, "resumed": False}
    return None


def _record(point: Point, cfg: Config, result: dict[str, Any], search: Search | None) -> RunRecord:
    optional: dict[str, object] = {}  # RunRecord's optional keys, before the config as stores have them
    if result.get("kept_weights"):
        optional["kept_weights"] = result["kept_weights"]
    if point.trial is not None:
        optional["trial"] = point.trial
    if search is not None:
        optional["search"] = search.identity()
    return cast(RunRecord, {"id": point.id, "overrides": point.overrides, "status": result["status"],
                            "final_val_loss": result.get("final_val_loss"), "steps": result.get("steps"),
                            "diverged_at_step": result.get("diverged_at_step"), "seconds": result.get("seconds"),
                            "device": result.get("device"), **optional, "config": _identity(cfg)})


def _describe(point: Point) -> str:
    return " ".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in point.overrides.items())


def _exit_with_parent(parent: int) -> None:
    """Pool-worker initializer: a thread that ends the worker once its parent, the driver, is gone (a killed
    driver must leave no process behind; an unfinished run resumes from its checkpoint on the rerun)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


ENGINES = ("local", "ray")


@dataclass
class SweepCounts:
    """What ``run_sweep`` did with the points it planned: already stored, completed, diverged or failed (failed
    runs are not stored; a rerun retries them)."""

    planned: int = 0
    stored: int = 0
    completed: int = 0
    diverged: int = 0
    failed: int = 0

    def add(self, status: str) -> None:
        """Count one recorded run by its status (completed or diverged)."""
        if status == "completed":
            self.completed += 1
        elif status == "diverged":
            self.diverged += 1
        else:
            raise ValueError(f"a recorded run's status is completed or diverged, not {status!r}")


def run_sweep(spec: SweepSpec, out: Path, workers: int = 1,
              log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
              engine: str = "local", address: str | None = None) -> SweepCounts:
    """Run every point not yet in ``out``'s store (``workers`` at once); returns counts by outcome.

    engine: ``local`` (a process pool on this machine) or ``ray`` (Ray tasks: ``address`` None or "local"
    starts a private instance, "auto" or HOST:PORT joins a cluster; ``sparsemup.tuning.ray_engine``).
    Both plan, skip, resume and record the same way. One driver per ``out``: a second is refused.
    """
    if workers < 1:
        raise SweepError(f"--workers {workers}: must be at least 1")
    if engine not in ENGINES:
        raise SweepError(f"--engine {engine!r}: choose local or ray")
    if engine == "ray":
        from .ray_engine import require_ray

        require_ray()
    elif address is not None:
        raise SweepError("--address applies to --engine ray only")
    out = Path(out)
    try:
        with driver_lock(out):
            return _run_locked(spec, out, workers, log, engine, address)
    except SweepLocked as error:
        raise SweepError(str(error)) from None


def _run_locked(spec: SweepSpec, out: Path, workers: int, log: Callable[[str], None], engine: str,
                address: str | None) -> SweepCounts:
    make_dirs(out)
    meta_path = out / "sweep.json"
    fingerprint = _identity(spec.base)
    if meta_path.exists():
        try:
            old = run_identity(with_defaults(json.loads(meta_path.read_text())["base"]))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise SweepError(f"{meta_path} is unreadable ({error}): it should name the sweep's base config. Delete "
                             "it to adopt the current config for the runs stored beside it (their records keep "
                             "their own configs), or use another --out") from None
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if changed:
            raise SweepError(f"{out} holds a sweep over another base config (differs in {', '.join(changed)}); "
                             "use another --out, or restore the base config")
    else:
        write_json_atomic(meta_path, {"base": fingerprint, "source": spec.source})
    store = ResultStore(out / STORE_NAME)
    if store.repaired:
        log(f"repaired {store.path}: dropped a torn last line (its run is recorded again)")
    threads = resolve(spec.base, Point("", {}), workers).train.threads
    where = f"with {workers} worker(s) × {threads} thread(s)" + (" on Ray" if engine == "ray" else "")
    with _Runner(spec, out, store, workers, log, engine, address) as runner:
        if spec.search is None:
            runner.run(spec.points, f"sweep {spec.source}: {len(spec.points)} runs planned, {{stored}} already "
                       f"stored, {{todo}} to run {where}; store: {store.path}")
        else:
            _search(spec, spec.search, runner, where)
    return runner.counts


class _Runner:
    """Runs points not yet stored on the chosen engine and records them: the one recording path of every sweep."""

    def __init__(self, spec: SweepSpec, out: Path, store: ResultStore, workers: int, log: Callable[[str], None],
                 engine: str, address: str | None) -> None:
        self.spec, self.out, self.store, self.workers, self.log = spec, out, store, workers, log
        self.engine, self.address = engine, address
        self.counts = SweepCounts()
        self.queued = self.done = 0  # runs handed to the engine so far / finished so far
        self.ahead = 0  # runs expected after this batch (an adaptive search's trials not yet asked)
        self.started = time.perf_counter()
        self._pool: ProcessPoolExecutor | None = None  # started on first need, kept across an adaptive search's batches
        self._ray = False

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        if self._ray:
            from .ray_engine import disconnect

            disconnect()

    def progress(self) -> str:
        """Done / total, failed so far, and the time left at the pace so far."""
        total = self.queued + self.ahead
        left = (total - self.done) * (time.perf_counter() - self.started) / self.done
        eta = f"ETA {left / 60:.0f} min" if left >= 90 else f"ETA {left:.0f} s"
        failed = f", {self.counts.failed} failed" if self.counts.failed else ""
        return f"[{self.done}/{total}{failed}, {eta}]" if self.done < total else f"[{self.done}/{total}{failed}]"

    def run(self, points: list[Point], header: str | None = None) -> None:
        """Skip stored points, record finished-but-unrecorded ones, run the rest (``header``: logged first)."""
        self.counts.planned += len(points)
        todo = []
        stored = 0
        for point in points:
            cfg = resolve(self.spec.base, point, self.workers)
            run_dir = self.out / "runs" / point.id
            if point.id in self.store:
                stored += 1
            elif (result := _finished_result(run_dir, cfg.train.steps)) is not None:
                _finish(self.store, point, cfg, result, run_dir, self.spec, self.counts)
            else:
                todo.append((point, cfg, run_dir))
        self.counts.stored += stored
        self.queued += len(todo)
        if header is not None:
            self.log(header.format(stored=stored, todo=len(todo)))
        if self.engine == "ray" and todo:
            from .ray_engine import connect, run_on_ray

            self._ray = self._ray or connect(self.address)
            run_on_ray([((point, cfg, run_dir), cfg.to_dict(), str(run_dir)) for point, cfg, run_dir in todo],
                       self.workers, _execute, lambda job, result: self.finished(*job, result))
        elif self.workers == 1:
            for point, cfg, run_dir in todo:
                self.finished(point, cfg, run_dir, _execute(cfg.to_dict(), str(run_dir)))
        elif todo:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_exit_with_parent, initargs=(os.getpid(),))
            futures = {self._pool.submit(_execute, cfg.to_dict(), str(run_dir)): (point, cfg, run_dir)
                       for point, cfg, run_dir in todo}
            for future in as_completed(futures):
                self.finished(*futures[future], future.result())

    def finished(self, point: Point, cfg: Config, run_dir: Path, result: dict[str, Any]) -> None:
        """Record one run's outcome (a failure goes to failures.jsonl, never to the store) and log it."""
        self.done += 1
        if "error" in result:
            self.counts.failed += 1
            append_line(self.out / FAILURES_NAME, {"id": point.id, "overrides": point.overrides,
                                                   "error": result["error"],
                                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            self.log(f"{self.progress()} {point.id} {_describe(point)}: FAILED (in {FAILURES_NAME}, not in "
                     f"{STORE_NAME}; retried on rerun)\n" + result["error"])
            if "unwritable" in result:
                path, code = result["unwritable"]
                raise WriteError(Path(path), OSError(code, os.strerror(code)))
            return
        _finish(self.store, point, cfg, result, run_dir, self.spec, self.counts)
        outcome = (f"val loss {result['final_val_loss']:.4f}" if result["status"] == "completed"
                   else f"diverged at step {result.get('diverged_at_step')}")
        self.log(f"{self.progress()} {point.id} {_describe(point)}: {outcome} ({result['seconds']:.0f} s"
                 + (", resumed" if result.get("resumed") else "") + ")")


def _search(spec: SweepSpec, search: Search, runner: _Runner, where: str) -> None:
    """An adaptive search, one study per grid point: ask a batch, run it, tell its results in trial order.

    A rerun asks again from the start; trials already stored are told from the store without running.
    """
    keys = set(search.bounds)
    stored: dict[tuple[str, int], str] = {}  # (grid part, trial) -> id, for the trials of this search
    for record in runner.store.records.values():
        if record.get("search") == search.identity() and isinstance(record.get("trial"), int):
            part = {k: v for k, v in record["overrides"].items() if k not in keys}
            stored[json.dumps(part, sort_keys=True), record["trial"]] = record["id"]
    total = search.samples * len(spec.grid_parts)
    runner.log(f"sweep {spec.source}: {search.sampler} search, {search.samples} trials × {len(spec.grid_parts)} grid "
               f"point(s) in batches of {search.batch}, {len(stored)} already stored; {where}; store: "
               f"{runner.store.path}" + (f" (batch {search.batch} < {runner.workers} workers: set [random] batch = "
                                         f"{runner.workers} to use them all)" if search.batch < runner.workers else ""))
    asked = 0
    for grid_part in spec.grid_parts:
        part_key = json.dumps(grid_part, sort_keys=True)
        study = Study(search)
        for first in range(0, search.samples, search.batch):
            batch = []
            for _ in range(min(search.batch, search.samples - first)):
                trial, values = study.ask()
                overrides = {**grid_part, **values}
                point = Point(run_id(overrides), overrides, trial)
                known = stored.get((part_key, trial))
                if known is not None and known != point.id:
                    raise SweepError(f"{runner.out}: trial {trial} of this {search.sampler} search (seed {search.seed})"
                                     f" is stored as run {known}, but the sampler now proposes {point.id}: the store "
                                     "holds another search (other ranges or grid, or another Optuna version); use "
                                     "another --out")
                validate(resolve(spec.base, point, 1))
                batch.append(point)
            asked += len(batch)
            runner.ahead = total - asked
            runner.run(batch)
            for point in batch:
                done = runner.store.records.get(point.id)
                if done is None:  # the run failed: the search cannot go on without its result
                    runner.log(f"{search.sampler} search stopped at trial {point.trial}: its run failed; a rerun "
                               "retries it and continues")
                    return
                assert point.trial is not None
                study.tell(point.trial, done["final_val_loss"] if done["status"] == "completed" else None)


def _finish(store: ResultStore, point: Point, cfg: Config, result: dict[str, Any], run_dir: Path,
            spec: SweepSpec, counts: SweepCounts) -> None:
    """Append the run's record, then drop its checkpoint (the record and metrics.csv are what a sweep keeps)."""
    store.append(_record(point, cfg, result, spec.search))
    counts.add(result["status"])
    if not spec.keep_checkpoints:
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
