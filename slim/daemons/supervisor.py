"""Supervising an external daemon (nfs-ganesha, dnsmasq): the base class and its helpers.

:class:`Supervisor` runs one daemon in its own work directory and keeps it running:
it locks the directory (one supervisor per work directory, and none beside a daemon
left by an earlier, killed supervisor), writes the rendered configuration there,
starts the daemon in its own session and waits until it is ready, restarts it with
jittered exponential backoff when it dies (with the last good configuration if the
registry has become invalid), re-renders when what it watches changes and stops only
the process it started.  :class:`~slim.core.daemons.ganesha.NfsServer`, the relay's
:class:`~slim.relay.nfs.RelayNfs` and
:class:`~slim.core.daemons.dnsmasq.DhcpServer` supply what differs: the command line,
the ready check, the configuration, how a new one is applied, what is watched and
what of the daemon's log is worth quoting.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import random
import signal
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, ClassVar, Generic, Self, TypeVar

from slim.errors import FailedPrecondition, SlimError, Unavailable
from slim.files import atomic_write

log = logging.getLogger(__name__)

R = TypeVar("R")  # a rendered configuration: what render() returns and the daemon runs


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


class Supervisor(ABC, Generic[R]):
    """Runs one daemon for a registry in its own work directory and keeps it running.

    The work directory holds ``STEM.conf`` (the rendered configuration), ``STEM.log``
    (the previous run's in ``STEM.log.1``), ``STEM.pid``, ``STEM.out`` (its standard
    output and error) and ``lock`` (held while the supervisor runs).  Methods may be
    called from any thread; they are serialized.  :meth:`run` is the supervising loop,
    :meth:`serve` the same with signal handling.  Only the process this object started
    is ever signalled, by its PID.

    A subclass sets the class attributes below and supplies :meth:`render`,
    :meth:`command`, :meth:`_text`, :meth:`_marker` and :meth:`_ready`; it may
    override :meth:`_apply` (how a changed configuration is applied: by default the
    daemon is restarted), :meth:`watch_signature` and :meth:`_poll_period` (what is
    polled for changes, how often), :meth:`_log_text` and :meth:`_useful` (what of
    its log is quoted), :meth:`_before_spawn`, :meth:`_not_ready`, :meth:`_commit`,
    :meth:`_describe` and :meth:`_reloaded`.
    """

    tag: ClassVar[str]  # what its log lines start with: "nfs"
    daemon: ClassVar[str]  # the daemon as messages name it: "ganesha.nfsd"
    stem: ClassVar[str]  # its files in the work directory: STEM.conf, STEM.log, ...
    owner: ClassVar[str]  # the command that supervises it: "slim nfs serve"
    install: ClassVar[str]  # what to do when its binary is missing
    quiet: ClassVar[str]  # what log_tail says when the daemon said nothing useful
    logger: ClassVar[logging.Logger]  # the subclass module's logger
    cite_log: ClassVar[bool] = False  # name the log file in start errors
    start_poll: ClassVar[float] = 0.05  # seconds between ready checks while it starts
    full_check: float = math.inf  # re-render at least this often (seconds), changes or not
    # log messages, %-formatted with a mapping of tag, daemon, how, delay, tail, error
    died_message: ClassVar[str]
    restart_failed_message: ClassVar[str]
    reload_failed_message: ClassVar[str]
    fallback_message: ClassVar[str] = "%(tag)s: restarting with the last good configuration: %(error)s"

    def __init__(
        self,
        registry_path: str | Path,
        workdir: str | Path,
        interval: float,
        start_timeout: float,
        stop_grace: float,
        backoff: tuple[float, float],
    ) -> None:
        self.registry_path = Path(registry_path)
        self.workdir = Path(workdir).absolute()
        self.interval = min(max(interval, 0.05), 60.0)
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.backoff = backoff
        self.config_path = self.workdir / f"{self.stem}.conf"
        self.log_path = self.workdir / f"{self.stem}.log"
        self.pid_path = self.workdir / f"{self.stem}.pid"
        self.out_path = self.workdir / f"{self.stem}.out"
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir_lock: IO[bytes] | None = None
        self._current: R | None = None  # the configuration the daemon runs: the last good one

    # -- what a subclass supplies --------------------------------------------
    @abstractmethod
    def render(self) -> R:
        """The configuration for the registry as it is now (reads files, changes nothing);
        raises :class:`SlimError` if the registry is invalid."""

    @abstractmethod
    def command(self) -> list[str]:
        """The daemon's command line: in the foreground, on ``config_path``, logging to
        ``log_path``, writing ``pid_path``."""

    @abstractmethod
    def _text(self, config: R) -> str:
        """What is written to ``config_path`` for ``config``."""

    @abstractmethod
    def _marker(self) -> str:
        """An argument of :meth:`command` that ties a process to this work directory."""

    @abstractmethod
    def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """Whether the starting daemon is ready; may raise :class:`Unavailable` (after
        terminating ``proc``) if it started wrongly."""

    def _before_spawn(self) -> None:
        """Checks before the daemon is started (raise to refuse)."""

    def _not_ready(self) -> str:
        """What the start timeout says the daemon did not do."""
        return "did not start"

    def _describe(self, config: R) -> str:
        """Appended to the "running" log line."""
        return ""

    def _commit(self, config: R) -> None:
        """``config`` runs now: it becomes the last good configuration."""
        self._current = config

    def _apply(self, config: R, running: bool) -> str:
        """Make the daemon use the changed ``config`` (already rendered, not yet written);
        returns what was done.  Here: restart it."""
        self._relaunch(config)
        return "restarted"

    def _reloaded(self, outcome: str) -> None:
        """Called by :meth:`run` after each reload with its outcome (to log it)."""

    def watch_signature(self) -> tuple[object, ...]:
        """What :meth:`run` polls for changes: here the registry file."""
        return (file_signature(self.registry_path),)

    def _poll_period(self) -> float:
        """Seconds between polls of :meth:`watch_signature` (0: every tick)."""
        return self.interval

    def _log_text(self) -> str:
        """The text :meth:`log_tail` looks at: the log, then the end of the output."""
        return self._read_log() + self._read_tail(self.out_path, 8192)

    def _useful(self, lines: list[str]) -> list[str]:
        """The lines of :meth:`_log_text` worth quoting, as they are to be quoted."""
        return [ln.strip() for ln in lines if ln.strip()]

    # -- state ---------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The PID of the running daemon this object started, or None."""
        with self._lock:
            proc = self._proc
            return proc.pid if proc is not None and proc.poll() is None else None

    # -- start / stop --------------------------------------------------------
    def start(self) -> None:
        """Lock the work directory, render, write the configuration and start the daemon;
        return once it is ready.  Raises :class:`Unavailable` (quoting its log) if it
        exits or is not ready within ``start_timeout``."""
        with self._lock:
            if self.pid is not None:
                return
            self._acquire_workdir()
            try:
                self._launch(self.render())
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL after ``stop_grace`` seconds) and release
        the work directory.  Idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                self._terminate(proc)
            self._release_workdir()

    def restart(self) -> None:
        """Stop the daemon and start it again with the configuration it runs."""
        with self._lock:
            self._relaunch(self._current if self._current is not None else self.render())

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reload(self) -> str:
        """Re-render; if the configuration changed, make the daemon use it (:meth:`_apply`).
        Returns "unchanged" or what was done.  Raises (keeping the running configuration)
        if the registry is invalid."""
        with self._lock:
            config = self.render()
            running = self.pid is not None
            current = self._current
            if running and current is not None and self._text(config) == self._text(current):
                return "unchanged"
            return self._apply(config, running)

    def _acquire_workdir(self) -> None:
        if self._workdir_lock is None:
            self._workdir_lock = lock_workdir(
                self.workdir, self.pid_path, self._marker(), self.daemon, self.owner
            )

    def _release_workdir(self) -> None:
        f, self._workdir_lock = self._workdir_lock, None
        if f is not None:
            f.close()

    def _launch(self, config: R) -> None:
        """Write ``config``, start the daemon on it and make it the running configuration."""
        atomic_write(self.config_path, self._text(config).encode())
        self._spawn(config)
        self._commit(config)

    def _relaunch(self, config: R) -> None:
        """Stop the daemon if it runs, then :meth:`_launch` ``config``."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._terminate(proc)
        self._launch(config)

    def _spawn(self, config: R) -> None:
        self._before_spawn()
        cmd = self.command()
        if self.log_path.exists():
            os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        self.log_path.touch()
        where = f" (log: {self.log_path})" if self.cite_log else ""
        try:
            with self.out_path.open("ab") as out:
                # its own session: a Ctrl-C at the terminal reaches the supervisor, which
                # stops the daemon in order, and not the daemon directly
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    start_new_session=True,
                )
        except FileNotFoundError:
            raise self._missing(cmd[0]) from None
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                rc: int | None = proc.wait(timeout=self.start_poll)
            except subprocess.TimeoutExpired:
                rc = None
            if rc is not None:
                self.pid_path.unlink(missing_ok=True)
                raise Unavailable(
                    f"{self.daemon} exited with status {rc} while starting{where}:\n{self.log_tail()}"
                )
            if self._ready(proc):
                break
            if time.monotonic() > deadline:
                self._terminate(proc)
                raise Unavailable(
                    f"{self.daemon} {self._not_ready()} within {self.start_timeout:g}s{where}:\n"
                    f"{self.log_tail()}"
                )
        self._proc = proc
        self.logger.info("%s: %s running (pid %d)%s", self.tag, self.daemon, proc.pid, self._describe(config))

    def _missing(self, binary: str) -> FailedPrecondition:
        return FailedPrecondition(f"{binary} not found: {self.install}")

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        terminate(proc, self.stop_grace, f"{self.tag}: {self.daemon}")
        self.pid_path.unlink(missing_ok=True)

    # -- logs ----------------------------------------------------------------
    def _read_log(self, offset: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @staticmethod
    def _read_tail(path: Path, size: int) -> str:
        """The last ``size`` bytes of ``path`` as text ("" if it cannot be read)."""
        try:
            return path.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 12) -> str:
        """The last lines of the daemon's log and output that say something."""
        shown = self._useful(self._log_text().splitlines())[-lines:]
        return "\n".join(f"  {ln}" for ln in shown) or f"  ({self.quiet})"

    def _say(self, level: int, message: str, **values: object) -> None:
        self.logger.log(level, message, {"tag": self.tag, "daemon": self.daemon, **values})

    # -- supervision ---------------------------------------------------------
    def run(
        self,
        stop_event: threading.Event,
        *,
        reload_event: threading.Event | None = None,
        ready: Callable[[Self], None] | None = None,
    ) -> None:
        """Start the daemon (raising if that fails), then supervise it until ``stop_event``
        is set, and stop it.  Every tick (``interval``, at most 0.25 s): if the daemon
        died, restart it after a jittered exponential backoff (``backoff`` = (first, most)
        seconds; reset once it has run for a minute), with the last good configuration
        if the registry is invalid; if :meth:`watch_signature` changed (polled every
        :meth:`_poll_period`), or ``reload_event`` is set, or ``full_check`` seconds
        passed, :meth:`reload`.  A failed reload is logged and the running configuration
        kept.  ``ready`` is called once the daemon first runs."""
        self.start()
        try:
            if ready is not None:
                ready(self)
            self._supervise(stop_event, reload_event or threading.Event())
        finally:
            self.stop()

    def serve(
        self, stop_event: threading.Event | None = None, *, ready: Callable[[Self], None] | None = None
    ) -> None:
        """:meth:`run` until SIGTERM/SIGINT (or ``stop_event``); SIGHUP re-renders now.
        Blocks.  The signal handlers (main thread only) are restored on return."""
        stop = stop_event if stop_event is not None else threading.Event()
        reload_event = threading.Event()
        with stop_signals(stop, reload_event):
            self.run(stop, reload_event=reload_event, ready=ready)

    def _supervise(self, stop: threading.Event, reload_event: threading.Event) -> None:
        tick = min(self.interval, 0.25)
        failures = 0
        restart_at: float | None = None
        up_since = time.monotonic()
        signature = self.watch_signature()
        next_poll = last_full = time.monotonic()
        while not stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                proc = self._proc
                rc = proc.poll() if proc is not None else -1
            if rc is not None:
                if restart_at is None:
                    delay = backoff_delay(self.backoff, failures)
                    how = "is not running" if proc is None else f"exited with status {rc}"
                    self._say(logging.WARNING, self.died_message, how=how, delay=delay, tail=self.log_tail())
                    restart_at = now + delay
                if now >= restart_at:
                    failures += 1
                    try:
                        self._restart_dead()
                    except SlimError as exc:
                        restart_at = time.monotonic() + backoff_delay(self.backoff, failures)
                        self._say(
                            logging.ERROR, self.restart_failed_message, delay=restart_at - now, error=exc
                        )
                    else:
                        restart_at = None
                        up_since = time.monotonic()
                continue
            if failures and now - up_since > 60.0:
                failures = 0
            if now < next_poll and not reload_event.is_set():
                continue
            next_poll = now + self._poll_period()
            current = self.watch_signature()
            if current == signature and not reload_event.is_set() and now - last_full < self.full_check:
                continue
            signature, last_full = current, now
            reload_event.clear()
            try:
                outcome = self.reload()
            except SlimError as exc:
                # an invalid registry: the daemon keeps its configuration; a failed
                # restart: the next tick restarts it with backoff
                self._say(logging.ERROR, self.reload_failed_message, error=exc)
                continue
            self._reloaded(outcome)

    def _restart_dead(self) -> None:
        """Start the daemon again: with the registry as it is now or, if that is invalid,
        with the last configuration that ran."""
        with self._lock:
            try:
                config = self.render()
            except SlimError as exc:
                if self._current is None:
                    raise
                self._say(logging.ERROR, self.fallback_message, error=exc)
                config = self._current
            self._relaunch(config)
