"""A boot medium's local cache: objects of the last boot on the medium's own USB stick
(standard library only).

``slim media build`` appends a small ext4 partition to the image (the last one), whose
filesystem UUID is the medium's own (``"cache"`` in ``/etc/slim/medium.json``): the cache is
found by that UUID only, so that no disk of the owner's is ever written.  At the first boot
from a stick, the medium's agent grows that partition to the end of the stick (``sfdisk``)
and makes a fresh ext4 filesystem on it with the same UUID (``mke2fs``).  A CD has no such
partition (the kernel reads no partition table on it): such a boot runs from RAM only.

The cache holds objects by digest (``objects/sha256/<hex>``): the release's kernel and initrd
(kept by the medium's agent) and the environment's copy set (kept by the release's agent,
told ``slim.cache=UUID``).  Nothing read from it is trusted: an object is used only when its
bytes hash to the digest the signed plan names (whatever ran on the PC since may have
written to the stick), and after a boot only the objects of its plan are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

TYPE_CHECKING = False  # typing is not imported at run time (the agent's start-up: slim.agent)
if TYPE_CHECKING:
    from typing import BinaryIO

LABEL = "SLIMCACHE"
MOUNT_POINT = Path("/run/slim-cache")
SYS_BLOCK = Path("/sys/class/block")
SEED_BYTES = 64 << 20  # a cache partition smaller than this is the image's seed: grown at first boot
FIND_SECONDS = 10.0  # how long to wait for the stick's partition to appear (USB enumerates late)
BLKRRPART = 0x125F  # ioctl: re-read the partition table
CHUNK = 1 << 20
TOOL_TIMEOUT = 300.0
# e2fsprogs' and util-linux's, which the medium's initrd carries (busybox's mke2fs makes no ext4)
SFDISK, MKE2FS = "/usr/sbin/sfdisk", "/usr/sbin/mke2fs"


class CacheError(RuntimeError):
    """The cache partition cannot be used (the boot goes on from RAM)."""


class CacheCorrupt(CacheError):
    """A cached object changed while it was being sent (the object is lost for this boot)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _superblock(device: Path) -> bytes | None:
    """The ext2/3/4 superblock on ``device`` (1024 bytes from offset 1024), if it holds one."""
    try:
        with open(device, "rb") as f:
            f.seek(1024)
            sb = f.read(1024)
    except OSError:
        return None
    return sb if len(sb) == 1024 and sb[56:58] == b"\x53\xef" else None


def ext_uuid(device: Path) -> str | None:
    """The UUID of the ext2/3/4 filesystem on ``device``, if it holds one."""
    sb = _superblock(device)
    import uuid  # only for a boot medium (slim.agent.DEFERRED)

    return None if sb is None else str(uuid.UUID(bytes=sb[104:120]))


def volume_set(device: Path) -> str:
    """The volume set identifier of the ISO 9660 image at the start of ``device`` ("" if none):
    slim media build writes ``SLIM-MEDIUM-<id>`` there."""
    try:
        with open(device, "rb") as f:
            f.seek(32768)
            pvd = f.read(2048)
    except OSError:
        return ""
    if pvd[:6] != b"\x01CD001":
        return ""
    return pvd[190:318].decode("ascii", "replace").strip()


def find_partition(
    fs_uuid: str, medium_id: str = "", seconds: float = FIND_SECONDS, sys_block: Path = SYS_BLOCK
) -> str | None:
    """The partition (``sdb3``) whose ext4 filesystem has ``fs_uuid`` and, with ``medium_id``,
    whose disk starts with that medium's image; waiting up to ``seconds`` for it to appear
    (USB enumerates late); None if none does."""
    deadline = time.monotonic() + seconds
    while True:
        for entry in sorted(sys_block.glob("*")) if sys_block.is_dir() else []:
            if not (entry / "partition").exists() or ext_uuid(Path("/dev") / entry.name) != fs_uuid:
                continue
            disk = entry.resolve().parent.name
            if not medium_id or volume_set(Path("/dev") / disk) == f"SLIM-MEDIUM-{medium_id}":
                return entry.name
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def _sectors(path: Path) -> int:
    return int(path.read_text().strip())


def _run(argv: list[str], stdin: str = "") -> None:
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CacheError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise CacheError(f"{' '.join(argv[:3])} failed: {(done.stderr or done.stdout).strip()[-300:]}")


def fs_bytes(device: Path) -> int:
    """The size of the ext2/3/4 filesystem on ``device`` (its superblock's block count), 0 if none."""
    sb = _superblock(device)
    if sb is None:
        return 0
    blocks = int.from_bytes(sb[4:8], "little") | (int.from_bytes(sb[0x150:0x154], "little") << 32)
    return blocks * (1024 << int.from_bytes(sb[24:28], "little"))


def grow(partition: str, fs_uuid: str, sys_block: Path = SYS_BLOCK) -> bool:
    """At the first boot from a stick: the seed partition ``partition`` grown to the end of its
    disk and given a fresh ext4 filesystem with the same UUID.  Decided by the filesystem's size,
    so that a growth cut short (power lost) is finished at the next boot.  False if there was
    nothing to do: the filesystem is grown, or the stick has no room after it."""
    part = sys_block / partition
    device = Path("/dev") / partition
    if fs_bytes(device) >= SEED_BYTES:
        return False
    disk = part.resolve().parent.name
    size, start = _sectors(part / "size"), _sectors(part / "start")
    if size * 512 < SEED_BYTES:  # the partition first
        if (_sectors(sys_block / disk / "size") - (start + size)) * 512 < SEED_BYTES:
            return False
        whole = f"/dev/{disk}"
        with open(whole, "rb") as f:
            mbr = f.read(512)
        number = (part / "partition").read_text().strip()
        _run([SFDISK, "--quiet", "--relocate", "gpt-bak-std", whole])
        _run([SFDISK, "--quiet", "--no-reread", "--no-tell-kernel", "-N", number, whole], stdin=",+\n")
        # sfdisk rewrites the protective MBR, which drops the BIOS's active entry: put it back
        with open(whole, "r+b") as f:
            f.seek(462)
            f.write(mbr[462:478])
            os.fsync(f.fileno())
        with open(whole, "rb") as f:
            fcntl.ioctl(f.fileno(), BLKRRPART)
        deadline = time.monotonic() + FIND_SECONDS
        while not (part.exists() and _sectors(part / "size") > size and device.exists()):
            if time.monotonic() > deadline:
                raise CacheError(
                    f"the kernel did not see /dev/{partition} grow (it stays {size * 512} bytes)"
                )
            time.sleep(0.2)
    _run([MKE2FS, "-q", "-F", "-t", "ext4", "-L", LABEL, "-U", fs_uuid, str(device)])
    return True


def mount(partition: str, where: Path = MOUNT_POINT) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "mount",
            "-t",
            "ext4",
            "-o",
            "noatime,nodev,nosuid,noexec,nosymfollow",
            f"/dev/{partition}",
            str(where),
        ]
    )
    for path in (where / "objects", where / "objects" / "sha256"):
        if path.is_symlink():  # nothing on the stick may lead the agent's writes elsewhere
            unmount(where)
            raise CacheError(f"{path} on the medium's cache is a symbolic link")
    return where


def attach(fs_uuid: str, medium_id: str, grow_it: bool = False) -> tuple[str, bool]:
    """The medium's cache partition found (:func:`find_partition`), with ``grow_it`` grown at the
    first boot (:func:`grow`), and mounted at :data:`MOUNT_POINT`: (partition, grown now).
    CacheError says why it cannot be used."""
    partition = find_partition(fs_uuid, medium_id)
    if partition is None:
        raise CacheError(f"no partition of this computer holds the medium's cache {fs_uuid}")
    grown = grow(partition, fs_uuid) if grow_it else False
    mount(partition)
    return partition, grown


def unmount(where: Path = MOUNT_POINT) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["umount", str(where)], capture_output=True, timeout=TOOL_TIMEOUT, check=False)


class LocalObjects:
    """Objects by digest in a directory (``objects/sha256/<hex>``), each checked when read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "objects" / "sha256"
        self.hits = 0  # objects served from here
        self.hit_bytes = 0
        self.stored = 0  # objects written here after a fetch
        self.used: set[str] = set()  # the hex digests read or written here this boot
        self._lock = threading.Lock()  # the counts: the agent fetches on several threads

    def path(self, hex_digest: str) -> Path:
        return self.dir / hex_digest

    def read(self, hex_digest: str, size: int, write: Callable[[bytes], object]) -> bool:
        """Send the object's bytes to ``write`` if it is here whole and intact: hashed once before
        (so that a damaged copy costs no byte to ``write``: it is removed and False returned) and
        again as it is sent; a copy that changes between the two (a failing stick) is removed and
        raises :class:`CacheCorrupt`, as a relay's wrong bytes stop the object."""
        path = self.path(hex_digest)
        try:
            if path.is_symlink() or path.stat().st_size != size or _sha256(path) != hex_digest:
                raise ValueError
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                path.unlink()
            return False
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    write(chunk)
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            raise CacheCorrupt(f"the medium's cache could not be read back: {exc}") from None
        if h.hexdigest() != hex_digest:
            with contextlib.suppress(OSError):
                path.unlink()
            raise CacheCorrupt(f"the medium's cache gave other bytes for sha256:{hex_digest} the second time")
        with self._lock:
            self.hits += 1
            self.hit_bytes += size
            self.used.add(hex_digest)
        return True

    def writer(self) -> _Staged | None:
        """A place for an object being fetched (:meth:`_Staged.keep` once verified), or None if
        the cache cannot take it now."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".fetch-", dir=self.dir)
        except OSError:
            return None
        return _Staged(self, os.fdopen(fd, "wb"), Path(name))

    def keep_only(self, hex_digests: Iterable[str]) -> int:
        """Remove every object but ``hex_digests`` (the current plan's); how many were removed."""
        keep = set(hex_digests)
        removed = 0
        for path in self.dir.glob("*") if self.dir.is_dir() else []:
            if path.name not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        return removed


class _Staged:
    def __init__(self, cache: LocalObjects, file: BinaryIO, path: Path) -> None:
        self.cache, self.file, self.path = cache, file, path
        self.failed = False

    def write(self, data: bytes | memoryview) -> None:
        if self.failed:
            return
        try:
            self.file.write(data)
        except OSError:  # full: the boot goes on, this object is not kept
            self.failed = True

    def keep(self, hex_digest: str) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if not self.failed:
                os.replace(self.path, self.cache.path(hex_digest))
                with self.cache._lock:
                    self.cache.stored += 1
                    self.cache.used.add(hex_digest)
        except OSError:
            pass
        finally:
            self.discard()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
