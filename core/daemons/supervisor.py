"""Helpers shared by the supervisors of external daemons (nfs-ganesha, dnsmasq)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import random
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO

from slim.errors import FailedPrecondition

log = logging.getLogger(__name__)


def backoff_delay(backoff: tuple[float, float], failures: int) -> float:
    """Seconds to wait before restart number ``failures`` + 1: exponential, capped, jittered."""
    first, most = backoff
    return min(most, first * 2.0 ** min(failures, 30)) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter


@contextlib.contextmanager
def stop_signals(stop: threading.Event, reload_event: threading.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop``; SIGHUP sets ``reload_event`` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        reload_event.set()

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, on_stop),
        signal.SIGINT: signal.signal(signal.SIGINT, on_stop),
        signal.SIGHUP: signal.signal(signal.SIGHUP, on_hup),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def lock_workdir(workdir: Path, pid_file: Path, marker: str, daemon: str, owner: str) -> IO[bytes]:
    """Lock ``workdir/lock`` (one supervisor per work directory) and refuse to go on
    while a ``daemon`` from an earlier run, one whose supervisor was killed, still runs
    there: ``pid_file`` names it and ``marker`` is one of its arguments.  Returns the
    open lock file (closing it releases the lock)."""
    workdir.mkdir(parents=True, exist_ok=True)
    f = (workdir / "lock").open("ab")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise FailedPrecondition(f"work directory {workdir} is in use by another {owner}") from None
    stale = stale_pid(pid_file, marker)
    if stale is not None:
        f.close()
        raise FailedPrecondition(
            f"{daemon} (pid {stale}) from an earlier run still uses {workdir}; stop it first (kill {stale})"
        )
    return f


def stale_pid(pid_file: Path, marker: str) -> int | None:
    """The PID in ``pid_file`` if that process runs and ``marker`` is one of its arguments."""
    try:
        pid = int(pid_file.read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if marker.encode() in cmdline else None


def terminate(proc: subprocess.Popen[bytes], grace: float, name: str) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reaps the process."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM for %gs; killing it", name, proc.pid, grace)
        proc.kill()
        proc.wait()


def file_signature(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is replaced or rewritten (inode, size, mtime, ctime); None
    if it cannot be read.  Supervisors poll it to notice a new registry."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
