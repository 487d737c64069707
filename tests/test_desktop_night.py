"""A real desktop, a real night, in minutes (issue 18's acceptance; the lab: labs/desktoplab.py).

A QEMU "desktop" with its own disk (an OS built from Debian packages that mounts its disk
read-only, prints a marker and powers off), PXE first in its boot order, on the lab's bridge
beside `slim serve`.  Before the window it boots its own OS.  When the window opens the relay
sends a real magic packet on the bridge; the NIC's stand-in hears it and the lab powers the
VM on; it boots the pool's EE in RAM, which reports `up`.  When the window closes the EE is
told to power off (SLIM woke it from off) and does; powered on again, it boots its own OS,
and its disk is as it was.  In the next window its owner presses L at the menu: it boots its
own OS, and SLIM takes it out of the pool with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from labs.desktoplab import DESKTOP_MARKER, DesktopNight
from labs.vmlab import MARKER
from tests.support import need_netns, need_tool

pytestmark = pytest.mark.slow
BOOT = 240.0  # seconds a boot may take on a loaded machine (TCG)


def test_a_desktops_night(tmp_path: Path) -> None:
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    for tool, package in (("ganesha.nfsd", "nfs-ganesha"), ("debootstrap", None), ("dnsmasq", None),
                          ("syslinux", None), ("mcopy", "mtools"), ("mkfs.fat", "dosfstools")):  # fmt: skip
        need_tool(tool, package)
    need_netns()
    with DesktopNight(tmp_path, qemu) as night:
        night.start()
        # the day: PXE first, the menu boots its own OS (no menu: straight to the disk)
        vm = night.power_on("day")
        vm.wait_for(DESKTOP_MARKER, BOOT)
        assert vm.wait_exit(60) == 0  # its owner shut it down for the night
        assert night.desktop().state == "own-os"
        before = night.sha256()

        # the window opens: a magic packet on its segment wakes it; it boots the EE in RAM
        night.set_window(True)
        night.wait_woken(1, 60)
        vm = night.power_on("night")
        vm.wait_for(MARKER, BOOT)  # the EE's init ran (and reported up)
        night.wait(lambda p: p.desktops[0].state == "idle", "the desktop up in the EE, idle")
        assert night.desktop().woken_from_off

        # the window closes: SLIM woke it from off, so it is told to power off, and does
        night.set_window(False)
        assert vm.wait_exit(BOOT) == 0
        night.wait(lambda p: p.desktops[0].state == "own-os", "the desktop back in its own OS")
        assert "told to poweroff" in vm.console

        # powered on again by its owner: its own OS, and its disk as it was
        vm = night.power_on("morning")
        vm.wait_for(DESKTOP_MARKER, BOOT)
        assert vm.wait_exit(60) == 0
        assert night.sha256() == before

        # the next window: woken again; its owner presses L at the menu and gets their own OS
        night.set_window(True, menu=30)
        night.wait_woken(2, 60)
        vm = night.power_on("owner")
        vm.wait_for("Boot from local disk", BOOT)  # the menu is on the console
        vm.sendkey("l")
        vm.wait_for(DESKTOP_MARKER, BOOT)
        assert vm.wait_exit(60) == 0
        night.wait(lambda p: p.desktops[0].state == "opted-out", "the desktop out of the pool")
        assert "picked their own OS at the menu" in night.desktop().reason
        assert night.sha256() == before
