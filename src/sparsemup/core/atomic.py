"""Atomic file writes: a crash or kill at any moment leaves the old file or the new one, never half of one.

Every write of the trainer, sweeps and reports goes through here, so an unwritable or full disk always surfaces as
one ``WriteError`` naming the path, the OS error and the fix (the CLI prints it without a traceback), never as a
library's own error with the cause buried in its chain (torch.save says "unexpected pos" on a full disk).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["write_atomic", "write_json_atomic", "write_text_atomic", "current_umask", "WriteError", "writing",
           "make_dirs", "append_atomic"]

_FIXES = {
    errno.ENOSPC: "the disk is full: free space on it or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.EACCES: "no permission to write there: fix the permissions or write elsewhere",
    errno.EPERM: "the file or directory may not be changed (immutable or protected): write elsewhere",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.ENOTDIR: "a parent of that path is a file, not a directory: write elsewhere",
    errno.ENOENT: "it cannot be made there (a parent is missing, or the filesystem takes no new files, as /proc): "
                  "write elsewhere",
    errno.EEXIST: "a file stands where a directory is needed: move it or write elsewhere",
}


class WriteError(OSError):
    """A file could not be written; the message names the path, the OS error and the fix."""

    def __init__(self, path: Path, cause: OSError) -> None:
        code = errno.errorcode.get(cause.errno or 0, "unknown error")
        fix = _FIXES.get(cause.errno or 0, "check the disk and the path, or write elsewhere")
        super().__init__(cause.errno, f"cannot write {path}: {cause.strerror or cause} ({code}); {fix}")
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.strerror)


def _os_error(exc: BaseException) -> OSError | None:
    """The OS error that caused ``exc`` (itself or one in its chain), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OS error raised while writing ``path`` (directly or as the cause of another error) into a
    ``WriteError`` naming it."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        cause = _os_error(exc)
        if cause is None:
            raise
        raise WriteError(path, cause) from exc


def make_dirs(path: Path) -> None:
    """``mkdir -p path``, failing with a ``WriteError``."""
    with writing(Path(path)):
        Path(path).mkdir(parents=True, exist_ok=True)


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write`` on a temp file beside ``path``, fsync it, then rename it over ``path``; on any failure the
    temp file is removed and the old ``path`` is untouched."""
    path = Path(path)
    make_dirs(path.parent)
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def append_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """Append ``data`` with a single write (flushed, fsynced unless ``sync`` is False), failing with a
    ``WriteError``; a failed append leaves at most a torn last line, which the readers drop."""
    make_dirs(Path(path).parent)
    with writing(Path(path)), Path(path).open("ab") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically (compact, one line)."""
    write_text_atomic(path, json.dumps(data, separators=(",", ":")))
