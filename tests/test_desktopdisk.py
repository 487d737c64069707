"""A desktop's own disk (labs/desktopdisk.py) in a QEMU desktop (labs/desktopvm.py): with no
boot server (SLIM down by day) the firmware falls through to it, and its OS leaves the image
byte for byte as it was.  Booting it through SLIM's menu (``sanboot``) and picking it with a
key are in tests/test_desktop_night.py, on the whole chain.

The kernel is the machine's Debian kernel package (cached like tests/test_kernel.py's),
unpacked into a scratch image with depmod; the disk is built once per module and copied for
each test.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from labs.desktopdisk import (
    DEFAULT_NOTE,
    PART_START,
    build_desktop_disk,
    marker_line,
    mbr_sector,
)
from labs.desktopvm import DesktopVM, plain
from slim.core.build.kernel import download_kernel, install_kernel
from tests.support import need, need_tool

MARKER = "SLIM-DESKTOP-OS"
MAC = "52:54:00:de:5c:01"
IPXE_ROM = Path("/usr/lib/ipxe/qemu/efi-e1000.rom")  # what QEMU loads for an e1000 NIC
BOOT = 240.0  # seconds: a whole boot under TCG takes 7-30
SANBOOT = "#!ipxe\necho SLIM-TEST: sanboot\nsanboot --no-describe --drive 0x80 || exit\n"


# -- no VM -----------------------------------------------------------------------------------
def test_mbr_has_one_bootable_partition_from_1mib() -> None:
    mbr = mbr_sector(131072)
    assert len(mbr) == 512 and mbr[510:] == b"\x55\xaa"
    status, kind, first, count = struct.unpack_from("<B3xB3xII", mbr, 446)
    assert (status, kind, first, count) == (0x80, 0x0E, PART_START, 131072 - PART_START)
    assert mbr[462:510] == b"\0" * 48


def test_marker_and_note_must_be_one_plain_word(tmp_path: Path) -> None:
    assert marker_line("M") == f"M {DEFAULT_NOTE}"
    for bad in ("two words", "quo'te", "$HOME", ""):
        with pytest.raises(ValueError, match="one printable word"):
            build_desktop_disk(tmp_path / "d.img", kernel=tmp_path / "k", marker=bad, work=tmp_path)
    assert not (tmp_path / "d.img").exists()


def test_plain_strips_escapes() -> None:
    assert plain("\x1b[0;1miPXE\x1b[0m ok\r\n\x1bc\x1b[?7lx\x08 \x08y") == "iPXE ok\nx y"


# -- VMs -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def desktop_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool, package in [
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
        ("depmod", "kmod"),
        ("mkfs.fat", "dosfstools"),
        ("mcopy", "mtools"),
        ("syslinux", "syslinux"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ]:
        need_tool(tool, package)
    need(Path("/bin/busybox").is_file(), "/bin/busybox is missing (apt-get install busybox-static)")
    need(IPXE_ROM.is_file(), f"{IPXE_ROM} is missing (apt-get install ipxe-qemu)")
    base = tmp_path_factory.mktemp("desktop")
    image = base / "image"
    (image / "usr" / "lib").mkdir(parents=True)
    (image / "lib").symlink_to("usr/lib")  # as debootstrap lays it out
    cache = Path(os.environ.get("SLIM_CACHE_DIR", "/var/cache/slim")) / "kernel"
    kver = install_kernel(download_kernel(cache), image)
    disk = build_desktop_disk(
        base / "desktop.img", kernel=image / "boot" / f"vmlinuz-{kver}", marker=MARKER, work=base / "work"
    )
    shutil.rmtree(image)
    return disk


@pytest.fixture
def disk(desktop_disk: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "desktop.img"
    shutil.copyfile(desktop_disk, copy)
    return copy


def boots_own_os(vm: DesktopVM) -> float:
    """Seconds from QEMU's start to the marker; checks the OS read its disk read-only and
    powered off."""
    at = vm.wait_for(re.escape(marker_line(MARKER)), BOOT)
    assert vm.wait_exit(60) == 0
    assert "SLIM-DESKTOP: /dev/vda1 mounted ro," in vm.console, vm.console[-2000:]
    return at


@pytest.mark.slow
def test_with_no_boot_server_the_firmware_falls_through_to_the_disk(disk: Path, tmp_path: Path) -> None:
    """SLIM down by day: QEMU's DHCP answers with no boot file; iPXE gives up and SeaBIOS
    boots the next device in the order, the disk."""
    with DesktopVM(disk, mac=MAC, work=tmp_path / "vm", pxe=True) as vm:
        gave_up = vm.wait_for("No more network devices", BOOT)
        disk_at = vm.wait_for("Booting from Hard Disk", 60)
        boots_own_os(vm)
    assert "Nothing to boot" in vm.console
    assert gave_up < disk_at < 60, (gave_up, disk_at)
