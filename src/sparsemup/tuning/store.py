"""The results store of a sweep: one JSON line per finished run, appended with fsync, read tolerantly.

Only the sweep's parent process writes, so appends never interleave. A kill can leave a torn last
line; reading drops it and truncates the file back to the last complete line, so nothing finished
is lost (a torn line's run is simply run again) and nothing is duplicated (the first line of an id wins).
Every complete line is checked by ``record_problem`` (the one validator of records, for sweep and report alike): an
invalid one stops the reader naming its line, rather than being counted as stored or left out of a report.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TypedDict, cast

from ..core.atomic import append_atomic, writing

__all__ = ["ResultStore", "StoreError", "STORE_NAME", "FAILURES_NAME", "append_line", "record_problem", "STATUSES",
           "ConfigValue", "SearchIdentity", "RunRecord", "FailureRecord"]

STORE_NAME = "results.jsonl"
FAILURES_NAME = "failures.jsonl"  # runs that raised: one line per failed attempt, never read back as results
STATUSES = ("completed", "diverged")
_TORN = object()  # a line that is not JSON

ConfigValue = bool | int | float | str  # a config key's value, as a sweep sets and records it


class SearchIdentity(TypedDict):
    """The adaptive search a run belongs to (``search.Search.identity``)."""

    sampler: str
    seed: int


class _RunRecordBase(TypedDict):
    id: str
    overrides: dict[str, ConfigValue]
    status: str  # one of STATUSES
    final_val_loss: float | None
    steps: int | None
    diverged_at_step: int | None
    seconds: float | None
    config: dict[str, ConfigValue]  # the flat config without its layout keys (``train.schema.run_identity``)


class RunRecord(_RunRecordBase, total=False):
    """One line of a results store: a finished run. ``device`` is absent from stores of older versions;
    ``kept_weights`` (per hidden weight: density, RMS, ...) only from runs that measured them; ``trial`` and
    ``search`` only from an adaptive search."""

    device: str | None
    kept_weights: dict[str, dict[str, float]]
    trial: int
    search: SearchIdentity


class FailureRecord(TypedDict):
    """One line of failures.jsonl: a run that raised (never read back as a result)."""

    id: str
    overrides: dict[str, ConfigValue]
    error: str
    time: str


def record_problem(record: object) -> str | None:
    """What makes ``record`` no run record (required keys and their types), or None when it is one."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for key, kind in (("id", str), ("overrides", dict), ("config", dict)):
        if not isinstance(record.get(key), kind):
            return (f"key {key!r} is missing" if key not in record
                    else f"{key!r} is {type(record[key]).__name__}, not {kind.__name__}")
    if record.get("status") not in STATUSES:
        return f"'status' is {record.get('status')!r}, not one of {', '.join(STATUSES)}"
    loss = record.get("final_val_loss")
    numeric = isinstance(loss, (int, float)) and not isinstance(loss, bool)
    if not numeric and (record["status"] == "completed" or loss is not None):
        return f"'final_val_loss' is {loss!r}, not a number"
    return None


def append_line(path: Path, record: RunRecord | FailureRecord) -> None:
    """Append ``record`` as one JSON line with a single write, flushed and fsynced."""
    append_atomic(path, (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode())


class StoreError(ValueError):
    """A results store that cannot be read safely; the message names the file, the line and the fix."""


class ResultStore:
    """Append-only JSONL of run records keyed by ``record["id"]``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.records: dict[str, RunRecord] = {}
        self.repaired = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        pos = keep = 0  # keep: byte offset just past the last complete record line
        for number, line in enumerate(data.split(b"\n"), 1):
            nxt = pos + len(line) + 1
            complete = nxt <= len(data)  # a line without its newline is a torn append
            if line.strip():
                record: object = _TORN
                with contextlib.suppress(ValueError):
                    record = json.loads(line) if complete else _TORN
                if record is _TORN and nxt >= len(data):  # the last line, torn by a kill: dropped, its run redone
                    break
                problem = "not JSON" if record is _TORN else record_problem(record)
                if problem is not None or not isinstance(record, dict):
                    raise StoreError(f"{self.path}, line {number}: not a run record ({problem}: {line[:60]!r}); "
                                     "the file was edited or corrupted: fix or delete that line")
                self.records.setdefault(record["id"], cast(RunRecord, record))  # checked by record_problem
            pos = keep = min(nxt, len(data))
        if keep < len(data):
            with writing(self.path), self.path.open("r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            self.repaired = True

    def __contains__(self, run_id: str) -> bool:
        return run_id in self.records

    def __len__(self) -> int:
        return len(self.records)

    def append(self, record: RunRecord) -> None:
        """Write one record as a line and fsync it; a record whose id is already stored is ignored."""
        problem = record_problem(record)
        if problem is not None:
            raise ValueError(f"not a run record ({problem}), not stored in {self.path}")
        if record["id"] in self.records:
            return
        append_line(self.path, record)
        self.records[record["id"]] = record
