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
from typing import BinaryIO

import zstandard
from pyfastcdc import FastCDC

from slim.agent.manifest import CHUNKED_ABOVE, ManifestEntry
from slim.agent.tree import BLK, CHR, DIR, FIFO, FILE, HARDLINK, SYMLINK, Entry
from slim.errors import FailedPrecondition

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


def hash_tree(
    root: str | Path, entries: Iterable[Entry], progress: Progress | None = None
) -> list[ManifestEntry]:
    """The manifest entries of ``entries`` (files hashed), without an archive."""
    return _pass(os.fspath(root), entries, None, progress)


def write_archive(
    root: str | Path,
    entries: Iterable[Entry],
    out: BinaryIO,
    level: int = DEFAULT_LEVEL,
    progress: Progress | None = None,
) -> list[ManifestEntry]:
    """Write the tar + zstd archive of ``entries`` to ``out``; return their manifest entries."""
    cctx = compressor(level)
    with (
        cctx.stream_writer(out, closefd=False) as zout,
        tarfile.open(fileobj=zout, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf,
    ):
        return _pass(os.fspath(root), entries, tf, progress)


def _pass(
    root: str, entries: Iterable[Entry], tf: tarfile.TarFile | None, progress: Progress | None
) -> list[ManifestEntry]:
    out: list[ManifestEntry] = []
    done = 0
    for entry in entries:
        if entry.kind != FILE:
            if tf is not None:
                tf.addfile(tarinfo(entry))
            out.append(ManifestEntry(entry))
            continue
        with _open(root, entry) as f:
            if os.fstat(f.fileno()).st_size != entry.size:
                raise _changed(entry)
            reader = _HashingReader(f, entry)
            if tf is not None:
                tf.addfile(tarinfo(entry), reader)
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
