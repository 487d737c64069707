"""A home PC boots over broadband from its USB stick (labs/homelab.py: a home, an ISP, the centre,
each a network namespace; the broadband a 3 Mb/s link with 20 ms each way).

The VM (QEMU, TCG, UEFI) has no PXE: it boots the image ``slim media build`` wrote, written to a
stick, gets its address from the home router, reaches the ISP's relay over the slow link with
its token over HTTPS, and boots the environment to ``up``; its second boot from the same stick
moves only the signed plan.  Its owner's disk is the same before and after, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from labs.desktopdisk import disk_sha256
from labs.homelab import ISP_WAN, HomeLab
from labs.vmlab import OVMF_CODE, SLIM, owner_disk
from tests.support import need, need_tool

STAGES = ["medium", "medium:cache", "medium:kernel", "medium:initrd", "kexec", "plan", "ram:/", "mount:/usr",
          "secrets", "done", "switch_root", "up"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_home_pc_boots_over_broadband_from_its_usb_stick(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "namespaces and tap devices need root")
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    for tool, package in (("ganesha.nfsd", "nfs-ganesha"), ("debootstrap", None), ("xorriso", None),
                          ("dnsmasq", "dnsmasq-base"), ("busybox", "busybox-static")):  # fmt: skip
        need_tool(tool, package)
    need(OVMF_CODE.is_file(), f"{OVMF_CODE} is missing (apt-get install ovmf)")
    with HomeLab(tmp_path, qemu=qemu) as lab:
        lab.start()
        rtt = lab.ping()  # the delayer's 20 ms each way: at least 40 ms there and back
        assert 40.0 <= rtt < 200.0, rtt
        token = tmp_path / "vm1.token"
        subprocess.run([*SLIM, "node", "enroll", "vm1", "--out", str(token), "--core", lab.core],
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        medium = tmp_path / "vm1.iso"
        lab.slim("media", "build", str(medium), "--node", "vm1", "--token-file", str(token),
                 "--registry", str(lab.registry), "--keys", str(lab.keys), "--ca", str(tmp_path / "ca"),
                 "--console", "serial")  # fmt: skip
        stick = tmp_path / "stick.img"
        shutil.copyfile(medium, stick)
        with open(stick, "r+b") as f:
            f.truncate(256 << 20)
        owner = tmp_path / "owner.img"  # the PC's own disk, which nothing may touch
        owners = owner_disk(owner)
        moved = []
        for _ in range(2):
            boot = lab.boot("-drive", f"file={owner},format=raw,if=virtio", medium=stick, usb=True)
            assert boot.status is not None and boot.status.state == "up", boot.status
            events = sorted(boot.events, key=lambda e: e.time.ToNanoseconds())
            assert [e.stage for e in events if e.stage in STAGES] == STAGES
            by_stage = {e.stage: e for e in events}
            assert all(e.relay == "isp1" for e in events), {e.relay for e in events}
            # /usr from the ISP relay's own ganesha, not the centre's; the test init ran programs
            # from it (sha256sum, stat: "secret <digest> <mode>")
            assert by_stage["mount:/usr"].message.startswith(f"mounted {ISP_WAN}:/slim/"), by_stage[
                "mount:/usr"
            ]
            up = by_stage["up"].message
            assert f"secret {hashlib.sha256(lab.secret.read_bytes()).hexdigest()} 400" in up, up
            moved.append(sum(by_stage[s].bytes for s in ("medium:kernel", "medium:initrd", "done")))
            assert disk_sha256(owner) == owners
        assert moved[0] > 30_000_000 and moved[1] == 0, moved
