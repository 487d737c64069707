"""A real VM network-boots into an EE through our servers (the lab: labs/vmlab.py).

The first test is the whole PXE chain on our own servers, through the README's
demo entry point (`./run demo`, labs/bootdemo.py): UEFI firmware PXE on a bridge in a network
namespace, its address from the site's DHCP server, boot information from our
proxy-DHCP (dnsmasq), ipxe.efi over our TFTP, the menu over HTTP, the EE.
The others use QEMU user networking:

QEMU (TCG) with its own iPXE ROM asks our relay for its iPXE script over HTTP;
the script loads the kernel and our initrd from the relay; the initrd's agent
(its own minimal Python) fetches the plan, unpacks / into a tmpfs, mounts /usr
read-only from nfs-ganesha over NFSv4/TCP, and switch_roots into a debootstrap
EE whose init (a script on the NFS /usr) prints a marker on the serial
console.  Every server is a real `slim` process: core (with its object
server), relay, `slim nfs serve`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from labs import bootdemo
from labs.vmlab import MAC, MILESTONES, OVMF_CODE, Boot, Lab
from slim.v1 import core_pb2 as pb
from tests.support import need, need_tool


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


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_boots_a_vm_through_the_whole_pxe_chain_on_our_servers(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "namespaces and tap devices need root")
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("ganesha.nfsd", "nfs-ganesha"),
                          ("debootstrap", None), ("dnsmasq", "dnsmasq-base")):  # fmt: skip
        need_tool(tool, package)
    need(OVMF_CODE.is_file(), f"{OVMF_CODE} is missing (apt-get install ovmf)")
    said: list[str] = []
    boot = bootdemo.run(tmp_path, keep=True, say=said.append)
    (lab,) = tmp_path.glob("slim-demo-*")
    console = re.sub(r"\x1b\[[0-9;]*m", "", boot.console)
    # the firmware's own PXE: an address from the site's DHCP server (10.77.0.50-99), whose
    # router it is; boot information from our proxy: ipxe.efi from the relay's TFTP
    m = re.search(r"Station IP address is 10\.77\.0\.(\d+)", console)
    assert m and 50 <= int(m.group(1)) <= 99, console[-3000:]
    assert "Server IP address is 10.77.0.1" in console and "NBP filename is ipxe.efi" in console
    assert "gw 10.77.0.2" in console
    efi = Path("/usr/lib/ipxe/ipxe.efi").stat().st_size
    assert f"sent 'ipxe.efi' ({efi} bytes)" in (lab / "state" / "logs" / "relay.log").read_text()
    assert f"PXE(br0) {MAC} proxy" in (lab / "state" / "dhcp" / "dnsmasq.log").read_text()
    # iPXE, recognized by its user class, is sent to the relay's boot script over HTTP
    assert f"Filename: http://10.77.0.1:8080/boot/{MAC}.ipxe" in console
    assert boot.active["node"] == "vm1" and boot.active["environment"] == "vmtest"
    assert [e.stage for e in checked(boot)] == ["plan", "ram:/", "mount:/usr", "done", "switch_root"]
    # the demo printed the whole timeline, each stage after the one before
    assert [label for label, _ in MILESTONES] == list(boot.milestones), boot.milestones
    assert sorted(boot.milestones.values()) == list(boot.milestones.values())
    assert any("agent: switch_root" in line for line in said) and said[-1].startswith("    power-on to")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_legacy_pxelinux_path_boots_the_ee(tmp_path: Path) -> None:
    """A node whose profile says loader: pxelinux (firmware that cannot run iPXE): our
    proxy-DHCP hands it lpxelinux.0, which reads its pxelinux.cfg/01-<mac> from the
    relay's TFTP (rendered by the core) and loads kernel and initrd over HTTP."""
    need(os.geteuid() == 0, "namespaces and tap devices need root")
    need(Path("/usr/lib/PXELINUX/lpxelinux.0").is_file(), "apt-get install pxelinux syslinux-common")
    need_tool("dnsmasq", "dnsmasq-base")
    with Lab(tmp_path, qemu=lab_for(tmp_path).qemu, network="pxe", pxelinux=True) as lab:
        lab.start()
        boot = lab.boot()
    assert "PXELINUX 6.04" in boot.console
    relay_log = (tmp_path / "state" / "logs" / "relay.log").read_text()
    for name in ("lpxelinux.0", "ldlinux.c32", "pxelinux.cfg/01-52-54-00-12-34-56"):
        assert f"sent '{name}'" in relay_log, name
    assert boot.active["node"] == "vm1"
    assert [e.stage for e in checked(boot)] == ["plan", "ram:/", "mount:/usr", "done", "switch_root"]


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
        assert unchanged.message.startswith("0 files fetched, 0 deleted"), unchanged.message
        # one file changes in the image: only it is fetched
        changed = lab.image / "var" / "lib" / "slim-test-changed"
        changed.write_bytes(b"x" * 300_000)
        lab.build()
        again = next(e for e in checked(lab.boot(*drive)) if e.stage == "sync:/var")
        assert again.message.startswith("1 files fetched, 0 deleted"), again.message
        assert (
            300_000 <= again.bytes - unchanged.bytes < 300_000 + 64_000
        )  # the file (+ a slightly larger manifest)
        assert again.bytes < full
