"""Initrds built from an EE image's own kernel modules.

- :func:`resolve_in_image` and :func:`kernel_release` find the image's kernel and its
  version (KVER), looking at the image as a chroot would.
- :func:`resolve_modules` turns module names into the files to load, dependencies first,
  from the image's ``lib/modules/KVER/modules.dep``.
- :class:`CpioArchive` is a deterministic cpio "newc" writer: the same entries always
  give the same bytes.
- :class:`InitrdBuilder` adds module selection and zstd compression (level 19, the whole
  archive in one window); the result is a Linux initramfs.
"""

from __future__ import annotations

import difflib
import io
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, Literal, cast

import zstandard

from slim.errors import FailedPrecondition, InvalidArgument, NotFound

MAX_SYMLINK_HOPS = 40  # what Linux allows in one path look-up
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
KVER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]*$")
KERNEL_NAME_RE = re.compile(r"^(?:vmlinuz|vmlinux)-(.+)$")
CHUNK = 1 << 20
# zstd's window: the whole archive, up to 128 MiB (what Linux's initramfs decompressor and
# ``zstd -d`` accept without --long).  With level 19's own, 8 MiB, the agent's runtime and a
# VM's 22 modules (26 MB) compress 5 % bigger; the kernel unpacks either in the same time
# within a TCG VM's noise, and xz, 9 % smaller still, in three times as long
# (docs/benchmarks/, initrd size).
WINDOW_LOG = 27


# --- the image's kernel -------------------------------------------------------------------------


def resolve_in_image(image_root: Path, path: str | PurePosixPath) -> Path:
    """The host path of ``path`` inside the image, resolved as in a chroot at ``image_root``.

    Absolute symbolic link targets are relative to the image, ``..`` at the image root stays
    there, and the answer is always inside ``image_root`` (whose own path is resolved first).
    Components that do not exist are kept as they are; callers check existence.  More than
    :data:`MAX_SYMLINK_HOPS` links is FailedPrecondition.
    """
    root = Path(image_root).resolve()
    todo = [c for c in reversed(PurePosixPath(path).parts) if c not in ("/", "", ".")]
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if not here.is_symlink():
            done.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            raise FailedPrecondition(f"image {root}: too many symbolic links resolving {path}")
        target = PurePosixPath(os.readlink(here))
        if target.is_absolute():
            done = []
        todo.extend(c for c in reversed(target.parts) if c not in ("/", "", "."))
    return root.joinpath(*done)


def kernel_release(image_root: Path, kernel: str = "/vmlinuz") -> str:
    """The version (KVER) of the kernel at ``kernel`` in the image, which must have its modules.

    KVER comes from the kernel's file name (``vmlinuz-KVER``, after following links) or, if the
    name does not say, from the only directory under ``/lib/modules``.
    """
    root = Path(image_root)
    if not root.is_dir():
        raise FailedPrecondition(f"image {root} does not exist or is not a directory")
    found = resolve_in_image(root, kernel)
    if not found.is_file():
        raise FailedPrecondition(
            f"image {root} has no kernel at {kernel}; add one with slim ee import --add-kernel "
            "or set environments.NAME.kernel"
        )
    modules_root = resolve_in_image(root, "/lib/modules")
    match = KERNEL_NAME_RE.match(found.name)
    if match:
        kver = match.group(1)
        if KVER_RE.match(kver) and resolve_in_image(root, f"/lib/modules/{kver}").is_dir():
            return kver
        raise FailedPrecondition(
            f"image {root}: kernel {kernel} is version {kver} but the image has no /lib/modules/{kver}"
            f" (it has: {', '.join(_dirs(modules_root)) or 'none'}); run depmod or install its modules"
        )
    versions = _dirs(modules_root)
    if len(versions) == 1 and KVER_RE.match(versions[0]):
        return versions[0]
    what = f"several: {', '.join(versions)}" if versions else "none"
    raise FailedPrecondition(
        f"image {root}: cannot tell the version of kernel {kernel} (file {found.name}) and "
        f"/lib/modules has {what}; name the kernel file vmlinuz-KVER"
    )


# How a bootable kernel file begins: (offset, bytes).  x86 bzImage ("HdrS" boot protocol
# header), an EFI/PE image or zboot, arm64 Image, riscv Image, gzip (Debian's arm64 vmlinuz), ELF.
KERNEL_MAGIC = (
    (0x202, b"HdrS"),
    (0, b"MZ"),
    (0x38, b"ARM\x64"),
    (0x30, b"RSC\x05"),
    (0, b"\x1f\x8b"),
    (0, b"\x7fELF"),
)


def kernel_warnings(image_root: Path, kernel: str, kver: str) -> list[str]:
    """Why the image's kernel (version ``kver``) may not boot a node, for ``slim ee build`` to
    warn: a file that does not begin like any kernel image, a modules.dep that lists no module
    (a stand-in kernel, or one whose modules were never installed)."""
    out: list[str] = []
    found = resolve_in_image(image_root, kernel)
    with open(found, "rb") as f:
        head = f.read(0x210)
    if not any(head[at : at + len(magic)] == magic for at, magic in KERNEL_MAGIC):
        out.append(
            f"the kernel {kernel} ({found.name}) does not look like a Linux kernel image "
            "(no bzImage, EFI, arm64, riscv, gzip or ELF header): a node cannot boot it; "
            "install one with slim ee import --add-kernel"
        )
    modules_dir = resolve_in_image(image_root, f"/lib/modules/{kver}")
    if not any(
        line.strip() and not line.startswith("#") for line in _read_lines(modules_dir / "modules.dep")
    ):
        out.append(
            f"/lib/modules/{kver}/modules.dep lists no modules: the initrd carries none, so a node "
            "has only what is built into the kernel (no NIC driver, NFS or overlay as modules); "
            "install the kernel's modules and run depmod"
        )
    return out


def _dirs(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir() if p.is_dir())
    except OSError:
        return []


# --- modules ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Module:
    """One loadable kernel module."""

    name: str  # with "_", never "-"
    path: str  # relative to lib/modules/KVER, as modules.dep names it
    size: int


@dataclass(frozen=True, slots=True)
class ModuleSelection:
    """Named modules and their dependencies, in an order insmod can load them."""

    kver: str
    modules: tuple[Module, ...]  # dependencies before the modules that need them
    builtin: tuple[str, ...]  # requested names built into the kernel: nothing to load

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]


def module_name(path: str) -> str:
    """``kernel/net/core/fail-over.ko.xz`` → ``fail_over``."""
    base = PurePosixPath(path.strip()).name
    for suffix in sorted(MODULE_SUFFIXES, key=len, reverse=True):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _module_path(modules_dir: Path, path: str) -> str:
    """A modules.dep path made relative to ``modules_dir`` and checked to stay inside it."""
    if path.startswith("/"):  # old depmod wrote absolute paths
        prefix = f"/lib/modules/{modules_dir.name}/"
        if not path.startswith(prefix):
            raise FailedPrecondition(f"{modules_dir}/modules.dep: {path} is outside the modules directory")
        path = path[len(prefix) :]
    parts = PurePosixPath(path).parts
    if not parts or ".." in parts or not path.endswith(MODULE_SUFFIXES):
        raise FailedPrecondition(f"{modules_dir}/modules.dep: {path!r} is not a module path")
    return path


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except FileNotFoundError:
        return []


def _parse_dep(modules_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """name → (path, dependency paths) from modules.dep."""
    dep_file = modules_dir / "modules.dep"
    if not dep_file.is_file():
        raise FailedPrecondition(
            f"{modules_dir} has no modules.dep; run depmod -b IMAGE {modules_dir.name} first"
        )
    table: dict[str, tuple[str, list[str]]] = {}
    for number, line in enumerate(_read_lines(dep_file), 1):
        if not line.strip() or line.startswith("#"):
            continue
        head, sep, tail = line.partition(":")
        if not sep:
            raise FailedPrecondition(f"{dep_file}:{number}: expected 'module: dependencies'")
        path = _module_path(modules_dir, head.strip())
        table[module_name(path)] = (path, [_module_path(modules_dir, d) for d in tail.split()])
    return table


def resolve_modules(modules_dir: Path, names: Iterable[str]) -> ModuleSelection:
    """The modules ``names`` need, from ``modules_dir`` (an image's ``lib/modules/KVER``).

    Reads modules.dep, and modules.builtin and modules.alias if present.  Each module comes
    once, after its dependencies; built-in modules are listed apart.  ``-`` and ``_`` are
    the same in names.  An unknown name is NotFound, with the closest known names.
    """
    modules_dir = Path(modules_dir)
    kver = modules_dir.name
    table = _parse_dep(modules_dir)
    by_path = {path: name for name, (path, _) in table.items()}
    builtin = {module_name(line) for line in _read_lines(modules_dir / "modules.builtin") if line.strip()}
    aliases: dict[str, list[str]] = {}
    for line in _read_lines(modules_dir / "modules.alias"):
        words = line.split()
        if len(words) == 3 and words[0] == "alias":
            aliases.setdefault(words[1].replace("-", "_"), []).append(words[2].replace("-", "_"))

    order: list[Module] = []
    done: set[str] = set()
    active: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in active:
            cycle = " → ".join([*active[active.index(name) :], name])
            raise FailedPrecondition(f"kernel {kver}: modules.dep has a dependency cycle: {cycle}")
        active.append(name)
        path, deps = table[name]
        for dep in reversed(deps):  # modprobe loads the listed dependencies last to first
            dep_name = by_path.get(dep)
            if dep_name is None:
                raise FailedPrecondition(f"kernel {kver}: {path} needs {dep}, not in modules.dep")
            visit(dep_name)
        active.pop()
        try:
            size = (modules_dir / path).stat().st_size
        except OSError:
            raise FailedPrecondition(f"kernel {kver}: modules.dep lists {path}, which is missing") from None
        order.append(Module(name, path, size))
        done.add(name)

    skipped: list[str] = []
    for requested in names:
        name = requested.replace("-", "_")
        candidates = [name] if name in table or name in builtin else aliases.get(name, [])
        known = [c for c in candidates if c in table or c in builtin]
        if not known:
            close = difflib.get_close_matches(name, sorted({*table, *builtin}), n=3, cutoff=0.6)
            hint = f"; closest: {', '.join(close)}" if close else "; no similar names"
            raise NotFound(f"kernel {kver} has no module {requested!r}{hint}")
        for real in known:
            if real in table:
                visit(real)
            elif real not in skipped:
                skipped.append(real)
    return ModuleSelection(kver=kver, modules=tuple(order), builtin=tuple(skipped))


# --- cpio "newc" --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpioEntry:
    """One archive member; ``data`` is a file's bytes or a symlink's target."""

    path: str
    mode: int  # file type and permission bits, as st_mode
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    source: Path | None = None  # a regular file's contents come from here instead of ``data``
    rdev: tuple[int, int] = (0, 0)


def _clean_path(path: str | PurePosixPath) -> str:
    text = str(path)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or "\x00" in text:
        raise InvalidArgument(f"{text!r} is not a valid archive path")
    return "/".join(parts)


def _header(ino: int, entry: CpioEntry, size: int, nlink: int, mtime: int, name: bytes) -> bytes:
    fields = (ino, entry.mode, entry.uid, entry.gid, nlink, mtime, size, 0, 0, *entry.rdev, len(name) + 1, 0)
    if not all(0 <= f <= 0xFFFFFFFF for f in fields):
        raise InvalidArgument(f"{entry.path}: a size, owner, time or device number does not fit in cpio newc")
    return b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0" + _pad(110 + len(name) + 1)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioArchive:
    """Entries of a cpio "newc" archive, written deterministically.

    Entries are sorted by path (each directory before its contents), missing parent
    directories are added (mode 0755), inode numbers count from 1, every mtime is ``mtime``
    and owners are root unless given.  Adding a path again is InvalidArgument unless the
    entry is the same.
    """

    def __init__(self, mtime: int = 0) -> None:
        if not 0 <= mtime <= 0xFFFFFFFF:
            raise InvalidArgument(f"mtime {mtime} does not fit in cpio newc")
        self.mtime = mtime
        self._entries: dict[str, CpioEntry] = {}

    def _add(self, entry: CpioEntry) -> None:
        old = self._entries.get(entry.path)
        if old is not None and old != entry:
            raise InvalidArgument(f"{entry.path} is already in the archive")
        self._entries[entry.path] = entry

    def add_dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self._add(CpioEntry(_clean_path(path), stat.S_IFDIR | (mode & 0o7777), uid, gid))

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> None:
        self._add(CpioEntry(_clean_path(path), stat.S_IFREG | (mode & 0o7777), uid, gid, bytes(data)))

    def add_file(self, path: str, source: Path, mode: int | None = None, uid: int = 0, gid: int = 0) -> None:
        """A regular file whose contents are read from ``source`` when the archive is written;
        ``mode`` defaults to the source's permission bits."""
        try:
            st = os.stat(source)
        except OSError as e:
            raise NotFound(f"cannot add {path}: {source}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"cannot add {path}: {source} is not a regular file")
        perm = stat.S_IMODE(st.st_mode) if mode is None else mode & 0o7777
        self._add(CpioEntry(_clean_path(path), stat.S_IFREG | perm, uid, gid, source=Path(source)))

    def add_symlink(self, path: str, target: str, uid: int = 0, gid: int = 0) -> None:
        if not target or "\x00" in target:
            raise InvalidArgument(f"{target!r} is not a valid symbolic link target")
        self._add(CpioEntry(_clean_path(path), stat.S_IFLNK | 0o777, uid, gid, target.encode()))

    def add_node(
        self,
        path: str,
        kind: Literal["c", "b"],
        major: int,
        minor: int,
        mode: int = 0o600,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        """A character (``c``) or block (``b``) device node; no privilege is needed to archive one."""
        if kind not in ("c", "b"):
            raise InvalidArgument(f"device kind must be 'c' or 'b', not {kind!r}")
        ftype = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        self._add(CpioEntry(_clean_path(path), ftype | (mode & 0o7777), uid, gid, rdev=(major, minor)))

    def entries(self) -> list[CpioEntry]:
        """Every entry in archive order, with the implied parent directories."""
        entries = dict(self._entries)
        for path, entry in self._entries.items():
            parent = PurePosixPath(path).parent
            while str(parent) != ".":
                above = entries.get(str(parent))
                if above is None:
                    entries[str(parent)] = CpioEntry(str(parent), stat.S_IFDIR | 0o755)
                elif not stat.S_ISDIR(above.mode):
                    raise InvalidArgument(f"{entry.path}: {parent} is in the archive but not a directory")
                parent = parent.parent
        return [entries[p] for p in sorted(entries, key=lambda p: p.split("/"))]

    def write_cpio(self, out: BinaryIO) -> int:
        """Write the archive, TRAILER!!! included; returns the number of bytes written."""
        written = 0
        for ino, entry in enumerate(self.entries(), 1):
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
            name = entry.path.encode("utf-8", "surrogateescape")
            if entry.source is None:
                out.write(head := _header(ino, entry, len(entry.data), nlink, self.mtime, name))
                out.write(entry.data + _pad(len(entry.data)))
                written += len(head) + len(entry.data) + len(_pad(len(entry.data)))
                continue
            with open(entry.source, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                out.write(head := _header(ino, entry, size, nlink, self.mtime, name))
                left = size
                while left and (chunk := f.read(min(CHUNK, left))):
                    out.write(chunk)
                    left -= len(chunk)
                if left or f.read(1):
                    raise FailedPrecondition(f"{entry.source} changed size while it was archived")
            out.write(_pad(size))
            written += len(head) + size + len(_pad(size))
        trailer = _header(0, CpioEntry("TRAILER!!!", 0), 0, 1, 0, b"TRAILER!!!")
        out.write(trailer)
        return written + len(trailer)


# --- initrds ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InitrdInfo:
    """What :meth:`InitrdBuilder.write` wrote."""

    compressed_size: int
    uncompressed_size: int
    files: int  # regular files
    entries: int  # every archive entry (directories, links and nodes too)
    modules: tuple[str, ...]  # module names in load order


class _Counter:
    """A write-only stream that counts the bytes it passes on."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


class InitrdBuilder(CpioArchive):
    """A cpio archive with a kernel's modules, written zstd-compressed as an initramfs.

    It always holds ``dev/console`` (c 5 1), which the kernel opens for init.
    """

    def __init__(self, mtime: int = 0) -> None:
        super().__init__(mtime)
        self.selection: ModuleSelection | None = None
        self.add_node("dev/console", "c", 5, 1)

    def add_modules(self, image_root: Path, kver: str, names: Iterable[str]) -> ModuleSelection:
        """Add ``names`` and their dependencies from the image's ``/lib/modules/KVER``.

        Also adds ``lib/modules/KVER/modules.dep`` limited to those modules (for modprobe),
        the image's modules.builtin, and ``etc/slim/modules``: the module paths in load order.
        Call it once, with every name.
        """
        if self.selection is not None:
            raise InvalidArgument("add_modules was already called; pass every module name at once")
        if not KVER_RE.match(kver):
            raise InvalidArgument(f"{kver!r} is not a kernel version")
        modules_dir = resolve_in_image(image_root, f"/lib/modules/{kver}")
        if not modules_dir.is_dir():
            raise FailedPrecondition(f"image {image_root} has no /lib/modules/{kver}")
        selection = resolve_modules(modules_dir, names)
        deps = _parse_dep(modules_dir)
        base = f"lib/modules/{kver}"
        dep_lines = []
        for module in selection.modules:
            source = resolve_in_image(image_root, f"/{base}/{module.path}")
            self.add_file(f"{base}/{module.path}", source, mode=0o644)
            dep_lines.append(f"{module.path}: {' '.join(deps[module.name][1])}".rstrip() + "\n")
        self.add_bytes(f"{base}/modules.dep", "".join(dep_lines).encode())
        builtin = modules_dir / "modules.builtin"
        if builtin.is_file():
            self.add_bytes(f"{base}/modules.builtin", builtin.read_bytes())
        self.add_bytes("etc/slim/modules", "".join(f"/{base}/{m.path}\n" for m in selection.modules).encode())
        self.selection = selection
        return selection

    def write(self, out: BinaryIO, level: int = 19) -> InitrdInfo:
        """Write the archive as one zstd frame (with checksum and its size) to ``out``.

        The archive is put together in memory first: a frame that says its size gets a window
        as big as the archive (up to :data:`WINDOW_LOG`) and no bigger, which the kernel
        allocates while it unpacks.
        """
        raw = io.BytesIO()
        size = self.write_cpio(raw)
        counter = _Counter(out)
        params = zstandard.ZstdCompressionParameters.from_level(
            level, source_size=size, window_log=WINDOW_LOG, write_checksum=True
        )
        compressor = zstandard.ZstdCompressor(compression_params=params)
        with compressor.stream_writer(cast(IO[bytes], counter), size=size, closefd=False) as writer:
            writer.write(raw.getbuffer())
        entries = self.entries()
        return InitrdInfo(
            compressed_size=counter.count,
            uncompressed_size=size,
            files=sum(1 for e in entries if stat.S_ISREG(e.mode)),
            entries=len(entries),
            modules=tuple(self.selection.names) if self.selection else (),
        )
