"""A one-machine lab: an EE booted in a QEMU VM through real `slim` servers.

Used by tests/test_vm_boot.py and bench/vm_boot.py.  It imports a Debian
bookworm EE (debootstrap minbase, cached) with / in RAM, /usr over NFSv4 and,
optionally, /var on the VM's disk; builds it; and runs, as real processes on
127.0.0.1, the core (with its object server), a relay and `slim nfs serve`.
QEMU (TCG) with its own iPXE ROM then boots through the relay: 10.0.2.2 in
the guest is the host's loopback.  The EE's init is a script on the NFS /usr
that prints a marker with /run/slim/ee and powers the VM off.

Every process is started here and stopped here, by PID (:meth:`Lab.close`).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc

SLIM = [sys.executable, "-m", "slim.cli"]
MAC = "52:54:00:12:34:56"
MARKER = "SLIM-EE-MARKER"
BOOT_TIMEOUT = 300.0
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
  vm: {{modules: [{modules}], kernel_args: "console=ttyS0 panic=-1"}}
environments:
  vmtest:
    image: {image}
    default_policy: ram
    kernel_args: "slim.init=/usr/local/sbin/slim-test-init"
    directories:
{var}      /usr: {{policy: nfs, options: "ro,nolock,noatime,proto=tcp,port={nfs},vers=4.1"}}
nodes:
  vm1: {{macs: ["{mac}"], profile: vm, environment: vmtest, site: qemu{disk}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Boot:
    active: dict[str, Any]  # the EE's /run/slim/ee
    events: list[pb.BootEvent]  # this boot's events, by the agent's timestamps
    console: str
    qemu_started: float  # host clock
    kernel_started: float  # when "Linux version" came out on the console
    marker_at: float
    qemu_exit: int


class Lab:
    def __init__(self, tmp: Path, var_policy: str | None = None, qemu: str = "qemu-system-x86_64") -> None:
        self.tmp, self.qemu, self.var_policy = tmp, qemu, var_policy
        self.image, self.store = tmp / "image", tmp / "store"
        self.registry = tmp / "registry.yaml"
        self.nfs_port = free_port()
        self.relay_port = 9
        self._procs: list[subprocess.Popen[str]] = []
        self._channel: grpc.Channel | None = None

    # -- setup --------------------------------------------------------------
    def start(self) -> Lab:
        """Import and build the EE, start the servers, wait until the core hears the relay."""
        self.write_registry()
        self._slim("ee", "import", "vmtest", "--from", "debootstrap:bookworm", "--add-kernel",
                   "--registry", str(self.registry))  # fmt: skip
        init = self.image / "usr" / "local" / "sbin" / "slim-test-init"  # on /usr: it runs from NFS
        init.write_text(TEST_INIT)
        init.chmod(0o755)
        self.built = self.build()
        core = self._start("core", "serve", "--registry", str(self.registry), "--store", str(self.store),
                           "--state", str(self.tmp / "state.db"), "--listen", "127.0.0.1:0",
                           "--objects-listen", "127.0.0.1:0")  # fmt: skip
        self._core = core
        self.core = self._ready(core, "listening on", "core")
        objects = self._ready(core, "objects on", "core")
        relay = self._start("relay", "serve", "--name", "r1", "--core", self.core,
                            "--upstream", f"http://{objects}", "--cache-dir", str(self.tmp / "cache"),
                            "--max-bytes", "2G", "--listen", "127.0.0.1:0")  # fmt: skip
        self.relay_port = int(self._ready(relay, "listening on", "relay").rsplit(":", 1)[1])
        self.write_registry()  # the registry names the relay where the guest reaches it
        nfs = self._start("nfs", "serve", "--registry", str(self.registry), "--store", str(self.store),
                          "--listen", f"127.0.0.1:{self.nfs_port}",
                          "--workdir", str(self.tmp / "nfs"))  # fmt: skip
        self._ready(nfs, "listening on", "nfs")
        self._channel = grpc.insecure_channel(self.core)
        self.admin = pb_grpc.AdminStub(self._channel)
        for _ in range(300):  # bounded: 30 s for the reloaded core to hear from the relay
            relays = self.admin.ListRelays(pb.ListRelaysRequest(), timeout=5).relays
            if any(r.urls[0].endswith(f":{self.relay_port}/") and r.status == "live" for r in relays):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"the core never heard from the relay (see {self.tmp}/relay.log)")

    def write_registry(self) -> None:
        """(Re)write the registry; a running core reloads it (SIGHUP)."""
        disk = self.var_policy is not None
        self.registry.write_text(
            REGISTRY.format(
                relay=self.relay_port,
                image=self.image,
                nfs=self.nfs_port,
                mac=MAC,
                modules="virtio_pci, virtio_net" + (", virtio_blk" if disk else ""),
                var=f"      /var: {self.var_policy}\n" if disk else "",
                disk=", disk: /dev/vda" if disk else "",
            )
        )
        core = getattr(self, "_core", None)
        if core is not None:
            core.send_signal(signal.SIGHUP)

    def build(self) -> dict[str, Any]:
        """``slim ee build vmtest``: its JSON report."""
        out = self._slim(
            "ee", "build", "vmtest", "--json", "--registry", str(self.registry), "--store", str(self.store)
        )
        report: dict[str, Any] = json.loads(out)[0]
        return report

    # -- booting ------------------------------------------------------------
    def boot(self, *qemu_args: str) -> Boot:
        """Boot the VM once; the console is read line by line and timestamped as lines arrive."""
        serial = self.tmp / "serial.log"
        started = time.time()
        proc = subprocess.Popen(
            [
                self.qemu, "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot", "-boot", "n",
                "-netdev", f"user,id=n0,bootfile=http://10.0.2.2:{self.relay_port}/boot/{MAC}.ipxe",
                "-device", f"virtio-net-pci,netdev=n0,mac={MAC}", *qemu_args,
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace",
        )  # fmt: skip
        assert proc.stdout is not None
        kernel_at = marker_at = 0.0
        active: dict[str, Any] = {}
        lines: list[str] = []
        with open(serial, "w") as log:
            for line in proc.stdout:  # ends when QEMU exits (the EE powers the VM off)
                now = time.time()
                lines.append(line)
                log.write(line)
                if not kernel_at and "Linux version" in line:
                    kernel_at = now
                m = re.search(rf"{MARKER} (\{{.*\}})", line)
                if m:
                    marker_at, active = now, json.loads(m.group(1))
                if now - started > BOOT_TIMEOUT:
                    proc.kill()
                    break
        code = proc.wait(timeout=30)
        proc.stdout.close()
        console = "".join(lines)
        if not active:
            raise AssertionError(f"no marker (qemu exit {code}):\n{console[-3000:]}")
        events = self.admin.ListBootEvents(pb.ListBootEventsRequest(node="vm1"), timeout=5).events
        mine = sorted(
            (e for e in events if e.boot_id == active["boot_id"]), key=lambda e: e.time.ToNanoseconds()
        )
        return Boot(active, mine, console, started, kernel_at, marker_at, code)

    # -- processes ----------------------------------------------------------
    def _slim(self, *args: str) -> str:
        proc = subprocess.run([*SLIM, *args], capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"slim {' '.join(args[:2])} failed:\n{proc.stderr[-2000:]}")
        return proc.stdout

    def _start(self, *args: str) -> subprocess.Popen[str]:
        with open(self.tmp / f"{args[0]}.log", "w") as err:
            proc = subprocess.Popen([*SLIM, *args], stdout=subprocess.PIPE, stderr=err, text=True)
        self._procs.append(proc)
        return proc

    def _ready(self, proc: subprocess.Popen[str], prefix: str, name: str) -> str:
        """The address a server prints once it serves (``prefix HOST:PORT``)."""
        assert proc.stdout is not None
        for _ in range(5):
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return line.split()[-1]
            if not line:
                break
        raise RuntimeError(f"{name} did not start: {(self.tmp / f'{name}.log').read_text()[-2000:]}")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self._procs:
            try:
                p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
