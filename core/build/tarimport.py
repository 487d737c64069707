"""Any tar archive unpacked safely: the builder's, importing images (``slim ee import``).

The same checks and writer as the agent's own reader of SLIM's archives
(:mod:`slim.agent.unpack`: names, links, devices, times), with the standard library's
``tarfile`` reading the archive, so that it takes any tar, compressed with gzip, bzip2 or
xz too.  It lives here, not in the agent's package, so that ``tarfile`` stays out of the
initrd (its 96 kB of bytecode, ~0.03 MB compressed: docs/benchmarks/, initrd size).
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from slim.agent.tree import FILE, Entry
from slim.agent.unpack import TAR_KINDS, TreeWriter, UnsafeEntry, WriteStats, make_entry, pax_ns


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's time in nanoseconds; UnsafeEntry if it is no time a file can have."""
    ns = pax_ns(member.pax_headers.get("mtime"))
    if ns is None:
        try:
            ns = int(member.mtime) * 1_000_000_000
        except (ValueError, OverflowError):  # a pax mtime of "nan" or "inf"
            raise UnsafeEntry(member.name, f"mtime {member.mtime!r} is not a time") from None
    return ns


def entry_from_member(member: tarfile.TarInfo) -> Entry:
    """The tree entry a tar member describes; UnsafeEntry if it cannot be one."""
    xattrs = tuple(
        sorted(
            (key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape"))
            for key, value in member.pax_headers.items()
            if key.startswith("SCHILY.xattr.")
        )
    )
    return make_entry(
        member.name, TAR_KINDS.get(member.type), member.type, member.mode, member.uid, member.gid,
        _mtime_ns(member), member.size, member.linkname, (member.devmajor, member.devminor), xattrs,
    )  # fmt: skip


def extract_tar(
    stream: IO[bytes],
    root: str | Path,
    *,
    owners: bool | None = None,
    devices: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> WriteStats:
    """Unpack an uncompressed (or gzip/bzip2/xz) tar stream under ``root`` safely, with
    :class:`~slim.agent.unpack.TreeWriter`'s checks: the builder's, importing images (the
    agent unpacks SLIM's archives, uncompressed by zstd, with
    :func:`slim.agent.unpack.extract_archive`)."""
    with TreeWriter(root, owners=owners, devices=devices) as writer:
        try:
            with tarfile.open(fileobj=stream, mode="r|*", errors="surrogateescape") as tf:
                for member in tf:
                    entry = entry_from_member(member)
                    data = tf.extractfile(member) if entry.kind == FILE else None
                    writer.add(entry, data)
                    if progress is not None:
                        progress(writer.stats.bytes)
        except tarfile.TarError as exc:
            raise UnsafeEntry("(archive)", f"not a valid tar archive: {exc}") from None
        writer.finish()
        return writer.stats
