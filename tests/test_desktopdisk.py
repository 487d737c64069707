"""A desktop's own disk (labs/desktopdisk.py): its MBR and what its build refuses.  Booting it
in a QEMU desktop (by day, through SLIM's menu, picked with a key, its image unchanged) is
tests/test_desktop_night.py, on the whole chain; the firmware falling through to it when no
boot server answers is measured by bench/desktop_night.py (``./run bench desktop``).

The kernel is the machine's Debian kernel package (cached like tests/test_kernel.py's),
unpacked into a scratch image with depmod; the disk is built once per module and copied for
each test.
"""

from __future__ import annotations

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
from labs.desktopvm import plain

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
