"""nfs-ganesha for SLIM: read-only NFSv4/TCP exports of content-addressed trees, supervised.

Shared by the core's ``slim nfs serve`` (:class:`slim.core.daemons.ganesha.NfsServer`, the
store's trees) and relays that export trees of their own (:class:`slim.relay.nfs.RelayNfs`,
docs/relay.md).  Each tree is named by the digest of its manifest and exported once, read-only,
at the NFSv4 pseudo path ``<export_root>/<hex>`` (:func:`pseudo_path`) with an Export_Id derived
from the digest (:func:`assign_export_ids`): the same tree has the same path and id on every
server, so a node that fails over from one server to another mounts the same name.

- :func:`render_ganesha` renders a configuration from an :class:`ExportSet`;
- :class:`GaneshaServer` runs and supervises one ``ganesha.nfsd`` in its own work directory,
  re-rendering when what it watches changes; a subclass says which trees it exports.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import re
import signal
import socket
import subprocess
import time
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slim import listen
from slim.daemons.supervisor import Supervisor
from slim.errors import FailedPrecondition, InvalidArgument, SlimError, Unavailable
from slim.files import atomic_write
from slim.listen import check_bind, check_port
from slim.vocabulary import HOSTNAME_RE, parse_digest

log = logging.getLogger(__name__)


GANESHA = "ganesha.nfsd"
# Export_Id 0 is ganesha's NFSv4 pseudo root; 1 is kept free as well (often used by
# hand-written configurations).  Ids are 16-bit; 65000 slots leave room for both.
FIRST_EXPORT_ID = 2
EXPORT_ID_SLOTS = 65000
DEFAULT_PORT = 2049
STATE_FILE = "exports.json"  # in a server's workdir: the trees it exported, with their ids

_SAFE_CONF_CHARS = re.compile(r"^[^\"\\\x00-\x1f\x7f]*$")
_NETGROUP_RE = re.compile(r"^@[A-Za-z0-9_.-]{1,255}$")
_WILDCARD_RE = re.compile(r"^(?=.*[*?])[A-Za-z0-9*?.-]{1,253}$")


# -- names ---------------------------------------------------------------------------------------


def pseudo_path(export_root: str, tree_digest: str) -> str:
    """The NFSv4 path under which the tree ``tree_digest`` is exported and mounted:
    ``<export_root>/<64 hex>`` (``/slim/3f…``).  Boot plans and the server both use this."""
    if not export_root.startswith("/"):
        raise InvalidArgument(f"NFS export root {export_root!r} is not an absolute path")
    return f"{export_root.rstrip('/')}/{parse_digest(tree_digest)}"


def export_id_for(tree_digest: str) -> int:
    """The Export_Id a tree gets unless another tree already holds it: derived from the
    digest, so it stays the same across runs and unrelated changes."""
    return FIRST_EXPORT_ID + int(parse_digest(tree_digest)[:8], 16) % EXPORT_ID_SLOTS


def assign_export_ids(trees: Iterable[str], keep: Mapping[str, int] | None = None) -> dict[str, int]:
    """Export_Ids for ``trees`` ("sha256:<hex>"): first every id in ``keep`` that is still
    valid and unique (a running server keeps its ids), then :func:`export_id_for`, probing
    upward (wrapping) past taken ids, in sorted digest order — deterministic."""
    wanted = sorted({f"sha256:{parse_digest(t)}" for t in trees})
    if len(wanted) > EXPORT_ID_SLOTS:
        raise FailedPrecondition(f"{len(wanted)} trees to export; at most {EXPORT_ID_SLOTS} fit")
    ids: dict[str, int] = {}
    used: set[int] = set()
    for tree in wanted:
        kept = (keep or {}).get(tree)
        if (
            isinstance(kept, int)
            and FIRST_EXPORT_ID <= kept < FIRST_EXPORT_ID + EXPORT_ID_SLOTS
            and kept not in used
        ):
            ids[tree] = kept
            used.add(kept)
    for tree in wanted:
        if tree in ids:
            continue
        export_id = export_id_for(tree)
        while export_id in used:
            export_id = FIRST_EXPORT_ID + (export_id - FIRST_EXPORT_ID + 1) % EXPORT_ID_SLOTS
        ids[tree] = export_id
        used.add(export_id)
    return ids


# -- what is exported ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeUse:
    """One environment directory whose current release uses a tree."""

    environment: str
    directory: str
    release: str  # the release's digest

    def __str__(self) -> str:
        return f"{self.environment}:{self.directory}"


@dataclass(frozen=True)
class Export:
    export_id: int
    tree: str  # "sha256:<hex>", the manifest digest naming the tree
    path: Path  # the tree on the server (absolute, symbolic links resolved)
    pseudo: str  # the NFSv4 path nodes mount
    used_by: tuple[TreeUse, ...]  # empty: kept for nodes still running an older release

    @property
    def hex(self) -> str:
        return parse_digest(self.tree)


@dataclass(frozen=True)
class ExportSet:
    export_root: str  # registry settings.nfs_export_root
    trees_dir: Path  # STORE/trees/sha256 (resolved): the real paths' parent
    exports: tuple[Export, ...]  # sorted by export id
    notes: tuple[str, ...] = ()  # why something is not exported, or kept

    def ids(self) -> dict[str, int]:
        return {e.tree: e.export_id for e in self.exports}

    def get(self, tree_digest: str) -> Export | None:
        tree = f"sha256:{parse_digest(tree_digest)}"
        return next((e for e in self.exports if e.tree == tree), None)


# -- clients, listen addresses -----------------------------------------------------------------------


def normalize_clients(clients: Iterable[str] | None) -> tuple[str, ...] | None:
    """Validate a client restriction list: addresses, CIDR networks (no host bits), host
    names, wildcards (``*.lab.example``) or ``@netgroup``.  None, empty, or a list with
    ``*`` means every client (returns None)."""
    if clients is None:
        return None
    out: list[str] = []
    for raw in clients:
        client = raw.strip()
        if not client:
            continue
        if client == "*":
            return None
        if "/" in client:
            try:
                client = str(ipaddress.ip_network(client, strict=True))
            except ValueError as exc:
                raise InvalidArgument(f"client {raw!r} is not a network in CIDR form: {exc}") from None
        else:
            try:
                client = str(ipaddress.ip_address(client))
            except ValueError:
                if not (
                    HOSTNAME_RE.match(client) or _WILDCARD_RE.match(client) or _NETGROUP_RE.match(client)
                ):
                    raise InvalidArgument(
                        f"client {raw!r} is not an address, a CIDR network, a host name, "
                        "a wildcard such as *.lab.example, or an @netgroup"
                    ) from None
        if client not in out:
            out.append(client)
    return tuple(out) or None


def parse_clients(value: str | None) -> tuple[str, ...] | None:
    """``--clients 10.1.0.0/16,node7`` → validated tuple (None: every client)."""
    return None if value is None else normalize_clients(value.split(","))


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT`` → (address, port); the host must
    be an IP address (ganesha binds one address); defaults 0.0.0.0 and 2049."""
    return listen.parse_listen(value, DEFAULT_PORT)


def _conf_string(value: str | Path, what: str) -> str:
    text = str(value)
    if not _SAFE_CONF_CHARS.match(text):
        raise InvalidArgument(f"{what} {text!r} contains a quote, backslash or control character")
    return f'"{text}"'


# -- rendering ----------------------------------------------------------------------------------------


def render_ganesha(
    exports: ExportSet,
    *,
    bind: str = "0.0.0.0",  # noqa: S104 - an NFS server listens on every address by default
    port: int = DEFAULT_PORT,
    clients: Sequence[str] | None = None,
    workdir: Path | None = None,
) -> str:
    """An nfs-ganesha configuration exporting every tree read-only over NFSv4/TCP only.

    With ``workdir``, everything ganesha writes outside its log and pid file (given on its
    command line) goes there: NFSv4 recovery directory, Kerberos credential cache, and a
    per-instance D-Bus name, so several servers can run on one machine.  Without it the
    configuration uses ganesha's system paths (one server per machine)."""
    bind = listen.check_bind(bind)
    port = listen.check_port(port)
    allowed = normalize_clients(clients)
    lines = [
        "# nfs-ganesha configuration for SLIM: read-only NFSv4/TCP exports of the store's trees.",
        "# Generated by slim (slim nfs config / slim nfs serve); edits are overwritten.",
        f"# Each tree STORE/trees/sha256/<hex> is exported at {exports.export_root.rstrip('/')}/<hex>"
        " (registry settings.nfs_export_root).",
    ]
    if workdir is not None:
        wd = Path(workdir).absolute()
        lines.append(
            f"# Run: {GANESHA} -F -f {wd / 'ganesha.conf'} -L {wd / 'ganesha.log'} "
            f"-p {wd / 'ganesha.pid'} -N NIV_EVENT"
        )
    lines += [f"# note: {n}" for n in exports.notes]
    core = [
        f"    Bind_Addr = {bind};",
        f"    NFS_Port = {port};",
        "    Protocols = 4;",
        "    Enable_NLM = false;",
        "    Enable_RQUOTA = false;",
        "    Enable_UDP = false;",
    ]
    nfsv4 = [
        "    Graceless = true;",
        "    Lease_Lifetime = 30;",
        "    Allow_Numeric_Owners = true;",
        "    Only_Numeric_Owners = true;",
    ]
    krb5 = ["    Active_krb5 = false;"]
    if workdir is not None:
        wd = Path(workdir).absolute()
        instance = hashlib.sha256(str(wd).encode()).hexdigest()[:12]
        core.append(f"    Dbus_Name_Prefix = slim_{instance};")
        nfsv4 += [
            "    RecoveryBackend = fs;",
            f"    RecoveryRoot = {_conf_string(wd / 'recovery', 'work directory')};",
        ]
        krb5.append(f"    CCacheDir = {_conf_string(wd / 'krb5', 'work directory')};")
    lines += ["", "NFS_CORE_PARAM {", *core, "}", "", "NFSV4 {", *nfsv4, "}", "", "NFS_KRB5 {", *krb5, "}"]
    for e in exports.exports:
        users = ", ".join(str(u) for u in e.used_by) or "no current release (kept for nodes booted earlier)"
        lines += [
            "",
            f"# {e.tree}: {users}",
            "EXPORT {",
            f"    Export_Id = {e.export_id};",
            f"    Path = {_conf_string(e.path, 'tree path')};",
            f"    Pseudo = {_conf_string(e.pseudo, 'pseudo path')};",
            f"    Access_Type = {'None' if allowed else 'RO'};",
            "    Squash = No_Root_Squash;",
            "    Protocols = 4;",
            "    Transports = TCP;",
            "    SecType = sys;",
            "    FSAL {",
            "        Name = VFS;",
            "    }",
        ]
        if allowed:
            # ganesha wants bare tokens here (a quoted string is "not a client")
            listed = ", ".join(allowed)
            lines += [
                "    CLIENT {",
                f"        Clients = {listed};",
                "        Access_Type = RO;",
                "        Protocols = 4;",
                "    }",
            ]
        lines.append("}")
    return "\n".join(lines) + "\n"


def read_state(path: Path) -> dict[str, int]:
    """The trees a server exported and their ids, from its state file (``STATE_FILE`` in
    its work directory); empty if there is none or it cannot be read (that is logged)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    raw = data.get("exports", {}) if isinstance(data, dict) else {}
    out: dict[str, int] = {}
    if isinstance(raw, dict):
        for tree, export_id in raw.items():
            with contextlib.suppress(SlimError):
                if isinstance(export_id, int):
                    out[f"sha256:{parse_digest(str(tree))}"] = export_id
    return out


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


class GaneshaServer(Supervisor[Rendered]):
    """Runs one ``ganesha.nfsd`` exporting trees, in its own work directory.

    The work directory holds everything of this instance: ``ganesha.conf``,
    ``ganesha.log`` (the previous run's in ``ganesha.log.1``), ``ganesha.pid``,
    ``ganesha.out`` (its stdout/stderr), ``recovery/``, ``krb5/``, ``exports.json`` (the
    trees exported and their ids, so a restarted server keeps both) and ``lock`` (held
    while the server runs: one supervisor per work directory).  Several servers with
    different work directories and ports can run on one machine.

    A subclass says which trees are exported (:meth:`collect`) and what is polled for
    changes (:meth:`watch_signature`).  Methods may be called from any thread; they are
    serialized.  ``run()`` is the supervising loop: it polls every ``interval`` seconds and
    re-renders at least every minute.  Only the process this object started is ever
    signalled, by its PID.
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
        watched: str | Path,
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
        super().__init__(watched, workdir, interval, start_timeout, stop_grace, backoff)
        self.bind = check_bind(bind)
        self.port = check_port(port)
        self.clients = normalize_clients(clients)
        self.ganesha = ganesha
        self.reload_timeout = reload_timeout
        self.retain_old_trees = retain_old_trees
        self.state_path = self.workdir / STATE_FILE
        self._serving: tuple[str, ...] = ()  # the running configuration's trees (set by _commit)

    @abstractmethod
    def collect(self, keep_ids: Mapping[str, int], retain: Iterable[str]) -> ExportSet:
        """The trees to export now (see :func:`slim.core.daemons.exports.collect_exports`):
        ``keep_ids`` are the ids of the last run, ``retain`` the trees it exported (empty when
        old trees are not kept)."""

    # -- state ---------------------------------------------------------------
    @property
    def exports(self) -> ExportSet | None:
        """The exports of the configuration ganesha is running (None before start)."""
        with self._lock:
            return self._current[0] if self._current is not None else None

    def serving(self) -> tuple[str, ...]:
        """The trees ("sha256:<hex>") the running ganesha exports; () when it is not running.
        Takes no lock: it may be called from an event loop while the supervisor restarts
        ganesha (a reference read, and a non-blocking waitpid)."""
        proc = self._proc
        return self._serving if proc is not None and proc.poll() is None else ()

    @property
    def address(self) -> tuple[str, int]:
        """Where to connect to this server from this machine."""
        return _connect_host(self.bind), self.port

    # -- rendering -----------------------------------------------------------
    def render(self) -> Rendered:
        """Collect the exports now and render this server's configuration (no side effects
        beyond reading what :meth:`collect` reads)."""
        with self._lock:
            state = read_state(self.state_path)
            exports = self.collect(state, state if self.retain_old_trees else ())
            text = render_ganesha(
                exports, bind=self.bind, port=self.port, clients=self.clients, workdir=self.workdir
            )
            return exports, text

    def _text(self, config: Rendered) -> str:
        return config[1]

    def _commit(self, config: Rendered) -> None:
        super()._commit(config)
        exports = config[0]
        self._serving = tuple(e.tree for e in exports.exports)
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
