"""NFS exports: which read-only trees are exported, and the configurations that export them.

A directory whose policy is ``nfs`` is built into a read-only tree in the store,
``STORE/trees/sha256/<hex>``, named by the digest of its manifest (content
addressed: two environments with the same ``/usr`` share one tree, and a rebuild
that changes ``/usr`` makes a new tree beside the old one).  Each tree is exported
once, read-only, at the NFSv4 pseudo path ``<nfs_export_root>/<hex>``
(:func:`pseudo_path`, the single definition boot plans use), so nodes still
running an old release keep their mount while new boots mount the new tree.

This module is pure (it reads the registry, the store and a server's state file, and
runs nothing):

- :func:`collect_exports` — the trees the current releases use (plus, for a
  server, trees it exported before and that are still in the store);
- :func:`render_ganesha` / :func:`render_exports` — an nfs-ganesha configuration
  (the server SLIM runs, in user space) or kernel-nfsd ``/etc/exports`` lines;
  :func:`render_config` backs ``slim nfs config``.

:mod:`slim.core.daemons.ganesha` runs and supervises ``ganesha.nfsd`` with them
(``slim nfs serve``).  Library code raises :class:`~slim.errors.SlimError`; only the
CLI exits.  See docs/nfs.md for the administrator's view.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from slim import listen
from slim.core.registry import Registry, load_registry
from slim.core.store import Store
from slim.errors import FailedPrecondition, InvalidArgument, SlimError
from slim.vocabulary import HOSTNAME_RE, Policy, parse_digest

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
    state = read_state(Path(workdir) / STATE_FILE) if workdir is not None else {}
    exports = collect_exports(registry, Store(store_root), keep_ids=state, retain=state)
    if fmt == "exports":
        return render_exports(exports, clients)
    return render_ganesha(
        exports, bind=bind, port=port, clients=clients, workdir=Path(workdir) if workdir else None
    )


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
