"""The one-driver lock of a sweep directory: a second sweep on the same --out is refused, not interleaved.

An exclusive ``flock`` on ``DIR/.sweep.lock`` held for the whole sweep. The kernel drops it when its
process dies, however it dies, so a killed driver never blocks the rerun that resumes its sweep. The
file names the holder's pid and host for the error message. (``flock`` is local to one machine on
some network filesystems: one driver per directory is then the user's to keep.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from ..core.atomic import make_dirs, writing

__all__ = ["LOCK_NAME", "SweepLocked", "driver_lock"]

LOCK_NAME = ".sweep.lock"


class SweepLocked(ValueError):
    """Another sweep driver holds the directory."""


@contextlib.contextmanager
def driver_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s driver lock for the block; SweepLocked naming the holder if another process has it."""
    path = Path(out) / LOCK_NAME
    make_dirs(path.parent)
    with writing(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise SweepLocked(f"{out} is being swept by {holder}; wait for that sweep to finish or stop it, "
                              "then rerun (it resumes), or choose another --out") from None
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
