"""``slim nfs serve``: nfs-ganesha exporting the store's trees, supervised.

:class:`NfsServer` runs one ``ganesha.nfsd`` for a registry and a store in its own
work directory, with the configuration :mod:`slim.core.daemons.exports` renders;
restarts it when it dies and re-renders when the registry, an environment's release
or the store's trees change, making ganesha re-read its exports by SIGHUP when that is
safe and restarting it otherwise.  :class:`NfsConfig` is ``slim nfs serve``'s settings
and :func:`run` runs a server from them.  See docs/nfs.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from slim.config import ProcessConfig, value_error
from slim.core.daemons.exports import (
    DEFAULT_PORT,
    GANESHA,
    STATE_FILE,
    ExportSet,
    collect_exports,
    normalize_clients,
    parse_listen,
    read_state,
    render_ganesha,
)
from slim.core.daemons.supervisor import Supervisor, file_signature
from slim.core.registry import Registry, load_registry
from slim.core.store import Store, atomic_write
from slim.errors import Unavailable
from slim.listen import check_bind, check_port

log = logging.getLogger(__name__)

# ganesha writes these lines to its log when it is ready / has re-read its exports.
_READY_LINE = "NFS SERVER INITIALIZED"
_REREAD_DONE = "Reread exports complete"
_REREAD_FAILED = re.compile(
    r"Config File \(|Could not create export|validation errors|:CRIT :|:MAJ :|:FATAL :"
)
# Harmless on a host without dbus, Kerberos, rpcbind or the RADOS plugin (see docs/nfs.md).
_LOG_NOISE = re.compile(
    r":DBUS :|dbus_|gssd_refresh_krb5|find_keytab_entry|nfs_rpc_cb_init_ccache|krb5|"
    r"Missing RADOS URLs|Cannot register NFS V4|__Register_program|lower_my_caps|"
    r"Unregistering ports|unhook failed"
)
_IMPORTANT = re.compile(r":(WARN|CRIT|MAJ|FATAL) :")
# at start: ganesha logs configuration errors, skips the block and serves without it
_CONFIG_REJECTED = re.compile(r"config_errs_to_log|Could not create export|Errors processing block")

Rendered = tuple[ExportSet, str]  # the exports and the ganesha.conf text that exports them


# -- settings --------------------------------------------------------------------------------------


def _listen(value: str) -> str:
    parse_listen(value)
    return value


def _clients(value: list[str] | None) -> list[str] | None:
    clients = normalize_clients(value)
    return None if clients is None else list(clients)


class NfsConfig(ProcessConfig):
    """``slim nfs serve``'s settings."""

    registry: Path = Field(Path("/etc/slim/registry.yaml"), description="the registry YAML file")
    store: Path = Field(Path("/var/lib/slim/store"), description="the content-addressed artifact store")
    workdir: Path = Field(
        Path("/var/lib/slim/nfs"),
        description="the server's own directory: ganesha.conf, log, pid file, recovery data, export ids",
    )
    listen: Annotated[str, AfterValidator(value_error(_listen))] = Field(
        f"0.0.0.0:{DEFAULT_PORT}", description="where ganesha listens: HOST:PORT, [V6]:PORT (an IP address)"
    )
    clients: Annotated[list[str] | None, AfterValidator(value_error(_clients))] = Field(
        None, description="who may mount: addresses, CIDR networks, host names, @netgroups; none: everyone"
    )

    @property
    def address(self) -> tuple[str, int]:
        """(address, port) ganesha binds."""
        return parse_listen(self.listen)


# -- the supervisor --------------------------------------------------------------------------------


def _connect_host(bind: str) -> str:
    addr = ipaddress.ip_address(bind)
    if addr.is_unspecified:
        return "::1" if addr.version == 6 else "127.0.0.1"
    return bind


def _accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class NfsServer(Supervisor[Rendered]):
    """Runs one ``ganesha.nfsd`` for a registry and a store, in its own work directory.

    The work directory holds everything of this instance: ``ganesha.conf``,
    ``ganesha.log`` (the previous run's in ``ganesha.log.1``), ``ganesha.pid``,
    ``ganesha.out`` (its stdout/stderr), ``recovery/``, ``krb5/``, ``exports.json`` (the
    trees exported and their ids, so a restarted server keeps both) and ``lock`` (held
    while the server runs: one supervisor per work directory).  Several servers with
    different work directories and ports can run on one machine.

    Methods may be called from any thread; they are serialized.  ``run()`` is the
    supervising loop: it polls the registry file, every environment ref and the trees
    directory every ``interval`` seconds, and re-renders at least every minute.  Only
    the process this object started is ever signalled, by its PID.
    """

    tag = "nfs"
    daemon = GANESHA
    stem = "ganesha"
    owner = "slim nfs serve"
    install = "install nfs-ganesha and nfs-ganesha-vfs (apt-get install nfs-ganesha nfs-ganesha-vfs)"
    quiet = "ganesha logged nothing useful"
    logger = log
    cite_log = True
    full_check = 60.0
    died_message = "%(tag)s: %(daemon)s %(how)s; restarting in %(delay).1fs. Its log ends:\n%(tail)s"
    restart_failed_message = "%(tag)s: restart failed (next try in %(delay).1fs): %(error)s"
    reload_failed_message = "%(tag)s: reload failed: %(error)s"

    def __init__(
        self,
        registry_path: str | Path,
        store_root: str | Path,
        workdir: str | Path,
        *,
        bind: str = "0.0.0.0",  # noqa: S104
        port: int = DEFAULT_PORT,
        clients: Sequence[str] | None = None,
        ganesha: str = GANESHA,
        interval: float = 1.0,
        start_timeout: float = 30.0,
        stop_grace: float = 10.0,
        reload_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.5, 30.0),
        retain_old_trees: bool = True,
    ) -> None:
        super().__init__(registry_path, workdir, interval, start_timeout, stop_grace, backoff)
        self.store = Store(store_root)
        self.bind = check_bind(bind)
        self.port = check_port(port)
        self.clients = normalize_clients(clients)
        self.ganesha = ganesha
        self.reload_timeout = reload_timeout
        self.retain_old_trees = retain_old_trees
        self.state_path = self.workdir / STATE_FILE
        self._registry: Registry | None = None
        self._registry_stat: tuple[int, int, int, int] | None = None

    # -- state ---------------------------------------------------------------
    @property
    def exports(self) -> ExportSet | None:
        """The exports of the configuration ganesha is running (None before start)."""
        with self._lock:
            return self._current[0] if self._current is not None else None

    @property
    def address(self) -> tuple[str, int]:
        """Where to connect to this server from this machine."""
        return _connect_host(self.bind), self.port

    # -- rendering -----------------------------------------------------------
    def render(self) -> Rendered:
        """Collect the exports now and render this server's configuration (no side effects
        beyond reading the registry file and the store)."""
        with self._lock:
            registry = self._load_registry()
            state = read_state(self.state_path)
            exports = collect_exports(
                registry,
                self.store,
                keep_ids=state,
                retain=state if self.retain_old_trees else (),
            )
            text = render_ganesha(
                exports, bind=self.bind, port=self.port, clients=self.clients, workdir=self.workdir
            )
            return exports, text

    def _load_registry(self) -> Registry:
        key = file_signature(self.registry_path)
        if self._registry is None or key is None or key != self._registry_stat:
            self._registry = load_registry(self.registry_path)
            self._registry_stat = key
        return self._registry

    def _text(self, config: Rendered) -> str:
        return config[1]

    def _commit(self, config: Rendered) -> None:
        super()._commit(config)
        exports = config[0]
        state = {"exports": {e.tree: e.export_id for e in exports.exports}}
        atomic_write(self.state_path, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())
        for note in exports.notes:
            log.info("nfs: %s", note)

    # -- start ---------------------------------------------------------------
    def command(self) -> list[str]:
        return [
            self.ganesha,
            "-F",
            "-f",
            str(self.config_path),
            "-L",
            str(self.log_path),
            "-p",
            str(self.pid_path),
            "-N",
            "NIV_EVENT",
        ]

    def _marker(self) -> str:
        return str(self.config_path)

    def _before_spawn(self) -> None:
        host, port = self.address
        if _accepts(host, port):
            raise Unavailable(f"cannot start {GANESHA}: something already listens on {host}:{port}")

    def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """Ready once it logged that it is and accepts connections; but if it skipped a
        part of the configuration it rejected, stopped and :class:`Unavailable`."""
        text = self._read_log()
        if _READY_LINE not in text or not _accepts(*self.address):
            return False
        rejected = [_short(ln) for ln in text.splitlines() if _CONFIG_REJECTED.search(ln)]
        if rejected:
            self._terminate(proc)
            listed = "\n".join(f"  {ln}" for ln in rejected[-12:])
            raise Unavailable(
                f"{GANESHA} rejected part of {self.config_path} (log: {self.log_path}):\n{listed}"
            )
        return True

    def _not_ready(self) -> str:
        host, port = self.address
        return f"did not accept connections on {host}:{port}"

    def _describe(self, config: Rendered) -> str:
        return f" on {self.bind}:{self.port}"

    # -- reload --------------------------------------------------------------
    def _apply(self, config: Rendered, running: bool) -> Literal["sighup", "restarted", "started"]:
        """Make ganesha use the changed configuration.

        ganesha 4.3 re-reads its EXPORT blocks on SIGHUP (adds new ones, removes missing
        ones).  It cannot change an existing Export_Id's Path (the export is dropped) and,
        after an in-place Pseudo change, hangs at shutdown; nor does SIGHUP re-read core
        parameters.  So SIGHUP is used only when every Export_Id present before and after
        keeps its path and pseudo path and nothing outside the EXPORT blocks changed;
        otherwise — or if ganesha logs an error while re-reading — it is restarted."""
        if not running:
            self._acquire_workdir()
            self._relaunch(config)
            return "started"
        old, (exports, text) = self._current, config
        if old is not None and _sighup_safe(old[0], old[1], exports, text):
            atomic_write(self.config_path, text.encode())
            if self._sighup():
                self._commit(config)
                return "sighup"
            log.warning("nfs: %s did not re-read its exports cleanly; restarting it", GANESHA)
        self._relaunch(config)
        return "restarted"

    def _sighup(self) -> bool:
        proc = self._proc
        assert proc is not None
        offset = self._log_size()
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + self.reload_timeout
        while time.monotonic() < deadline:
            try:
                proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
            else:
                return False
            new = self._read_log(offset)
            if _REREAD_DONE in new:
                # errors are logged just before or just after the completion line
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.1)
                bad = [
                    ln
                    for ln in self._read_log(offset).splitlines()
                    if _REREAD_FAILED.search(ln) and not _LOG_NOISE.search(ln)
                ]
                for line in bad:
                    log.warning("nfs: ganesha: %s", _short(line))
                return not bad and proc.poll() is None
        return False

    def _reloaded(self, outcome: str) -> None:
        if outcome != "unchanged":
            exports = self.exports
            count = len(exports.exports) if exports else 0
            log.info("nfs: exports changed (%d trees); ganesha %s", count, outcome)

    # -- logs ----------------------------------------------------------------
    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _useful(self, lines: list[str]) -> list[str]:
        """Lines that say something (known harmless D-Bus/Kerberos/rpcbind complaints left
        out): its warnings and errors if there are any, else whatever it said last;
        shortened to component and message."""
        useful = [ln for ln in lines if ln.strip() and not _LOG_NOISE.search(ln)]
        important = [ln for ln in useful if _IMPORTANT.search(ln) or "] " not in ln]
        return [_short(ln) for ln in important or useful]

    # -- supervision ---------------------------------------------------------
    def watch_signature(self) -> tuple[object, ...]:
        """What is polled for changes: the registry file, every environment ref, and the
        trees directory (a tree removed from the store is unexported)."""
        try:
            refs = sorted(p.name for p in self.store.refs.iterdir())
        except OSError:
            refs = []
        return (
            file_signature(self.registry_path),
            tuple((name, file_signature(self.store.refs / name)) for name in refs),
            file_signature(self.store.trees),
        )


def _sighup_safe(old: ExportSet, old_text: str, new: ExportSet, new_text: str) -> bool:
    before = {e.export_id: (e.path, e.pseudo) for e in old.exports}
    for e in new.exports:
        if e.export_id in before and before[e.export_id] != (e.path, e.pseudo):
            return False
    return _core_part(old_text) == _core_part(new_text)


def _core_part(text: str) -> str:
    """The configuration outside its EXPORT blocks and comments (SIGHUP does not re-read it)."""
    head = text.split("\nEXPORT {", 1)[0]
    return "\n".join(ln for ln in head.splitlines() if ln.strip() and not ln.startswith("#"))


def _short(line: str) -> str:
    # "24/11/2026 21:53:27 : epoch 6b060757 : vm : nfs-ganesha-32681[main] fn :COMP :LEVEL :msg"
    _, sep, rest = line.partition("] ")
    return rest.strip() if sep else line.strip()


# -- entry points ----------------------------------------------------------------------------------


def run(
    config: NfsConfig,
    ready: Callable[[NfsServer], None] | None = None,
    *,
    stop_event: threading.Event | None = None,
) -> None:
    """``slim nfs serve`` with ``config``: see :func:`serve`."""
    bind, port = config.address
    serve(config.registry, config.store, config.workdir, bind, port, config.clients, stop_event, ready=ready)


def serve(
    registry_path: str | Path,
    store_root: str | Path,
    workdir: str | Path,
    bind: str = "0.0.0.0",  # noqa: S104
    port: int = DEFAULT_PORT,
    clients: Sequence[str] | None = None,
    stop_event: threading.Event | None = None,
    *,
    interval: float = 1.0,
    ready: Callable[[NfsServer], None] | None = None,
    ganesha: str = GANESHA,
) -> None:
    """Run and supervise ganesha until SIGTERM/SIGINT (or ``stop_event``), then stop it
    and return.  Blocks.  Called from the main thread it handles SIGTERM and SIGINT (stop)
    and SIGHUP (re-render now), restoring the previous handlers on return.  Raises
    :class:`SlimError` if ganesha cannot be started at all."""
    server = NfsServer(
        registry_path,
        store_root,
        workdir,
        bind=bind,
        port=port,
        clients=clients,
        ganesha=ganesha,
        interval=interval,
    )
    server.serve(stop_event, ready=ready)
