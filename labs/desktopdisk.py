"""A desktop's own disk for the harvesting labs (issue 18): a small raw disk image whose own OS
proves, on the serial console, that it booted from that disk, and never writes to it.

Desktops keep their own OS on their disk and have PXE first in their boot order; SLIM's boot
menu boots that disk (``:local``) outside the harvest window.  :func:`build_desktop_disk`
makes such a disk from Debian packages, without root and without mounting anything:

* an MBR (syslinux's ``mbr.bin``, package syslinux-common) with one bootable FAT16 partition
  at 1 MiB labelled :data:`LABEL` (``mkfs.fat --offset``, dosfstools);
* SYSLINUX installed into that partition (``syslinux --offset``, package syslinux; its files
  are written with mtools), booting the given Linux kernel with ``console=ttyS0``;
* an initramfs with static busybox (busybox-static) and the modules to see the disk over
  virtio-blk or IDE and read FAT (taken from the kernel's image, which must have run depmod);
* a note file on the partition, :data:`NOTE_FILE`.

The initramfs's ``/init`` mounts proc, sysfs and devtmpfs, finds the partition by its label,
mounts it READ-ONLY, prints ``MARKER NOTE`` (:func:`marker_line`: the marker given at build
time, then the note read back from the disk) and a line with the mount's options on the
serial console, and powers the machine off at once (``poweroff -f``).  Nothing on the way
writes the disk: SeaBIOS, iPXE's ``sanboot``, SYSLINUX (no ADV updates) and a read-only
FAT mount only read, so :func:`disk_sha256` of the image is the same before and after a
boot — the check that a night of harvesting left the desktop's own disk alone.

labs/desktopvm.py starts QEMU with such a disk, directly or PXE first.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from pathlib import Path

from slim.core.build.initrd import InitrdBuilder, kernel_release
from slim.errors import FailedPrecondition

LABEL = "SLIMDESK"  # the partition's FAT label; /init finds its partition by it
NOTE_FILE = "DESKTOP.TXT"  # on the partition: what /init prints after the marker
DEFAULT_NOTE = "own-os-from-disk"
SECTOR = 512
PART_START = 2048  # sectors: the partition begins at 1 MiB
DEFAULT_SIZE = 64 * 1024 * 1024
MIN_SIZE, MAX_SIZE = 32 * 1024 * 1024, 1024 * 1024 * 1024  # FAT16 with SYSLINUX: 32 MiB .. 1 GiB
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")  # syslinux-common: 440 bytes of boot code
BUSYBOX = Path("/bin/busybox")  # busybox-static
TOOL_PACKAGES = {"mkfs.fat": "dosfstools", "mcopy": "mtools", "syslinux": "syslinux"}
TOOL_TIMEOUT = 120.0
# virtio-blk or IDE (QEMU's -drive if=virtio / if=ide), and FAT; Debian builds them all as
# modules.  The codepages are the FAT defaults of Debian's kernel (437, ascii, utf8).
DISK_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "ata_piix",
    "sd_mod",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
)
KERNEL_ARGS = "console=ttyS0 ro panic=-1 loglevel=4"
SYSLINUX_CFG = """\
SERIAL 0 115200
DEFAULT desktop
PROMPT 0
TIMEOUT 0
LABEL desktop
  KERNEL /vmlinuz
  INITRD /initrd
  APPEND {args}
"""
INIT = """\
#!/bin/sh
# the desktop's own OS (labs/desktopdisk.py): read its own disk, read-only, say so, power off
PATH=/bin
export PATH
busybox mkdir -p /proc /sys /dev /mnt
busybox mount -t proc proc /proc
busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do insmod "$module" 2>/dev/null; done < /etc/slim/modules
tries=0
until dev=$(findfs LABEL={label} 2>/dev/null); do
    tries=$((tries + 1))
    if [ "$tries" -gt 300 ]; then
        echo "SLIM-DESKTOP: no partition labelled {label}"
        busybox poweroff -f
    fi
    sleep 0.1
done
if mount -t vfat -o ro "$dev" /mnt; then
    echo "SLIM-DESKTOP: $dev mounted $(grep " /mnt " /proc/mounts | cut -d' ' -f4)"
    echo "{marker} $(tr -d '\\r\\n' < /mnt/{note_file})"
    umount /mnt
else
    echo "SLIM-DESKTOP: cannot mount $dev"
fi
busybox poweroff -f
"""


def marker_line(marker: str, note: str = DEFAULT_NOTE) -> str:
    """The line the disk's OS prints when it has read ``note`` back from its own disk."""
    return f"{marker} {note}"


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise FailedPrecondition(f"{name} is not installed (apt-get install {TOOL_PACKAGES.get(name, name)})")
    return found


def _run(*args: str | Path) -> None:
    argv = [_tool(str(args[0])), *map(str, args[1:])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)
    if done.returncode != 0:
        raise FailedPrecondition(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")


def _check_word(what: str, value: str) -> None:
    if not value or any(c.isspace() or c in "\"'`$\\" for c in value) or not value.isprintable():
        raise ValueError(f"{what} {value!r}: one printable word without quotes, $ or backslashes")


def build_initrd(
    out: Path, *, kernel: Path, marker: str, image_root: Path | None = None, modules: tuple[str, ...] = ()
) -> str:
    """The desktop OS's initramfs (zstd cpio) at ``out``; returns the kernel's version.

    ``kernel`` is ``IMAGE/boot/vmlinuz-KVER`` of an image with ``/lib/modules/KVER`` and its
    modules.dep (``image_root``, default: two levels above the kernel).
    """
    _check_word("marker", marker)
    root = image_root if image_root is not None else kernel.parent.parent
    kver = kernel_release(root, "/" + str(kernel.relative_to(root)))
    if not BUSYBOX.is_file():
        raise FailedPrecondition(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    initrd = InitrdBuilder()
    initrd.add_file("bin/busybox", BUSYBOX, mode=0o755)
    initrd.add_symlink("bin/sh", "busybox")
    initrd.add_bytes(
        "init", INIT.format(label=LABEL, marker=marker, note_file=NOTE_FILE).encode(), mode=0o755
    )
    initrd.add_modules(root, kver, DISK_MODULES + modules)
    with open(out, "wb") as f:
        initrd.write(f, level=9)
    return kver


def mbr_sector(total_sectors: int) -> bytes:
    """Boot code, one bootable FAT16 (LBA, type 0x0e) partition from PART_START to the end."""
    code = MBR_CODE.read_bytes()
    if len(code) > 440:
        raise FailedPrecondition(f"{MBR_CODE} is {len(code)} bytes; an MBR has room for 440")
    count = total_sectors - PART_START
    # CHS fields say "use LBA" (0xfe 0xff 0xff), as partitioners do for large disks
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", 0x0E, b"\xfe\xff\xff", PART_START, count)
    return code.ljust(440, b"\0") + b"SLIM" + b"\0\0" + entry + b"\0" * 48 + b"\x55\xaa"


def build_desktop_disk(
    path: Path,
    *,
    kernel: Path,
    marker: str,
    work: Path,
    note: str = DEFAULT_NOTE,
    image_root: Path | None = None,
    size: int = DEFAULT_SIZE,
) -> Path:
    """A raw disk image at ``path`` whose own OS prints :func:`marker_line` (``marker``, then
    ``note`` read from the disk, mounted read-only) on ttyS0 and powers off.

    ``kernel``: a Debian kernel in an image with its modules (see :func:`build_initrd`);
    ``work``: a directory for intermediate files; ``size``: bytes, 32 MiB to 1 GiB.
    """
    _check_word("note", note)
    if not MIN_SIZE <= size <= MAX_SIZE or size % (1024 * 1024):
        raise ValueError(f"size {size}: a whole number of MiB from 32 MiB to 1 GiB (FAT16)")
    work.mkdir(parents=True, exist_ok=True)
    initrd = work / "initrd"
    build_initrd(initrd, kernel=kernel, marker=marker, image_root=image_root)
    cfg = work / "syslinux.cfg"
    cfg.write_text(SYSLINUX_CFG.format(args=KERNEL_ARGS))
    note_file = work / NOTE_FILE
    note_file.write_text(note + "\n")

    tmp = path.with_name(path.name + ".tmp")
    sectors = size // SECTOR
    try:
        with open(tmp, "wb") as f:
            f.truncate(size)
            f.write(mbr_sector(sectors))
        part_kib = (sectors - PART_START) * SECTOR // 1024
        _run("mkfs.fat", "-F", "16", "-n", LABEL, "--invariant",
             f"--offset={PART_START}", tmp, str(part_kib))  # fmt: skip
        image = f"{tmp}@@{PART_START * SECTOR}"
        for source, name in (
            (kernel, "vmlinuz"),
            (initrd, "initrd"),
            (cfg, "syslinux.cfg"),
            (note_file, NOTE_FILE),
        ):
            _run("mcopy", "-o", "-i", image, source, f"::{name}")
        _run("syslinux", "--install", f"--offset={PART_START * SECTOR}", tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def disk_sha256(path: Path) -> str:
    """The sha256 of the whole image, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
