"""What CPU this is: model name, cores and feature flags, recorded beside every benchmark and in every cache key.

Machines differ between sessions and users (AVX-512 or AVX2, bf16 units or none, cores), so a timing or a
compiled kernel means little without them.
"""

from __future__ import annotations

import os
import platform
from typing import TypedDict

__all__ = ["CpuFacts", "cpu_flags", "cpu_facts"]


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def cpu_flags() -> list[str]:
    """The CPU's feature flags, sorted: the ``flags`` (x86) or ``Features`` (Arm) line of /proc/cpuinfo; none
    found elsewhere."""
    for line in _cpuinfo_lines():
        if line.startswith(("flags", "Features")):
            return sorted(set(line.split(":", 1)[1].split()))
    return []


class CpuFacts(TypedDict):
    """What ``cpu_facts`` reads about the CPU."""

    model: str
    cores: int | None  # os.cpu_count(): None when it cannot tell
    flags: list[str]


def cpu_facts() -> CpuFacts:
    """The CPU's model name, core count and flags (from /proc/cpuinfo on Linux)."""
    model = platform.processor() or platform.machine()
    for line in _cpuinfo_lines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
            break
    return {"model": model, "cores": os.cpu_count(), "flags": cpu_flags()}
