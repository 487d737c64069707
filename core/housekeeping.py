"""The store's garbage collection (``slim store gc``): what no kept release uses goes.

Kept, for each environment with a ref: its current release and the ``previous`` releases
its ref pointed at before (the store's release history, ``refs/history/<name>``; a store
from before the history keeps only the current one); and every release a node booted in
its last boot of record (the core's state: :func:`slim.core.control.state.booted_releases`).
A kept release keeps its document, kernel, initrd, archives, manifests, the file objects
of its ``sync`` directories and the trees of its ``nfs`` directories (and their file objects,
where a build stored them for relays that export NFS).  Everything else in
``objects/sha256`` and ``trees/sha256`` goes, unless it is younger than ``min_age``.

It never races a build: it holds the store's lock exclusively (builds hold it shared,
:meth:`Store.locked`), and the minimum age protects writers that do not take the lock.
A tree is renamed out of the way first (into a ``.gc.*`` directory), so it disappears at
once and ``slim nfs serve`` stops exporting it at its next poll; what a crashed run left
(``.gc.*``, and a writer's ``.new.*`` older than the minimum age) goes at the next run.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from slim.core.store import Store
from slim.errors import FailedPrecondition, InvalidArgument, NotFound, SlimError
from slim.release import decode_manifest, manifest_objects
from slim.vocabulary import HEX_RE, Policy, parse_digest

DEFAULT_KEEP_PREVIOUS = 2
DEFAULT_MIN_AGE = 3600.0  # seconds


@dataclass(frozen=True)
class Garbage:
    """One object or tree that goes (or, in a dry run, would go)."""

    kind: Literal["object", "tree"]
    digest: str  # "sha256:<hex>"
    bytes: int  # its size (a tree: the sizes of its files, each inode once)


@dataclass
class Collection:
    """What a collection kept and removed."""

    dry_run: bool
    kept_releases: dict[str, list[str]] = field(default_factory=dict)  # environment -> digests
    booted: dict[str, str] = field(default_factory=dict)  # node -> release digest
    kept_objects: int = 0
    kept_trees: int = 0
    young: int = 0  # unreferenced but younger than the minimum age: left
    removed: list[Garbage] = field(default_factory=list)  # (would be) removed
    notes: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(g.bytes for g in self.removed)

    def count(self, kind: str) -> int:
        return sum(1 for g in self.removed if g.kind == kind)


def collect_garbage(
    store: Store,
    *,
    keep_previous: int = DEFAULT_KEEP_PREVIOUS,
    booted: Mapping[str, str] | None = None,
    min_age: float = DEFAULT_MIN_AGE,
    dry_run: bool = False,
    wait: float | None = 0.0,
    now: float | None = None,
) -> Collection:
    """Remove (or, with ``dry_run``, list) the objects and trees of ``store`` that no kept
    release uses.  ``booted``: node → the release of its last boot of record (kept too).
    ``wait``: seconds to wait for builds holding the store's lock (None: as long as it
    takes), then :class:`~slim.errors.Unavailable`."""
    if not store.root.is_dir():
        raise NotFound(f"the store {store.root} does not exist (give --store, or build first: slim ee build)")
    if not (store.root / "objects").is_dir() and not (store.root / "refs").is_dir():
        raise FailedPrecondition(f"{store.root} is not a SLIM store (it has no objects/ and no refs/)")
    if min_age < 0:
        raise InvalidArgument(f"the minimum age must be 0 or more seconds, not {min_age}")
    result = Collection(dry_run=dry_run, booted=dict(booted or {}))
    with store.locked(exclusive=True, wait=wait):
        objects, trees = _live(store, keep_previous, result)
        result.kept_objects, result.kept_trees = len(objects), len(trees)
        cutoff = (time.time() if now is None else now) - min_age
        if not dry_run:
            _leftovers(store, cutoff, result)
        for kind, directory, live in (("object", store.objects, objects), ("tree", store.trees, trees)):
            for hexdigest, st in _entries(directory):
                if hexdigest in live:
                    continue
                if max(st.st_mtime, st.st_ctime) > cutoff:
                    result.young += 1
                    continue
                path = directory / hexdigest
                # objects are files and trees directories; anything else under such a name
                # (a link, say) is removed as itself and never followed
                as_tree = kind == "tree" and stat.S_ISDIR(st.st_mode)
                size = _tree_bytes(path) if as_tree else st.st_size
                try:
                    if not dry_run:
                        _remove_tree(path) if as_tree else path.unlink(missing_ok=True)
                except OSError as exc:
                    result.notes.append(f"{kind} sha256:{hexdigest} could not be removed: {exc}")
                    continue
                result.removed.append(Garbage(kind, f"sha256:{hexdigest}", size))  # type: ignore[arg-type]
    return result


def _leftovers(store: Store, cutoff: float, result: Collection) -> None:
    """Remove what crashed runs left: trees a collection was deleting (``.gc.*``) and a
    writer's temporary files older than the cutoff (``.new.*``)."""
    for directory in (store.objects, store.trees):
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            path = directory / name
            try:
                st = path.lstat()
                if not (name.startswith(".gc.") or (name.startswith(".new.") and st.st_mtime <= cutoff)):
                    continue
                if stat.S_ISDIR(st.st_mode):
                    _delete_tree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                result.notes.append(f"leftover {path} could not be removed: {exc}")
                continue
            result.notes.append(f"removed a crashed run's leftover {path.name}")


def _live(store: Store, keep_previous: int, result: Collection) -> tuple[set[str], set[str]]:
    """The hex digests of every object and tree a kept release uses."""
    roots: dict[str, str] = {}  # release digest -> why it is kept
    for env in store.environments():
        kept = store.kept_releases(env, keep_previous)
        result.kept_releases[env] = kept
        for i, digest in enumerate(kept):
            roots.setdefault(digest, f"environment {env!r}" + ("" if i == 0 else " (previous)"))
    for node, digest in sorted(result.booted.items()):
        roots.setdefault(digest, f"node {node}'s last boot")
    objects: set[str] = set()
    trees: set[str] = set()
    for digest, why in roots.items():
        try:
            release = store.read_release(digest, f" ({why})")
        except NotFound:
            if why.startswith("environment") and "(previous)" not in why:
                raise FailedPrecondition(
                    f"the current release {digest} of {why} is missing from the store {store.root}; "
                    "nothing collected (rebuild it first: slim ee build)"
                ) from None
            result.notes.append(f"release {digest[:19]} of {why} is no longer in the store")
            continue
        objects.add(parse_digest(digest))
        objects.update(parse_digest(ref.digest) for ref in release.objects())
        for path, built in release.directories.items():
            if built.manifest is None:
                continue
            if built.policy is Policy.NFS:
                trees.add(parse_digest(built.manifest.digest))
            if built.policy in (Policy.NFS, Policy.SYNC):  # nfs: the files relays build their trees from
                try:
                    manifest = decode_manifest(store.read_object(built.manifest.digest))
                except SlimError as exc:
                    raise FailedPrecondition(
                        f"release {digest[:19]} of {why}: the manifest of {path} cannot be read "
                        f"({exc.message}); nothing collected"
                    ) from None
                objects.update(named.hex for named in manifest_objects(manifest))
    return objects, trees


def _entries(directory: Path) -> list[tuple[str, os.stat_result]]:
    """(hex, lstat) of each digest-named entry (temporary files are a writer's)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for name in sorted(names):
        if HEX_RE.fullmatch(name):
            try:
                out.append((name, (directory / name).lstat()))
            except FileNotFoundError:
                continue
    return out


def _tree_bytes(path: Path) -> int:
    """The bytes of a tree's files, each inode once (hard links share theirs)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for parent, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(parent, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _remove_tree(path: Path) -> None:
    """Rename the tree out of its name (it disappears at once), then delete it."""
    doomed = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".gc.{path.name[:12]}."))
    os.rename(path, doomed / "tree")
    _delete_tree(doomed)


def _delete_tree(doomed: Path) -> None:
    """Delete a tree whose read-only directories are made writable first (links are not
    followed)."""
    for parent, dirs, _files in os.walk(doomed):
        for name in [".", *dirs]:
            d = os.path.join(parent, name)
            if not os.path.islink(d):
                os.chmod(d, stat.S_IMODE(os.lstat(d).st_mode) | stat.S_IRWXU)
    shutil.rmtree(doomed)
