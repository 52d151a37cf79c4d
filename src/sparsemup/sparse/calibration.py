"""The automatic backend choice, calibrated on the machine it runs on: time each candidate, once, keep the fastest.

Which backend wins depends on the CPU (AVX-512 or AVX2, bf16 units or none, cores), so a threshold
recorded on one machine is wrong on another. ``sparsify(model, "auto")`` therefore times, for every
distinct masked layer of the model (shape, density, dtype, mask), forward + backward of masked dense
and of each sparse backend its mask allows, and keeps a sparse backend only where it beats masked
dense by ``MARGIN`` (so timing noise cannot flip a choice). Timings are cached on disk per machine
(CPU model and flags, cores, threads, torch version, native-kernel build), so the next process on
the same machine decides in no time. In a distributed job rank 0 decides and broadcasts, so every
process runs the same backends; the checkpoint records them, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import write_text_atomic
from ..core.vocab import Backend
from .machine import cpu_facts

__all__ = ["LayerCase", "MARGIN", "TOKENS", "decide", "machine_key", "calibrated", "cache_dir"]

MARGIN = 1.1  # a sparse backend must be ≥ 10 % faster than masked dense to be chosen
TOKENS = 2048  # tokens per timed step: enough for the GEMMs to reach their speed, seconds for a whole model
Timings = Mapping[str, float | None]  # backend -> fwd + bwd ms (None: it could not run)


@dataclass(frozen=True)
class LayerCase:
    """One distinct masked layer to time: logical shape (out, in), density, dtype name, and the sparse backends
    its mask allows (``block``: b of a blocks mask, else 0)."""

    shape: tuple[int, int]
    density: float
    dtype: str
    candidates: tuple[Backend, ...]
    block: int = 0

    def key(self) -> str:
        """The case's name in the cache."""
        return (f"{self.shape[0]}x{self.shape[1]}/rho={self.density:.6g}/{self.dtype}/"
                f"{'+'.join(self.candidates)}/b={self.block}")


def decide(timings: Timings) -> Backend:
    """The rule: the fastest sparse backend if it beats masked dense by ``MARGIN``, else masked dense."""
    dense = timings.get("masked_dense")
    sparse = {b: t for b, t in timings.items() if b != "masked_dense" and t is not None}
    if not sparse:
        return "masked_dense"
    best = min(sorted(sparse), key=lambda b: sparse[b])  # sorted: ties break the same way everywhere
    if dense is None or sparse[best] * MARGIN <= dense:
        return best  # type: ignore[return-value]  # keys of timings are backend names
    return "masked_dense"


def machine_key() -> str:
    """A digest of what decides the timings: CPU model and SIMD flags, cores, torch threads and version, and the
    native kernels' build (or their absence)."""
    from .native import status

    cpu = cpu_facts()
    native = status()
    facts = {"cpu": cpu["model"], "flags": sorted(f for f in cpu["flags"] if f.startswith(("avx", "amx", "fma"))),
             "cores": cpu["cores"], "threads": torch.get_num_threads(), "torch": torch.__version__,
             "native": native.get("build_key") if native.get("active") else None}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where calibrations are kept: ``$SPARSEMUP_CACHE/calibration`` or ``~/.cache/sparsemup/calibration``."""
    root = os.environ.get("SPARSEMUP_CACHE")
    return Path(root) / "calibration" if root else Path.home() / ".cache" / "sparsemup" / "calibration"


def _read(path: Path) -> dict[str, dict[str, float | None]]:
    """The cache file's {case key: {backend: ms}}, or {} when it is absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # absent or torn by a kill: measured again
    return data if isinstance(data, dict) else {}


def calibrated(cases: Sequence[LayerCase], measure: Callable[[LayerCase, Backend], float | None],
               directory: Path | None = None) -> dict[LayerCase, Backend]:
    """{case: backend} by ``decide`` on timings from the cache, measuring (``measure(case, backend)`` → ms) and
    caching the cases it lacks. A cache that cannot be written only costs the next process a re-measurement."""
    path = (directory or cache_dir()) / f"{machine_key()}.json"
    cache = _read(path)
    missing = [case for case in cases if case.key() not in cache]
    for case in missing:
        cache[case.key()] = {backend: measure(case, backend) for backend in ("masked_dense", *case.candidates)}
    if missing:
        try:
            write_text_atomic(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only home: the decision stands, the next process measures again
    return {case: decide(cache[case.key()]) for case in cases}


def broadcast_choice(choice: dict[str, Backend]) -> dict[str, Backend]:
    """Rank 0's choice on every process of an initialized process group (the argument elsewhere)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choice
    box: list[Any] = [choice if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return dict(box[0])
