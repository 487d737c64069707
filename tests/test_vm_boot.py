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

from .needs import need, need_tool
from .test_nfs import free_port, wait_for

SLIM = [sys.executable, "-m", "slim.cli"]
MAC = "52:54:00:12:34:56"
MARKER = "SLIM-EE-MARKER"
TEST_INIT = f"""#!/bin/sh
mount -t proc proc /proc
echo "{MARKER} $(tr -d '\\n' < /run/slim/ee)"
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


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cold debootstrap and kernel download on a fresh machine, then TCG
def test_vm_boots_into_the_ee_through_the_relay(tmp_path: Path, procs: Procs) -> None:
    qemu = need_tool("qemu-system-x86_64", "qemu-system-x86")
    need(Path("/usr/lib/ipxe/qemu/efi-virtio.rom").exists() or Path("/usr/share/qemu").exists(), "ipxe-qemu")
    need_tool("ganesha.nfsd", "nfs-ganesha")
    need_tool("debootstrap")
    image, store = tmp_path / "image", tmp_path / "store"
    registry = tmp_path / "registry.yaml"
    nfs_port = free_port()

    def write_registry(relay_port: int) -> None:
        registry.write_text(REGISTRY.format(relay=relay_port, image=image, nfs=nfs_port, mac=MAC))

    write_registry(9)
    subprocess.run(
        [
            *SLIM,
            "ee",
            "import",
            "vmtest",
            "--from",
            "debootstrap:bookworm",
            "--add-kernel",
            "--registry",
            str(registry),
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    init = image / "usr" / "local" / "sbin" / "slim-test-init"  # on /usr: it runs from NFS
    init.write_text(TEST_INIT)
    init.chmod(0o755)
    subprocess.run(
        [*SLIM, "ee", "build", "vmtest", "--registry", str(registry), "--store", str(store)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    core = procs.start(
        "core", "serve", "--registry", str(registry), "--store", str(store),
        "--state", str(tmp_path / "state.db"), "--listen", "127.0.0.1:0", "--objects-listen", "127.0.0.1:0",
        log=tmp_path / "core.log",
    )  # fmt: skip
    core_addr = ready_line(core, "listening on").split()[-1]
    objects = ready_line(core, "objects on").split()[-1]
    assert core_addr and objects, (tmp_path / "core.log").read_text()
    relay = procs.start(
        "relay", "serve", "--name", "r1", "--core", core_addr, "--upstream", f"http://{objects}",
        "--cache-dir", str(tmp_path / "cache"), "--max-bytes", "2G", "--listen", "127.0.0.1:0",
        log=tmp_path / "relay.log",
    )  # fmt: skip
    relay_port = int(ready_line(relay, "listening on").rsplit(":", 1)[1])
    write_registry(relay_port)  # the registry names the relay where the guest reaches it
    core.send_signal(signal.SIGHUP)
    nfs = procs.start(
        "nfs", "serve", "--registry", str(registry), "--store", str(store),
        "--listen", f"127.0.0.1:{nfs_port}", "--workdir", str(tmp_path / "nfs"), log=tmp_path / "nfs.log",
    )  # fmt: skip
    assert ready_line(nfs, "listening on"), (tmp_path / "nfs.log").read_text()
    channel = grpc.insecure_channel(core_addr)
    admin = pb_grpc.AdminStub(channel)

    def relay_known() -> bool:
        relays = admin.ListRelays(pb.ListRelaysRequest(), timeout=5).relays
        return any(r.urls[0].endswith(f":{relay_port}/") and r.status == "live" for r in relays)

    wait_for(relay_known, 30, "the core to know the relay and hear from it")
    serial = tmp_path / "serial.log"
    with open(serial, "w") as out:
        vm = subprocess.run(
            [
                qemu, "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot", "-boot", "n",
                "-netdev", f"user,id=n0,bootfile=http://10.0.2.2:{relay_port}/boot/{MAC}.ipxe",
                "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
            ],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=300, check=False,
        )  # fmt: skip
    console = serial.read_text(errors="replace")
    m = re.search(rf"{MARKER} (\{{.*\}})", console)
    assert m is not None, f"no marker (qemu exit {vm.returncode}):\n{console[-3000:]}"
    active = json.loads(m.group(1))
    assert active["node"] == "vm1" and active["environment"] == "vmtest"
    events = list(reversed(admin.ListBootEvents(pb.ListBootEventsRequest(node="vm1"), timeout=5).events))
    channel.close()
    stages = [e.stage for e in events if e.boot_id == active["boot_id"]]
    assert stages == ["plan", "ram:/", "mount:/usr", "done", "switch_root"], stages
    times = [e.time.ToNanoseconds() for e in events if e.boot_id == active["boot_id"]]
    assert times == sorted(times) and all(e.ok and e.relay == "r1" for e in events)
