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
import subprocess
from hashlib import sha256
from pathlib import Path

import pytest

from labs import bootdemo
from labs.vmlab import CRASH_INIT_PATH, MAC, MILESTONES, OVMF_CODE, SLIM, Boot, Lab
from slim import timeline
from slim.core.build.initrd import resolve_in_image
from slim.core.store import Store
from slim.v1 import core_pb2 as pb
from tests.support import need, need_tool


def lab_for(tmp_path: Path, var_policy: str | None = None) -> Lab:
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    need_tool("ganesha.nfsd", "nfs-ganesha")
    need_tool("debootstrap")
    return Lab(tmp_path, var_policy, qemu)


AGENT_STAGES = ["plan", "ram:/", "mount:/usr", "secrets", "done", "switch_root", "up"]


def checked(boot: Boot) -> list[pb.BootEvent]:
    """The boot's events: all ok, from the relay, each stage ending after the one before,
    and the boot up, said by the environment itself (not by the agent)."""
    assert boot.status is not None and boot.status.state == "up", boot.status
    assert all(e.ok and e.relay == "r1" for e in boot.events), boot.events
    assert all(e.time.seconds > 1_700_000_000 for e in boot.events), boot.events
    ends = [e.time.ToNanoseconds() for e in boot.events]
    assert ends == sorted(ends), [(e.stage, e.time.ToNanoseconds()) for e in boot.events]
    up = next(e for e in boot.events if e.stage == "up")
    assert "slim-test-init" in up.message or "systemd reached" in up.message, up.message
    if "slim-test-init" in up.message:  # the environment's secret arrived, with its mode
        assert f"secret {sha256(boot.secret).hexdigest()} 400" in up.message, up.message
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
    plot = tmp_path / "timeline.png"
    boot = bootdemo.run(tmp_path, keep=True, say=said.append, plot=plot)
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
    # the default import boots: its own systemd is the init, and it reports up
    init = resolve_in_image(lab / "image", "/sbin/init")
    assert init.name == "systemd" and init.is_file(), init
    checked(boot)
    assert boot.agent_stages == AGENT_STAGES
    up = next(e for e in boot.events if e.stage == "up")
    # Debian's default target (graphical.target: multi-user and, on a desktop, a display manager)
    assert re.fullmatch(r"systemd reached (multi-user|graphical)\.target", up.message), up.message
    assert [label for label, _ in MILESTONES] == list(boot.milestones), boot.milestones
    assert sorted(boot.milestones.values()) == list(boot.milestones.values())
    # the whole timeline from power-on, the relays' own records first, bytes as sent
    stages = [e.stage for e in boot.events]
    assert stages == ["tftp:ipxe.efi", "script", "kernel", "initrd", *AGENT_STAGES], stages
    release = Store(lab / "state" / "store").release("vmtest")
    assert release is not None
    sizes = {e.stage: e.bytes for e in boot.events}
    assert sizes["tftp:ipxe.efi"] == efi
    assert (sizes["kernel"], sizes["initrd"]) == (release[1].kernel.size, release[1].initrd.size)
    root_archive = release[1].directories["/"].archive
    assert root_archive is not None and sizes["ram:/"] == root_archive.size  # "/" in RAM: its archive
    # the demo printed the product's timeline (slim node timeline), and its figure agrees
    t = timeline.build("vm1", boot.events, boot.status)
    assert f"      power-on (first request) to up: {t.total:.1f} s" in said, said
    assert said[-1].endswith(f"power-on to up: {t.total:.1f} s; everything is in {lab}"), said[-1]
    for label in ("stage 1 over TFTP: ipxe.efi", "boot script", "kernel", "initrd", "mount:/usr", "up"):
        assert any(label in line for line in said), label
    # one clock (the relays and the lab share this host's): the first request came after
    # QEMU started, and the up report before the lab saw the core say so
    assert boot.qemu_started <= t.power_on and t.power_on + t.total <= boot.marker_at
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    checked(boot)
    assert boot.agent_stages == AGENT_STAGES
    # the pxelinux config over TFTP is the boot script; lpxelinux.0 before it, by address
    stages = [e.stage for e in boot.events]
    assert stages[:2] == ["tftp:lpxelinux.0", "tftp:ldlinux.c32"] and "script" in stages, stages


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold debootstrap and kernel download on a fresh machine, then TCG
def test_e1000_vm_waits_out_a_busy_relay_then_an_init_that_dies_fails_the_boot(tmp_path: Path) -> None:
    """An Intel e1000 NIC (the profile loads e1000, not virtio); the relay (behind a busy
    front) answers the first two object requests 503: iPXE waits out the first (it has a
    Retry-After), the boot script waits and goes round again after the second.  Then an
    init that dies right after switch_root: the VM ends (panic, -no-reboot) and the core
    fails the boot once the environment's up_timeout has passed."""
    qemu = lab_for(tmp_path).qemu
    with Lab(tmp_path, qemu=qemu, nic="e1000", up_timeout=20, busy=[1, None]) as lab:
        lab.start()
        assert "e1000" in lab.built["initrd"]["modules"]
        boot = lab.boot()
        assert boot.active["node"] == "vm1" and boot.active["environment"] == "vmtest"
        checked(boot)
        assert boot.agent_stages == AGENT_STAGES
        # iPXE's HTTP client waited out the 503 with Retry-After itself; the bare 503 failed
        # the fetch, and the script waited and went round the relays again
        assert lab.front is not None
        refused = lab.front.refused
        assert len(refused) == 2 and all("stage=kernel" in path for path in refused), refused
        assert "SLIM: no relay could send the kernel and initrd; round 1," in boot.console
        stages = [e.stage for e in boot.events]
        assert stages[:3] == ["script", "kernel", "initrd"], stages  # the iPXE ROM: no TFTP here

        # a profile naming a module the image's kernel lacks is refused, with the right name
        typo = lab.registry.read_text().replace("modules: [e1000]", "modules: [e1000x]")
        assert typo != lab.registry.read_text()
        (tmp_path / "typo.yaml").write_text(typo)
        check = subprocess.run(
            [*SLIM, "registry", "check", str(tmp_path / "typo.yaml")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert check.returncode == 1 and "'e1000x'; closest: e1000" in check.stderr, check.stderr

        # an environment whose init is not in the image cannot be built (it would panic)
        test_init = lab.image / lab.init_path.lstrip("/")  # type: ignore[union-attr]
        test_init.rename(tmp_path / "init-aside")
        with pytest.raises(
            RuntimeError, match=r"its init \(slim\.init=/usr/local/sbin/slim-test-init\) is missing"
        ):
            lab.build()
        (tmp_path / "init-aside").rename(test_init)

        lab.init_path = CRASH_INIT_PATH
        lab.write_registry()
        lab.wait_for_kernel_args(f"slim.init={CRASH_INIT_PATH}")
        crashed = lab.boot()
    assert crashed.qemu_exit is not None and "kill init! exitcode=0x00000100" in crashed.console  # it died
    assert crashed.status is not None and (crashed.status.state, crashed.status.stage) == ("failed", "up")
    assert crashed.status.message == "no report from the environment 20 s after switch_root"
    assert crashed.agent_stages == AGENT_STAGES[:-1]  # up to switch_root, never up


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
        stages = [e.stage for e in events if e.stage not in ("script", "kernel", "initrd")]
        assert stages == [
            "plan",
            "ram:/",
            "mount:/usr",
            "mkfs",
            "disk:/var",
            "secrets",
            "done",
            "switch_root",
            "up",
        ]
        full = next(e.bytes for e in events if e.stage == "disk:/var")
        # the same image as copy-if-needed: nothing but the manifest crosses the wire
        lab.var_policy = "sync"
        lab.write_registry()
        lab.build()
        second = lab.boot(*drive)
        events = checked(second)
        assert second.agent_stages == [
            "plan",
            "ram:/",
            "mount:/usr",
            "sync:/var",
            "secrets",
            "done",
            "switch_root",
            "up",
        ]
        unchanged = next(e for e in events if e.stage == "sync:/var")
        assert unchanged.message.startswith("0 files fetched, 0 deleted; manifest whole"), unchanged.message
        # one file changes in the image: only it is fetched, and the manifest as a delta from
        # the one the node kept on its disk
        changed = lab.image / "var" / "lib" / "slim-test-changed"
        changed.write_bytes(b"x" * 300_000)
        lab.build()
        again = next(e for e in checked(lab.boot(*drive)) if e.stage == "sync:/var")
        assert again.message.startswith("1 files fetched, 0 deleted; manifest delta"), again.message
        assert 300_000 <= again.bytes < 300_000 + 4_000  # the file and the manifest's delta
        assert again.bytes < full
