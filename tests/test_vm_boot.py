"""A real VM network-boots into an EE through our servers.

QEMU (TCG) with its own iPXE ROM asks our relay for its iPXE script over HTTP
(QEMU user networking: 10.0.2.2 in the guest is the host's loopback); the
script loads the kernel and our initrd from the relay; the initrd's agent (its
own minimal Python) fetches the plan, unpacks / into a tmpfs, mounts /usr
read-only from nfs-ganesha over NFSv4/TCP, and switch_roots into a debootstrap
EE whose init (a script on the NFS /usr) prints a marker on the serial
console.  Every server is a real `slim` process: core (with its object
server), relay, `slim nfs serve`.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc

from .needs import need_tool
from .test_nfs import free_port, wait_for

SLIM = [sys.executable, "-m", "slim.cli"]
MAC = "52:54:00:12:34:56"
MARKER = "SLIM-EE-MARKER"
TEST_INIT = f"""#!/bin/sh
mount -t proc proc /proc
echo "{MARKER} $(tr -d '\\n' < /run/slim/ee)"
sync
echo o > /proc/sysrq-trigger
"""

REGISTRY = """\
settings: {{nfs_server: 10.0.2.2, boot_menu_timeout: 0, heartbeat_interval: 1}}
sites:
  qemu: {{prefixes: [127.0.0.0/8, 10.0.2.0/24]}}
relays:
  r1: {{urls: ["http://10.0.2.2:{relay}/"], site: qemu}}
profiles:
  vm: {{modules: [virtio_pci, virtio_net], kernel_args: "console=ttyS0 panic=-1"}}
environments:
  vmtest:
    image: {image}
    default_policy: ram
    kernel_args: "slim.init=/usr/local/sbin/slim-test-init"
    directories:
      /usr: {{policy: nfs, options: "ro,nolock,noatime,proto=tcp,port={nfs},vers=4.1"}}
nodes:
  vm1: {{macs: ["{mac}"], profile: vm, environment: vmtest, site: qemu}}
"""


class Procs:
    """The servers this test starts; stopped by PID at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str, log: Path) -> subprocess.Popen[str]:
        with open(log, "w") as f:
            proc = subprocess.Popen([*SLIM, *args], stdout=subprocess.PIPE, stderr=f, text=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.stop()


def ready_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for _ in range(5):
        line = proc.stdout.readline()
        if line.startswith(prefix) or not line:
            return line
    return ""


class Cluster:
    """The EE built, and core, relay and NFS server running, for QEMU to boot through."""

    def __init__(self, tmp: Path, procs: Procs, var_policy: str | None = None) -> None:
        self.qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
        need_tool("ganesha.nfsd", "nfs-ganesha")
        need_tool("debootstrap")
        self.tmp, self.procs = tmp, procs
        self.image, self.store = tmp / "image", tmp / "store"
        self.registry = tmp / "registry.yaml"
        self.nfs_port = free_port()
        self.relay_port = 9
        self.var_policy = var_policy
        self.write_registry()
        subprocess.run(
            [*SLIM, "ee", "import", "vmtest", "--from", "debootstrap:bookworm", "--add-kernel",
             "--registry", str(self.registry)],
            check=True, capture_output=True, timeout=900,
        )  # fmt: skip
        init = self.image / "usr" / "local" / "sbin" / "slim-test-init"  # on /usr: it runs from NFS
        init.write_text(TEST_INIT)
        init.chmod(0o755)
        self.build()
        core = procs.start(
            "core", "serve", "--registry", str(self.registry), "--store", str(self.store),
            "--state", str(tmp / "state.db"), "--listen", "127.0.0.1:0", "--objects-listen", "127.0.0.1:0",
            log=tmp / "core.log",
        )  # fmt: skip
        self.core_proc = core
        self.core = ready_line(core, "listening on").split()[-1]
        objects = ready_line(core, "objects on").split()[-1]
        assert self.core and objects, (tmp / "core.log").read_text()
        relay = procs.start(
            "relay", "serve", "--name", "r1", "--core", self.core, "--upstream", f"http://{objects}",
            "--cache-dir", str(tmp / "cache"), "--max-bytes", "2G", "--listen", "127.0.0.1:0",
            log=tmp / "relay.log",
        )  # fmt: skip
        self.relay_port = int(ready_line(relay, "listening on").rsplit(":", 1)[1])
        self.write_registry()  # the registry names the relay where the guest reaches it
        nfs = procs.start(
            "nfs", "serve", "--registry", str(self.registry), "--store", str(self.store),
            "--listen", f"127.0.0.1:{self.nfs_port}", "--workdir", str(tmp / "nfs"), log=tmp / "nfs.log",
        )  # fmt: skip
        assert ready_line(nfs, "listening on"), (tmp / "nfs.log").read_text()
        self.channel = grpc.insecure_channel(self.core)
        self.admin = pb_grpc.AdminStub(self.channel)

        def relay_known() -> bool:
            relays = self.admin.ListRelays(pb.ListRelaysRequest(), timeout=5).relays
            return any(r.urls[0].endswith(f":{self.relay_port}/") and r.status == "live" for r in relays)

        wait_for(relay_known, 30, "the core to know the relay and hear from it")

    def write_registry(self) -> None:
        text = REGISTRY.format(relay=self.relay_port, image=self.image, nfs=self.nfs_port, mac=MAC)
        if self.var_policy is not None:
            text = text.replace("      /usr:", f"      /var: {self.var_policy}\n      /usr:")
            text = text.replace("profile: vm,", "profile: vm, disk: /dev/vda,")
            text = text.replace("[virtio_pci, virtio_net]", "[virtio_pci, virtio_net, virtio_blk]")
        self.registry.write_text(text)
        if hasattr(self, "core_proc"):
            self.core_proc.send_signal(signal.SIGHUP)

    def build(self) -> None:
        subprocess.run(
            [*SLIM, "ee", "build", "vmtest", "--registry", str(self.registry), "--store", str(self.store)],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip

    def boot(self, *extra: str) -> tuple[dict[str, object], list[pb.BootEvent]]:
        """Boot the VM once: (the EE's /run/slim/ee, this boot's events in order)."""
        serial = self.tmp / "serial.log"
        with open(serial, "w") as out:
            vm = subprocess.run(
                [
                    self.qemu, "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot", "-boot", "n",
                    "-netdev", f"user,id=n0,bootfile=http://10.0.2.2:{self.relay_port}/boot/{MAC}.ipxe",
                    "-device", f"virtio-net-pci,netdev=n0,mac={MAC}", *extra,
                ],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300, check=False,
            )  # fmt: skip
        console = serial.read_text(errors="replace")
        m = re.search(rf"{MARKER} (\{{.*\}})", console)
        assert m is not None, f"no marker (qemu exit {vm.returncode}):\n{console[-3000:]}"
        active = json.loads(m.group(1))
        events = self.admin.ListBootEvents(pb.ListBootEventsRequest(node="vm1"), timeout=5).events
        mine = sorted(
            (e for e in events if e.boot_id == active["boot_id"]), key=lambda e: e.time.ToNanoseconds()
        )
        assert all(e.ok and e.relay == "r1" for e in mine), mine
        # sorted by the agent's timestamps, the stages come out in the order the agent ran them
        assert all(e.time.seconds > 1_700_000_000 for e in mine), mine
        return active, mine


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold debootstrap and kernel download on a fresh machine, then TCG
def test_vm_boots_into_the_ee_through_the_relay(tmp_path: Path, procs: Procs) -> None:
    cluster = Cluster(tmp_path, procs)
    active, events = cluster.boot()
    assert active["node"] == "vm1" and active["environment"] == "vmtest"
    assert [e.stage for e in events] == ["plan", "ram:/", "mount:/usr", "done", "switch_root"]
    cluster.channel.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vm_disk_then_sync_transfers_only_changes(tmp_path: Path, procs: Procs) -> None:
    """/var on the VM's (blank) virtual disk: copied whole, then kept by copy-if-needed."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(256 << 20)
    drive = ("-drive", f"file={disk},if=virtio,format=raw")
    cluster = Cluster(tmp_path, procs, var_policy="disk")
    _, events = cluster.boot(*drive)
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
    cluster.var_policy = "sync"
    cluster.write_registry()
    cluster.build()
    _, events = cluster.boot(*drive)
    assert [e.stage for e in events] == ["plan", "ram:/", "mount:/usr", "sync:/var", "done", "switch_root"]
    unchanged = next(e for e in events if e.stage == "sync:/var")
    assert unchanged.message.startswith("0 files, 0 deleted"), unchanged.message
    # one file changes in the image: only it is fetched
    changed = cluster.image / "var" / "lib" / "slim-test-changed"
    changed.write_bytes(b"x" * 300_000)
    cluster.build()
    _, events = cluster.boot(*drive)
    again = next(e for e in events if e.stage == "sync:/var")
    assert again.message.startswith("1 files, 0 deleted"), again.message
    assert (
        300_000 <= again.bytes - unchanged.bytes < 300_000 + 64_000
    )  # the file (+ a slightly larger manifest)
    assert again.bytes < full
    cluster.channel.close()
