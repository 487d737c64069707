"""Small files written whole: keys, certificates, records (the CA's, the signing key's)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """``data`` into ``path`` with ``mode``: written to a file of this process beside it,
    synced, then renamed over ``path`` (a reader sees the old file or the new one, never a
    part; a symbolic link at ``path`` is replaced, not followed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # a file left by a process of the same pid keeps no other mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def atomic_write(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data``: temporary file beside it, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
