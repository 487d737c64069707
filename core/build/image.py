"""``slim ee import``: bring a root file system into an environment's image directory.

Sources:

- ``DIR``: an existing root file system, copied;
- ``TARBALL``: ``.tar`` optionally compressed with gzip, bzip2, xz or zstd,
  unpacked safely (see slim.agent.unpack: no ``..``, no absolute names, nothing
  through symlinks, devices only as root);
- ``debootstrap:SUITE``: a fresh Debian system made with debootstrap (minbase
  variant by default) plus an init system (:data:`INIT_PACKAGES`: systemd as
  ``/sbin/init`` and udev, so the environment boots to its multi-user target;
  ``init=False`` leaves them out), cached as an archive under the cache directory
  so a second import of the same suite and packages does not download again.

Owners, modes, symlinks, hard links, device nodes, times and xattrs are kept.
The image is built in a staging directory beside the target and swapped in
with a rename, so the old image stays whole until the new one is complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from slim.agent.tree import FILE, ScanReport, scan
from slim.agent.unpack import UnsafeEntry, WriteStats, copy_root_meta, copy_tree
from slim.core.build import copyset
from slim.core.build.release import Progress, ticker
from slim.core.build.tarimport import extract_tar
from slim.errors import FailedPrecondition, InvalidArgument

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
SUITE_RE = re.compile(r"^[a-z][a-z0-9.+-]{0,40}$")
VARIANTS = ("minbase", "buildd", "fakechroot", "-")
# what a debootstrap import adds so that the environment boots: systemd as /sbin/init, and
# udev (without it systemd waits 90 s for the console's device before its getty)
INIT_PACKAGES = ("systemd-sysv", "udev")
DEBOOTSTRAP_TIMEOUT = 1800
CACHE_LEVEL = 3


@dataclass
class ImportResult:
    target: Path
    source: str
    entries: int
    files: int
    bytes: int
    cached: bool = False  # debootstrap: taken from the cache
    kernel_release: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def default_cache_dir() -> Path:
    """$SLIM_CACHE_DIR, else /var/cache/slim as root, else ~/.cache/slim."""
    env = os.environ.get("SLIM_CACHE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/slim")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slim"


def import_image(
    source: str,
    target: Path,
    *,
    cache_dir: Path | None = None,
    variant: str = "minbase",
    include: tuple[str, ...] = (),
    init: bool = True,
    add_kernel: bool = False,
    progress: Progress | None = None,
) -> ImportResult:
    """Import ``source`` (see the module docstring) as the image at ``target``."""
    started = time.monotonic()
    cache = cache_dir or default_cache_dir()
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise InvalidArgument(f"the image path {target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.import-"))
    os.chmod(staging, 0o755)  # noqa: S103 - a root file system's / (a source that says otherwise wins)
    try:
        result = ImportResult(target=target, source=source, entries=0, files=0, bytes=0)
        if source.startswith("debootstrap:"):
            if init:
                include = (*include, *(p for p in INIT_PACKAGES if p not in include))
            stats, result.cached = _from_debootstrap(source, staging, cache, variant, include, progress)
        else:
            path = Path(source)
            if path.is_dir():
                stats = _from_directory(path, staging, progress)
            elif path.is_file():
                stats = _from_tarball(path, staging, progress)
            else:
                raise InvalidArgument(f"{source!r} is neither a directory, a tarball nor debootstrap:SUITE")
        result.entries, result.files, result.bytes = stats.entries, stats.files, stats.bytes
        if stats.xattr_failures:
            result.notes.append(f"{stats.xattr_failures} extended attribute(s) could not be set")
        if add_kernel:
            from slim.core.build.kernel import download_kernel, install_kernel

            if progress is not None:
                progress("kernel: apt-get download", 0, 0)
            deb = download_kernel(cache / "kernel")
            result.kernel_release = install_kernel(deb, staging)
        _swap(staging, target)
        result.seconds = time.monotonic() - started
        return result
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _swap(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; an old image is moved aside first, then removed."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, old / "image")
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _from_directory(source: Path, staging: Path, progress: Progress | None) -> WriteStats:
    if source.resolve() == Path("/"):
        raise InvalidArgument("importing the running system's / is not supported; use debootstrap or a copy")
    report = ScanReport()
    entries = list(scan(source, report=report))
    total = sum(e.size for e in entries if e.kind == FILE)
    try:
        stats = copy_tree(source, entries, staging, progress=ticker(progress, f"copy {source}", total))
    except UnsafeEntry as exc:
        raise FailedPrecondition(f"cannot import {source}: {exc}") from None
    copy_root_meta(source, staging)
    return stats


def _open_archive(path: Path) -> BinaryIO:
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, closed there
    magic = f.read(4)
    f.seek(0)
    if magic == ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(f, closefd=True)
    return f


def _from_tarball(path: Path, staging: Path, progress: Progress | None) -> WriteStats:
    tick = ticker(progress, f"unpack {path.name}", 0)
    with _open_archive(path) as stream:
        try:
            return extract_tar(stream, staging, progress=tick)
        except UnsafeEntry as exc:
            raise InvalidArgument(f"refusing {path}: member {exc}") from None
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            raise InvalidArgument(f"cannot read {path}: {exc}") from None


def _from_debootstrap(
    source: str,
    staging: Path,
    cache: Path,
    variant: str,
    include: tuple[str, ...],
    progress: Progress | None,
) -> tuple[WriteStats, bool]:
    suite = source.split(":", 1)[1]
    if not SUITE_RE.match(suite):
        raise InvalidArgument(f"{suite!r} is not a Debian suite name (e.g. debootstrap:bookworm)")
    if variant not in VARIANTS:
        raise InvalidArgument(f"unknown debootstrap variant {variant!r} (one of {', '.join(VARIANTS)})")
    for pkg in include:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]*", pkg):
            raise InvalidArgument(f"{pkg!r} is not a Debian package name")
    arch = _dpkg_arch()
    key = hashlib.sha256(",".join(sorted(include)).encode()).hexdigest()[:12] if include else "base"
    cached = cache / "debootstrap" / f"{suite}-{variant}-{arch}-{key}.tar.zst"
    if cached.is_file():
        try:
            return _from_tarball(cached, staging, progress), True
        except InvalidArgument:
            cached.unlink(missing_ok=True)  # a damaged cache is rebuilt, never trusted
            shutil.rmtree(staging)
            staging.mkdir()
    if os.geteuid() != 0:
        raise FailedPrecondition("debootstrap must run as root")
    if shutil.which("debootstrap") is None:
        raise FailedPrecondition("debootstrap is not installed (apt-get install debootstrap)")
    if progress is not None:
        progress(f"debootstrap {suite} ({variant})", 0, 0)
    cmd = ["debootstrap", f"--variant={variant}", f"--arch={arch}"]
    if include:
        cmd.append("--include=" + ",".join(include))
    cmd += [suite, str(staging)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        log = staging / "debootstrap" / "debootstrap.log"
        if log.is_file():
            tail += "\n" + "\n".join(log.read_text(errors="replace").strip().splitlines()[-8:])
        raise FailedPrecondition(f"debootstrap {suite} failed (exit {proc.returncode}):\n{tail}")
    _apt_clean(staging)
    stats = WriteStats()
    for e in scan(staging):
        stats.entries += 1
        if e.kind != "dir":
            stats.files += 1
        if e.kind == FILE:
            stats.bytes += e.size
    _write_cache(staging, cached)
    return stats, False


def _apt_clean(root: Path) -> None:
    """What ``apt-get clean`` removes: downloaded packages and apt's binary caches."""
    archives = root / "var" / "cache" / "apt" / "archives"
    if archives.is_dir():
        for deb in archives.glob("*.deb"):
            deb.unlink()
    for binfile in (root / "var" / "cache" / "apt").glob("*.bin"):
        binfile.unlink()


def _write_cache(tree: Path, cached: Path) -> None:
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{cached.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            copyset.write_archive(tree, scan(tree), f, level=CACHE_LEVEL)
        os.replace(tmp, cached)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _dpkg_arch() -> str:
    try:
        out = subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "amd64"
    return out.stdout.strip() or "amd64"
