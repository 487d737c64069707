"""A synthetic "Table-2 image": the paper's Fedora Core 1 workload without Fedora Core 1.

Table 2 of the paper lists, per top-level directory of a freshly installed
Fedora Core 1, whether it is read-only or read/write at run time, how many
files it holds and how many megabytes.  :func:`generate` writes a tree with
exactly those counts and sizes (times ``scale``), shaped like a real system:

* nested directories (``usr/share/doc/<pkg>-<version>/…``, ``usr/share/locale/
  <lang>/LC_MESSAGES/…``, ``lib/modules/<kernel>/kernel/drivers/…``) with a
  spread of fan-outs and depths;
* log-normal file sizes per area (small configuration files, larger libraries,
  a few big files such as the RPM database), scaled so that every directory's
  total is exact;
* symbolic links (``libfoo.so.1 -> libfoo.so.1.2.3``, ``rc3.d/S10x ->
  ../init.d/x``), a few hard links (``gunzip``/``zcat`` and ``gzip``, zoneinfo),
  executables in ``bin`` and ``sbin``, setuid and setgid programs, sticky
  ``tmp`` directories;
* ``dev`` made of device nodes (``os.mknod``) and one FIFO when running as root;
  without root the device nodes become empty regular files with the same
  names and permissions (the FIFO stays a FIFO);
* contents that compress like a system image: text made of words (documents,
  configuration, headers, scripts), binary-looking data (machine-code-like
  bytes, string tables, zero padding) and already-compressed data (``.gz``,
  ``.png``).  Every file is generated from its own random stream, so no two
  files share their bytes and an archive cannot deduplicate across files.

Units and rounding: a "MB" of Table 2 is a MiB (2**20 bytes, what ``du -m``
reports).  At scale ``s`` a directory gets ``max(1, floor(files * s + 0.5))``
non-directory entries (every kind counts: files, symbolic links, hard links,
device nodes, FIFOs) and exactly ``floor(mb * 2**20 * s + 0.5)`` bytes in its
regular files (a hard-linked file counts once; symbolic links, device nodes
and FIFOs count 0).  Directories are not counted.

The same ``(scale, seed)`` always gives the same tree: names, contents, modes,
ownership (0:0 as root, otherwise the current user and its primary group) and
modification times (Fedora Core 1's release day, 2003-11-05 00:00 UTC).
"""

from __future__ import annotations

import array
import math
import os
import posixpath
import random
import re
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from slim.errors import FailedPrecondition, InvalidArgument

MIB = 1 << 20
READ_ONLY = "read-only"
READ_WRITE = "read/write"
MTIME_NS = 1_067_990_400 * 1_000_000_000  # 2003-11-05T00:00:00Z, Fedora Core 1's release
MAX_SCALE = 10.0  # 25 GB; a typo such as 100 should not fill the disk
KERNEL = "2.4.22-1.2115.nptl"  # Fedora Core 1's kernel


@dataclass(frozen=True, slots=True)
class Table2Row:
    """One row of the paper's Table 2."""

    path: str  # "/usr"
    access: str  # READ_ONLY or READ_WRITE
    files: int  # non-directory entries
    mb: float  # MiB in regular files

    @property
    def name(self) -> str:
        return self.path.lstrip("/")

    def scaled_files(self, scale: float) -> int:
        """Entries at ``scale``: ``max(1, floor(files * scale + 0.5))``."""
        return max(1, math.floor(self.files * scale + 0.5))

    def scaled_bytes(self, scale: float) -> int:
        """Bytes at ``scale``: ``floor(mb * 2**20 * scale + 0.5)``."""
        return math.floor(self.mb * MIB * scale + 0.5)


TABLE2: tuple[Table2Row, ...] = (
    Table2Row("/bin", READ_ONLY, 98, 4.6),
    Table2Row("/boot", READ_ONLY, 37, 4.6),
    Table2Row("/dev", READ_WRITE, 18704, 0.4),
    Table2Row("/etc", READ_WRITE, 4122, 25.0),
    Table2Row("/lib", READ_ONLY, 3920, 76.9),
    Table2Row("/sbin", READ_ONLY, 274, 12.2),
    Table2Row("/usr", READ_ONLY, 144202, 2196.3),
    Table2Row("/var", READ_WRITE, 1410, 65.0),
)

# Empty top-level directories Fedora Core 1 also had (mount points and user data);
# they hold no files, so Table 2 has no row for them.
EMPTY_DIRS: tuple[tuple[str, int], ...] = (
    ("home", 0o755),
    ("initrd", 0o755),
    ("mnt", 0o755),
    ("opt", 0o755),
    ("proc", 0o555),
    ("selinux", 0o755),
    ("tmp", 0o1777),
)


@dataclass(frozen=True, slots=True)
class GeneratedDir:
    """What :func:`generate` wrote into one Table-2 directory."""

    path: str  # "/usr"
    access: str
    files: int  # non-directory entries (all kinds)
    bytes: int  # bytes in regular files, hard links once
    regular: int  # regular files (the first name of a hard-linked file included)
    symlinks: int
    hardlinks: int  # extra names of an earlier regular file
    devices: int  # character and block device nodes (empty regular files without root)
    fifos: int
    directories: int  # subdirectories, the directory itself excluded


# --------------------------------------------------------------------------- contents

TEXT, BINARY, RANDOM = "text", "binary", "random"
_CONS: tuple[str, ...] = (*"bcdfghklmnprstvwxz", "ch", "sh", "st", "tr", "gr", "pl", "qu", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "y", "ia", "ou", "ee")
_COMMON = (
    "the", "of", "and", "to", "a", "in", "is", "for", "that", "file", "if", "with", "on", "be", "this",
    "by", "not", "or", "are", "it", "from", "as", "default", "use", "=", "0", "1", "--", "*", "#",
    "{", "}", "(void)", "return", "int", "NULL", "#define", "char", "struct", "static", "const",
    "/usr", "/etc", "error", "value", "set", "options", "see", "will", "can", "you", "option",
)  # fmt: skip
_CHUNK = 1 << 20
_ELF = b"\x7fELF\x01\x01\x01" + bytes(9) + b"\x02\x00\x03\x00\x01\x00\x00\x00"
_MAGIC = {".gz": b"\x1f\x8b\x08\x00", ".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff\xe0"}
# Machine-code-like bytes: a random byte through this table is skewed toward
# zero and small values, as compiled code and data are.
_CODE = bytes(0 if i < 96 else (i % 16 if i < 160 else i) for i in range(256))


def _word(rng: random.Random, lo: int = 1, hi: int = 3) -> str:
    n = rng.randint(lo, hi)
    w = "".join(rng.choice(_CONS) + rng.choice(_VOWELS) for _ in range(n))
    return w + rng.choice(_CONS) if rng.random() < 0.4 else w


class _Content:
    """Deterministic file contents; every file draws from its own random stream.

    Text is a sequence of three-word phrases and code a sequence of
    instruction-like byte strings, each picked by two random bytes from a table
    of 65536 built once per seed (Zipf-like word frequencies, so frequent words
    repeat as in real text); the choice of phrases is what makes each file
    unique.
    """

    def __init__(self, seed: int) -> None:
        rng = random.Random(f"table2-words:{seed}")  # noqa: S311 - reproducible, not secret
        vocab = [_word(rng) for _ in range(6000)]
        insns = [rng.randbytes(rng.randint(1, 6)).translate(_CODE) for _ in range(3000)]

        def zipf(common: tuple[str, ...] | None, pool: list[str] | list[bytes]) -> object:
            if common is not None and rng.random() < 0.45:
                return rng.choice(common)
            return pool[int(rng.paretovariate(1.1)) % len(pool)]

        self.phrases = tuple(
            (
                " ".join(str(zipf(_COMMON, vocab)) for _ in range(3)) + ("\n" if rng.random() < 0.12 else " ")
            ).encode()
            for _ in range(65536)
        )
        self.code = tuple(
            b"".join(insns[int(rng.paretovariate(0.9)) % len(insns)] for _ in range(4)) for _ in range(65536)
        )
        self.mean_phrase = sum(map(len, self.phrases)) / len(self.phrases)
        self.mean_code = sum(map(len, self.code)) / len(self.code)

    @staticmethod
    def _draw(rng: random.Random, table: tuple[bytes, ...], mean: float, n: int) -> bytes:
        parts: list[bytes] = []
        have = 0
        while have < n:
            want = min(n - have, _CHUNK)
            idx = array.array("H", rng.randbytes(2 * (int(want / mean) + 8)))
            if sys.byteorder == "big":
                idx.byteswap()
            piece = b"".join(map(table.__getitem__, idx))
            parts.append(piece)
            have += len(piece)
        return b"".join(parts)[:n]

    def text(self, rng: random.Random, n: int) -> bytes:
        return self._draw(rng, self.phrases, self.mean_phrase, n)

    def binary(self, rng: random.Random, n: int, elf: bool = True) -> bytes:
        parts = [_ELF] if elf else []
        have = len(_ELF) if elf else 0
        while have < n:
            seg = min(rng.randint(256, 12288), n - have)
            r = rng.random()
            if r < CODE_MIX[0]:  # code: instruction sequences
                piece = self._draw(rng, self.code, self.mean_code, seg)
            elif r < CODE_MIX[1]:  # data: skewed bytes
                piece = rng.randbytes(seg).translate(_CODE)
            elif r < CODE_MIX[2]:  # string tables
                piece = self.text(rng, seg).replace(b" ", b"\0")
            elif r < CODE_MIX[3]:  # padding
                piece = bytes(seg)
            else:  # compressed or encrypted data: resources, signatures
                piece = rng.randbytes(seg)
            parts.append(piece)
            have += len(piece)
        return b"".join(parts)[:n]

    def chunks(self, content: str, path: str, seed: int, size: int, header: bytes) -> Iterator[bytes]:
        """The bytes of the regular file ``path`` (``size`` of them), in pieces."""
        rng = random.Random(f"table2:{seed}:{path}")  # noqa: S311 - reproducible, not secret
        done = 0
        while done < size:
            n = min(size - done, 4 * _CHUNK)
            if content == TEXT:
                data = self.text(rng, n)
            elif content == BINARY:
                data = self.binary(rng, n, elf=done == 0)
            else:
                data = rng.randbytes(n)
            if done == 0 and header:
                data = (header + data)[:n]
            done += n
            yield data


CODE_MIX = (0.50, 0.62, 0.84, 0.96)


def _header(path: str, content: str) -> bytes:
    """A plausible first line for a text file, or a magic number."""
    base = posixpath.basename(path)
    ext = posixpath.splitext(base)[1]
    if content == RANDOM:
        return _MAGIC.get(ext, b"")
    if content != TEXT:
        return b""
    if ext in (".h", ".c"):
        return f"/* {base} */\n#ifndef {re.sub(r'[^A-Za-z0-9]', '_', base).upper()}\n".encode()
    if re.fullmatch(r"\.[1-8]", ext):
        return f'.TH {base[: -len(ext)].upper()} {ext[1]} "2003-11-05"\n.SH NAME\n'.encode()
    if ext in (".html", ".htm"):
        return f"<html><head><title>{base}</title></head>\n<body>\n".encode()
    if ext in (".xml", ".schemas"):
        return b'<?xml version="1.0"?>\n'
    if ext in (".py",):
        return b"#!/usr/bin/python\n"
    if ext in (".pm", ".pl"):
        return f"package {base[: -len(ext)]};\nuse strict;\n".encode()
    if "/init.d/" in path or ext == ".sh":
        return b"#!/bin/sh\n#\n# chkconfig: 2345 10 90\n"
    return f"# {path}\n".encode()


# --------------------------------------------------------------------------- the plan

FILE, SYMLINK, HARDLINK, CHR, BLK, FIFO = "file", "symlink", "hardlink", "chr", "blk", "fifo"


@dataclass(slots=True)
class _Item:
    path: str  # relative to the target
    kind: str
    mode: int
    content: str = TEXT
    weight: float = 0.0  # size before scaling to the directory's total
    size: int = 0
    target: str = ""  # symlink target, or the path (relative to the target) a hard link names
    rdev: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class _Special:
    """A named entry placed before the generated ones (while the count allows)."""

    path: str
    kind: str = FILE
    mode: int = 0o644
    content: str = TEXT
    mu: float = 8.0  # log of the size before scaling
    target: str = ""


@dataclass(frozen=True, slots=True)
class _Area:
    """A region of a top-level directory filled with generated entries."""

    path: str  # "usr/share/doc"
    share: float  # of the directory's generated entries
    exts: tuple[tuple[str, str], ...]  # (name suffix, content) choices
    mu: float = 8.0  # log-normal size parameters, before scaling
    sigma: float = 1.2
    levels: tuple[tuple[str, ...] | None, ...] = ()  # per level: fixed names, or None = generated
    per_dir: int = 12  # mean entries per leaf directory
    loose: float = 0.1  # share of a non-leaf directory's entries kept in it as files
    mode: int = 0o644
    symlinks: float = 0.0
    hardlinks: float = 0.0
    versioned: bool = False  # generated directory names look like "name-1.2.3"
    prefix: str = ""  # file name prefix ("lib", "pam_")
    so_links: bool = False  # symlinks are "libx.so.1 -> libx.so.1.2.3"
    link_area: str = ""  # symlinks point at that area's files (rc?.d -> init.d)
    upper: bool = False  # README-style names


@dataclass(frozen=True, slots=True)
class _Layout:
    specials: tuple[_Special, ...]
    areas: tuple[_Area, ...]
    dirs: tuple[tuple[str, int], ...] = ()  # directories that exist even if empty, with modes


_T, _B, _R = TEXT, BINARY, RANDOM
_EXEC = 0o755
_SO = ((".so", _B),)
_LANGS = (
    "ar", "bg", "ca", "cs", "da", "de", "el", "en_GB", "es", "et", "eu", "fi", "fr", "ga", "gl", "he",
    "hr", "hu", "id", "it", "ja", "ko", "lt", "ms", "nl", "nn", "no", "pl", "pt", "pt_BR", "ro", "ru",
    "sk", "sl", "sr", "sv", "ta", "tr", "uk", "vi", "wa", "zh_CN", "zh_TW",
)  # fmt: skip
_MAN = ("man1", "man2", "man3", "man4", "man5", "man6", "man7", "man8", "mann")
_DOCS = ("README", "COPYING", "ChangeLog", "NEWS", "AUTHORS", "TODO", "INSTALL", "THANKS", "BUGS", "FAQ")
_ZONES = ("Africa", "America", "Antarctica", "Asia", "Atlantic", "Australia", "Europe", "Indian", "Pacific")
_KMOD = ("drivers", "fs", "net", "crypto", "lib", "arch", "sound")

LAYOUTS: dict[str, _Layout] = {
    "bin": _Layout(
        specials=(
            _Special("bin/bash", mode=_EXEC, content=_B, mu=13.4),
            _Special("bin/sh", SYMLINK, 0o777, target="bash"),
            _Special("bin/gzip", mode=_EXEC, content=_B, mu=11),
            _Special("bin/gunzip", HARDLINK, target="bin/gzip"),
            _Special("bin/zcat", HARDLINK, target="bin/gzip"),
            _Special("bin/su", mode=0o4755, content=_B, mu=10),
            _Special("bin/ping", mode=0o4755, content=_B, mu=10.3),
            _Special("bin/mount", mode=0o4755, content=_B, mu=11.2),
            _Special("bin/umount", mode=0o4755, content=_B, mu=10.5),
            _Special("bin/vi", mode=_EXEC, content=_B, mu=12.9),
            _Special("bin/ex", SYMLINK, 0o777, target="vi"),
            _Special("bin/rpm", mode=_EXEC, content=_B, mu=11.2),
        ),
        areas=(_Area("bin", 1, (("", _B),), mu=10.5, mode=_EXEC, symlinks=0.1, hardlinks=0.02),),
    ),
    "boot": _Layout(
        specials=(
            _Special(f"boot/vmlinuz-{KERNEL}", content=_R, mu=14.0),
            _Special("boot/vmlinuz", SYMLINK, 0o777, target=f"vmlinuz-{KERNEL}"),
            _Special(f"boot/initrd-{KERNEL}.img", content=_R, mu=12.4),
            _Special(f"boot/System.map-{KERNEL}", mu=13.2),
            _Special("boot/System.map", SYMLINK, 0o777, target=f"System.map-{KERNEL}"),
            _Special(f"boot/config-{KERNEL}", mu=10.7),
            _Special("boot/grub/grub.conf", mode=0o600, mu=6.5),
            _Special("boot/grub/menu.lst", SYMLINK, 0o777, target="./grub.conf"),
            _Special("boot/grub/device.map", mu=3.5),
            _Special("boot/grub/splash.xpm.gz", content=_R, mu=11.6),
            _Special("boot/grub/stage1", content=_B, mu=6.2),
            _Special("boot/grub/stage2", content=_B, mu=11.5),
            _Special("boot/message", content=_R, mu=11),
        ),
        areas=(_Area("boot/grub", 1, (("_stage1_5", _B),), mu=9.2, sigma=0.3),),
    ),
    "dev": _Layout(  # devices are added by _devices()
        specials=(_Special("dev/.udev.tdb", content=_B, mu=12.5),),
        areas=(_Area("dev/.udevdb", 1, (("", _T),), mu=5, sigma=0.4),),
        dirs=(("dev/pts", 0o755), ("dev/shm", 0o1777)),
    ),
    "etc": _Layout(
        specials=(
            _Special("etc/passwd", mu=7.3),
            _Special("etc/group", mu=6.5),
            _Special("etc/shadow", mode=0o400, mu=6.8),
            _Special("etc/fstab", mu=6.0),
            _Special("etc/hosts", mu=5),
            _Special("etc/inittab", mu=7.4),
            _Special("etc/ld.so.conf", mu=3.5),
            _Special("etc/ld.so.cache", content=_B, mu=10.8),
            _Special("etc/localtime", content=_B, mu=7.2),
            _Special("etc/prelink.cache", content=_B, mu=10.5),
            _Special("etc/termcap", mu=13.3),
            _Special("etc/services", mu=12.7),
        ),
        areas=(
            _Area("etc", 0.10, ((".conf", _T), ("", _T)), mu=7.3),
            _Area("etc/rc.d/init.d", 0.025, (("", _T),), mu=8, mode=_EXEC),
            _Area(
                "etc/rc.d",
                0.11,
                (("", _T),),
                levels=(("rc0.d", "rc1.d", "rc2.d", "rc3.d", "rc4.d", "rc5.d", "rc6.d"),),
                per_dir=60,
                symlinks=1.0,
                link_area="etc/rc.d/init.d",
            ),
            _Area("etc/sysconfig", 0.04, (("", _T),), levels=(None,), loose=0.5),
            _Area("etc/X11", 0.05, ((".conf", _T), ("", _T)), levels=(None, None), per_dir=8),
            _Area(
                "etc/gconf",
                0.45,
                ((".xml", _T), (".schemas", _T)),
                mu=8.5,
                levels=(("gconf.xml.defaults", "schemas"), None, None),
                per_dir=6,
            ),
            _Area("etc/pam.d", 0.015, (("", _T),), mu=5.8),
            _Area("etc/alternatives", 0.01, (("", _T),), symlinks=1.0),
            _Area("etc", 0.2, ((".conf", _T), ("", _T), (".db", _B)), levels=(None, None), per_dir=7),
        ),
        dirs=(("etc/skel", 0o755), ("etc/opt", 0o755)),
    ),
    "lib": _Layout(
        specials=(
            _Special("lib/libc-2.3.2.so", mode=_EXEC, content=_B, mu=14.2),
            _Special("lib/libc.so.6", SYMLINK, 0o777, target="libc-2.3.2.so"),
            _Special("lib/ld-2.3.2.so", mode=_EXEC, content=_B, mu=11.5),
            _Special("lib/ld-linux.so.2", SYMLINK, 0o777, target="ld-2.3.2.so"),
            _Special(f"lib/modules/{KERNEL}/modules.dep", mu=11.5),
            _Special(f"lib/modules/{KERNEL}/modules.pcimap", mu=11),
        ),
        areas=(
            _Area("lib", 0.05, _SO, mu=11, mode=_EXEC, symlinks=0.45, so_links=True, prefix="lib"),
            _Area(
                f"lib/modules/{KERNEL}/kernel",
                0.55,
                ((".o", _B),),
                mu=9.6,
                levels=(_KMOD, None, None),
                per_dir=15,
            ),
            _Area("lib/security", 0.015, _SO, mu=9.3, mode=_EXEC, prefix="pam_"),
            _Area("lib/iptables", 0.02, _SO, mu=8.8, mode=_EXEC, prefix="libipt_"),
            _Area("lib/i686", 0.005, _SO, mu=12, mode=_EXEC, prefix="lib"),
            _Area(
                "lib/kbd",
                0.33,
                ((".map", _T), (".psfu.gz", _R), (".trans", _T), (".uni", _T)),
                mu=7.5,
                levels=(("keymaps", "consolefonts", "unimaps", "consoletrans"), None, None),
                per_dir=20,
                symlinks=0.05,
            ),
            _Area("lib/firmware", 0.005, ((".bin", _R),), mu=10),
        ),
    ),
    "sbin": _Layout(
        specials=(
            _Special("sbin/init", mode=_EXEC, content=_B, mu=10.4),
            _Special("sbin/ldconfig", mode=_EXEC, content=_B, mu=13.2),
            _Special("sbin/mke2fs", mode=_EXEC, content=_B, mu=11),
            _Special("sbin/mkfs.ext2", HARDLINK, target="sbin/mke2fs"),
            _Special("sbin/mkfs.ext3", HARDLINK, target="sbin/mke2fs"),
            _Special("sbin/unix_chkpwd", mode=0o4755, content=_B, mu=9.8),
            _Special("sbin/pam_timestamp_check", mode=0o4755, content=_B, mu=9),
            _Special("sbin/MAKEDEV", mode=_EXEC, content=_B, mu=10.5),
        ),
        areas=(_Area("sbin", 1, (("", _B),), mu=10.6, mode=_EXEC, symlinks=0.15, hardlinks=0.02),),
    ),
    "usr": _Layout(
        specials=(
            _Special("usr/bin/perl5.8.1", mode=_EXEC, content=_B, mu=13.8),
            _Special("usr/bin/perl", HARDLINK, target="usr/bin/perl5.8.1"),
            _Special("usr/bin/passwd", mode=0o4511, content=_B, mu=9.8),
            _Special("usr/bin/wall", mode=0o2555, content=_B, mu=9.4),
            _Special("usr/bin/python2.2", mode=_EXEC, content=_B, mu=8.2),
            _Special("usr/bin/python", SYMLINK, 0o777, target="python2.2"),
            _Special("usr/bin/crontab", mode=0o4755, content=_B, mu=10),
            _Special("usr/share/doc/fedora-release-1/GPL", mu=9.8),
            _Special("usr/share/doc/fedora-release-1/eula.txt", mu=7.6),
            _Special("usr/lib/locale/locale-archive", content=_B, mu=17),
        ),
        areas=(
            _Area(
                "usr/bin", 0.012, (("", _B),), mu=9.8, sigma=1.3, mode=_EXEC, symlinks=0.12, hardlinks=0.01
            ),
            _Area("usr/sbin", 0.003, (("", _B),), mu=9.6, mode=_EXEC, symlinks=0.08),
            _Area("usr/lib", 0.015, _SO, mu=10.6, mode=_EXEC, symlinks=0.45, so_links=True, prefix="lib"),
            _Area(
                "usr/lib",
                0.16,
                ((".py", _T), (".pyc", _B), (".so", _B), (".pm", _T), (".a", _B), (".la", _T)),
                mu=8.6,
                levels=(None, None, None),
                per_dir=14,
                symlinks=0.02,
            ),
            _Area("usr/libexec", 0.004, (("", _B),), mu=10, mode=_EXEC, levels=(None,), loose=0.4),
            _Area("usr/include", 0.05, ((".h", _T),), mu=8.3, levels=(None, None), per_dir=16, loose=0.3),
            _Area(
                "usr/share/doc",
                0.08,
                (("", _T), ("", _T), ("", _T), (".txt", _T), (".html", _T), (".html", _T), (".gif", _R)),
                mu=8.3,
                levels=(None, ("html", "examples", "doc")),
                per_dir=8,
                loose=0.7,
                versioned=True,
                upper=True,
            ),
            _Area("usr/share/man", 0.06, (("", _T),), mu=8.2, sigma=1.0, levels=(_MAN,), per_dir=500),
            _Area(
                "usr/share/locale",
                0.10,
                ((".mo", _B),),
                mu=9,
                levels=(_LANGS, ("LC_MESSAGES",)),
                per_dir=40,
                loose=0,
            ),
            _Area(
                "usr/share",
                0.30,
                (
                    (".png", _R),
                    (".xml", _T),
                    (".txt", _T),
                    (".svg", _T),
                    ("", _T),
                    (".dat", _B),
                    (".xpm", _T),
                    (".html", _T),
                    (".desktop", _T),
                    (".py", _T),
                ),
                mu=8.0,
                levels=(None, None, None),
                per_dir=10,
                symlinks=0.03,
            ),
            _Area(
                "usr/share/zoneinfo",
                0.012,
                (("", _B),),
                mu=7.2,
                sigma=0.6,
                levels=(_ZONES,),
                per_dir=80,
                hardlinks=0.25,
            ),
            _Area(
                "usr/X11R6/lib/X11/fonts",
                0.012,
                ((".pcf.gz", _R),),
                mu=8.8,
                levels=(("misc", "75dpi", "100dpi", "Type1", "cyrillic"),),
                per_dir=200,
            ),
            _Area("usr/X11R6/bin", 0.003, (("", _B),), mu=10.2, mode=_EXEC, symlinks=0.1),
            _Area("usr/share/info", 0.003, ((".info", _T),), mu=9.5),
        ),
        dirs=(("usr/local/bin", 0o755), ("usr/local/src", 0o755), ("usr/src/redhat/SOURCES", 0o755)),
    ),
    "var": _Layout(
        specials=(
            _Special("var/lib/rpm/Packages", mode=0o644, content=_B, mu=17.4),
            _Special("var/lib/rpm/Basenames", content=_B, mu=15.0),
            _Special("var/lib/rpm/Dirnames", content=_B, mu=14.2),
            _Special("var/lib/rpm/Filemd5s", content=_B, mu=15.2),
            _Special("var/lib/rpm/Providename", content=_B, mu=13.5),
            _Special("var/lib/rpm/Requirename", content=_B, mu=13.5),
            _Special("var/lib/rpm/Name", content=_B, mu=11.5),
            _Special("var/lib/rpm/__db.001", content=_B, mu=9.5),
            _Special("var/log/messages", mode=0o600, mu=10),
            _Special("var/log/lastlog", mode=0o644, content=_B, mu=9.5),
        ),
        areas=(
            _Area("var/lib", 0.15, (("", _T), (".db", _B)), mu=8.5, levels=(None,), per_dir=8),
            _Area("var/log", 0.03, (("", _T), (".log", _T)), mu=8.5, levels=(None,), loose=0.6, mode=0o600),
            _Area(
                "var/cache",
                0.2,
                ((".gz", _R), ("", _T)),
                mu=8.5,
                levels=(None, ("cat1", "cat5", "cat8")),
                per_dir=30,
            ),
            _Area(
                "var/www",
                0.4,
                ((".html", _T), (".gif", _R), (".png", _R)),
                mu=8.2,
                levels=(("manual", "icons", "error", "html"), None),
                per_dir=20,
                loose=0.4,
            ),
            _Area("var/spool", 0.03, (("", _T),), mu=7, levels=(None,)),
            _Area("var/named", 0.01, ((".zone", _T),), mu=7),
        ),
        dirs=(
            ("var/tmp", 0o1777),
            ("var/run", 0o755),
            ("var/lock", 0o755),
            ("var/empty/sshd", 0o711),
            ("var/spool/mail", 0o775),
            ("var/ftp/pub", 0o755),
        ),
    ),
}


class _Planner:
    """Names and kinds of every entry of one top-level directory."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.items: list[_Item] = []
        self.dirs: dict[str, int] = {}  # path -> mode, parents before children
        self.names: dict[str, set[str]] = {}  # directory -> names taken in it
        self.area_files: dict[str, list[str]] = {}  # area path -> its regular files

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent = posixpath.dirname(path)
        if parent and parent not in self.dirs:
            self.mkdir(parent)
        if path not in self.dirs:
            self.dirs[path] = mode
            self.names.setdefault(parent, set()).add(posixpath.basename(path))
        elif mode != 0o755:
            self.dirs[path] = mode

    def take(self, directory: str, name: str) -> str:
        """``name`` or, if taken in ``directory``, ``name`` with a number: unique in it."""
        used = self.names.setdefault(directory, set())
        stem, ext = (name, "")
        if "." in name[1:]:
            i = name.index(".", 1)
            stem, ext = name[:i], name[i:]
        candidate = name
        n = 2
        while candidate in used:
            candidate = f"{stem}{n}{ext}"
            n += 1
        used.add(candidate)
        return candidate

    def add(self, item: _Item) -> None:
        self.mkdir(posixpath.dirname(item.path))
        name = posixpath.basename(item.path)
        self.names.setdefault(posixpath.dirname(item.path), set()).add(name)
        self.items.append(item)

    # -- specials and areas

    def special(self, sp: _Special) -> None:
        mode = 0o777 if sp.kind == SYMLINK else sp.mode
        weight = math.exp(sp.mu + 0.2 * self.rng.gauss()) if sp.kind == FILE else 0.0
        item = _Item(sp.path, sp.kind, mode, sp.content, weight, target=sp.target)
        if sp.kind == HARDLINK:  # shares the first name's mode
            item.mode = next(i.mode for i in self.items if i.path == sp.target)
        self.add(item)

    def area(self, area: _Area, n: int) -> None:
        if n <= 0:
            return
        self.mkdir(area.path)
        rng = self.rng
        n_sym = min(n - 1, round(n * area.symlinks)) if not area.link_area else n
        n_hard = min(n - 1 - n_sym, round(n * area.hardlinks)) if not area.link_area else 0
        n_hard = max(0, n_hard)
        kinds = [SYMLINK] * n_sym + [HARDLINK] * n_hard + [FILE] * (n - n_sym - n_hard)
        rng.shuffle(kinds)
        if not area.link_area and kinds[0] != FILE:  # links need an earlier file to name
            j = kinds.index(FILE)
            kinds[0], kinds[j] = kinds[j], kinds[0]
        leaves: list[tuple[str, int]] = []
        self._split(area, area.path, n, area.levels, leaves)
        it = iter(kinds)
        files: list[str] = []
        self.area_files[area.path] = files
        for leaf, count in leaves:
            self.mkdir(leaf)
            leaf_files: list[str] = []
            for _ in range(count):
                self._entry(area, leaf, next(it), files, leaf_files)

    def _split(
        self,
        area: _Area,
        path: str,
        n: int,
        levels: tuple[tuple[str, ...] | None, ...],
        out: list[tuple[str, int]],
    ) -> None:
        if not levels or n <= 1:
            out.append((path, n))
            return
        rng = self.rng
        pool = levels[0]
        at_root = path == area.path and (pool is not None or area.versioned)
        keep = 0 if at_root else math.floor(n * min(1.0, area.loose * (0.5 + rng.random())))
        keep = min(keep, n - 1)
        rest = n - keep
        # the upper level fans out most (many packages, each with a few subdirectories)
        k = max(1, round((rest / area.per_dir) ** (0.7 if len(levels) > 1 else 1.0)))
        if pool is not None:
            k = min(k, len(pool))
            names = rng.sample(pool, k) if k < len(pool) else list(pool)
        else:
            names = [self._dirname(area, path) for _ in range(k)]
        weights = [math.exp(0.8 * rng.gauss()) for _ in range(k)]
        counts = _partition(rest, weights)
        if keep:
            out.append((path, keep))
        for name, count in zip(names, counts, strict=True):
            if count:
                self._split(area, f"{path}/{name}", count, levels[1:], out)

    def _dirname(self, area: _Area, parent: str) -> str:
        word = _word(self.rng, 1, 3)
        if area.versioned:
            word += "-" + ".".join(str(self.rng.randint(0, 9)) for _ in range(self.rng.randint(2, 3)))
        return self.take(parent, word)

    def _filename(self, area: _Area, leaf: str, ext: str) -> str:
        rng = self.rng
        used = self.names.setdefault(leaf, set())
        docs = [d for d in _DOCS if d + ext not in used] if area.upper and rng.random() < 0.4 else []
        base = rng.choice(docs) if docs else area.prefix + _word(rng, 1, 3)
        if area.path == "usr/share/man":
            ext = "." + (leaf.rsplit("man", 1)[-1] or "n")
        elif ext == ".so":
            ext = f".so.{rng.randint(0, 6)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"
        elif area.path == "usr/bin" and rng.random() < 0.05:
            base += "-config"
        return self.take(leaf, base + ext)

    def _entry(self, area: _Area, leaf: str, kind: str, files: list[str], leaf_files: list[str]) -> None:
        rng = self.rng
        if kind == FILE:
            ext, content = rng.choice(area.exts)
            name = self._filename(area, leaf, ext)
            weight = math.exp(area.mu + area.sigma * max(-3.0, min(3.0, rng.gauss())))
            path = f"{leaf}/{name}"
            self.add(_Item(path, FILE, area.mode, content, weight))
            files.append(path)
            leaf_files.append(path)
            return
        if kind == HARDLINK:
            target = rng.choice(leaf_files or files)
            stem = posixpath.basename(target).split(".")[0]
            name = self.take(leaf, f"{stem}-{_word(rng, 1, 1)}")
            self.add(_Item(f"{leaf}/{name}", HARDLINK, area.mode, target=target))
            return
        # symlink
        if area.link_area:
            pool = self.area_files.get(area.link_area)
            # no script to start at this scale: a dangling link, like a removed service's
            target = rng.choice(pool) if pool else f"{area.link_area}/{_word(rng)}"
            base = posixpath.basename(target)
            name = self.take(leaf, f"{'S' if rng.random() < 0.6 else 'K'}{rng.randint(1, 99):02d}{base}")
        elif area.path == "etc/alternatives":
            name = self.take(leaf, _word(rng, 1, 2))
            self.add(_Item(f"{leaf}/{name}", SYMLINK, 0o777, target=f"/usr/bin/{name}"))
            return
        else:
            target = rng.choice(leaf_files or files)
            name = self._link_name(area, leaf, posixpath.basename(target))
        rel = posixpath.relpath(target, leaf)
        self.add(_Item(f"{leaf}/{name}", SYMLINK, 0o777, target=rel))

    def _link_name(self, area: _Area, leaf: str, base: str) -> str:
        """``libx.so.1`` (then ``libx.so``) for ``libx.so.1.2.3``; otherwise a new word."""
        m = re.fullmatch(r"(.+\.so)\.(\d+)\..*", base) if area.so_links else None
        used = self.names.setdefault(leaf, set())
        if m:
            for candidate in (f"{m.group(1)}.{m.group(2)}", m.group(1)):
                if candidate not in used:
                    used.add(candidate)
                    return candidate
        return self.take(leaf, _word(self.rng))


def _partition(n: int, weights: list[float]) -> list[int]:
    """``n`` split in proportion to ``weights`` (largest remainders), exact total."""
    total = sum(weights)
    raw = [n * w / total for w in weights]
    counts = [math.floor(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (counts[i] - raw[i], i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _devices(planner: _Planner, n: int) -> None:
    """``n`` entries of a static /dev: a few fixed nodes and links, then device families."""
    fixed: list[tuple[str, str, int, int, int]] = [
        ("null", CHR, 1, 3, 0o666),
        ("zero", CHR, 1, 5, 0o666),
        ("console", CHR, 5, 1, 0o600),
        ("tty", CHR, 5, 0, 0o666),
        ("initctl", FIFO, 0, 0, 0o600),
        ("mem", CHR, 1, 1, 0o640),
        ("kmem", CHR, 1, 2, 0o640),
        ("random", CHR, 1, 8, 0o644),
        ("urandom", CHR, 1, 9, 0o644),
        ("ptmx", CHR, 5, 2, 0o666),
        ("hda", BLK, 3, 0, 0o660),
        ("fd0", BLK, 2, 0, 0o660),
    ]
    links = [
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("fd", "/proc/self/fd"),
        ("core", "/proc/kcore"),
        ("MAKEDEV", "../sbin/MAKEDEV"),
        ("cdrom", "hdc"),
    ]

    def families() -> Iterator[tuple[str, str, int, int, int]]:
        yield from fixed[:5]
        yield ("stdin", SYMLINK, 0, 0, 0)
        yield from fixed[5:]
        for name, _ in links[1:]:
            yield (name, SYMLINK, 0, 0, 0)
        for i in range(64):
            yield (f"tty{i}", CHR, 4, i, 0o620)
        for i in range(64):
            yield (f"ttyS{i}", CHR, 4, 64 + i, 0o660)
        ide_majors = (3, 3, 22, 22, 33, 33, 34, 34, 56, 56, 57, 57, 88, 88, 89, 89, 90, 90, 91, 91)
        for d, major in enumerate(ide_majors):
            disk = "hd" + "abcdefghijklmnopqrst"[d]
            base = 64 * (d % 2)
            if d:
                yield (disk, BLK, major, base, 0o660)
            for p in range(1, 64):
                yield (f"{disk}{p}", BLK, major, base + p, 0o660)
        letters = "abcdefghijklmnopqrstuvwxyz"
        for d in range(256):
            disk = "sd" + (letters[d] if d < 26 else letters[d // 26 - 1] + letters[d % 26])
            major = 8 if d < 16 else 64 + d // 16
            for p in range(16):
                yield (disk + (str(p) if p else ""), BLK, major, (d % 16) * 16 + p, 0o660)
        for i in range(256):
            yield (f"loop{i}", BLK, 7, i, 0o660)
        for i in range(20):
            yield (f"ram{i}", BLK, 1, i, 0o660)
        for i, c in enumerate("pqrstuvwxyzabcde"):
            for j in range(16):
                yield (f"pty{c}{j:x}", CHR, 2, i * 16 + j, 0o666)
                yield (f"tty{c}{j:x}", CHR, 3, i * 16 + j, 0o666)
        for i in range(1, 256):
            yield (f"raw/raw{i}", CHR, 162, i, 0o660)
        for i in range(32):
            yield (f"input/event{i}", CHR, 13, 64 + i, 0o600)
            yield (f"input/mouse{i}", CHR, 13, 32 + i, 0o600)
        for i in range(256):
            yield (f"sg{i}", CHR, 21, i, 0o660)
        for ctl in range(8):
            for unit in range(16):
                for p in range(16):
                    name = f"c{ctl}d{unit}" + (f"p{p}" if p else "")
                    yield (f"cciss/{name}", BLK, 104 + ctl, unit * 16 + p, 0o660)
                    yield (f"ida/{name}", BLK, 72 + ctl, unit * 16 + p, 0o660)
                    yield (f"rd/{name}", BLK, 48 + ctl, unit * 16 + p, 0o660)
        i = 0
        while True:  # beyond Fedora's list: numbered nodes of a local major
            yield (f"misc/unit{i}", CHR, 240 + (i >> 20), i & 0xFFFFF, 0o600)
            i += 1

    targets = dict(links)
    for (name, kind, major, minor, mode), _ in zip(families(), range(n), strict=False):
        path = f"dev/{name}"
        if kind == SYMLINK:
            planner.add(_Item(path, SYMLINK, 0o777, target=targets[name]))
        else:
            planner.add(_Item(path, kind, mode, rdev=(major, minor)))


def _plan(row: Table2Row, scale: float, seed: int) -> tuple[list[_Item], dict[str, int]]:
    """Every entry of one Table-2 directory, sizes set; and its directories with modes."""
    name = row.name
    layout = LAYOUTS[name]
    planner = _Planner(random.Random(f"table2-plan:{seed}:{name}"))  # noqa: S311 - reproducible
    planner.mkdir(name)
    # Reserve every fixed directory first, so no generated file takes its name.
    for sp in layout.specials:
        planner.mkdir(posixpath.dirname(sp.path))
    for area in layout.areas:
        planner.mkdir(area.path)
    for path, mode in layout.dirs:
        planner.mkdir(path, mode)
    n = row.scaled_files(scale)
    total_bytes = row.scaled_bytes(scale)
    specials = list(layout.specials)
    n_regular_min = 1 if total_bytes else 0
    if name == "dev":
        # devices dominate; the regular files (udev's database) are about 1 in 200
        n_files = max(n_regular_min, round(n / 200))
        n_dev = n - n_files
        _devices(planner, n_dev)
        n = n_files
    for sp in specials[:n]:
        planner.special(sp)
    rest = n - min(n, len(specials))
    shares = [a.share for a in layout.areas]
    for area, count in zip(layout.areas, _partition(rest, shares), strict=True):
        planner.area(area, count)
    _set_sizes(planner.items, total_bytes)
    return planner.items, planner.dirs


def _set_sizes(items: list[_Item], total: int) -> None:
    regular = [i for i in items if i.kind == FILE]
    if not regular:
        if total:
            raise AssertionError("bytes but no regular file to hold them")
        return
    weights = [max(i.weight, 1e-9) for i in regular]
    for item, size in zip(regular, _partition(total, weights), strict=True):
        item.size = size


# --------------------------------------------------------------------------- writing


@dataclass
class _Writer:
    root: str
    seed: int
    content: _Content
    devices: bool
    uid: int
    gid: int

    def write(self, item: _Item) -> None:
        full = os.path.join(self.root, item.path)
        kind = item.kind
        if kind == FILE or (kind in (CHR, BLK) and not self.devices):
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                if kind == FILE:
                    header = _header(item.path, item.content)
                    for chunk in self.content.chunks(item.content, item.path, self.seed, item.size, header):
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                os.fchown(fd, self.uid, self.gid)
                os.fchmod(fd, item.mode)  # after chown, which clears setuid
            finally:
                os.close(fd)
        elif kind == SYMLINK:
            os.symlink(item.target, full)
            os.chown(full, self.uid, self.gid, follow_symlinks=False)
        elif kind == HARDLINK:
            os.link(os.path.join(self.root, item.target), full, follow_symlinks=False)
        elif kind in (CHR, BLK):
            fmt = stat.S_IFCHR if kind == CHR else stat.S_IFBLK
            os.mknod(full, fmt | 0o600, os.makedev(*item.rdev))
            os.chown(full, self.uid, self.gid)
            os.chmod(full, item.mode)
        elif kind == FIFO:
            os.mkfifo(full, 0o600)
            os.chown(full, self.uid, self.gid)
            os.chmod(full, item.mode)
        else:  # pragma: no cover - the planner makes no other kind
            raise AssertionError(kind)
        os.utime(full, ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)


def generate(
    target: Path,
    scale: float = 1.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    *,
    device_nodes: bool | None = None,
) -> list[GeneratedDir]:
    """Write a Table-2 image into ``target`` (created if missing; must be empty).

    ``progress(done, total)`` is called as non-directory entries are written
    (about every 1000, and once at the end).  ``device_nodes``: make real
    device nodes in ``dev`` (default: when running as root); otherwise they are
    empty regular files with the same names and permissions.  Returns what each
    Table-2 directory received, in Table 2's order.
    """
    if not (isinstance(scale, int | float) and math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        raise InvalidArgument(f"scale must be a number in (0, {MAX_SCALE:g}], not {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgument(f"seed must be an integer, not {seed!r}")
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FailedPrecondition(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        raise FailedPrecondition(
            f"{target} is not empty; the Table-2 image is only written into an empty directory"
        )
    is_root = os.geteuid() == 0
    if device_nodes is None:
        device_nodes = is_root
    elif device_nodes and not is_root:
        raise FailedPrecondition(
            "device nodes need root; leave device_nodes unset to get empty files instead"
        )
    uid, gid = (0, 0) if is_root else (os.getuid(), os.getgid())

    plans = [(row, *_plan(row, scale, seed)) for row in TABLE2]
    total = sum(len(items) for _, items, _ in plans)
    target.mkdir(parents=True, exist_ok=True)
    root = os.fspath(target)
    writer = _Writer(root, seed, _Content(seed), device_nodes, uid, gid)
    all_dirs: list[tuple[str, int]] = [(name, mode) for name, mode in EMPTY_DIRS]
    summaries: list[GeneratedDir] = []
    done = 0
    for row, items, dirs in plans:
        for path in dirs:
            os.mkdir(os.path.join(root, path), 0o700)
        all_dirs.extend(dirs.items())
        for item in items:
            writer.write(item)
            done += 1
            if progress is not None and done % 1000 == 0:
                progress(done, total)
        summaries.append(_summary(row, items, dirs, device_nodes))
    for name, _mode in EMPTY_DIRS:
        os.mkdir(os.path.join(root, name), 0o700)
    # Directories last, deepest first: their modes may forbid writing, and
    # creating entries changes their modification time.
    for path, mode in sorted(all_dirs, key=lambda d: d[0].count("/"), reverse=True):
        full = os.path.join(root, path)
        os.chown(full, uid, gid)
        os.chmod(full, mode)
        os.utime(full, ns=(MTIME_NS, MTIME_NS))
    os.chmod(root, 0o755)  # noqa: S103 - an image root is world-readable
    os.utime(root, ns=(MTIME_NS, MTIME_NS))
    if progress is not None:
        progress(total, total)
    return summaries


def _summary(row: Table2Row, items: list[_Item], dirs: dict[str, int], devices: bool) -> GeneratedDir:
    kinds = [i.kind for i in items]
    n_dev = kinds.count(CHR) + kinds.count(BLK)
    return GeneratedDir(
        path=row.path,
        access=row.access,
        files=len(items),
        bytes=sum(i.size for i in items if i.kind == FILE),
        regular=kinds.count(FILE) + (0 if devices else n_dev),
        symlinks=kinds.count(SYMLINK),
        hardlinks=kinds.count(HARDLINK),
        devices=n_dev,
        fifos=kinds.count(FIFO),
        directories=len(dirs) - 1,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m labs.table2 TARGET [--scale S] [--seed N]``: write a Table-2 image."""
    import click
    from rich.table import Table

    from slim.cli.common import StageProgress, console, errors_to_exit

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("target", type=click.Path(file_okay=False, path_type=Path))
    @click.option(
        "--scale",
        type=float,
        default=1.0,
        show_default=True,
        help="Fraction of the paper's file counts and sizes (1.0: 173k files, about 2.4 GB).",
    )
    @click.option("--seed", type=int, default=0, show_default=True, help="Same seed and scale, same tree.")
    def table2(target: Path, scale: float, seed: int) -> None:
        """Write a synthetic image into TARGET (empty or missing) with the file counts and sizes
        per directory of the paper's Table 2 (Fedora Core 1), for benchmarks and tests."""
        with errors_to_exit(), StageProgress() as progress:
            rows = generate(target, scale, seed, lambda done, total: progress("files", done, total))
        table = Table(title=f"Table-2 image at {target} (scale {scale:g}, seed {seed})", title_justify="left")
        for col in ("directory", "files", "MB (2^20 bytes)"):
            table.add_column(col, justify="left" if col == "directory" else "right")
        for row in rows:
            table.add_row(row.path, str(row.files), f"{row.bytes / 2**20:.1f}")
        console.print(table)

    table2.main(args=argv, prog_name="python -m labs.table2")


if __name__ == "__main__":
    main()
