"""``slim ee build``: an EE image → content-addressed objects and a release.

For each directory of the environment (registry ``directories``, with ``/``
standing for everything not listed):

- ``ram``, ``disk``, ``sync``: a copy-set archive (tar + zstd, deterministic)
  and a manifest; ``sync`` also stores every file (or, above 4 MiB, every
  content-defined piece of 16-256 KiB: slim.core.build.copyset) as an object so
  copy-if-needed fetches only what changed;
- ``nfs``: a manifest and the read-only tree for NFS export,
  ``trees/sha256/<manifest digest>``, copied once; where a relay exports NFS trees
  of its own (registry ``relays.NAME.nfs``), every file as an object too, which
  such relays build their copies from.

Plus the kernel (from the image) and an initrd holding the image's own kernel
modules for every hardware profile.  Every object is named by its SHA-256, so
rebuilding an unchanged image writes no new object and keeps the release.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from slim.agent import manifest as mf
from slim.agent.plan import parse_cmdline
from slim.agent.tree import FILE, Entry, ScanReport, scan
from slim.agent.unpack import UnsafeEntry, copy_root_meta, copy_tree, nofollow
from slim.core.build import copyset
from slim.core.build.agentrt import Runtime, add_runtime
from slim.core.build.deltas import make_deltas, previous_manifests, raw_digest
from slim.core.build.initrd import (
    InitrdBuilder,
    InitrdInfo,
    kernel_release,
    kernel_warnings,
    resolve_in_image,
    resolve_modules,
)
from slim.core.registry import Registry
from slim.core.store import Store
from slim.errors import FailedPrecondition, InvalidArgument, NotFound, Problem, SlimError
from slim.release import (
    ManifestDelta,
    ObjectRef,
    Release,
    ReleaseDirectory,
    compress_manifest,
    decode_manifest,
)
from slim.signing import SigningKey, verify
from slim.vocabulary import Policy

# Modules every initrd carries when the kernel has them (the agent mounts NFS
# and may overlay a read-only tree), beside each hardware profile's own.
# ext4 also mounts the ext2 the agent makes on blank disks; it asks the crypto API for
# crc32c at mount time (not a modules.dep dependency), so that comes too.
EXTRA_MODULES = ("nfsv4", "overlay", "ext4", "crc32c_generic")

Progress = Callable[[str, int, int], None]  # (what, done, total) in bytes; total 0 when unknown


@dataclass
class DirectoryReport:
    path: str
    policy: Policy
    files: int
    bytes: int
    archive: ObjectRef | None = None
    parts: tuple[ObjectRef, ...] = ()  # the archive's, when it has more than one
    manifest: ObjectRef | None = None
    file_objects: int = 0  # sync: objects the node may fetch one by one
    deltas: int = 0  # sync: deltas of the manifest from previous releases' (slim.core.build.deltas)
    tree: str = ""  # nfs: the exported tree
    seconds: float = 0.0


@dataclass
class BuildResult:
    environment: str
    digest: str
    release: Release
    unchanged: bool  # the release equals the current one: nothing was published
    new_objects: int
    kernel_release: str
    initrd: InitrdInfo
    directories: list[DirectoryReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the release may not boot: e.g. a stand-in kernel
    seconds: float = 0.0


def image_directory(image: Path, path: str) -> Path:
    """``path`` of the environment inside ``image``: a real directory, reached without
    following symlinks (a merged-usr ``/lib -> usr/lib`` must be listed as /usr/lib)."""
    current = image
    for part in [p for p in path.split("/") if p]:
        current = current / part
        try:
            st = current.lstat()
        except FileNotFoundError:
            raise FailedPrecondition(f"the image {image} has no {path}") from None
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(current)
            raise FailedPrecondition(
                f"{path} in the image {image} is a symlink to {target}; list the directory it points to"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"{path} in the image {image} is not a directory")
    return current


def _pruned(path: str, others: list[str]) -> list[str]:
    """The other directories below ``path``, relative to it (their contents belong to
    their own policy)."""
    prefix = "/" if path == "/" else path + "/"
    return [o[len(prefix) :] for o in others if o != path and o.startswith(prefix)]


DEFAULT_INIT = "/sbin/init"


def init_of(kernel_args: str) -> str:
    """The init an environment's nodes start after switch_root: ``slim.init=`` in its kernel
    arguments (the last one, as the agent reads them), else /sbin/init."""
    return parse_cmdline(kernel_args).get("slim.init") or DEFAULT_INIT


def check_init(name: str, image: Path, kernel_args: str) -> str:
    """The environment's init, which must be an executable file in the image (after links,
    as in the image): without it a node reaches switch_root and the kernel panics."""
    init = init_of(kernel_args)
    if not init.startswith("/"):
        raise FailedPrecondition(f"environment {name!r}: slim.init={init!r} is not an absolute path")
    found = resolve_in_image(image, init)
    named = "its init" if init == DEFAULT_INIT else f"its init (slim.init={init})"
    if not found.is_file():
        raise FailedPrecondition(
            f"environment {name!r}: {named} is missing in image {image}, so it would not boot. "
            "Add an init system to the image (slim ee import --from debootstrap:SUITE installs "
            "systemd-sysv by default; in a chroot: apt-get install systemd-sysv), or name the "
            "program to start with slim.init=PATH in the environment's kernel_args"
        )
    if not os.access(found, os.X_OK) or not found.stat().st_mode & 0o111:
        raise FailedPrecondition(
            f"environment {name!r}: {named} in image {image} is not executable (chmod +x {found})"
        )
    return init


def _signed_by(store: Store, name: str, digest: str, signer: SigningKey) -> bool:
    """Whether the environment's current release carries ``signer``'s signature."""
    signature = store.release_signature(name)
    if not signature:
        return False
    try:
        verify(store.read_object(digest), signature, [signer.public], "release")
    except SlimError:
        return False
    return True


def build_environment(
    registry: Registry,
    store: Store,
    name: str,
    *,
    level: int = copyset.DEFAULT_LEVEL,
    progress: Progress | None = None,
    runtime: Runtime | None = None,
    signer: SigningKey | None = None,
) -> BuildResult:
    """Build environment ``name`` into ``store`` and publish its release.  With
    ``runtime`` the initrd also carries the agent and what it runs on
    (:mod:`slim.core.build.agentrt`); without it, only the kernel modules.  With
    ``signer`` (the core's key) the release is signed: relays pin and warm only signed
    releases.  The store's lock is held (shared) throughout: ``slim store gc`` never
    removes what a build is writing and has not published yet."""
    with store.locked(exclusive=False):
        return _build(registry, store, name, level=level, progress=progress, runtime=runtime, signer=signer)


def _build(
    registry: Registry,
    store: Store,
    name: str,
    *,
    level: int,
    progress: Progress | None,
    runtime: Runtime | None,
    signer: SigningKey | None = None,
) -> BuildResult:
    started = time.monotonic()
    env = registry.environment(name)
    image = Path(env.image)
    if not image.is_dir():
        raise FailedPrecondition(
            f"the image of environment {name!r}, {image}, does not exist; "
            f"import one with: slim ee import {name} --from DIR|TARBALL|debootstrap:SUITE"
        )
    check_init(name, image, env.kernel_args)
    # the kernel and the profiles' modules first: a module name the kernel lacks fails
    # here, not after the directories (slim registry check finds it earlier still)
    kernel_path = resolve_in_image(image, env.kernel)
    kver = kernel_release(image, env.kernel)
    modules = _initrd_modules(registry, image, kver)
    warnings = kernel_warnings(image, env.kernel, kver) + (runtime.warnings if runtime is not None else [])
    before = store.count_objects()
    directories = registry.directories(name)
    paths = list(directories)
    reports: list[DirectoryReport] = []
    built: dict[str, ReleaseDirectory] = {}
    notes: list[str] = []
    for path, spec in directories.items():
        t0 = time.monotonic()
        root = image_directory(image, path)
        scan_report = ScanReport()
        entries = list(scan(root, prune=_pruned(path, paths), report=scan_report))
        if scan_report.sockets:
            notes.append(f"{path}: {len(scan_report.sockets)} socket(s) left out (no archive keeps sockets)")
        if scan_report.other_filesystems:
            notes.append(f"{path}: mounted file systems left out: {', '.join(scan_report.other_filesystems)}")
        total = sum(e.size for e in entries if e.kind == FILE)
        tick = ticker(progress, f"{name} {path} ({spec.policy})", total)
        report = DirectoryReport(path, spec.policy, files=0, bytes=total)
        if spec.policy is Policy.NFS:
            items = copyset.hash_tree(root, entries, tick)
        else:
            parts: list[copyset.Part] = []
            with store.writer() as w:
                items = copyset.write_archive(root, entries, w, level, tick, parts)  # type: ignore[arg-type]
            report.archive = w.ref
            report.parts = (
                tuple(ObjectRef(digest=p.digest, size=p.size) for p in parts) if len(parts) > 1 else ()
            )
        manifest = mf.make(path, items)
        report.files = manifest.files
        raw = mf.encode(manifest)
        with store.writer() as w:
            w.write(compress_manifest(raw))
        report.manifest = w.ref
        assert report.manifest is not None
        deltas: tuple[ManifestDelta, ...] = ()
        if spec.policy is Policy.SYNC:
            report.file_objects = _store_files(store, root, items)
            deltas = make_deltas(store, previous_manifests(store, name, path), raw, report.manifest.size)
            report.deltas = len(deltas)
        elif spec.policy is Policy.NFS:
            report.tree = str(_materialize_tree(store, root, entries, report.manifest.digest))
            if registry.relays_export_nfs:  # relays build their own copies of the tree from these
                report.file_objects = _store_files(store, root, items)
        report.seconds = time.monotonic() - t0
        reports.append(report)
        built[path] = ReleaseDirectory(
            policy=spec.policy,
            archive=report.archive,
            manifest=report.manifest,
            manifest_raw=raw_digest(raw),
            deltas=deltas,
            bytes=report.bytes,
            files=report.files,
            parts=report.parts,
        )

    kernel_ref, _ = store.put_file(kernel_path)
    initrd_builder = InitrdBuilder()
    initrd_builder.add_modules(image, kver, modules)
    if runtime is not None:
        add_runtime(initrd_builder, runtime)
    with store.writer() as w:
        initrd_info = initrd_builder.write(w)  # type: ignore[arg-type]
    assert w.ref is not None
    initrd_ref = w.ref

    release = Release(
        environment=name,
        kernel=kernel_ref,
        initrd=initrd_ref,
        directories=built,
        kernel_release=kver,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    current = store.release(name)
    if current is not None and _same(current[1], release):
        digest, release, unchanged = current[0], current[1], True
        if signer is not None and not _signed_by(store, name, digest, signer):
            store.publish_release(release, signer)  # the same document, signed (by this key)
    else:
        digest, unchanged = store.publish_release(release, signer), False
    return BuildResult(
        environment=name,
        digest=digest,
        release=release,
        unchanged=unchanged,
        new_objects=store.count_objects() - before,
        kernel_release=kver,
        initrd=initrd_info,
        directories=reports,
        notes=notes,
        warnings=warnings,
        seconds=time.monotonic() - started,
    )


def _same(a: Release, b: Release) -> bool:
    """The same release but for its time and its manifests' deltas (which depend on the
    releases before it, not on the image)."""

    def plain(r: Release) -> Release:
        dirs = {p: d.model_copy(update={"deltas": ()}) for p, d in r.directories.items()}
        return r.model_copy(update={"created": "", "directories": dirs})

    return plain(a) == plain(b)


def ticker(progress: Progress | None, what: str, total: int) -> Callable[[int], None] | None:
    """A per-step ``done`` callback for ``progress(what, done, total)`` (None without one)."""
    if progress is None:
        return None
    progress(what, 0, total)
    return lambda done: progress(what, done, total)


def _initrd_modules(registry: Registry, image: Path, kver: str) -> list[str]:
    """Every hardware profile's modules (checked: an unknown name is NotFound naming the
    closest), plus EXTRA_MODULES the kernel has as modules."""
    wanted = sorted({m for p in registry.profiles.values() for m in p.modules})
    moddir = resolve_in_image(image, f"/lib/modules/{kver}")
    resolve_modules(moddir, wanted)
    for extra in EXTRA_MODULES:
        try:
            if resolve_modules(moddir, [extra]).modules and extra not in wanted:
                wanted.append(extra)
        except NotFound:
            pass  # built in, or not in this kernel at all
    return wanted


def _store_files(store: Store, root: Path, items: list[mf.ManifestEntry]) -> int:
    """Store each file of a copy-if-needed directory (whole, or in chunks); returns the
    number of objects the manifest names."""
    count = 0
    for item in items:
        if item.entry.kind != FILE:
            continue
        path = root / item.entry.path
        if not item.chunks:
            store.put_file(path, expect=f"sha256:{item.sha256}")
            count += 1
            continue
        with open(path, "rb", opener=nofollow) as f:
            for chunk_hex, size in mf.parts(item):
                data = f.read(size)
                if not store.has(f"sha256:{chunk_hex}"):
                    ref = store.put_bytes(data)
                    if ref.digest != f"sha256:{chunk_hex}":
                        raise FailedPrecondition(f"{path} changed while it was being stored; build again")
                count += 1
    return count


def _materialize_tree(store: Store, root: Path, entries: list[Entry], manifest_digest: str) -> Path:
    """The directory's read-only copy for NFS export, made once per manifest digest."""
    target = store.tree_path(manifest_digest)
    if target.is_dir():
        return target
    store.trees.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=store.trees, prefix=".new."))
    try:
        copy_tree(root, entries, staging)
        copy_root_meta(root, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # another build made the same tree meanwhile: keep that one
                raise
    except UnsafeEntry as exc:
        raise FailedPrecondition(f"cannot copy {root} for NFS export: {exc}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class VerifyReport:
    objects: int = 0
    bytes: int = 0
    trees: int = 0
    problems: list[str] = field(default_factory=list)


def verify_release(store: Store, release: Release) -> VerifyReport:
    """Re-hash every object a release names (kernel, initrd, archives, manifests, the
    file objects of copy-if-needed directories) and check each NFS tree against its
    manifest; problems are collected, not raised."""
    report = VerifyReport()
    seen: set[str] = set()

    def check(digest: str, what: str) -> bool:
        if digest in seen:
            return True
        seen.add(digest)
        try:
            report.bytes += store.verify_object(digest)
        except SlimError as exc:
            report.problems.append(f"{what}: {exc.message}")
            return False
        report.objects += 1
        return True

    check(release.kernel.digest, "kernel")
    check(release.initrd.digest, "initrd")
    for path, built in release.directories.items():
        if built.archive is not None:
            check(built.archive.digest, f"{path} archive")
        if built.manifest is None or not check(built.manifest.digest, f"{path} manifest"):
            continue
        try:
            manifest = decode_manifest(store.read_object(built.manifest.digest))
        except InvalidArgument as exc:
            report.problems.append(f"{path} manifest: {exc.message}")
            continue
        if built.policy is Policy.SYNC:
            for item in manifest.entries:
                for hexdigest in item.chunks or ((item.sha256,) if item.entry.kind == FILE else ()):
                    check(f"sha256:{hexdigest}", f"{path}/{item.entry.path}")
        elif built.policy is Policy.NFS:
            tree = store.tree_path(built.manifest.digest)
            if not tree.is_dir():
                report.problems.append(f"{path}: the NFS tree {tree} is missing")
                continue
            try:
                actual = copyset.hash_tree(tree, scan(tree))
            except (OSError, SlimError) as exc:
                report.problems.append(f"{path}: the NFS tree {tree} cannot be read: {exc}")
                continue
            if tuple(actual) != manifest.entries:
                report.problems.append(f"{path}: the NFS tree {tree} differs from its manifest")
            report.trees += 1
    return report


# --- slim registry check: the profiles' modules against the images' kernels ------------------


@dataclass
class ModuleCheck:
    """What :func:`check_profile_modules` found."""

    problems: list[Problem] = field(default_factory=list)  # what a build would refuse
    checked: dict[str, str] = field(default_factory=dict)  # environment → kernel release
    skipped: dict[str, str] = field(default_factory=dict)  # environment → why its kernel was not checked


def check_profile_modules(registry: Registry) -> ModuleCheck:
    """Every hardware profile's modules against the kernel of every environment whose image
    has one, read as modprobe reads them (``-`` and ``_`` alike, built-in modules and
    aliases count).  Every profile against every environment, because that is what a build
    does: each initrd carries every profile's modules (a node may be sent to any
    environment).  An environment without an image or a kernel file yet is skipped, with
    why; a kernel the build would refuse (its modules missing) is a problem."""
    out = ModuleCheck()
    missing: dict[tuple[str, int, str], tuple[list[str], str]] = {}  # (profile, index, kver) → envs, why
    for env_name, env in registry.environments.items():
        image = Path(env.image)
        if not image.is_dir():
            out.skipped[env_name] = f"no image at {image} yet"
            continue
        if not resolve_in_image(image, env.kernel).is_file():
            out.skipped[env_name] = f"no kernel at {env.kernel} in {image} yet"
            continue
        try:
            kver = kernel_release(image, env.kernel)
        except FailedPrecondition as exc:  # a kernel the build would refuse (no modules, no version)
            out.problems.append(registry.problem(("environments", env_name, "kernel"), exc.message))
            continue
        moddir = resolve_in_image(image, f"/lib/modules/{kver}")
        try:
            resolve_modules(moddir, [])  # reads modules.dep, as a build does
        except FailedPrecondition as exc:
            out.problems.append(registry.problem(("environments", env_name, "image"), exc.message))
            continue
        out.checked[env_name] = kver
        for profile_name, profile in registry.profiles.items():
            for i, module in enumerate(profile.modules):
                try:
                    resolve_modules(moddir, [module])
                except SlimError as exc:
                    envs, _ = missing.setdefault((profile_name, i, kver), ([], exc.message))
                    envs.append(env_name)
    for (profile_name, i, _), (envs, why) in missing.items():
        which = "environment" if len(envs) == 1 else "environments"
        out.problems.append(
            registry.problem(("profiles", profile_name, "modules", i), f"{why} ({which} {', '.join(envs)})")
        )
    return out
