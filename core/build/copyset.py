"""Copy sets: one EE directory as a deterministic tar + zstd archive, hashed into
a manifest in the same pass (the paper's "all files that need to be copied are
packed into a compressed archive file", section 4.5).

Deterministic: entries in tree order (slim.agent.tree), numeric owners only,
modification times to the nanosecond (pax ``mtime``), xattrs as pax
``SCHILY.xattr.*`` records (what GNU tar writes), no other time stamps, and a
zstd frame made with a fixed worker setting (zstd's multi-threaded output does
not depend on the number of threads).  Same tree → same bytes → same digest.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO, NamedTuple

import zstandard
from pyfastcdc import FastCDC

from slim.agent.manifest import CHUNKED_ABOVE, ManifestEntry
from slim.agent.tree import BLK, CHR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry
from slim.errors import FailedPrecondition
from slim.release import MAX_PARTS

DEFAULT_LEVEL = 9
READ_CHUNK = 1 << 20
_TAR_TYPES = {
    DIR: tarfile.DIRTYPE,
    FILE: tarfile.REGTYPE,
    SYMLINK: tarfile.SYMTYPE,
    HARDLINK: tarfile.LNKTYPE,
    CHR: tarfile.CHRTYPE,
    BLK: tarfile.BLKTYPE,
    FIFO: tarfile.FIFOTYPE,
}

Progress = Callable[[int], None]  # bytes of file data processed so far


def compressor(level: int = DEFAULT_LEVEL) -> zstandard.ZstdCompressor:
    """The zstd settings of every SLIM archive (threads ≥ 1 keeps output independent of
    the number of cores)."""
    if not 1 <= level <= 22:
        raise ValueError(f"zstd level {level} is out of range (1-22)")
    return zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)


def tarinfo(entry: Entry) -> tarfile.TarInfo:
    """The tar header of one entry."""
    ti = tarfile.TarInfo(entry.path)
    ti.type = _TAR_TYPES[entry.kind]
    ti.mode = entry.mode
    ti.uid, ti.gid = entry.uid, entry.gid
    ti.uname = ti.gname = ""
    sec, ns = divmod(entry.mtime_ns, 1_000_000_000)
    ti.mtime = sec
    pax: dict[str, str] = {}
    if ns and sec >= 0:
        pax["mtime"] = f"{sec}.{ns:09d}"
    for name, value in entry.xattrs:
        pax["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    ti.pax_headers = pax
    if entry.kind == FILE:
        ti.size = entry.size
    elif entry.kind in (SYMLINK, HARDLINK):
        ti.linkname = entry.target
    elif entry.kind in (CHR, BLK):
        ti.devmajor, ti.devminor = entry.rdev
    return ti


# Content-defined pieces of big files (FastCDC, pyfastcdc): where a piece ends depends on
# the bytes just before that point (and on the distance from the last end, within 16-256
# KiB), so after an insertion or a deletion the ends fall where they fell before again,
# usually within a piece or two, and a node re-fetches only the pieces around a change.
# Pieces are about 64 KiB on average (pyfastcdc's average is avg_size + min_size).
# Fixed settings (seed 0): same file, same pieces; the manifest names every piece's
# size, so the agent needs none of this.
CDC_MIN = 16 << 10
CDC_AVG = 48 << 10
CDC_MAX = 256 << 10


def chunker() -> FastCDC:
    if not FastCDC.__module__.startswith("pyfastcdc.cy"):  # its fallback is ~100 times slower
        raise FailedPrecondition(
            "pyfastcdc's compiled extension does not load on this build host (it fell back to "
            "pure Python): reinstall pyfastcdc from a wheel for this platform"
        )
    return FastCDC(CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX, normalized_chunking=1, seed=0)


class _HashingReader:
    """Reads a file for tarfile (``read(n)`` gives exactly ``n`` bytes until the end) while
    hashing it whole and, when it is big, in content-defined pieces."""

    def __init__(self, f: BinaryIO, entry: Entry) -> None:
        self.f = f
        self.entry = entry
        self.whole = hashlib.sha256()
        self.chunks: list[str] = []
        self.sizes: list[int] = []
        self.read_bytes = 0
        self._pieces = chunker().cut_stream(f) if entry.size > CHUNKED_ABOVE else None
        self._buf = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = READ_CHUNK
        if self._pieces is None:
            data = self.f.read(n)
            self.whole.update(data)
            self.read_bytes += len(data)
            return data
        out: list[memoryview] = []
        while n > 0:
            if not self._buf:
                piece = next(self._pieces, None)
                if piece is None:
                    break
                self._buf = memoryview(self._take(bytes(piece.data)))
            part = self._buf[:n]
            out.append(part)
            n -= len(part)
            self._buf = self._buf[len(part) :]
        return b"".join(out)

    def _take(self, data: bytes) -> bytes:
        self.whole.update(data)
        self.read_bytes += len(data)
        self.chunks.append(hashlib.sha256(data).hexdigest())
        self.sizes.append(len(data))
        return data

    def finish(self) -> ManifestEntry:
        return ManifestEntry(self.entry, self.whole.hexdigest(), tuple(self.chunks), tuple(self.sizes))


def _open(root: str, entry: Entry) -> BinaryIO:
    fd = os.open(os.path.join(root, entry.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    return os.fdopen(fd, "rb")


def _changed(entry: Entry) -> FailedPrecondition:
    return FailedPrecondition(f"{entry.path} changed while it was being read; build again")


# An archive is written in parts: each a zstd frame of its own, holding whole tar members
# (the archive's end, two zero blocks and the padding to a tar record, is in the last), cut
# after about PART_BYTES of tar.  Read whole, one after the other, the frames are one zstd
# stream and their members one tar, as any zstd and tar read them; a release names each
# part's size and digest (ReleaseDirectory.parts), so that an agent with several CPUs can
# fetch and unpack parts side by side (slim.agent.ee; it makes a hard link whose target is
# in another part once all are unpacked).
PART_BYTES = 16 << 20
_BLOCK = tarfile.BLOCKSIZE
_TAR_HEAD = 1024  # a member's header and pax records, about


class Part(NamedTuple):
    """One part of an archive: its compressed bytes' count and ``sha256:<hex>``."""

    size: int
    digest: str


class _Parts:
    """The compressed stream on its way to ``out``, counted and hashed part by part."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.done: list[Part] = []
        self._h = hashlib.sha256()
        self._n = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._h.update(data)
        self._n += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        pass  # (zstandard's writer flushes its output here after a frame's end; out is the caller's)

    def cut(self) -> None:
        if self._n:
            self.done.append(Part(self._n, "sha256:" + self._h.hexdigest()))
        self._h = hashlib.sha256()
        self._n = 0


def write_archive(
    root: str | Path,
    entries: Iterable[Entry],
    out: BinaryIO,
    level: int = DEFAULT_LEVEL,
    progress: Progress | None = None,
    parts: list[Part] | None = None,
    part_bytes: int | None = None,
) -> list[ManifestEntry]:
    """Write the tar + zstd archive of ``entries`` to ``out``, in parts of about
    ``part_bytes`` of tar (default :data:`PART_BYTES`), listed in ``parts`` when given;
    return the entries' manifest entries."""
    listed = list(entries)
    cuts = _cuts(listed, PART_BYTES if part_bytes is None else part_bytes)
    counted = _Parts(out)
    zout = compressor(level).stream_writer(counted, closefd=False, write_return_read=True)  # type: ignore[arg-type]  # (it only writes)
    written = 0

    def put(data: bytes | memoryview) -> None:
        nonlocal written
        zout.write(data)
        written += len(data)

    def add(i: int, entry: Entry, data: _HashingReader | None) -> None:
        if i in cuts:
            zout.flush(zstandard.FLUSH_FRAME)
            counted.cut()
        put(tarinfo(entry).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if data is not None:
            left = entry.size
            while left > 0:
                chunk = data.read(min(READ_CHUNK, left))
                if not chunk:
                    raise _changed(entry)
                put(chunk)
                left -= len(chunk)
            put(bytes(-entry.size % _BLOCK))

    items = _pass(os.fspath(root), listed, add, progress)
    put(bytes(2 * _BLOCK))  # the archive's end, padded to a record, as tarfile ends one
    put(bytes(-written % tarfile.RECORDSIZE))
    zout.flush(zstandard.FLUSH_FRAME)
    counted.cut()
    if parts is not None:
        parts[:] = counted.done
    return items


def _cuts(entries: list[Entry], part_bytes: int) -> set[int]:
    """Where new parts begin: before the first entry past ``part_bytes`` of tar since the
    last cut (more where there would be over :data:`MAX_PARTS`: parts as many, bigger)."""
    if part_bytes <= 0:
        raise ValueError(f"parts of {part_bytes} bytes: they must have some")
    sizes = [_TAR_HEAD + e.size + -e.size % _BLOCK for e in entries]
    part_bytes = max(part_bytes, -(-sum(sizes) // MAX_PARTS))
    cuts: set[int] = set()
    size = 0
    for i, n in enumerate(sizes):
        if size >= part_bytes:
            cuts.add(i)
            size = 0
        size += n
    return cuts


Adder = Callable[[int, Entry, _HashingReader | None], None]  # (index, entry, its bytes)


def hash_tree(
    root: str | Path, entries: Iterable[Entry], progress: Progress | None = None
) -> list[ManifestEntry]:
    """The manifest entries of ``entries`` (files hashed), without an archive."""
    return _pass(os.fspath(root), entries, None, progress)


def _pass(
    root: str, entries: Iterable[Entry], add: Adder | None, progress: Progress | None
) -> list[ManifestEntry]:
    out: list[ManifestEntry] = []
    done = 0
    for i, entry in enumerate(entries):
        if entry.kind != FILE:
            if add is not None:
                add(i, entry, None)
            out.append(ManifestEntry(entry))
            continue
        with _open(root, entry) as f:
            if os.fstat(f.fileno()).st_size != entry.size:
                raise _changed(entry)
            reader = _HashingReader(f, entry)
            if add is not None:
                add(i, entry, reader)
            else:
                while reader.read(READ_CHUNK):
                    pass
            if reader.read_bytes != entry.size or reader.read(1) or f.read(1):
                raise _changed(entry)
        out.append(reader.finish())
        done += entry.size
        if progress is not None:
            progress(done)
    return out
