"""A file tree as a sorted list of entries: what the builder archives, the profiler
counts, the manifest lists and the agent compares.

Standard library only: the agent runs this in the initrd.

Paths are relative to the scanned root, ``/``-separated, never empty, never
starting with ``/`` and never containing ``.`` or ``..`` components.  Entries
come in pre-order, children sorted by name (bytes order), so a directory always
precedes its contents and the same tree always gives the same list.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from slim.agent.value import Mutable, Value

DIR = "dir"
FILE = "file"
SYMLINK = "symlink"
HARDLINK = "hardlink"  # another name for an earlier FILE (or device/fifo) entry
CHR = "chr"
BLK = "blk"
FIFO = "fifo"
KINDS = (DIR, FILE, SYMLINK, HARDLINK, CHR, BLK, FIFO)


class Entry(Value):
    """One file system object, with everything needed to recreate it."""

    __slots__ = ("gid", "kind", "mode", "mtime_ns", "path", "rdev", "size", "target", "uid", "xattrs")
    path: str
    kind: str
    mode: int  # permission bits, including setuid/setgid/sticky (stat.S_IMODE)
    uid: int
    gid: int
    mtime_ns: int
    size: int  # regular files only
    target: str  # symlink target, or the earlier path a hard link names
    rdev: tuple[int, int]  # (major, minor) of device nodes
    xattrs: tuple[tuple[str, bytes], ...]

    def __init__(
        self,
        path: str,
        kind: str,
        mode: int,
        uid: int,
        gid: int,
        mtime_ns: int,
        size: int = 0,
        target: str = "",
        rdev: tuple[int, int] = (0, 0),
        xattrs: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        self.path = path
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = size
        self.target = target
        self.rdev = rdev
        self.xattrs = xattrs


class ScanReport(Mutable):
    """What a scan left out, so callers can say so."""

    __slots__ = ("other_filesystems", "sockets", "unreadable_xattrs")

    def __init__(
        self,
        sockets: list[str] | None = None,
        other_filesystems: list[str] | None = None,
        unreadable_xattrs: list[str] | None = None,
    ) -> None:
        self.sockets = [] if sockets is None else sockets
        self.other_filesystems = [] if other_filesystems is None else other_filesystems
        self.unreadable_xattrs = [] if unreadable_xattrs is None else unreadable_xattrs


def check_relpath(path: str) -> str:
    """``path`` if it is a safe relative path as defined above; ValueError otherwise."""
    if not path:
        raise ValueError("empty path")
    if "\x00" in path:
        raise ValueError(f"{path!r} contains a NUL byte")
    if path.startswith("/"):
        raise ValueError(f"{path!r} is an absolute path")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"{path!r} has an empty, '.' or '..' component")
    return path


def read_xattrs(path: str | Path, report: ScanReport | None = None) -> tuple[tuple[str, bytes], ...]:
    """Every extended attribute of ``path`` (not following a symlink), sorted by name."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # file system without xattrs, or a symlink on one that refuses
        return ()
    out = []
    for name in sorted(names):
        try:
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError:
            if report is not None:
                report.unreadable_xattrs.append(f"{path}:{name}")
    return tuple(out)


def entry_from_stat(
    rel: str,
    st: os.stat_result,
    full: str,
    first_links: dict[tuple[int, int], str] | None,
    report: ScanReport | None = None,
) -> Entry | None:
    """The entry for one object; None for sockets (no archive format keeps them)."""
    fmt = stat.S_IFMT(st.st_mode)
    mode = stat.S_IMODE(st.st_mode)
    common = {"path": rel, "mode": mode, "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}
    if fmt == stat.S_IFDIR:
        return Entry(kind=DIR, xattrs=read_xattrs(full, report), **common)  # type: ignore[arg-type]
    if fmt == stat.S_IFLNK:
        return Entry(kind=SYMLINK, target=os.readlink(full), **common)  # type: ignore[arg-type]
    if fmt == stat.S_IFSOCK:
        if report is not None:
            report.sockets.append(rel)
        return None
    if first_links is not None and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        first = first_links.get(key)
        if first is not None:
            return Entry(kind=HARDLINK, target=first, **common)  # type: ignore[arg-type]
        first_links[key] = rel
    xattrs = read_xattrs(full, report)
    if fmt == stat.S_IFREG:
        return Entry(kind=FILE, size=st.st_size, xattrs=xattrs, **common)  # type: ignore[arg-type]
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        kind = CHR if fmt == stat.S_IFCHR else BLK
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        return Entry(kind=kind, rdev=rdev, xattrs=xattrs, **common)  # type: ignore[arg-type]
    if fmt == stat.S_IFIFO:
        return Entry(kind=FIFO, xattrs=xattrs, **common)  # type: ignore[arg-type]
    return None


def scan(
    root: str | Path,
    *,
    prune: Collection[str] = (),
    one_file_system: bool = True,
    report: ScanReport | None = None,
    on_dir: Callable[[str], None] | None = None,
) -> Iterator[Entry]:
    """Every object under ``root`` (not ``root`` itself), in the order described above.

    ``prune`` lists relative directory paths whose *contents* are left out (the
    directory itself is listed, as the mount point another policy fills).
    Hard links are detected within the scan: the first name is a FILE (or device,
    fifo) entry, later names are HARDLINK entries pointing at it.  Sockets and,
    with ``one_file_system``, other file systems' contents are left out and
    noted in ``report``.
    """
    root_s = os.fspath(root)
    root_dev = os.lstat(root_s).st_dev
    first_links: dict[tuple[int, int], str] = {}
    pruned = frozenset(prune)
    # Iterative pre-order: a stack of (directory, its full path, its remaining sorted names).
    stack: list[tuple[str, str, Iterator[str]]] = [("", root_s, _sorted_names(root_s, on_dir, ""))]
    while stack:
        rel_parent, full_parent, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        rel = f"{rel_parent}/{name}" if rel_parent else name
        full = os.path.join(full_parent, name)
        st = os.lstat(full)
        entry = entry_from_stat(rel, st, full, first_links, report)
        if entry is None:
            continue
        yield entry
        if entry.kind == DIR and rel not in pruned:
            if one_file_system and st.st_dev != root_dev:
                if report is not None:
                    report.other_filesystems.append(rel)
                continue
            stack.append((rel, full, _sorted_names(full, on_dir, rel)))


def _sorted_names(full_dir: str, on_dir: Callable[[str], None] | None, rel: str) -> Iterator[str]:
    if on_dir is not None:
        on_dir(rel)
    with os.scandir(full_dir) as it:
        names = sorted((d.name for d in it), key=os.fsencode)
    return iter(names)
