"""Loader of the native sparse CPU kernels (``csrc/kernels.cpp``: rows and blocks), built with the machine's compiler
on first use.

The build lands in ``$SPARSEMUP_CACHE`` or ``~/.cache/sparsemup/ext/<key>``; the key hashes the sources and build
flags, the torch version, the CPU's flags and the compiler, so a cache is never reused on a machine it was not built
for. Where it cannot be built (no compiler, no ninja, a compile error) or ``SPARSEMUP_NATIVE=0`` is set, ``load``
warns once and returns None, and the layers fall back to plain torch. ``SPARSEMUP_NATIVE_FORCE_FAIL=1`` makes
the build fail on purpose (for tests of that fallback).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .machine import cpu_flags

__all__ = ["load", "kernels_for", "status", "reset"]

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "kernels.cpp"  # includes the headers beside it
_SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "fma")
# -fopenmp: ATen's parallel_for is inline OpenMP code in torch's CPU builds, so without it the kernels run on one
# thread; libgomp.so.1 then resolves to the copy torch has loaded, and torch.set_num_threads applies.
CFLAGS = ("-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-unused-function", "-fopenmp")
LDFLAGS = ("-fopenmp",)
STALE_LOCK_S = 900.0  # a build lock older than this was left by a killed build

_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_reason = "not loaded yet"
_cache: Path | None = None


def compiler() -> str:
    """``$CXX`` (or ``c++``) and the first line of its ``--version``: part of the cache key."""
    cxx = os.environ.get("CXX", "c++")
    try:
        first = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return f"{cxx} (not found)"
    return f"{cxx}: {first[0] if first else '?'}"


def _key() -> str:
    h = hashlib.sha256()
    sources = [f.read_bytes() for f in sorted(CSRC.iterdir()) if f.suffix in (".cpp", ".h")]
    for part in (*sources, " ".join(CFLAGS + LDFLAGS).encode(), torch.__version__.encode(),
                 platform.machine().encode(), " ".join(cpu_flags()).encode(),
                 compiler().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cache_dir(key: str) -> Path:
    root = os.environ.get("SPARSEMUP_CACHE")
    if root:
        return Path(root) / key
    return Path.home() / ".cache" / "sparsemup" / "ext" / key


def _put_pip_ninja_on_path() -> None:
    """The ``ninja`` wheel's binary on PATH: an environment used without activating it lacks its bin/ there."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([str(ninja.BIN_DIR), os.environ.get("PATH", "")])


def _clear_stale_lock(lock: Path) -> None:
    """Remove the build lock of a build that was killed: torch's loader would wait for it forever. A live build
    takes about a minute; a lock untouched for ``STALE_LOCK_S`` is taken as left behind."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
            warnings.warn(f"sparsemup: removed {lock}, left by a native build that did not finish", RuntimeWarning,
                          stacklevel=3)
    except FileNotFoundError:
        pass


def _build() -> tuple[ModuleType, str]:
    if os.environ.get("SPARSEMUP_NATIVE_FORCE_FAIL") == "1":
        raise RuntimeError("build failure forced by SPARSEMUP_NATIVE_FORCE_FAIL=1")
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler: {cxx} is not on PATH (install g++ or clang, or set $CXX)")

    global _cache
    key = _key()
    cache = _cache_dir(key)
    _cache = cache
    cache.mkdir(parents=True, exist_ok=True)
    name = f"sparsemup_kernels_{key}"
    built_before = any(cache.glob(f"{name}*.so"))
    _clear_stale_lock(cache / "lock")
    if shutil.which("ninja") is None:
        _put_pip_ninja_on_path()
        cpp_extension.verify_ninja_availability()  # raises with torch's own message where none is found
    module = cpp_extension.load(
        name=name, sources=[str(SOURCE)], build_directory=str(cache), verbose=False,
        extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
    )
    return module, ("cached" if built_before else "built")


def load() -> ModuleType | None:
    """The compiled kernel module, built or loaded once per process; None (after one warning) where unavailable."""
    global _module, _tried, _reason
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        if os.environ.get("SPARSEMUP_NATIVE", "1") == "0":
            _reason = "disabled by SPARSEMUP_NATIVE=0"
        else:
            try:
                _module, _reason = _build()
            except Exception as exc:  # noqa: BLE001 - any build problem means: fall back to plain torch
                _module = None
                _reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        _tried = True
        if _module is None:
            warnings.warn(f"sparsemup: native sparse kernels unavailable ({_reason}); using the plain-torch path",
                          RuntimeWarning, stacklevel=2)
        return _module


def kernels_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The compiled module where it applies to these operands (all on the CPU, the first fp32 or bf16; the kernels
    check the rest and name what is wrong) and could be built, else None: the caller's plain-torch path."""
    if not all(t.device.type == "cpu" for t in tensors) or tensors[0].dtype not in (torch.float32, torch.bfloat16):
        return None
    return load()


def reset() -> None:
    """Forget the loaded module and the last outcome, so the next ``load`` tries again (for tests)."""
    global _module, _tried, _reason, _cache
    with _lock:
        _module, _tried, _reason, _cache = None, False, "not loaded yet", None


def status() -> dict[str, Any]:
    """Whether the native kernels are active and why (or why not), their ISA variant, cache path and compiler."""
    module = load()
    flags = set(cpu_flags())
    return {
        "active": module is not None,
        "reason": _reason,
        "isa": module.isa() if module is not None else None,
        "cache": str(_cache) if _cache is not None else None,
        "build_key": _cache.name if module is not None and _cache is not None else "plain-torch",
        "compiler": compiler(),
        "cpu_flags_simd": [f for f in _SIMD_FLAGS if f in flags],
    }
