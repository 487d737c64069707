"""Safe creation of a file tree under a target directory, from tar archives or
from another tree.

Standard library only: the agent unpacks copy-set archives with this in the
initrd, and the builder imports images and materializes NFS trees with it.
:func:`extract_archive` takes SLIM's own copy-set archives (ustar headers and pax
records, as the builder writes them), read by a small parser of its own;
:func:`slim.core.build.tarimport.extract_tar` any tar, with tarfile and the same checks
and writer (the builder's, importing images: tarfile stays out of the initrd).

Safety rules (every member is checked before anything is written for it):

- names are relative, with no ``..`` component; a leading ``./`` is accepted,
  an absolute name is refused (not silently made relative);
- no member is created *through* a symlink: every parent directory is opened
  with ``O_NOFOLLOW`` relative to its parent's descriptor, so a symlink
  planted by an earlier member (or already in the target) stops extraction;
- a member that replaces an existing non-directory unlinks it first (never
  writes through it); replacing a directory with a non-directory is refused.
  The one exception, asked for (``in_place``: the agent's copy-if-needed): a
  file's bytes are written over a regular file with no other link, opened
  without following anything and checked to be the one looked at, so that its
  blocks are reused instead of freed and allocated again (rsync's ``--inplace``);
- a hard link must name an earlier non-directory inside the target;
- device nodes are created only when the writer allows them
  (``devices=True``, for root file systems extracted as root); otherwise they
  are refused;
- symlink targets are stored as given (absolute targets are normal in a root
  file system) and never followed.

A refused member raises :class:`UnsafeEntry`; the caller extracts into a
staging directory it can delete, so nothing half-made is used.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from slim.agent.tree import BLK, CHR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry, check_relpath
from slim.agent.value import Mutable

TYPE_CHECKING = False  # typing is not imported at run time (the agent's start-up: slim.agent)
if TYPE_CHECKING:
    from typing import IO, Protocol, TypeAlias

    Bytes: TypeAlias = "IO[bytes] | _Data"  # a file's bytes, as TreeWriter.add takes them

    class ReadsInto(Protocol):  # a binary stream, raw or buffered
        def readinto(self, buffer: memoryview, /) -> int | None: ...


COPY_CHUNK = 1 << 20
NAME_MAX = 255  # bytes in one path component (Linux)
PATH_MAX = 4096  # bytes in a symlink's target, with its NUL
MAX_ID = 2**32 - 2  # largest uid or gid (2**32 - 1 is chown's "unchanged")
MAX_MAJOR, MAX_MINOR = 2**12 - 1, 2**20 - 1  # what mknod(2) takes (a 32-bit dev_t)
MIN_NS, MAX_NS = -(2**63), 2**63 - 1  # times utimensat can take, as nanoseconds
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeEntry(Exception):
    """An archive member (or tree entry) that would be unsafe or impossible to create."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path!r}: {reason}")
        self.path = path
        self.reason = reason


class WriteStats(Mutable):
    """What a :class:`TreeWriter` wrote."""

    __slots__ = ("bytes", "entries", "files", "xattr_failures")

    def __init__(self) -> None:
        self.entries = 0
        self.files = 0  # non-directory entries
        self.bytes = 0  # regular file bytes written
        self.xattr_failures = 0


class TreeWriter:
    """Creates entries under ``root`` following the rules in the module docstring.

    ``owners``: set uid/gid (default: when running as root).  ``devices``: allow
    device nodes (default: when running as root).  Directory metadata is applied
    by :meth:`finish`, deepest first, so read-only directories can be filled.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        owners: bool | None = None,
        devices: bool | None = None,
        fresh: bool = False,
        in_place: bool = False,
        shared: bool = False,
    ) -> None:
        self.root = Path(root)
        # fresh: ``root`` is empty and only this writer fills it, so what an entry would
        # replace is not looked for (an entry given twice is refused); on a local POSIX file
        # system, where a new file gets the mode asked for less the umask (or a default
        # ACL's) and the process's owner: its plain files are made so (:func:`_born`)
        self.fresh = fresh
        # shared: other writers fill ``root`` at the same time, each from a part of one archive
        # (slim.agent.ee): a directory may have been made by another (as the parent of what it
        # writes), and hard links are not made but kept in :attr:`later` (their targets may be
        # another's), for the caller to add once all are done, with ``later`` None; so are
        # directories' metadata (:meth:`finish`, once, with every writer's :meth:`pending`)
        self.shared = shared
        self.later: list[Entry] | None = [] if shared else None
        # in_place: a file's bytes go over the regular file in its place (one link only),
        # its metadata all set anew; a crash leaves it half written, so only a caller that
        # finds such a file again (the agent's sync: its mtime is not the manifest's) asks
        self.in_place = in_place
        # ... and, when a list: their mtimes are not set but listed here, (path, mtime_ns), for
        # the caller to set once their bytes are on the disk (an overwrite of blocks already
        # allocated is not ordered before the journal's commit of a new mtime: after a power
        # cut the old bytes could come back under the new size and mtime, which a quick check
        # takes as right; a file left with the time it was written in is hashed instead)
        self.unsettled: list[tuple[str, int]] | None = None
        root_is_root = os.geteuid() == 0
        self.owners = root_is_root if owners is None else owners
        self.devices = root_is_root if devices is None else devices
        self.stats = WriteStats()
        self.xattr_errors: list[str] = []
        self._root_fd = os.open(self.root, _DIR_FLAGS)
        self._cached: tuple[str, int] | None = None  # (parent path, fd) of the last entry
        # (uid, gid, umask) a file made in a fresh tree is born with, when known: then a file
        # whose owner and mode those give is made with them, no fchown or fchmod after
        self._born = _born(self._root_fd) if fresh else None
        self._dirs: list[Entry] = []

    # -- public ------------------------------------------------------------------
    def add(self, entry: Entry, data: Bytes | None = None, source: str | None = None) -> None:
        """Create one entry; a FILE's bytes come from ``data`` (exactly ``entry.size``).
        ``source``: ``data`` is a whole file of that name, made for this entry on the same
        file system, which is moved into place (given the entry's metadata, then renamed)
        instead of copied; across file systems it is copied."""
        if entry.kind == HARDLINK and self.later is not None:
            self.later.append(entry)
            return
        if entry.path == "":  # the target directory itself ("./" in a tar)
            if entry.kind != DIR:
                raise UnsafeEntry(".", "the archive's root is not a directory")
            self._dirs.append(entry)
            self.stats.entries += 1
            return
        try:
            check_relpath(entry.path)
        except ValueError as exc:
            raise UnsafeEntry(entry.path, str(exc)) from None
        parent, _, name = entry.path.rpartition("/")
        pfd = self._parent_fd(entry.path, parent)
        existing = None if self.fresh else _lstat_at(pfd, name)
        if existing is not None:
            if stat.S_ISDIR(existing.st_mode):
                if entry.kind != DIR:
                    raise UnsafeEntry(entry.path, "would replace a directory with a non-directory")
            elif (
                self.in_place
                and entry.kind == FILE
                and source is None
                and self._overwrite(pfd, name, entry, data, existing)
            ):
                self.stats.entries += 1
                self.stats.files += 1
                return
            else:
                os.unlink(name, dir_fd=pfd)  # never write through what was there
        self.stats.entries += 1
        if entry.kind == DIR:
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                try:
                    os.mkdir(name, 0o700, dir_fd=pfd)
                except FileExistsError:
                    if not (self.shared and stat.S_ISDIR(os.lstat(name, dir_fd=pfd).st_mode)):
                        raise UnsafeEntry(entry.path, "given twice") from None
            self._dirs.append(entry)
            return
        self.stats.files += 1
        if (
            source is not None
            and data is not None
            and not isinstance(data, _Data)  # (a whole file, not an archive's member)
            and entry.kind == FILE
            and not self.fresh
            and self._move(pfd, name, entry, data, source)
        ):
            return
        try:
            self._make(pfd, name, entry, data)
        except FileExistsError:  # only in a fresh tree, where nothing is looked for first
            raise UnsafeEntry(entry.path, "given twice") from None

    def _make(self, pfd: int, name: str, entry: Entry, data: Bytes | None) -> None:
        if entry.kind == FILE:
            self._file(pfd, name, entry, data)
        elif entry.kind == SYMLINK:
            os.symlink(entry.target, name, dir_fd=pfd)
            self._meta(pfd, name, entry, symlink=True)
        elif entry.kind == HARDLINK:
            self._hardlink(pfd, name, entry)
        elif entry.kind in (CHR, BLK):
            if not self.devices:
                raise UnsafeEntry(entry.path, "device node refused: this target does not allow device nodes")
            kind = stat.S_IFCHR if entry.kind == CHR else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(*entry.rdev), dir_fd=pfd)
            self._meta(pfd, name, entry)
        elif entry.kind == FIFO:
            os.mkfifo(name, 0o600, dir_fd=pfd)
            self._meta(pfd, name, entry)
        else:
            raise UnsafeEntry(entry.path, f"unsupported entry type {entry.kind!r}")

    def pending(self) -> tuple[list[Entry], list[Entry]]:
        """The directories whose metadata :meth:`finish` would apply, and the hard links
        kept for later (:attr:`later`), taken from this writer (a shared tree's)."""
        dirs, self._dirs = self._dirs, []
        links, self.later = self.later or [], [] if self.shared else None
        return dirs, links

    def adopt(self, dirs: Iterable[Entry]) -> None:
        """Apply the metadata of ``dirs`` too, at :meth:`finish` (another writer's, of a
        shared tree: :meth:`pending`)."""
        self._dirs.extend(dirs)

    def finish(self) -> None:
        """Apply directory owners, modes, xattrs and times (deepest first)."""
        for entry in sorted(self._dirs, key=lambda e: e.path.count("/") + bool(e.path), reverse=True):
            fd = self._open_dir(entry.path)
            try:
                self._fd_meta(fd, entry)
            finally:
                if fd != self._root_fd:
                    os.close(fd)
        self._dirs.clear()

    def close(self) -> None:
        self._drop_cache()
        os.close(self._root_fd)

    def __enter__(self) -> TreeWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------
    def _drop_cache(self) -> None:
        if self._cached is not None:
            os.close(self._cached[1])
            self._cached = None

    def _parent_fd(self, path: str, parent: str) -> int:
        if not parent:
            return self._root_fd
        if self._cached is not None and self._cached[0] == parent:
            return self._cached[1]
        fd = self._walk(path, parent, create=True)
        self._drop_cache()
        self._cached = (parent, fd)
        return fd

    def _open_dir(self, path: str) -> int:
        return self._root_fd if not path else self._walk(path, path, create=False)

    def _walk(self, path: str, directory: str, *, create: bool) -> int:
        """A descriptor for ``directory`` reached without following any symlink."""
        fd = self._root_fd
        done = ""
        try:
            for part in directory.split("/"):
                done = f"{done}/{part}" if done else part
                try:
                    nfd = _open_dir_at(part, fd, path, done)
                except FileNotFoundError:
                    if not create:
                        raise UnsafeEntry(path, f"directory {done!r} is missing") from None
                    # (tar archives may omit parent entries; in a shared tree another writer may
                    # have made it since: it is opened as any)
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    nfd = _open_dir_at(part, fd, path, done)
                if fd != self._root_fd:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != self._root_fd:
                os.close(fd)
            raise
        return fd

    def _file(self, pfd: int, name: str, entry: Entry, data: Bytes | None) -> None:
        born = self._born
        # made with its mode and owner (not 0600, then fchown and fchmod) when the umask leaves
        # the mode whole, it has no setuid, setgid or sticky bit (those come after the owner:
        # fchown clears them), and it is the process's (another's is private until it is theirs)
        as_born = (
            born is not None
            and not entry.mode & (0o7000 | born[2])
            and (not self.owners or (entry.uid, entry.gid) == born[:2])
        )
        try:
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                entry.mode if as_born else 0o600,
                dir_fd=pfd,
            )
        except FileExistsError:
            raise UnsafeEntry(entry.path, "given twice") from None
        try:
            self._write_data(fd, entry, data)
            self._fd_meta(fd, entry, as_born=as_born)
        finally:
            os.close(fd)

    def _write_data(self, fd: int, entry: Entry, data: Bytes | None) -> None:
        remaining = entry.size
        if remaining and data is None:
            raise UnsafeEntry(entry.path, "no data for a non-empty file")
        if remaining and isinstance(data, _Data) and isinstance(data.f, ReadAhead):  # no copy on the way
            remaining -= data.write_to(fd, remaining)
            if remaining:
                raise UnsafeEntry(entry.path, f"truncated: {remaining} of {entry.size} bytes missing")
        while remaining > 0:
            assert data is not None
            chunk = data.read(min(COPY_CHUNK, remaining))
            if not chunk:
                raise UnsafeEntry(entry.path, f"truncated: {remaining} of {entry.size} bytes missing")
            _write_all(fd, chunk)
            remaining -= len(chunk)
        self.stats.bytes += entry.size

    def _overwrite(
        self, pfd: int, name: str, entry: Entry, data: Bytes | None, existing: os.stat_result
    ) -> bool:
        """The entry's bytes written over the regular file ``existing`` at ``name`` (its
        blocks reused: with the old bytes in the page cache, about a sixth of the time of
        unlinking it and writing a new file; without, the same), then all its metadata
        set, extended attributes it should not have removed.  False, with nothing
        changed, when it is not only that file (another link to it: that one must keep
        its bytes), or cannot be opened for writing (read-only to this user, running)."""
        if existing.st_nlink != 1 or not stat.S_ISREG(existing.st_mode):
            return False
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # (a fifo swapped in: no wait)
        try:
            fd = os.open(name, flags, dir_fd=pfd)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (existing.st_dev, existing.st_ino) or st.st_nlink != 1:
                return False  # (swapped or linked since it was looked at)
            self._write_data(fd, entry, data)
            os.ftruncate(fd, entry.size)
            self._drop_xattrs(fd, entry)
            if self.unsettled is None:
                self._fd_meta(fd, entry)
            else:
                self._fd_meta(fd, entry, times=False)
                self.unsettled.append((entry.path, entry.mtime_ns))
        finally:
            os.close(fd)
        return True

    def _move(self, pfd: int, name: str, entry: Entry, data: IO[bytes], source: str) -> bool:
        """``source`` (open as ``data``) given the entry's metadata and renamed to ``name``
        (the name is free: add() removed what was there); False if it must be copied."""
        fd = data.fileno()
        if os.fstat(fd).st_size != entry.size:
            raise UnsafeEntry(entry.path, f"{os.fstat(fd).st_size} bytes where {entry.size} were expected")
        self._drop_xattrs(fd, entry)  # what the file got where it was made (a default ACL, a label)
        self._fd_meta(fd, entry)
        try:
            os.rename(source, name, dst_dir_fd=pfd)
        except OSError as exc:
            if exc.errno != errno.EXDEV:  # another file system (a mount inside the tree)
                raise
            data.seek(0)
            return False
        self.stats.bytes += entry.size
        return True

    def _drop_xattrs(self, fd: int, entry: Entry) -> None:
        """Remove the extended attributes of ``fd`` that ``entry`` does not list."""
        want = {key for key, _ in entry.xattrs}
        for key in os.listxattr(fd):
            if key not in want:
                try:
                    os.removexattr(fd, key)
                except OSError as exc:
                    self.stats.xattr_failures += 1
                    if len(self.xattr_errors) < 20:
                        self.xattr_errors.append(f"{entry.path}: {key}: {exc.strerror}")

    def _hardlink(self, pfd: int, name: str, entry: Entry) -> None:
        try:
            check_relpath(entry.target)
        except ValueError as exc:
            raise UnsafeEntry(entry.path, f"hard link target: {exc}") from None
        sparent, _, sname = entry.target.rpartition("/")
        sfd = self._root_fd if not sparent else self._walk(entry.path, sparent, create=False)
        try:
            st = _lstat_at(sfd, sname)
            if st is None:
                raise UnsafeEntry(entry.path, f"hard link to {entry.target!r}, which is not in the target")
            if stat.S_ISDIR(st.st_mode):
                raise UnsafeEntry(entry.path, f"hard link to the directory {entry.target!r}")
            os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            if sfd != self._root_fd:
                os.close(sfd)

    def _meta(self, pfd: int, name: str, entry: Entry, *, symlink: bool = False) -> None:
        """Owner, mode, xattrs and time of a just-created symlink, device node or fifo
        (by name relative to its parent's descriptor; nothing is opened or followed)."""
        if self.owners:
            os.chown(name, entry.uid, entry.gid, dir_fd=pfd, follow_symlinks=False)
        if not symlink:
            os.chmod(name, entry.mode, dir_fd=pfd)
            if entry.xattrs:  # setxattr has no dir_fd form: go through an O_PATH descriptor
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                try:
                    self._xattrs(f"/proc/self/fd/{fd}", entry)
                finally:
                    os.close(fd)
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _fd_meta(self, fd: int, entry: Entry, times: bool = True, as_born: bool = False) -> None:
        # chown first: it clears setuid bits and file capabilities (always: a new file may
        # have taken a setgid directory's group); ``as_born``: the file was made with its
        # owner and mode (TreeWriter._file)
        if not as_born:
            if self.owners:
                os.fchown(fd, entry.uid, entry.gid)
            os.fchmod(fd, entry.mode)
        self._xattrs(fd, entry)
        if times:
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))

    def _xattrs(self, target: int | str, entry: Entry) -> None:
        for name, value in entry.xattrs:
            try:
                os.setxattr(target, name, value)
            except (OSError, ValueError) as exc:  # ValueError: a NUL in the name (a pax key)
                self.stats.xattr_failures += 1
                if len(self.xattr_errors) < 20:
                    why = exc.strerror if isinstance(exc, OSError) else str(exc)
                    self.xattr_errors.append(f"{entry.path}: {name}: {why}")


def _open_dir_at(name: str, fd: int, path: str, done: str) -> int:
    """The directory ``name`` in ``fd``, opened without following a symlink (``path``: the
    entry being made; ``done``: the way to ``name``, for the refusal)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(name, dir_fd=fd)
            raise UnsafeEntry(path, f"goes through the symlink {done!r} (-> {target})") from None
        raise UnsafeEntry(path, f"{done!r} is not a directory") from None


def _born(root_fd: int) -> tuple[int, int, int] | None:
    """(uid, gid, umask) of a file this process makes in a fresh tree under ``root_fd``, or
    None where that is not known.  Its owner is the process's; its group the process's or,
    on a setgid directory or a ``grpid`` mount, its directory's, which a fresh tree's
    directories (this writer's, their metadata set only at the end) take from the root:
    known when the root's group is the process's.  Its mode is the one asked for less the
    umask, unless the directories have a default ACL, which the root would pass on."""
    gid = os.getegid()
    if os.fstat(root_fd).st_gid != gid:
        return None
    try:
        os.getxattr(root_fd, "system.posix_acl_default")
        return None  # a default ACL: the mode is the ACL's
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
    try:
        with open("/proc/self/status", "rb") as f:  # (reading the umask any other way sets it)
            umask = next(int(line.split()[1], 8) for line in f if line.startswith(b"Umask:"))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return os.geteuid(), gid, umask


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


# -- tar archives ------------------------------------------------------------------
TAR_KINDS = {  # tarfile's type flags (REGTYPE, AREGTYPE, CONTTYPE, DIRTYPE, ...), as bytes:
    b"0": FILE,  # the agent never imports tarfile (core/build/tarimport.py does)
    b"\0": FILE,
    b"7": FILE,
    b"5": DIR,
    b"2": SYMLINK,
    b"1": HARDLINK,
    b"3": CHR,
    b"4": BLK,
    b"6": FIFO,
}


def member_name(name: str) -> str:
    """A tar member name as a tree path: ``./etc/`` → ``etc``, ``.`` → ``""``;
    absolute names and ``..`` components raise ValueError."""
    if name.startswith("/"):
        raise ValueError(f"{name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{name!r} contains '..'")
    return "/".join(parts)


def pax_ns(exact: str | None) -> int | None:
    """A pax ``mtime`` record ("1700000000.123456789") in nanoseconds (float seconds would
    lose them); None if there is none or it is no number."""
    if exact is None or len(exact) > 40:
        return None
    sec, _, frac = exact.partition(".")
    try:
        ns = int(sec) * 1_000_000_000
        if frac:
            ns += (1 if not sec.startswith("-") else -1) * int((frac + "000000000")[:9])
    except ValueError:
        return None
    return ns


def make_entry(
    name: str,
    kind: str | None,
    type_flag: object,
    mode: int,
    uid: int,
    gid: int,
    mtime_ns: int,
    size: int,
    linkname: str,
    rdev: tuple[int, int],
    xattrs: tuple[tuple[str, bytes], ...],
) -> Entry:
    """The tree entry an archive member describes; UnsafeEntry if it cannot be one: what the
    file system could not take is refused before anything is written (names of more than
    NAME_MAX bytes a component, link targets of PATH_MAX bytes, owners, times and device
    numbers outside their types: tar reads base-256 numbers of any size)."""
    try:
        path = member_name(name)
    except ValueError as exc:
        raise UnsafeEntry(name, str(exc)) from None
    if kind is None:
        raise UnsafeEntry(name, f"unsupported member type {type_flag!r}")
    target = linkname
    if kind in (SYMLINK, HARDLINK) and not target:
        raise UnsafeEntry(name, "a link to nothing (an empty target)")
    if kind == HARDLINK:
        try:
            target = member_name(linkname)
        except ValueError as exc:
            raise UnsafeEntry(name, f"hard link target: {exc}") from None
    for part_of in (path, target) if kind == HARDLINK else (path,):
        if (len(part_of) > NAME_MAX or not part_of.isascii()) and any(
            len(os.fsencode(part)) > NAME_MAX for part in part_of.split("/")
        ):
            raise UnsafeEntry(name, f"a name component is longer than {NAME_MAX} bytes")
    if kind == SYMLINK and (len(os.fsencode(target)) >= PATH_MAX or "\0" in target):
        raise UnsafeEntry(name, f"symlink target longer than {PATH_MAX - 1} bytes or with NUL")
    for what, value in (("uid", uid), ("gid", gid)):
        if not 0 <= value <= MAX_ID:
            raise UnsafeEntry(name, f"{what} {value} is out of range")
    if kind in (CHR, BLK) and not (0 <= rdev[0] <= MAX_MAJOR and 0 <= rdev[1] <= MAX_MINOR):
        raise UnsafeEntry(name, f"device {rdev[0]}:{rdev[1]} is out of range")
    if not MIN_NS <= mtime_ns <= MAX_NS:
        raise UnsafeEntry(name, f"mtime {mtime_ns} ns is out of range")
    return Entry(
        path=path,
        kind=kind,
        mode=mode & 0o7777,
        uid=uid,
        gid=gid,
        mtime_ns=mtime_ns,
        size=size if kind == FILE else 0,
        target=target if kind in (SYMLINK, HARDLINK) else "",
        rdev=rdev if kind in (CHR, BLK) else (0, 0),
        xattrs=xattrs,
    )


# -- SLIM's own archives, fast ------------------------------------------------------
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_READ_BUFFER = 1 << 20
MAX_PAX = 1 << 20  # bytes of one member's pax records (names, xattrs): ours are far smaller


class ReadAhead:
    """A stream read ahead into one buffer of its own: what is read comes from it, and a
    member's bytes go from it straight to their file (:meth:`write_to`), not first into a
    new ``bytes`` as a buffered reader's ``read`` gives them.  For the agent's pipe from
    zstd (an unbuffered ``FileIO``: each fill is one ``read``).  It reads past what it
    was asked for: what follows an archive's end is read from it, not from the stream."""

    __slots__ = ("_at", "_end", "_readinto", "_view")

    def __init__(self, stream: ReadsInto, size: int = _READ_BUFFER) -> None:
        self._readinto = getattr(stream, "readinto1", None) or stream.readinto
        self._view = memoryview(bytearray(size))
        self._at = self._end = 0  # what is read and not yet taken: _view[_at:_end]

    def _fill(self) -> int:
        """Read into the buffer, all of it taken; how many bytes came (0: the stream ended)."""
        self._at = 0
        n = self._readinto(self._view)
        if n is None:  # (only a non-blocking stream says so: this reader waits on its reads)
            raise BlockingIOError("ReadAhead reads a blocking stream, and this one had nothing")
        self._end = n
        return n

    def read(self, n: int) -> bytes:
        """The stream's next ``n`` bytes (fewer where it ends)."""
        if n < 0:
            raise ValueError("ReadAhead reads a number of bytes, not to the stream's end")
        at, end = self._at, self._end
        if end - at >= n:
            self._at = at + n
            return bytes(self._view[at : at + n])
        parts = [bytes(self._view[at:end])]
        n -= end - at
        while n > 0 and self._fill():
            k = min(n, self._end)
            parts.append(bytes(self._view[:k]))
            self._at = k
            n -= k
        return b"".join(parts)

    def write_to(self, fd: int, n: int) -> int:
        """Write the stream's next ``n`` bytes to ``fd``; how many there were (fewer where
        it ends)."""
        done = 0
        while done < n:
            if self._at == self._end and not self._fill():
                break
            k = min(self._end - self._at, n - done)
            _write_all(fd, self._view[self._at : self._at + k])
            self._at += k
            done += k
        return done


class _Data:
    """One member's bytes, read from the archive as the writer asks for them."""

    __slots__ = ("f", "left")

    def __init__(self, f: IO[bytes] | ReadAhead, size: int) -> None:
        self.f = f
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        self.left -= len(data)
        return data

    def write_to(self, fd: int, most: int) -> int:
        """Write the member's next bytes, ``most`` at most, to ``fd`` from its ReadAhead's
        buffer; how many (fewer: the archive ended).  (From another stream, the writer
        reads them: TreeWriter._write_data.)"""
        assert isinstance(self.f, ReadAhead)
        done = self.f.write_to(fd, min(most, self.left))
        self.left -= done
        return done


def _number(field: bytes, what: str) -> int:
    """A header number: octal digits (NUL or space ended), or base-256 (GNU's, for big ones)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] and field[0] & 0x80:
        raise UnsafeEntry("(archive)", f"a negative {what}")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if text.strip(b"01234567"):  # int() would also take a sign, "_" or spaces inside
        raise UnsafeEntry("(archive)", f"{what} {text[:20]!r} is not a number")
    return int(text, 8) if text else 0


_REPEATED: dict[bytes, int] = {}  # mode, uid and gid fields read before, and their value
_REPEATED_KEPT = 4096


def _repeated(field: bytes, what: str) -> int:
    """:func:`_number`, for the fields that repeat from member to member (modes, owners):
    each distinct field is parsed once (checksums, sizes and times are not kept)."""
    value = _REPEATED.get(field)
    if value is None:
        value = _number(field, what)
        if len(_REPEATED) < _REPEATED_KEPT:
            _REPEATED[field] = value
    return value


def _pax_records(data: bytes) -> dict[str, bytes]:
    """A pax extended header's records ("LEN key=value\n" each)."""
    out: dict[str, bytes] = {}
    at = 0
    while at < len(data):
        space = data.find(b" ", at, at + 20)
        try:
            length = int(data[at:space]) if space > at else 0
        except ValueError:
            length = 0
        record = data[space + 1 : at + length]
        key, eq, value = record.partition(b"=")
        if length <= 0 or at + length > len(data) or not eq or not record.endswith(b"\n"):
            raise UnsafeEntry("(archive)", "a malformed pax record")
        out[key.decode("utf-8", "surrogateescape")] = value[:-1]
        at += length
    return out


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def read_archive(
    stream: IO[bytes] | ReadAhead, *, checksums: bool = True, part: bool = False
) -> Iterator[tuple[Entry, _Data | None]]:
    """The members of a SLIM copy-set archive, uncompressed, as :func:`entry_from_member`
    makes them: a pax tar as slim.core.build.copyset writes it (ustar headers, each
    member's pax records in an ``x`` header before it).  Each FILE comes with its bytes,
    to be read before the next member; anything else a tar may hold (GNU long names,
    global or sparse headers) is refused as not one of ours.  ``checksums`` False: the
    headers' checksums are not checked, for a caller that checks the whole archive's
    digest (a wrong byte anywhere is found there; every other check is made all the same).
    ``part``: the stream may also end where a header would begin, as a part of an archive
    does (slim.core.build.copyset.PART_BYTES), not only at the archive's end."""
    read = stream.read
    pax: dict[str, bytes] = {}
    h = read(_BLOCK)
    while True:  # (each read takes what comes before the next header, and that header)
        if part and not h and not pax:
            return
        if len(h) < _BLOCK:
            raise UnsafeEntry("(archive)", "truncated: the archive ends inside a header")
        if h == _ZERO_BLOCK:
            if pax:
                raise UnsafeEntry("(archive)", "pax records for no member")
            return
        if h[257:262] != b"ustar":
            raise UnsafeEntry("(archive)", "not a ustar/pax header")
        if checksums and _number(h[148:156], "checksum") != sum(h) - sum(h[148:156]) + 8 * 32:
            raise UnsafeEntry("(archive)", "a header's checksum does not match")
        flag = h[156:157]
        size = _number(h[124:136], "size")
        if "size" in pax:
            size = _pax_int(pax, "size", size)
        if flag == b"x":
            if pax:
                raise UnsafeEntry("(archive)", "two pax headers for one member")
            if size > MAX_PAX:
                raise UnsafeEntry("(archive)", f"a pax header of {size} bytes (at most {MAX_PAX})")
            pad = -size % _BLOCK
            data = read(size + pad + _BLOCK)
            if len(data) < size:
                raise UnsafeEntry("(archive)", "truncated pax header")
            pax = _pax_records(data[:size])
            if not pax:
                pax = {"": b""}  # an empty pax header still belongs to the next member
            h = data[size + pad :]
            continue
        kind = TAR_KINDS.get(flag)
        if kind is None:
            raise UnsafeEntry("(archive)", f"member type {flag!r} is not one of a SLIM archive's")
        name = _text(h[0:100].split(b"\0", 1)[0])
        prefix = h[345:500].split(b"\0", 1)[0]
        if prefix:
            name = f"{_text(prefix)}/{name}"
        name = _text(pax["path"]) if "path" in pax else name
        link = _text(pax["linkpath"]) if "linkpath" in pax else _text(h[157:257].split(b"\0", 1)[0])
        mtime = pax_ns(_text(pax["mtime"])) if "mtime" in pax else None
        if mtime is None:
            mtime = _number(h[136:148], "mtime") * 1_000_000_000
        xattrs = tuple(
            sorted((k[len("SCHILY.xattr.") :], v) for k, v in pax.items() if k.startswith("SCHILY.xattr."))
        )
        uid = _pax_int(pax, "uid", 0) if "uid" in pax else _repeated(h[108:116], "uid")
        gid = _pax_int(pax, "gid", 0) if "gid" in pax else _repeated(h[116:124], "gid")
        rdev = (0, 0)
        if kind in (CHR, BLK):
            rdev = (_number(h[329:337], "device major"), _number(h[337:345], "device minor"))
        entry = make_entry(
            name, kind, flag, _repeated(h[100:108], "mode"), uid, gid, mtime, size, link, rdev, xattrs
        )
        pax = {}
        if kind == FILE:
            data_of = _Data(stream, size)
            yield entry, data_of
            while data_of.left:  # what the writer did not read
                if not data_of.read(_READ_BUFFER):
                    raise UnsafeEntry(entry.path, "truncated: the archive ends inside the file")
            pad = -size % _BLOCK
            h = read(pad + _BLOCK)
            if part and len(h) < pad:
                raise UnsafeEntry(entry.path, "truncated: the archive ends inside the file's padding")
            h = h[pad:]
        else:
            if size and kind != HARDLINK:
                raise UnsafeEntry(entry.path, f"a {kind} with {size} bytes of data")
            yield entry, None
            h = read(_BLOCK)


def _pax_int(pax: dict[str, bytes], key: str, default: int) -> int:
    if key not in pax:
        return default
    try:
        value = int(pax[key])
    except ValueError:
        raise UnsafeEntry("(archive)", f"pax {key} {pax[key][:20]!r} is not a number") from None
    if value < 0:
        raise UnsafeEntry("(archive)", f"pax {key} is negative")
    return value


def extract_archive(
    stream: IO[bytes] | ReadAhead,
    root: str | Path,
    *,
    owners: bool | None = None,
    devices: bool | None = None,
    fresh: bool = False,
    checksums: bool = True,
) -> WriteStats:
    """Unpack a SLIM copy-set archive (uncompressed: :func:`read_archive`, ``checksums``
    as it says) under ``root``, safely, as :func:`extract_tar` would, several times faster
    (``fresh``: ``root`` is an empty directory of the caller's, as :class:`TreeWriter` says)."""
    with TreeWriter(root, owners=owners, devices=devices, fresh=fresh) as writer:
        for entry, data in read_archive(stream, checksums=checksums):
            writer.add(entry, data)
        writer.finish()
        return writer.stats


def copy_tree(
    source: str | Path,
    entries: Iterable[Entry],
    root: str | Path,
    *,
    owners: bool | None = None,
    devices: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> WriteStats:
    """Recreate ``entries`` (scanned from ``source``) under ``root``."""
    src = os.fspath(source)
    with TreeWriter(root, owners=owners, devices=devices) as writer:
        for entry in entries:
            if entry.kind == FILE:
                with open(os.path.join(src, entry.path), "rb", opener=nofollow) as f:
                    if os.fstat(f.fileno()).st_size != entry.size:
                        raise UnsafeEntry(entry.path, "changed size while being copied")
                    writer.add(entry, f)
            else:
                writer.add(entry)
            if progress is not None:
                progress(writer.stats.bytes)
        writer.finish()
        return writer.stats


def nofollow(path: str, flags: int) -> int:
    """An ``opener`` for :func:`open` that refuses a symlink as the last component."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def copy_root_meta(source: str | Path, target: str | Path) -> None:
    """Give ``target`` the owner (as root), mode and time of the directory ``source``
    (tree copies list what is below a directory, not the directory itself)."""
    st = os.lstat(source)
    if os.geteuid() == 0:
        os.chown(target, st.st_uid, st.st_gid)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_mtime_ns, st.st_mtime_ns))
