"""Home PCs over broadband (docs/home.md), on real parts: labs/homelab.py puts a home, an ISP and
the centre in three network namespaces, the broadband between the home and the ISP a 3 Mb/s
link with 20 ms each way (labs/wanlink.py); the ISP runs a relay with its own nfs-ganesha.

A QEMU VM (TCG) with no PXE and its owner's disk attached boots the image ``slim media build``
wrote, whose first relay is down (every boot asks the next): from a USB stick under UEFI over
the shaped link (twice: the second boot moves only the signed plan), then, the link unshaped
and a new release built, from the stick under BIOS (moving only what changed) and from the
image as a CD under UEFI with Secure Boot.  Each boot reaches ``up`` through the release's own
kernel (kexec), mounts ``/usr`` from the ISP relay's ganesha, runs programs from it, and leaves
the owner's disk as it was, byte for byte.  Last, a generic medium given an expired one-time
code (typed on its console) stops at a clear console message.  (A revoked or wrong token:
``tests/test_agent.py``, the medium's agent against the real core and relay.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from labs.desktopdisk import disk_sha256
from labs.homelab import ISP_WAN, RELAY_HTTPS, HomeLab
from labs.host import free_port
from labs.vmlab import OVMF_CODE, SLIM, Boot, owner_disk
from slim.v1 import core_pb2 as pb
from tests.support import need, need_tool

MEDIUM_STAGES = ["medium", "medium:kernel", "medium:initrd", "kexec"]
AGENT_STAGES = ["plan", "ram:/", "mount:/usr", "secrets", "done", "switch_root", "up"]


def checked(lab: HomeLab, boot: Boot, token: Path, usb: bool) -> dict[str, pb.BootEvent]:
    """The boot's events by stage, once everything every boot from a medium must show holds."""
    assert boot.status is not None and boot.status.state == "up", boot.status
    events = sorted(boot.events, key=lambda e: e.time.ToNanoseconds())
    stages = [e.stage for e in events]
    assert [s for s in stages if s in MEDIUM_STAGES + AGENT_STAGES] == MEDIUM_STAGES + AGENT_STAGES
    assert ("medium:cache" in stages) == usb, stages  # a CD runs from RAM
    by_stage = {e.stage: e for e in events}
    assert all(e.relay == "isp1" for e in events), {e.relay for e in events}
    assert boot.active["boot_id"] == boot.status.boot_id
    assert token.read_text().strip() not in boot.console  # the token never reaches a command line
    # /usr from the ISP relay's own ganesha, not the centre's; the test init ran programs from
    # it (sha256sum, stat) to say that the environment's secret arrived
    mount = by_stage["mount:/usr"].message
    assert mount.startswith(f"mounted {ISP_WAN}:/slim/"), mount
    up = by_stage["up"].message
    assert f"secret {hashlib.sha256(lab.secret.read_bytes()).hexdigest()} 400" in up, up
    return by_stage


def moved(by_stage: dict[str, pb.BootEvent]) -> int:
    """Bytes the boot moved: the release's kernel and initrd, and its copy set."""
    return sum(by_stage[s].bytes for s in ("medium:kernel", "medium:initrd", "done"))


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_home_pc_boots_from_its_medium_over_broadband_through_its_isps_relay(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "namespaces and tap devices need root")
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    for tool, package in (("ganesha.nfsd", "nfs-ganesha"), ("debootstrap", None), ("xorriso", None),
                          ("mformat", "mtools"), ("grub-mkimage", "grub-common"), ("sfdisk", "fdisk"),
                          ("dnsmasq", "dnsmasq-base"), ("busybox", "busybox-static")):  # fmt: skip
        need_tool(tool, package)
    need(OVMF_CODE.is_file(), f"{OVMF_CODE} is missing (apt-get install ovmf)")
    with HomeLab(tmp_path, qemu=qemu) as lab:
        lab.start()
        assert lab.wan is not None
        rtt = lab.ping()  # the delayer's 20 ms each way: at least 40 ms there and back
        assert 40.0 <= rtt < 200.0, rtt
        token = tmp_path / "vm1.token"
        subprocess.run([*SLIM, "node", "enroll", "vm1", "--out", str(token), "--core", lab.core],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        medium = tmp_path / "vm1.iso"
        where = ("--registry", str(lab.registry), "--keys", str(lab.keys), "--ca", str(tmp_path / "ca"))
        relay = f"https://{ISP_WAN}:{RELAY_HTTPS}"
        dead = f"https://{ISP_WAN}:{free_port()}"  # the medium's first relay is down: each boot asks the next
        node = ("--node", "vm1", "--token-file", str(token), "--relay", dead, "--relay", relay)
        built = json.loads(
            lab.slim("media", "build", str(medium), *node, *where, "--console", "serial", "--json")
        )
        assert built["node"] == "vm1" and built["relays"] == [dead, relay]
        assert stat.S_IMODE(medium.stat().st_mode) == 0o600  # it holds the token
        stick = tmp_path / "stick.img"  # the image written to a 256 MiB stick; the image itself is the CD
        shutil.copyfile(medium, stick)
        with open(stick, "r+b") as f:
            f.truncate(256 << 20)
        owner = tmp_path / "owner.img"  # the PC's own disk, which nothing may touch
        owners = owner_disk(owner)
        disk = ("-drive", f"file={owner},format=raw,if=virtio")
        release = lab.built["release"]
        generic = tmp_path / "generic.iso"  # for the last step: built while the relay builds its tree
        lab.slim("media", "build", str(generic), "--generic", "--environment", "vmtest", *where,
                 "--console", "serial")  # fmt: skip
        lab.wait_relay_nfs()

        # over the shaped link: UEFI from the stick, twice
        shaped = []
        for _ in range(2):
            boot = lab.boot(*disk, medium=stick, usb=True)
            by_stage = checked(lab, boot, token, usb=True)
            assert release in by_stage["medium"].message and boot.active["release"] == release
            assert "Secure boot disabled" in boot.console
            shaped.append(moved(by_stage))
            assert disk_sha256(owner) == owners
        # the first fetched everything and kept it on the stick; the second moved only the plan
        assert shaped[0] > 30_000_000 and shaped[1] == 0, shaped

        # the rest unshaped (the delay stays), with a new release of the environment
        lab.wan.set_rate(None)
        (lab.image / "etc" / "slim-test-release").write_text("the next release\n")
        new = lab.build()["release"]
        assert new != release
        # BIOS from the stick: the new release, moving only what changed (the kernel did not)
        lab.firmware = "bios"
        boot = lab.boot(*disk, medium=stick, usb=True)
        by_stage = checked(lab, boot, token, usb=True)
        assert boot.active["release"] == new and "Secure boot" not in boot.console
        kernel = by_stage["medium:kernel"]
        assert kernel.bytes == 0 and "from the medium's cache" in kernel.message, kernel
        assert 0 < moved(by_stage) < shaped[0], moved(by_stage)
        # UEFI with Secure Boot from the CD: shim, GRUB and the kernel from its El Torito image;
        # a CD keeps nothing, so it runs from RAM and fetches everything
        lab.firmware, lab.secure_boot = "uefi", True
        boot = lab.boot(*disk, medium=medium, usb=False)
        by_stage = checked(lab, boot, token, usb=False)
        assert boot.active["release"] == new and moved(by_stage) > 30_000_000
        assert "Secure boot enabled" in boot.console and "Kernel is locked down" in boot.console
        assert disk_sha256(owner) == owners

        # a generic medium (no node, no token) asks for a one-time code; an expired one stops it
        code = subprocess.run([*SLIM, "node", "code", "vm1", "--ttl", "1s", "--core", lab.core], check=True,
                              capture_output=True, text=True, timeout=60).stdout.strip()  # fmt: skip
        lab.firmware, lab.secure_boot = "bios", False
        console = lab.console_until(
            r"this PC stays here", medium=generic, typed=(r"type the one-time code", code)
        )
        assert "refused this one-time code" in console and "has expired" in console, console[-2000:]
        assert "Ask your SLIM administrator for a new one-time code" in console
