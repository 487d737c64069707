"""NFS exports: the read-only trees of ``nfs`` directories, served over NFSv4/TCP.

A directory whose policy is ``nfs`` is built into a read-only tree in the store,
``STORE/trees/sha256/<hex>``, named by the digest of its manifest (content
addressed: two environments with the same ``/usr`` share one tree, and a rebuild
that changes ``/usr`` makes a new tree beside the old one).  Each tree is exported
once, read-only, at the NFSv4 pseudo path ``<nfs_export_root>/<hex>``
(:func:`pseudo_path`, the single definition boot plans use), so nodes still
running an old release keep their mount while new boots mount the new tree.

This module:

- :func:`collect_exports` — the trees the current releases use (plus, for a
  server, trees it exported before and that are still in the store);
- :func:`render_ganesha` / :func:`render_exports` — an nfs-ganesha configuration
  (the server SLIM runs, in user space) or kernel-nfsd ``/etc/exports`` lines;
- :class:`NfsServer` and :func:`serve` — a supervisor that runs ``ganesha.nfsd``,
  restarts it when it dies and re-renders its exports when the registry or a
  release changes (``slim nfs serve``); :func:`render_config` backs ``slim nfs config``.

Library code raises :class:`~slim.errors.SlimError`; only the CLI exits.  See
docs/nfs.md for the administrator's view.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from slim import listen
from slim.core.daemons.supervisor import backoff_delay, file_signature, lock_workdir, stop_signals, terminate
from slim.core.registry import HOSTNAME_RE, Registry, load_registry
from slim.core.store import Store, atomic_write
from slim.errors import FailedPrecondition, InvalidArgument, SlimError, Unavailable
from slim.vocabulary import Policy, parse_digest

log = logging.getLogger(__name__)

GANESHA = "ganesha.nfsd"
# Export_Id 0 is ganesha's NFSv4 pseudo root; 1 is kept free as well (often used by
# hand-written configurations).  Ids are 16-bit; 65000 slots leave room for both.
FIRST_EXPORT_ID = 2
EXPORT_ID_SLOTS = 65000
DEFAULT_PORT = 2049
STATE_FILE = "exports.json"  # in a server's workdir: the trees it exported, with their ids

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


def collect_exports(
    registry: Registry,
    store: Store,
    *,
    keep_ids: Mapping[str, int] | None = None,
    retain: Iterable[str] = (),
) -> ExportSet:
    """One export per distinct tree named by the ``nfs`` directories of every registry
    environment's current release.

    Environments never built, and ``nfs`` directories whose release names no tree, are
    listed in ``notes``.  A release naming a tree that is missing from the store is an
    error (:class:`FailedPrecondition`): nodes would be told to mount it.  Trees in
    ``retain`` (earlier exports of a running server) stay exported, with no users, as long
    as they are still in the store; ``keep_ids`` are ids to keep (see :func:`assign_export_ids`).
    """
    uses: dict[str, list[TreeUse]] = {}
    notes: list[str] = []
    for env in sorted(registry.environments):
        found = store.release(env)
        if found is None:
            notes.append(f"environment {env!r} has never been built; nothing of it is exported")
            continue
        release_digest, release = found
        for directory, built in sorted(release.directories.items()):
            if built.policy is not Policy.NFS:
                continue
            if built.manifest is None:
                notes.append(
                    f"environment {env!r}: release {release_digest[:19]} shares {directory} over NFS "
                    f"but names no tree; not exported (rebuild it: slim ee build {env})"
                )
                continue
            tree = built.manifest.digest
            path = store.tree_path(tree)
            if not path.is_dir():
                what = "is not a directory" if path.exists() else "is missing from the store"
                raise FailedPrecondition(
                    f"environment {env!r}, directory {directory}: release {release_digest[:19]} names "
                    f"tree {tree}, but {path} {what} (rebuild it: slim ee build {env})"
                )
            uses.setdefault(tree, []).append(TreeUse(env, directory, release_digest))
    kept: list[str] = []
    for old in sorted({f"sha256:{parse_digest(t)}" for t in retain} - set(uses)):
        if store.tree_path(old).is_dir():
            kept.append(old)
            notes.append(f"tree {old[:19]} is no current release's; still exported for nodes booted earlier")
    ids = assign_export_ids([*uses, *kept], keep_ids)
    root = registry.settings.nfs_export_root
    exports = sorted(
        (
            Export(ids[tree], tree, store.tree_path(tree).resolve(), pseudo_path(root, tree), tuple(users))
            for tree, users in [*uses.items(), *((t, []) for t in kept)]
        ),
        key=lambda e: e.export_id,
    )
    return ExportSet(root, store.trees.resolve(), tuple(exports), tuple(notes))


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


_check_bind = listen.check_bind
_check_port = listen.check_port


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
    bind = _check_bind(bind)
    port = _check_port(port)
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


def _exports_escape(path: Path) -> str:
    # exports(5): characters such as space are written as \ooo octal escapes
    return "".join(c if c.isalnum() or c in "/._-+:@,=" else f"\\{ord(c):03o}" for c in str(path))


def render_exports(exports: ExportSet, clients: Sequence[str] | None = None) -> str:
    """Kernel-nfsd ``/etc/exports`` lines for the same trees (real paths, read-only)."""
    allowed = normalize_clients(clients) or ("*",)
    root = exports.export_root.rstrip("/") or "/"
    lines = [
        "# /etc/exports for SLIM's read-only NFSv4 trees (generated by slim nfs config --format exports).",
        "# Kernel nfsd exports each tree at its real path, STORE/trees/sha256/<hex>; nodes mount",
        "# <settings.nfs_export_root>/<hex>.  Set nfs_export_root to the trees directory,",
        f"#   nfs_export_root: {exports.trees_dir}",
        "# and the path a node mounts is the real path (then run: exportfs -ra).",
    ]
    if Path(root) != exports.trees_dir:
        lines.append(
            f"# WARNING: nfs_export_root is {root}, so nodes would mount {root}/<hex>, "
            "which these exports do not serve."
        )
    lines += [f"# note: {n}" for n in exports.notes]
    for e in exports.exports:
        users = ", ".join(str(u) for u in e.used_by) or "no current release"
        fsid = "-".join((e.hex[:8], e.hex[8:12], e.hex[12:16], e.hex[16:20], e.hex[20:32]))
        options = f"ro,no_root_squash,no_subtree_check,insecure,sec=sys,fsid={fsid}"
        lines.append(f"# {e.tree}: {users}")
        lines.append(" ".join([_exports_escape(e.path), *(f"{c}({options})" for c in allowed)]))
    return "\n".join(lines) + "\n"


def render_config(
    registry_path: str | Path,
    store_root: str | Path,
    *,
    fmt: Literal["ganesha", "exports"] = "ganesha",
    workdir: str | Path | None = None,
    bind: str = "0.0.0.0",  # noqa: S104
    port: int = DEFAULT_PORT,
    clients: Sequence[str] | None = None,
) -> str:
    """What ``slim nfs config`` prints.  With ``workdir`` (a ``slim nfs serve`` work
    directory) the trees that server still exports, and their ids, are included, so the
    output is exactly the configuration that server would run."""
    if fmt not in ("ganesha", "exports"):
        raise InvalidArgument(f"unknown format {fmt!r} (ganesha or exports)")
    registry = load_registry(registry_path)
    state = _read_state(Path(workdir) / STATE_FILE) if workdir is not None else {}
    exports = collect_exports(registry, Store(store_root), keep_ids=state, retain=state)
    if fmt == "exports":
        return render_exports(exports, clients)
    return render_ganesha(
        exports, bind=bind, port=port, clients=clients, workdir=Path(workdir) if workdir else None
    )


def _read_state(path: Path) -> dict[str, int]:
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


# -- the supervisor ------------------------------------------------------------------------------------


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


class NfsServer:
    """Runs one ``ganesha.nfsd`` for a registry and a store, in its own work directory.

    The work directory holds everything of this instance: ``ganesha.conf``,
    ``ganesha.log`` (the previous run's in ``ganesha.log.1``), ``ganesha.pid``,
    ``ganesha.out`` (its stdout/stderr), ``recovery/``, ``krb5/``, ``exports.json`` (the
    trees exported and their ids, so a restarted server keeps both) and ``lock`` (held
    while the server runs: one supervisor per work directory).  Several servers with
    different work directories and ports can run on one machine.

    Methods may be called from any thread; they are serialized.  ``run()`` is the
    supervising loop.  Only the process this object started is ever signalled, by its PID.
    """

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
        self.registry_path = Path(registry_path)
        self.store = Store(store_root)
        self.workdir = Path(workdir).absolute()
        self.bind = _check_bind(bind)
        self.port = _check_port(port)
        self.clients = normalize_clients(clients)
        self.ganesha = ganesha
        self.interval = min(max(interval, 0.05), 60.0)
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self.reload_timeout = reload_timeout
        self.backoff = backoff
        self.retain_old_trees = retain_old_trees
        self.config_path = self.workdir / "ganesha.conf"
        self.log_path = self.workdir / "ganesha.log"
        self.pid_path = self.workdir / "ganesha.pid"
        self.out_path = self.workdir / "ganesha.out"
        self.state_path = self.workdir / STATE_FILE
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir_lock: IO[bytes] | None = None
        self._exports: ExportSet | None = None
        self._config: str | None = None
        self._registry: Registry | None = None
        self._registry_stat: tuple[int, int, int, int] | None = None

    # -- state ---------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The PID of the running ganesha this object started, or None."""
        with self._lock:
            proc = self._proc
            return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def exports(self) -> ExportSet | None:
        """The exports of the configuration ganesha is running (None before start)."""
        with self._lock:
            return self._exports

    @property
    def address(self) -> tuple[str, int]:
        """Where to connect to this server from this machine."""
        return _connect_host(self.bind), self.port

    # -- rendering -----------------------------------------------------------
    def render(self) -> tuple[ExportSet, str]:
        """Collect the exports now and render this server's configuration (no side effects
        beyond reading the registry file and the store)."""
        with self._lock:
            registry = self._load_registry()
            state = _read_state(self.state_path)
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

    def _commit(self, exports: ExportSet, text: str) -> None:
        self._exports, self._config = exports, text
        state = {"exports": {e.tree: e.export_id for e in exports.exports}}
        atomic_write(self.state_path, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())
        for note in exports.notes:
            log.info("nfs: %s", note)

    # -- start / stop --------------------------------------------------------
    def start(self) -> None:
        """Render the configuration into the work directory and start ganesha; return once
        it accepts TCP connections on its port.  Raises :class:`Unavailable` (quoting
        ganesha's log) if it exits or does not listen within ``start_timeout``."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            self._acquire_workdir()
            try:
                exports, text = self.render()
                atomic_write(self.config_path, text.encode())
                self._spawn()
                self._commit(exports, text)
            except BaseException:
                self.stop()
                raise

    def __enter__(self) -> NfsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop ganesha (SIGTERM, then SIGKILL after ``stop_grace`` seconds) and release
        the work directory.  Idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                self._terminate(proc)
            self._release_workdir()

    def restart(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                self._terminate(proc)
            self._spawn()

    def _acquire_workdir(self) -> None:
        if self._workdir_lock is None:
            marker = str(self.config_path)
            self._workdir_lock = lock_workdir(self.workdir, self.pid_path, marker, GANESHA, "slim nfs serve")

    def _release_workdir(self) -> None:
        f, self._workdir_lock = self._workdir_lock, None
        if f is not None:
            f.close()

    def _spawn(self) -> None:
        host, port = self.address
        if _accepts(host, port):
            raise Unavailable(f"cannot start {GANESHA}: something already listens on {host}:{port}")
        if self.log_path.exists():
            os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))
        cmd = [
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
        try:
            with self.out_path.open("ab") as out:
                # its own session: a Ctrl-C at the terminal reaches the supervisor, which
                # stops ganesha in order, and not ganesha directly
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.workdir,
                    start_new_session=True,
                )
        except FileNotFoundError:
            raise FailedPrecondition(
                f"{self.ganesha} not found: install nfs-ganesha and nfs-ganesha-vfs (apt-get install "
                "nfs-ganesha nfs-ganesha-vfs)"
            ) from None
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                rc: int | None = proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                rc = None
            if rc is not None:
                self.pid_path.unlink(missing_ok=True)
                raise Unavailable(
                    f"{GANESHA} exited with status {rc} while starting "
                    f"(log: {self.log_path}):\n{self.log_tail()}"
                )
            text = self._read_log()
            if _READY_LINE in text and _accepts(host, port):
                rejected = [_short(ln) for ln in text.splitlines() if _CONFIG_REJECTED.search(ln)]
                if rejected:
                    self._terminate(proc)
                    listed = "\n".join(f"  {ln}" for ln in rejected[-12:])
                    raise Unavailable(
                        f"{GANESHA} rejected part of {self.config_path} (log: {self.log_path}):\n{listed}"
                    )
                break
            if time.monotonic() > deadline:
                self._terminate(proc)
                raise Unavailable(
                    f"{GANESHA} did not accept connections on {host}:{port} within "
                    f"{self.start_timeout:g}s (log: {self.log_path}):\n{self.log_tail()}"
                )
        self._proc = proc
        log.info("nfs: %s running (pid %d) on %s:%d", GANESHA, proc.pid, self.bind, self.port)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        terminate(proc, self.stop_grace, f"nfs: {GANESHA}")
        self.pid_path.unlink(missing_ok=True)

    # -- reload --------------------------------------------------------------
    def reload(self) -> Literal["unchanged", "sighup", "restarted", "started"]:
        """Re-render; if the configuration changed, make ganesha use it.

        ganesha 4.3 re-reads its EXPORT blocks on SIGHUP (adds new ones, removes missing
        ones).  It cannot change an existing Export_Id's Path (the export is dropped) and,
        after an in-place Pseudo change, hangs at shutdown; nor does SIGHUP re-read core
        parameters.  So SIGHUP is used only when every Export_Id present before and after
        keeps its path and pseudo path and nothing outside the EXPORT blocks changed;
        otherwise — or if ganesha logs an error while re-reading — it is restarted.
        Raises (keeping the running configuration) if the registry or store is invalid."""
        with self._lock:
            exports, text = self.render()
            running = self._proc is not None and self._proc.poll() is None
            if running and text == self._config:
                return "unchanged"
            old, old_text = self._exports, self._config
            atomic_write(self.config_path, text.encode())
            if not running:
                self._acquire_workdir()
                self._spawn()
                self._commit(exports, text)
                return "started"
            if old is not None and old_text is not None and _sighup_safe(old, old_text, exports, text):
                if self._sighup():
                    self._commit(exports, text)
                    return "sighup"
                log.warning("nfs: %s did not re-read its exports cleanly; restarting it", GANESHA)
            self.restart()
            self._commit(exports, text)
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

    # -- logs ----------------------------------------------------------------
    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _read_log(self, offset: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 12) -> str:
        """The last lines of ganesha's log and output that say something (known harmless
        D-Bus/Kerberos/rpcbind complaints left out), shortened to component and message."""
        text = self._read_log()
        with contextlib.suppress(OSError):
            text += self.out_path.read_bytes()[-8192:].decode(errors="replace")
        useful = [ln for ln in text.splitlines() if ln.strip() and not _LOG_NOISE.search(ln)]
        # warnings and errors if there are any, else whatever it said last
        important = [ln for ln in useful if _IMPORTANT.search(ln) or "] " not in ln]
        shown = [_short(ln) for ln in (important or useful)[-lines:]]
        return "\n".join(f"  {ln}" for ln in shown) or "  (ganesha logged nothing useful)"

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

    def run(
        self,
        stop_event: threading.Event,
        *,
        reload_event: threading.Event | None = None,
        ready: Callable[[NfsServer], None] | None = None,
        full_check: float = 60.0,
    ) -> None:
        """Start ganesha (raising if that fails), then supervise it until ``stop_event``
        is set, and stop it.  Every ``interval`` seconds: if ganesha died, restart it
        after a jittered exponential backoff (``backoff`` = (first, most) seconds; reset
        once it has run for a minute); if the registry file, an environment ref or the
        trees directory changed (or ``reload_event`` is set, or every ``full_check``
        seconds anyway) re-render and :meth:`reload`.  A failed reload is logged and the
        running configuration kept.  ``ready`` is called once ganesha first listens."""
        self.start()
        try:
            if ready is not None:
                ready(self)
            self._supervise(stop_event, reload_event or threading.Event(), full_check)
        finally:
            self.stop()

    def _supervise(self, stop: threading.Event, reload_event: threading.Event, full_check: float) -> None:
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
                    log.warning(
                        "nfs: %s %s; restarting in %.1fs. Its log ends:\n%s",
                        GANESHA,
                        how,
                        delay,
                        self.log_tail(),
                    )
                    restart_at = now + delay
                if now >= restart_at:
                    failures += 1
                    try:
                        self._restart_dead()
                    except SlimError as exc:
                        restart_at = time.monotonic() + backoff_delay(self.backoff, failures)
                        log.error("nfs: restart failed (next try in %.1fs): %s", restart_at - now, exc)
                    else:
                        restart_at = None
                        up_since = time.monotonic()
                continue
            if failures and now - up_since > 60.0:
                failures = 0
            if now < next_poll and not reload_event.is_set():
                continue
            next_poll = now + self.interval
            current = self.watch_signature()
            if current == signature and not reload_event.is_set() and now - last_full < full_check:
                continue
            signature, last_full = current, now
            reload_event.clear()
            try:
                outcome = self.reload()
            except SlimError as exc:
                # an invalid registry or store: ganesha keeps its configuration; a failed
                # restart: the next tick restarts it with backoff
                log.error("nfs: reload failed: %s", exc)
                continue
            if outcome != "unchanged":
                exports = self.exports
                count = len(exports.exports) if exports else 0
                log.info("nfs: exports changed (%d trees); ganesha %s", count, outcome)

    def _restart_dead(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None:
                self._terminate(proc)  # reaps it; removes its pid file
            try:
                exports, text = self.render()
            except SlimError as exc:
                log.error("nfs: restarting with the last good configuration: %s", exc)
            else:
                atomic_write(self.config_path, text.encode())
                self._spawn()
                self._commit(exports, text)
                return
            self._spawn()


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
    """``slim nfs serve``: run and supervise ganesha until SIGTERM/SIGINT (or
    ``stop_event``), then stop it and return.  Blocks.  Called from the main thread it
    handles SIGTERM and SIGINT (stop) and SIGHUP (re-render now), restoring the previous
    handlers on return.  Raises :class:`SlimError` if ganesha cannot be started at all."""
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
    stop = stop_event if stop_event is not None else threading.Event()
    reload_event = threading.Event()
    with stop_signals(stop, reload_event):
        server.run(stop, reload_event=reload_event, ready=ready)
