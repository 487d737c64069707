"""NFS exports of the store: which read-only trees the core exports, and their configurations.

A directory whose policy is ``nfs`` is built into a read-only tree in the store,
``STORE/trees/sha256/<hex>``, named by the digest of its manifest (content
addressed: two environments with the same ``/usr`` share one tree, and a rebuild
that changes ``/usr`` makes a new tree beside the old one).  Each tree is exported
once, read-only, at the NFSv4 pseudo path ``<nfs_export_root>/<hex>``
(:func:`slim.daemons.ganesha.pseudo_path`, the single definition boot plans and relays use),
so nodes still running an old release keep their mount while new boots mount the new tree.

This module is pure (it reads the registry, the store and a server's state file, and
runs nothing):

- :func:`collect_exports` — the trees the current releases use (plus, for a
  server, trees it exported before and that are still in the store);
- :func:`render_exports` — kernel-nfsd ``/etc/exports`` lines, and :func:`render_config`
  (``slim nfs config``), which renders those or nfs-ganesha's configuration
  (:func:`slim.daemons.ganesha.render_ganesha`).

:mod:`slim.core.daemons.ganesha` runs and supervises ``ganesha.nfsd`` with them
(``slim nfs serve``).  Library code raises :class:`~slim.errors.SlimError`; only the
CLI exits.  See docs/nfs.md for the administrator's view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from slim.core.registry import Registry, load_registry
from slim.core.store import Store
from slim.daemons.ganesha import (
    DEFAULT_PORT,
    STATE_FILE,
    Export,
    ExportSet,
    TreeUse,
    assign_export_ids,
    normalize_clients,
    pseudo_path,
    read_state,
    render_ganesha,
)
from slim.errors import FailedPrecondition, InvalidArgument
from slim.vocabulary import Policy, parse_digest


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
