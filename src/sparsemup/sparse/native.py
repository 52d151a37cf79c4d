"""Loader of the native sparse CPU kernels (``csrc/kernels.cpp``: rows and blocks), built with the machine's compiler
on first use.

The build lands in ``$SPARSEMUP_CACHE`` or ``~/.cache/sparsemup/ext/<key>``; the key hashes the sources and build
flags, the torch version, the CPU's flags and the compiler, so a cache is never reused on a machine it was not built
for. Where it cannot be built (no compiler, no ninja, a compile error) or ``SPARSEMUP_NATIVE=0`` is set, ``load``
warns once and returns None, and the layers fall back to plain torch. ``SPARSEMUP_NATIVE_FORCE_FAIL=1`` makes
the build fail on purpose (for tests of that fallback).

Faults of the cache are survived, not crashed on: each built library has its size and SHA-256 recorded beside it
(``<lib>.so.sha256``) and is checked before it is loaded, since loading a truncated library takes the process down;
a damaged one is rebuilt after one warning. Builds take ``sparsemup.lock`` (holder's pid and host, touched while the
build runs), so a waiting process notices a killed holder while it waits and gives up after ``MAX_WAIT_S``, naming
the lock; the holder clears what a killed build left: torch's own ``lock`` and compilers still running in the cache.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import TypedDict

import torch

from ..core.atomic import write_text_atomic
from .machine import cpu_flags

__all__ = ["load", "kernels_for", "status", "reset"]

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "kernels.cpp"  # includes the headers beside it
_SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "fma")
# -fopenmp: ATen's parallel_for is inline OpenMP code in torch's CPU builds, so without it the kernels run on one
# thread; libgomp.so.1 then resolves to the copy torch has loaded, and torch.set_num_threads applies.
CFLAGS = ("-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-unused-function", "-fopenmp")
LDFLAGS = ("-fopenmp",)
STALE_LOCK_S = 60.0  # a build lock untouched this long was left by a killed build (a live one is touched)
HEARTBEAT_S = 5.0  # how often a build touches its lock
MAX_WAIT_S = 900.0  # the longest wait for another process's build before falling back to plain torch
POLL_S = 0.5
LOCK_NAME = "sparsemup.lock"
BUILD_TOOLS = frozenset({"ninja", "c++", "g++", "gcc", "cc", "clang", "clang++", "cc1plus", "as", "ld", "collect2"})

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


def _stale(lock: Path) -> str | None:
    """Why the build lock ``lock`` was left by a killed build (its holder is gone, or it went untouched for
    ``STALE_LOCK_S``), or None while its build may be alive."""
    try:
        age = time.time() - lock.stat().st_mtime
        holder = lock.read_text().split()
    except FileNotFoundError:
        return None
    if len(holder) == 2 and holder[1] == socket.gethostname() and holder[0].isdigit():
        try:
            os.kill(int(holder[0]), 0)
        except ProcessLookupError:
            return f"its process {holder[0]} is gone"
        except PermissionError:
            pass  # alive, another user's
    return f"untouched for {age:.0f} s" if age > STALE_LOCK_S else None


def _acquire(lock: Path) -> None:
    """Take the build lock, waiting for a live build elsewhere and removing a stale lock (with a warning), whenever
    it turns stale during the wait; after ``MAX_WAIT_S`` raise, naming the lock and the fix."""
    deadline = time.monotonic() + MAX_WAIT_S
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            reason = _stale(lock)
            if reason is not None:
                lock.unlink(missing_ok=True)
                warnings.warn(f"sparsemup: removed {lock}, left by a native build that did not finish ({reason})",
                              RuntimeWarning, stacklevel=4)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {MAX_WAIT_S:.0f} s for the native build lock {lock}; if no sparsemup "
                                   "build is running, remove that file") from None
            time.sleep(POLL_S)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return


def _heartbeat(lock: Path, done: threading.Event) -> None:
    """Touch ``lock`` every ``HEARTBEAT_S`` until ``done``: the sign that its build is alive."""
    while not done.wait(HEARTBEAT_S):
        try:
            os.utime(lock)
        except FileNotFoundError:
            return


def _end_leftover_builds(cache: Path) -> None:
    """Terminate build tools still working in ``cache`` (ninja and compilers of a killed build, orphaned: a live
    build elsewhere would hold the lock we hold). Linux only; elsewhere they simply finish on their own."""
    proc = Path("/proc")
    for entry in proc.glob("[0-9]*") if proc.is_dir() else ():
        try:
            if ((entry / "comm").read_text().strip() in BUILD_TOOLS
                    and Path(os.readlink(entry / "cwd")) == cache.resolve()):
                os.kill(int(entry.name), signal.SIGTERM)
                warnings.warn(f"sparsemup: ended process {entry.name}, left running in {cache} by a native build "
                              "that did not finish", RuntimeWarning, stacklevel=4)
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read


def _digest(path: Path) -> str:
    """``<size> <sha256>`` of a file: the record a built library is checked against before it is loaded."""
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _check_libraries(cache: Path, name: str) -> None:
    """Remove every built library of ``name`` that does not match its record, so that ninja relinks it; one
    without a record (built by an older sparsemup, or killed before the record) is relinked silently."""
    for lib in cache.glob(f"{name}*.so"):
        record = lib.with_name(lib.name + ".sha256")
        expected = record.read_text().strip() if record.exists() else None
        if expected is not None and _digest(lib) != expected:
            warnings.warn(f"sparsemup: the native build {lib} is damaged (its size or checksum differs from "
                          f"{record.name}); rebuilding it", RuntimeWarning, stacklevel=4)
        elif expected is not None:
            continue
        lib.unlink()
        record.unlink(missing_ok=True)


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
    if shutil.which("ninja") is None:
        _put_pip_ninja_on_path()
        cpp_extension.verify_ninja_availability()  # raises with torch's own message where none is found
    lock = cache / LOCK_NAME
    _acquire(lock)
    done = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, done), daemon=True)
    beat.start()
    try:
        # Holding our lock, torch's lock and any process working here are what a killed build left behind.
        if (cache / "lock").exists():
            (cache / "lock").unlink()
            warnings.warn(f"sparsemup: removed {cache / 'lock'}, left by a native build that did not finish",
                          RuntimeWarning, stacklevel=3)
        _end_leftover_builds(cache)
        _check_libraries(cache, name)
        built_before = any(cache.glob(f"{name}*.so"))
        module = cpp_extension.load(
            name=name, sources=[str(SOURCE)], build_directory=str(cache), verbose=False,
            extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
        )
        for lib in cache.glob(f"{name}*.so"):
            record = lib.with_name(lib.name + ".sha256")
            if not record.exists():
                write_text_atomic(record, _digest(lib) + "\n")
    finally:
        done.set()
        beat.join()
        lock.unlink(missing_ok=True)
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


class Status(TypedDict):
    """What ``status`` reports about the native kernels."""

    active: bool
    reason: str  # why they are (or are not) active
    isa: str | None  # the code path the build chose (None when inactive)
    cache: str | None  # the build's cache folder
    build_key: str  # "plain-torch" when inactive
    compiler: str
    cpu_flags_simd: list[str]


def status() -> Status:
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
