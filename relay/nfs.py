"""A relay's own NFS: the read-only trees of the current releases, exported by its nfs-ganesha.

A relay run with ``--nfs-listen`` (an ISP's relay near home PCs, a remote site's) serves the
``nfs`` directories of the environments it relays itself, so a node's ``/usr`` comes over the
relay's link and not from the centre (docs/home.md, docs/relay.md):

1. every current release the core names on the heartbeat stream, and that the core signed with
   a key the relay trusts (:class:`slim.relay.warm.Warmer` checks), lists its ``nfs``
   directories' manifests;
2. a tree missing here is *materialised*: its manifest and every file object it names come
   through the relay's cache (fetched once from upstream, checked against their digests), and
   the files are written into ``NFS_DIR/trees/.new.<hex>`` with the manifest's owners, modes
   and times, each file's bytes hashed again as they are copied; the directory is renamed to
   ``NFS_DIR/trees/<hex>`` only when complete;
3. :class:`RelayNfs` runs ganesha (:class:`slim.daemons.ganesha.GaneshaServer`, work directory
   ``NFS_DIR/ganesha``) exporting every complete tree read-only at the same NFSv4 path and
   Export_Id as the centre's server (``<nfs_export_root>/<hex>``);
4. the relay's heartbeats list the trees its ganesha exports; the core sends a node's mounts to
   its site's relays only for those, and after them to the next servers (the parents', then
   the centre's), so a tree the relay is still building is mounted elsewhere meanwhile.

A tree no current release names stays exported for ``keep`` seconds (a week by default: nodes
booted earlier still use it), then it is unexported and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from slim.agent import manifest as mf
from slim.agent.tree import FILE
from slim.agent.unpack import TreeWriter, UnsafeEntry
from slim.daemons.ganesha import (
    DEFAULT_PORT,
    GANESHA,
    Export,
    ExportSet,
    GaneshaServer,
    TreeUse,
    assign_export_ids,
    pseudo_path,
)
from slim.daemons.supervisor import file_signature
from slim.errors import FailedPrecondition, NotFound, SlimError
from slim.files import atomic_write
from slim.objects.source import CachedObject
from slim.relay.fetch import CachingSource
from slim.release import Release, decode_manifest, manifest_objects
from slim.vocabulary import Policy, parse_digest

log = logging.getLogger(__name__)

DEFAULT_KEEP = 7 * 86400.0  # seconds a tree no current release names stays exported
SEEN_FILE = "trees.json"  # in NFS_DIR: when each tree was last named by a current release
ROOT_FILE = "export_root"  # in NFS_DIR: the registry's nfs_export_root, as the core last said
_TREE_RE = re.compile(r"^[0-9a-f]{64}$")


class TreeCorrupt(FailedPrecondition):
    """A cached object's bytes are not what its digest says (the relay's disk changed them)."""

    def __init__(self, message: str, hexdigest: str) -> None:
        super().__init__(message)
        self.hexdigest = hexdigest


class _Parts:
    """The bytes of one file, read from its cached objects in turn, each hashed as it is read
    and checked the moment it ends: a wrong object stops the file (:class:`TreeCorrupt`)."""

    def __init__(self, path: str, parts: Sequence[tuple[str, int, Path]]) -> None:
        self.path = path
        self.parts = list(parts)
        self.index = 0
        self.file: IO[bytes] | None = None
        self.hash = hashlib.sha256()
        self.left = 0

    def _next(self) -> bool:
        self.close()
        if self.index >= len(self.parts):
            return False
        _, size, source = self.parts[self.index]
        self.file = open(source, "rb")  # noqa: SIM115 - closed in _next/close
        self.hash = hashlib.sha256()
        self.left = size
        return True

    def read(self, n: int = -1) -> bytes:
        while self.file is None or self.left == 0:
            if self.file is not None:
                self._check()
            if not self._next():
                return b""
            if self.left == 0:
                continue
        want = self.left if n < 0 else min(n, self.left)
        assert self.file is not None
        data = self.file.read(want)
        if not data:
            hexdigest = self.parts[self.index][0]
            raise TreeCorrupt(f"{self.path}: cached object sha256:{hexdigest} is short", hexdigest)
        self.hash.update(data)
        self.left -= len(data)
        if self.left == 0:
            self._check()
        return data

    def _check(self) -> None:
        hexdigest = self.parts[self.index][0]
        if self.hash.hexdigest() != hexdigest:
            raise TreeCorrupt(
                f"{self.path}: cached object sha256:{hexdigest} does not hash to its name "
                "(the relay's cache disk changed it); it is dropped and fetched again",
                hexdigest,
            )
        self.index += 1
        self.close()
        self.file = None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _read_manifest(path: Path, hexdigest: str) -> mf.Manifest:
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != hexdigest:
        raise TreeCorrupt(f"cached manifest sha256:{hexdigest} does not hash to its name", hexdigest)
    return decode_manifest(data)


def build_tree(manifest: mf.Manifest, objects: Mapping[str, Path], trees: Path, hexdigest: str) -> Path:
    """Write the tree ``manifest`` describes into ``trees/<hexdigest>`` from the cached objects
    ``objects`` (hex -> file), atomically: into a staging directory first, renamed when whole.
    Blocking (run it off the event loop).  Raises :class:`TreeCorrupt` or
    :class:`FailedPrecondition`; nothing is left behind on failure."""
    target = trees / hexdigest
    if target.is_dir():
        return target
    staging = trees / f".new.{hexdigest}.{os.getpid()}.{threading.get_ident()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o755)
    try:
        with TreeWriter(staging) as writer:
            for m in manifest.entries:
                entry = m.entry
                if entry.kind != FILE:
                    writer.add(entry)
                    continue
                parts = []
                for h, size in mf.parts(m):
                    if h not in objects:
                        raise FailedPrecondition(
                            f"{entry.path}: object sha256:{h} is not in the relay's cache"
                        )
                    parts.append((h, size, objects[h]))
                data = _Parts(entry.path, parts)
                try:
                    writer.add(entry, data)  # type: ignore[arg-type]
                finally:
                    data.close()
            writer.finish()
        os.chmod(staging, 0o755)  # noqa: S103 - a tree every user of the node reads (the manifest lists what is below it)
        os.sync()  # the files are on disk before the name that says the tree is whole
        os.rename(staging, target)
    except UnsafeEntry as exc:
        raise FailedPrecondition(f"tree sha256:{hexdigest} cannot be written: {exc}") from None
    except OSError as exc:
        raise FailedPrecondition(f"tree sha256:{hexdigest} cannot be written in {trees}: {exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _drop(source: CachingSource, obj: CachedObject) -> None:
    """A cached object whose bytes are wrong: out of the cache, fetched again next time."""
    source.lost(obj)
    obj.path.unlink(missing_ok=True)


class TreeServer(GaneshaServer):
    """ganesha exporting the complete trees in ``trees`` (named by their manifests' hex
    digests), at the export root the core names; :class:`RelayNfs` says who uses which."""

    owner = "slim relay serve --nfs-listen"

    def __init__(self, trees: Path, workdir: Path, **kwargs: Any) -> None:
        super().__init__(trees, workdir, retain_old_trees=False, **kwargs)
        self.trees = trees
        self.export_root = "/slim"
        self.users: dict[str, tuple[TreeUse, ...]] = {}  # hex -> users: the trees the current releases want
        self.generation = 0  # bumped when export_root or users change

    def complete(self) -> list[str]:
        try:
            return sorted(p.name for p in self.trees.iterdir() if _TREE_RE.match(p.name) and p.is_dir())
        except OSError:
            return []

    def collect(self, keep_ids: Mapping[str, int], retain: Iterable[str]) -> ExportSet:
        trees = self.complete()
        ids = assign_export_ids(trees, keep_ids)
        exports = []
        for hexdigest in trees:
            tree = f"sha256:{hexdigest}"
            exports.append(
                Export(
                    ids[tree],
                    tree,
                    (self.trees / hexdigest).resolve(),
                    pseudo_path(self.export_root, tree),
                    self.users.get(hexdigest, ()),
                )
            )
        exports.sort(key=lambda e: e.export_id)
        return ExportSet(self.export_root, self.trees.resolve(), tuple(exports))

    def watch_signature(self) -> tuple[object, ...]:
        return (file_signature(self.trees), self.generation)


class RelayNfs:
    """Materialises the current releases' NFS trees and keeps the relay's ganesha exporting
    them.  Lives on the relay's event loop; ganesha's supervisor runs on a thread of its own."""

    def __init__(
        self,
        source: CachingSource,
        root: Path,
        *,
        bind: str = "0.0.0.0",  # noqa: S104
        port: int = DEFAULT_PORT,
        clients: Sequence[str] | None = None,
        concurrency: int = 8,
        keep: float = DEFAULT_KEEP,
        ganesha: str = GANESHA,
    ) -> None:
        self.source = source
        self.root = root
        self.trees = root / "trees"
        self.concurrency = concurrency
        self.keep = keep
        self.server = TreeServer(
            self.trees, root / "ganesha", bind=bind, port=port, clients=clients, ganesha=ganesha
        )
        self.failed: dict[str, str] = {}  # hex -> why its last build failed
        self._building: asyncio.Task[None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, float] = {}

    # -- life ---------------------------------------------------------------
    def start(self) -> None:
        """Blocking (files, then ganesha's start): run it off the event loop.  Drops staging
        directories an earlier run left, starts ganesha with the complete trees, and its
        supervisor on a thread."""
        self.trees.mkdir(parents=True, exist_ok=True)
        for leftover in [*self.trees.glob(".new.*"), *self.trees.glob(".old.*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        self._seen = self._read_seen()
        with contextlib.suppress(OSError, UnicodeDecodeError):
            root = (self.root / ROOT_FILE).read_text().strip()
            if root.startswith("/"):
                self.server.export_root = root  # until the core says otherwise
        self.server.start()
        self._thread = threading.Thread(target=self._supervise, name="relay nfs", daemon=True)
        self._thread.start()

    def _supervise(self) -> None:
        try:
            self.server.run(self._stop)
        except SlimError as exc:
            log.error("nfs: %s", exc.message)

    async def stop(self) -> None:
        if self._building is not None:
            self._building.cancel()
            await asyncio.gather(self._building, return_exceptions=True)
        self._stop.set()
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        await asyncio.get_running_loop().run_in_executor(None, self.server.stop)

    # -- what to export -----------------------------------------------------
    def exported(self) -> list[str]:
        """The trees ganesha exports now ("sha256:<hex>"), for the heartbeat."""
        return list(self.server.serving())

    def set_releases(self, releases: Sequence[tuple[str, Release]], export_root: str) -> None:
        """The current releases whose signatures checked (the warmer's), and the registry's
        export root: build what is missing, then drop what has been unused for ``keep``."""
        wanted: dict[str, list[TreeUse]] = {}
        for digest, release in releases:
            for directory, built in sorted(release.directories.items()):
                if built.policy is Policy.NFS and built.manifest is not None:
                    hexdigest = parse_digest(built.manifest.digest)
                    wanted.setdefault(hexdigest, []).append(TreeUse(release.environment, directory, digest))
        users = {h: tuple(u) for h, u in wanted.items()}
        moved = bool(export_root) and export_root != self.server.export_root
        if moved:
            atomic_write(self.root / ROOT_FILE, (export_root + "\n").encode())
            self.server.export_root = export_root
        if moved or users != self.server.users:
            self.server.users = users
            self.server.generation += 1
        if self._building is None or self._building.done():
            self._building = asyncio.get_running_loop().create_task(self._work(), name="nfs trees")

    async def _work(self) -> None:
        for hexdigest in list(self.server.users):
            if (self.trees / hexdigest).is_dir():
                continue
            try:
                await self._materialise(hexdigest)
                self.failed.pop(hexdigest, None)
            except SlimError as exc:
                if self.failed.get(hexdigest) != exc.message:
                    log.warning("nfs: tree sha256:%s not built: %s", hexdigest, exc.message)
                self.failed[hexdigest] = exc.message
        await asyncio.get_running_loop().run_in_executor(None, self._prune)

    async def _materialise(self, hexdigest: str) -> None:
        started = time.monotonic()
        source = self.source
        await source.ensure(hexdigest)
        held = []
        try:
            obj = source.acquire(hexdigest)
            if obj is None:
                raise FailedPrecondition(f"manifest sha256:{hexdigest} left the cache while being read")
            held.append(obj)
            loop = asyncio.get_running_loop()
            try:
                manifest = await loop.run_in_executor(None, _read_manifest, obj.path, hexdigest)
            except TreeCorrupt:
                _drop(source, obj)
                raise
            named = manifest_objects(manifest)
            queue = list(reversed(named))
            paths: dict[str, Path] = {}
            fetched = 0

            async def worker() -> None:
                nonlocal fetched
                while queue:
                    item = queue.pop()
                    size, new = await source.ensure(item.hex)
                    got = source.acquire(item.hex)
                    if got is None:
                        raise FailedPrecondition(
                            f"object sha256:{item.hex} left the cache at once: the relay's cache budget "
                            f"(--max-bytes) is smaller than tree sha256:{hexdigest[:12]}"
                        )
                    held.append(got)
                    paths[item.hex] = got.path
                    fetched += size if new else 0

            try:
                async with asyncio.TaskGroup() as group:  # one failure cancels the other workers
                    for _ in range(min(self.concurrency, len(named)) or 1):
                        group.create_task(worker())
            except BaseExceptionGroup as failed:
                first = failed.exceptions[0]
                if isinstance(first, SlimError):
                    raise FailedPrecondition(
                        f"{first.message} (a release built before a relay of the registry had nfs: "
                        "stores no objects for its nfs files: build it again)"
                        if isinstance(first, NotFound)
                        else first.message
                    ) from None
                raise first from None
            try:
                await loop.run_in_executor(None, build_tree, manifest, paths, self.trees, hexdigest)
            except TreeCorrupt as exc:
                for o in held:
                    if o.hex == exc.hexdigest:
                        _drop(source, o)
                raise
            log.info(
                "nfs: tree sha256:%s built: %d files, %d bytes (%d fetched) in %.1f s",
                hexdigest[:12],
                manifest.files,
                manifest.bytes,
                fetched,
                time.monotonic() - started,
            )
        finally:
            for o in held:
                source.release(o)
        await asyncio.get_running_loop().run_in_executor(None, self.server.reload)

    # -- old trees ----------------------------------------------------------
    def _read_seen(self) -> dict[str, float]:
        try:
            data = json.loads((self.root / SEEN_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return {k: float(v) for k, v in data.items() if _TREE_RE.match(k) and isinstance(v, int | float)}

    def _prune(self) -> None:
        """Blocking.  Note when each tree was last wanted; unexport and remove those unwanted
        for longer than ``keep``."""
        now = time.time()
        for hexdigest in self.server.users:
            self._seen[hexdigest] = now
        old = [h for h in self.server.complete() if now - self._seen.setdefault(h, now) > self.keep]
        if old:
            for h in old:
                os.rename(self.trees / h, self.trees / f".old.{h}")
            self.server.reload()
            for h in old:
                shutil.rmtree(self.trees / f".old.{h}", ignore_errors=True)
                self._seen.pop(h, None)
                log.info("nfs: tree sha256:%s removed (no current release for %.0f s)", h[:12], self.keep)
        atomic_write(self.root / SEEN_FILE, (json.dumps(self._seen, sort_keys=True) + "\n").encode())
