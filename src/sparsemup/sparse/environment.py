"""What decides speed on this machine, for ``sparsemup doctor``: torch, threads, CPU, native kernels, calibration.

Every fact is read, not assumed: the CPU's model and SIMD flags from the OS, whether the native sparse kernels
(rows and blocks) are active (and why not: no compiler, a failed build, ``SPARSEMUP_NATIVE=0``), where their build
and the ``auto`` calibration are cached, and which optional extras are installed (found, not imported).
"""

from __future__ import annotations

import importlib.util
import json
from typing import TypedDict

import torch

from . import native
from .calibration import cache_dir, machine_key
from .machine import cpu_facts

__all__ = ["Report", "report", "render"]

EXTRAS = {"transformers": "hf", "ray": "ray", "optuna": "tune"}


class CpuSummary(TypedDict):
    model: str
    cores: int | None
    simd: list[str]  # the SIMD flags among the CPU's


class CalibrationFile(TypedDict):
    file: str
    cases: int  # layer cases timed in it


class Report(TypedDict):
    """The facts of ``sparsemup doctor`` (``--json`` prints them as they are)."""

    torch: str
    threads: int
    cuda: bool
    cpu: CpuSummary
    native: native.Status
    calibration: CalibrationFile
    extras: dict[str, bool]  # optional extra -> installed


def _calibration() -> CalibrationFile:
    path = cache_dir() / f"{machine_key()}.json"
    try:
        cases = len(json.loads(path.read_text()))
    except (OSError, ValueError):
        cases = 0
    return {"file": str(path), "cases": cases}


def report() -> Report:
    """The facts as a JSON-ready dict (building the native kernels first if this process has not yet)."""
    cpu = cpu_facts()
    simd = sorted(f for f in cpu["flags"] if f.startswith(("avx", "amx", "fma")))
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cpu": {"model": cpu["model"], "cores": cpu["cores"], "simd": simd},
        "native": native.status(),
        "calibration": _calibration(),
        "extras": {name: importlib.util.find_spec(module) is not None for module, name in EXTRAS.items()},
    }


def render(facts: Report) -> str:
    """The report as lines a person reads, with the fix where a fast path is off."""
    status = facts["native"]
    if status["active"]:
        native_line = f"active ({status['reason']}), {status['isa']} code path; build cache {status['cache']}"
    else:
        native_line = (f"OFF: {status['reason']}. The rows and blocks backends run on plain torch (correct, slower). "
                       "Fix: install a C++ compiler and ninja (pip install ninja), unset SPARSEMUP_NATIVE")
    extras = ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in facts["extras"].items())
    return "\n".join([
        f"torch        {facts['torch']}, {facts['threads']} thread(s), CUDA {'yes' if facts['cuda'] else 'no'}",
        f"cpu          {facts['cpu']['model']}, {facts['cpu']['cores']} core(s)",
        f"simd         {' '.join(facts['cpu']['simd']) or 'none found'}",
        f"compiler     {status['compiler']}",
        f"native       {native_line}",
        f"auto         calibration {facts['calibration']['file']} ({facts['calibration']['cases']} layer case(s) "
        "timed on this machine)",
        f"extras       {extras}  (pip install 'sparsemup[hf,ray,tune]')",
    ])
