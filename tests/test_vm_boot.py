"""A real VM network-boots into an EE through our servers (the lab: slim/vmlab.py).

QEMU (TCG) with its own iPXE ROM asks our relay for its iPXE script over HTTP;
the script loads the kernel and our initrd from the relay; the initrd's agent
(its own minimal Python) fetches the plan, unpacks / into a tmpfs, mounts /usr
read-only from nfs-ganesha over NFSv4/TCP, and switch_roots into a debootstrap
EE whose init (a script on the NFS /usr) prints a marker on the serial
console.  Every server is a real `slim` process: core (with its object
server), relay, `slim nfs serve`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from slim.v1 import core_pb2 as pb
from slim.vmlab import Boot, Lab

from .needs import need_tool


def lab_for(tmp_path: Path, var_policy: str | None = None) -> Lab:
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    need_tool("ganesha.nfsd", "nfs-ganesha")
    need_tool("debootstrap")
    return Lab(tmp_path, var_policy, qemu)


def checked(boot: Boot) -> list[pb.BootEvent]:
    """The boot's events: all ok, from the relay, with the agent's own timestamps."""
    assert all(e.ok and e.relay == "r1" for e in boot.events), boot.events
    # sorted by the agent's timestamps, the stages come out in the order the agent ran them
    assert all(e.time.seconds > 1_700_000_000 for e in boot.events), boot.events
    return boot.events


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with lab_for(tmp_path) as lab:
        yield lab.start()


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold debootstrap and kernel download on a fresh machine, then TCG
def test_vm_boots_into_the_ee_through_the_relay(lab: Lab) -> None:
    boot = lab.boot()
    assert boot.active["node"] == "vm1" and boot.active["environment"] == "vmtest"
    assert [e.stage for e in checked(boot)] == ["plan", "ram:/", "mount:/usr", "done", "switch_root"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vm_disk_then_sync_transfers_only_changes(tmp_path: Path) -> None:
    """/var on the VM's (blank) virtual disk: copied whole, then kept by copy-if-needed."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    drive = ("-drive", f"file={disk},if=virtio,format=raw")
    with lab_for(tmp_path, var_policy="disk") as lab:
        lab.start()
        events = checked(lab.boot(*drive))
        stages = [e.stage for e in events]
        assert stages == [
            "plan",
            "ram:/",
            "mount:/usr",
            "mkfs",
            "disk:/var",
            "done",
            "switch_root",
        ]  # a blank disk
        full = next(e.bytes for e in events if e.stage == "disk:/var")
        # the same image as copy-if-needed: nothing but the manifest crosses the wire
        lab.var_policy = "sync"
        lab.write_registry()
        lab.build()
        events = checked(lab.boot(*drive))
        assert [e.stage for e in events] == [
            "plan",
            "ram:/",
            "mount:/usr",
            "sync:/var",
            "done",
            "switch_root",
        ]
        unchanged = next(e for e in events if e.stage == "sync:/var")
        assert unchanged.message.startswith("0 files, 0 deleted"), unchanged.message
        # one file changes in the image: only it is fetched
        changed = lab.image / "var" / "lib" / "slim-test-changed"
        changed.write_bytes(b"x" * 300_000)
        lab.build()
        again = next(e for e in checked(lab.boot(*drive)) if e.stage == "sync:/var")
        assert again.message.startswith("1 files, 0 deleted"), again.message
        assert (
            300_000 <= again.bytes - unchanged.bytes < 300_000 + 64_000
        )  # the file (+ a slightly larger manifest)
        assert again.bytes < full
