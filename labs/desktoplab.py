"""A desktop's night on real parts (issue 18's acceptance; tests/test_desktop_night.py).

The VM lab's PXE network (labs/vmlab.py, ``network="pxe"``: a namespace with a bridge,
`slim serve` with dnsmasq in proxy-DHCP mode beside the site's own DHCP server, nfs-ganesha)
holds one desktop, ``vm1``: a BIOS VM whose NIC's iPXE ROM comes first in its boot order and
whose own disk (labs/desktopdisk.py) holds an OS that mounts it read-only, prints a marker
and powers off.  The registry puts ``vm1`` in pool ``lab`` (the VM lab's EE, in RAM with /usr
on NFS; UTC) and has relay ``r1`` send its magic packets to the bridge's broadcast.  Another
namespace on the bridge, ``pc``, runs the NIC's stand-in (``python -m labs.wakelab``), which
prints a line for each well-formed magic packet for the desktop's MAC: the lab starts the VM
when it sees one, as a NIC's wake logic would power the machine on.

The pool's window is opened and closed by rewriting the registry (a window from the current
minute, or one hours away) and sending `slim serve` SIGHUP: the core takes the new registry
and acts at the edge it finds, as it would at 20:00.  Everything is started and stopped here
(by PID); the namespaces go with :meth:`DesktopNight.close`.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
import time
from pathlib import Path

from labs.desktopdisk import build_desktop_disk, disk_sha256
from labs.desktopvm import DesktopVM
from labs.vmlab import MAC, PXE_SUBNET, Lab
from slim.v1 import core_pb2 as pb

DESKTOP_MARKER = "SLIM-DESKTOP-OWN-OS"
WAKE_HOST = "10.77.0.3"  # the NIC stand-in's namespace, on the bridge
BROADCAST = "10.77.0.255:9"  # the bridge's broadcast: the desktop's segment
POOL = """\
pools:
  lab:
    nodes: [vm1]
    environment: vmtest
    time_zone: UTC
    windows: [{{days: [daily], start: "{start}", end: "{end}"}}]
    menu_timeout: {menu}
    order_poll: 2
    wake_timeout: 300
    grace: 0
"""


def _hhmm(when: dt.datetime) -> str:
    return when.strftime("%H:%M")


class DesktopNight:
    def __init__(self, tmp: Path, qemu: str) -> None:
        self.tmp, self.qemu = tmp, qemu
        self.lab = Lab(tmp, qemu=qemu, network="pxe", nic="e1000", firmware="bios", wake_to=BROADCAST)
        self.set_window(False, write=False)
        self.disk = tmp / "desktop.img"
        self.woken: list[str] = []
        self._woke = threading.Condition()
        self._listener: subprocess.Popen[bytes] | None = None
        self.vm: DesktopVM | None = None
        self._reader: threading.Thread | None = None

    # -- set-up ---------------------------------------------------------------
    def start(self) -> DesktopNight:
        self.lab.start()
        kernel = max((self.lab.image / "boot").glob("vmlinuz-*"))
        build_desktop_disk(
            self.disk, kernel=kernel, marker=DESKTOP_MARKER, work=self.tmp / "disk", image_root=self.lab.image
        )
        netlab = self.lab.netlab
        assert netlab is not None
        pc = netlab.add_host("pc", WAKE_HOST)
        self._listener = netlab.popen(pc, sys.executable, "-m", "labs.wakelab", MAC, stdout=subprocess.PIPE)
        assert self._listener.stdout is not None
        first = self._listener.stdout.readline().decode()
        if not first.startswith("listening on"):
            raise RuntimeError(f"the wake listener did not start: {first!r}")
        self._reader = threading.Thread(target=self._read_wakes, name="wakes", daemon=True)
        self._reader.start()
        return self

    def _read_wakes(self) -> None:
        assert self._listener is not None and self._listener.stdout is not None
        for raw in self._listener.stdout:
            line = raw.decode().strip()
            if line.startswith("woken "):
                with self._woke:
                    self.woken.append(line.split()[1])
                    self._woke.notify_all()

    def wait_woken(self, count: int, timeout: float) -> None:
        """Until ``count`` magic packets for the desktop arrived at its NIC's stand-in."""
        with self._woke:
            if not self._woke.wait_for(lambda: len(self.woken) >= count, timeout):
                raise AssertionError(f"{len(self.woken)} magic packet(s) in {timeout:g} s, not {count}")

    # -- the window ------------------------------------------------------------
    def set_window(self, open_: bool, write: bool = True, menu: float = 4) -> None:
        """Open the pool's window now (from the current minute, an hour long), or move it
        hours away (closed); the core takes it on SIGHUP and acts at the edge."""
        now = dt.datetime.now(dt.UTC)
        start = now.replace(second=0, microsecond=0) if open_ else now + dt.timedelta(hours=6)
        self.lab.pools = POOL.format(start=_hhmm(start), end=_hhmm(start + dt.timedelta(hours=1)), menu=menu)
        if write:
            self.lab.write_registry()
            self.wait(lambda p: p.open == open_, f"the core saw the window {'open' if open_ else 'closed'}")

    # -- the core's view ---------------------------------------------------------
    def pool(self) -> pb.PoolStatus:
        client = self.lab._client
        assert client is not None
        return client.call(client.admin.HarvestStatus, pb.HarvestStatusRequest(pool="lab")).pools[0]

    def desktop(self) -> pb.DesktopStatus:
        return self.pool().desktops[0]

    def wait(self, check: object, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # bounded; the core's state is polled
            if check(self.pool()):  # type: ignore[operator]
                return
            time.sleep(0.2)
        raise AssertionError(f"never: {what} (core: {self.pool()})")

    # -- the machine ----------------------------------------------------------------
    def power_on(self, name: str) -> DesktopVM:
        """Start the desktop (PXE first, then its disk) on the lab's bridge."""
        netlab = self.lab.netlab
        assert netlab is not None
        self.close_vm()
        self.vm = DesktopVM(
            self.disk, mac=MAC, work=self.tmp / name, pxe=True, nic="e1000", memory_mb=1024,
            qemu=self.qemu, netdev="tap,id=n0,ifname=tap0,script=no,downscript=no",
            prefix=netlab.cmd(netlab.server),
        )  # fmt: skip
        return self.vm

    def sha256(self) -> str:
        return disk_sha256(self.disk)

    def close_vm(self) -> None:
        if self.vm is not None:
            self.vm.close()
            self.vm = None

    def close(self) -> None:
        self.close_vm()
        self.lab.close()  # stops the listener with the lab's other processes; removes the namespaces
        if self._reader is not None:
            self._reader.join(10)  # the listener is gone: its output ends
        if self._listener is not None and self._listener.stdout is not None:
            self._listener.stdout.close()

    def __enter__(self) -> DesktopNight:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DESKTOP_MARKER", "PXE_SUBNET", "DesktopNight"]
