"""A one-machine lab: an EE booted in a QEMU VM through real `slim` servers.

Used by tests/test_vm_boot.py, bench/vm_boot.py and the boot demo (labs/bootdemo.py).  It imports
a Debian bookworm EE (`slim ee import --from debootstrap:bookworm`: minbase with
systemd, cached) with / in RAM, /usr over NFSv4 and, optionally, /var on the VM's
disk, and builds it.  Its init is either the image's own systemd (``init="systemd"``:
the EE reports up through the unit the agent leaves in its /run; the lab then stops
the VM) or, quicker, a test script on the NFS /usr (``init="test"``) that reports up
with /run/slim/report, prints a marker with /run/slim/ee and powers the VM off.  A
boot ends when the core says it is up or failed.  Two networks:

* ``user`` (QEMU user networking): the core (with its object server), a relay
  and `slim nfs serve` run as processes on 127.0.0.1; QEMU's iPXE ROM is told
  the relay's boot-script URL by QEMU's own DHCP (10.0.2.2 in the guest is the
  host's loopback).
* ``pxe`` (the whole chain on our servers): a network namespace with a bridge
  (labs/netlab.py) runs `slim serve` — core, relay with TFTP on port 69,
  nfs-ganesha, dnsmasq in proxy-DHCP mode — beside a plain dnsmasq playing
  the site's own DHCP server.  QEMU joins the bridge on a tap device with UEFI
  firmware (OVMF) whose native PXE gets its address from the site, boot
  information from our proxy, ``ipxe.efi`` over our TFTP; iPXE then gets its
  menu over HTTP from the relay, and boots the EE.

Every process and namespace is created here and removed here (:meth:`Lab.close`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from labs.busyfront import BusyFront
from labs.desktopdisk import disk_sha256
from labs.host import enroll, free_port
from labs.netlab import NetLab
from slim.allinone import await_ready
from slim.rpc import NONE, CoreClient, Credentials
from slim.v1 import core_pb2 as pb
from slim.vocabulary import relay_observed

SLIM = [sys.executable, "-m", "slim.cli"]
MAC = "52:54:00:12:34:56"
MARKER = "SLIM-EE-MARKER"
BOOT_TIMEOUT = 300.0
CONSOLE_GRACE = 20.0  # seconds after "up" the console may take to show what the EE printed
SECRET_PATH = "/etc/slim-test/secret"  # noqa: S105 - a path, not a password: a per-node secret the lab's registry names (in RAM: / is ram)
TEST_INIT = f"""#!/bin/sh
mount -t proc proc /proc
# the environment's secret (registry `secrets`): its digest and mode say it arrived, not its bytes
secret="secret $(sha256sum {SECRET_PATH} | cut -c1-64) $(stat -c %a {SECRET_PATH})"
/run/slim/report "slim-test-init started $secret" || echo "SLIM-TEST: no relay took the report"
echo "{MARKER} $(tr -d '\\n' < /run/slim/ee)"
# a harvested desktop's EE runs until SLIM sends it back (docs/harvest.md): the agent's script
# asks the relays, then powers off (or reboots) when told
[ -x /run/slim/orders ] && exec /run/slim/busybox sh /run/slim/orders
sync
echo o > /proc/sysrq-trigger
"""
# an init that dies at once: the kernel panics (panic=-1 reboots it; QEMU -no-reboot exits)
CRASH_INIT = "#!/bin/sh\necho SLIM-TEST: this init dies\nexit 1\n"
TEST_INIT_PATH = "/usr/local/sbin/slim-test-init"
CRASH_INIT_PATH = "/usr/local/sbin/slim-crash-init"
NIC_MODULES = {"virtio-net-pci": "virtio_pci, virtio_net", "e1000": "e1000"}
REGISTRY = """\
settings: {{nfs_server: {server}, boot_menu_timeout: 0, heartbeat_interval: 1}}
sites:
  qemu:
    prefixes: [{prefixes}]
    secrets_without_token: true  # the lab's own network: PXE carries no token
{dhcp}relays:
  r1: {{urls: [{relay_urls}], site: qemu{wake}}}
profiles:
  vm: {{firmware: {firmware}, loader: {loader}, modules: [{modules}], kernel_args: "console=ttyS0 panic=-1"}}
environments:
  vmtest:
    image: {image}
    default_policy: ram
    kernel_args: "{kernel_args}"
{up_timeout}    secrets: [{{source: {secret}, path: {secret_path}, mode: "0400"}}]
    directories:
{var}      /usr: {{policy: nfs, options: "ro,nolock,noatime,proto=tcp,port={nfs},vers=4.1"}}
nodes:
  vm1: {{macs: ["{mac}"], profile: vm, environment: vmtest, site: qemu{disk}}}
{pools}{server_section}"""
# the pxe network: the bridge's subnet, our server, the site's own DHCP server
PXE_SUBNET, PXE_SERVER, PXE_SITE_DHCP = "10.77.0.0/24", "10.77.0.1", "10.77.0.2"
PXE_SERVER6 = "fd77::1/64"  # a private IPv6 prefix on the bridge: our router advertisements spare iPXE ~13 s
PXE_SERVER_SECTION = """\
server:
  core_listen: unix:{tmp}/core.sock
  relay_listen: {server}:8080
  tftp_listen: {server}:69
  nfs_listen: {server}:2049
"""
SITE_DHCP = """\
# the site's own DHCP server: addresses only, it knows nothing about booting
port=0
interface=eth0
bind-interfaces
dhcp-range=10.77.0.50,10.77.0.99,255.255.255.0,1h
dhcp-leasefile={tmp}/site-dhcp.leases
"""
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Secure Boot: the firmware that enforces it, and variables with Microsoft's KEK and db (what
# PCs ship with: they trust Debian's shim)
OVMF_CODE_SECURE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_VARS_MS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")


# console lines that mark the boot's stages (the first line matching each), in order
INIT_MILESTONE = "EE's init runs"
MILESTONES = (
    ("firmware PXE: address and boot file from DHCP", re.compile(r"Station IP address is")),
    ("firmware PXE: ipxe.efi over TFTP", re.compile(r"NBP file downloaded successfully")),
    ("iPXE: DHCP again, told the relay's boot URL", re.compile(r"Filename: http")),
    ("iPXE: menu over HTTP", re.compile(r"\.ipxe\.\.\. ok")),
    ("kernel and initrd over HTTP; kernel starts", re.compile(r"Linux version")),
    (INIT_MILESTONE, re.compile(rf"{MARKER}|Reached target.*[Mm]ulti-[Uu]ser")),  # test init, or systemd
)


def owner_disk(path: Path, size: int = 32 << 20) -> str:
    """A PC owner's disk at ``path``: a GPT with an ext4 partition (its own UUID) and free space
    after it, the rest random; its SHA-256 (a boot medium must never change a byte of it)."""
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    table = "label: gpt\nstart=2048, size=16384, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
    subprocess.run(["sfdisk", "--quiet", str(path)], input=table, text=True, check=True, capture_output=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", f"offset={2048 * 512}", str(path), "8M"],
                   check=True, capture_output=True)  # fmt: skip
    return disk_sha256(path)


@dataclass
class Boot:
    active: dict[str, Any]  # the EE's /run/slim/ee (from the test init's marker, or from the core)
    events: list[pb.BootEvent]  # every event of this boot (relays' and agent's), oldest first
    console: str
    qemu_started: float  # host clock
    kernel_started: float  # when "Linux version" came out on the console
    marker_at: float  # the test init's marker, or when the lab saw the core say "up"
    qemu_exit: int | None  # None: the lab stopped the VM (a systemd EE runs on)
    milestones: dict[str, float] = field(default_factory=dict)  # label -> host clock
    status: pb.BootStatus | None = None  # the core's word on this boot, at its end
    secret: bytes = b""  # the environment's secret file as the core has it (the guest reports its digest)

    @property
    def agent_stages(self) -> list[str]:
        """The stages the agent and the environment reported (not the relays' own)."""
        return [e.stage for e in self.events if not relay_observed(e.stage)]


class _Console:
    """QEMU's console, read on a thread: lines timestamped as they arrive, the milestones,
    the kernel's start and the test init's marker."""

    def __init__(self, proc: subprocess.Popen[str], log: Path) -> None:
        self.lines: list[str] = []
        self.milestones: dict[str, float] = {}
        self.kernel_at = self.marker_at = 0.0
        self.active: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._read, args=(proc, log), name="console", daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str], log: Path) -> None:
        assert proc.stdout is not None
        with open(log, "w") as out:
            for line in proc.stdout:  # ends when QEMU exits
                now = time.time()
                self.lines.append(line)
                out.write(line)
                for label, pattern in MILESTONES:
                    if label not in self.milestones and pattern.search(line):
                        self.milestones[label] = now
                if not self.kernel_at and "Linux version" in line:
                    self.kernel_at = now
                m = re.search(rf"{MARKER} (\{{.*\}})", line)
                if m:
                    self.marker_at, self.active = now, json.loads(m.group(1))
        proc.stdout.close()

    def join(self) -> None:
        self._thread.join(30)

    @property
    def text(self) -> str:
        return "".join(self.lines)


class Lab:
    def __init__(
        self,
        tmp: Path,
        var_policy: str | None = None,
        qemu: str = "qemu-system-x86_64",
        network: Literal["user", "pxe"] = "user",
        pxelinux: bool = False,
        init: Literal["test", "systemd"] = "test",
        nic: Literal["virtio-net-pci", "e1000"] = "virtio-net-pci",
        up_timeout: float | None = None,
        busy: list[int | None] | None = None,
        firmware: Literal["uefi", "bios"] | None = None,
        wake_to: str | None = None,
        https: bool = False,
        modules: tuple[str, ...] = (),
    ) -> None:
        """``pxelinux`` (pxe network only): a BIOS VM whose profile boots the legacy way,
        lpxelinux.0 over TFTP and its pxelinux.cfg/01-<mac> from the relay.  ``init``: the
        image's own systemd, or the test script (see the module's docstring); ``nic``: the
        VM's network card (the profile loads its driver); ``up_timeout``: the
        environment's; ``busy`` (user network): a busy front (labs.busyfront) before the
        relay refuses the first object requests with 503, with these Retry-Afters; ``https``
        (user network): the relay also serves HTTPS, named first in the registry (what a
        boot medium and a node with a token speak); ``modules``: more kernel modules for
        the profile (a boot medium's cache on a USB stick needs USB storage and ext4)."""
        self.tmp, self.qemu, self.var_policy, self.network = tmp, qemu, var_policy, network
        self.pxelinux = pxelinux
        self.init_path: str | None = TEST_INIT_PATH if init == "test" else None  # None: the image's
        self.nic, self.up_timeout, self.busy = nic, up_timeout, busy
        self.firmware, self.wake_to = firmware, wake_to
        self.https_port = 0 if https else None  # the relay's HTTPS port, once it serves
        self.modules = modules
        self.secure_boot = False  # UEFI with Secure Boot on (boot media only)
        self.pools = ""  # the registry's pools section (labs.desktoplab writes it)
        self._serve: subprocess.Popen[bytes] | None = None
        self.front: BusyFront | None = None
        self.state = tmp / "state"
        self.image, self.store = tmp / "image", self.state / "store"
        self.keys = self.state / "keys"  # the core's signing key (slim serve's STATE_DIR/keys); the build
        # puts its public key into the initrd, whose agent refuses plans it did not sign
        self.registry = tmp / "registry.yaml"
        self.secret = tmp / "vm.secret"  # the environment's secret, on the core's side
        pxe = network == "pxe"
        self.nfs_port = 2049 if pxe else free_port()  # in the lab's own namespace, or on loopback
        self.relay_port = 8080 if pxe else 9
        self.said: list[str] = []  # what `slim serve` printed (pxe)
        self._procs: list[subprocess.Popen[str]] = []
        self._client: CoreClient | None = None
        self.netlab: NetLab | None = None

    # -- setup --------------------------------------------------------------
    def start(self) -> Lab:
        """Import and build the EE, start the servers, wait until the core hears the relay."""
        self.write_registry()
        self._slim("ee", "import", "vmtest", "--from", "debootstrap:bookworm", "--add-kernel",
                   "--registry", str(self.registry))  # fmt: skip
        self._write_inits()
        self.built = self.build()
        if self.network == "pxe":
            return self._start_pxe()
        ca = self.tmp / "ca"  # the lab's own CA: the relay and the lab's client get certificates of it
        relay_identity = enroll(ca, "r1", "relay", self.tmp / "relay-r1")
        self.identity = enroll(ca, "lab", "admin", self.tmp / "admin-lab")
        core = self._start("core", "serve", "--registry", str(self.registry), "--store", str(self.store),
                           "--keys", str(self.keys), "--ca", str(ca), "--no-socket",
                           "--state", str(self.tmp / "state.db"), "--listen", "127.0.0.1:0",
                           "--objects-listen", "127.0.0.1:0")  # fmt: skip
        self._core = core
        self.core = self._ready(core, "listening on", "core")
        objects = self._ready(core, "objects on", "core")
        https = ["--https-listen", "127.0.0.1:0"] if self.https_port is not None else []
        relay = self._start("relay", "serve", "--identity", str(relay_identity), "--core", self.core,
                            "--upstream", f"https://{objects}", "--cache-dir", str(self.tmp / "cache"),
                            "--max-bytes", "2G", "--listen", "127.0.0.1:0",
                            *https)  # fmt: skip
        self.relay_port = int(self._ready(relay, "listening on", "relay").rsplit(":", 1)[1])
        if self.https_port is not None:
            self.https_port = int(self._ready(relay, "https on", "relay").rsplit(":", 1)[1])
        if self.busy:  # the guest reaches the relay through the busy front
            self.front = BusyFront(f"http://127.0.0.1:{self.relay_port}", self.busy)
            self.relay_port = self.front.start()
        self.write_registry()  # the registry names the relay where the guest reaches it
        nfs = self._start("nfs", "serve", "--registry", str(self.registry), "--store", str(self.store),
                          "--listen", f"127.0.0.1:{self.nfs_port}",
                          "--workdir", str(self.tmp / "nfs"))  # fmt: skip
        self._ready(nfs, "listening on", "nfs")
        return self._connect()

    def _write_inits(self) -> None:
        """The test inits, on the image's /usr (they run from NFS)."""
        for path, text in ((TEST_INIT_PATH, TEST_INIT), (CRASH_INIT_PATH, CRASH_INIT)):
            init = self.image / path.lstrip("/")
            init.write_text(text)
            init.chmod(0o755)

    def _connect(self) -> Lab:
        identity = getattr(self, "identity", None)
        credentials = Credentials.from_identity(identity) if identity is not None else NONE
        self._client = CoreClient(self.core, timeout=5, credentials=credentials)
        self.admin = self._client.admin
        for _ in range(300):  # bounded: 30 s for the reloaded core to hear from the relay
            relays = self._client.call(self.admin.ListRelays, pb.ListRelaysRequest()).relays
            if any(r.urls[-1].endswith(f":{self.relay_port}/") and r.status == "live" for r in relays):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"the core never heard from the relay (see {self.tmp}/relay.log)")

    def _start_pxe(self) -> Lab:
        """The namespace, the site's DHCP server, `slim serve`; wait until the core hears the relay."""
        self.netlab = lab = NetLab(self.tmp, PXE_SUBNET, ipv6=PXE_SERVER6)
        lab.add_tap("tap0")
        site = lab.add_host("site", PXE_SITE_DHCP)
        conf = self.tmp / "site-dhcp.conf"
        conf.write_text(SITE_DHCP.format(tmp=self.tmp))
        lab.popen(site, "dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", "--user=root",
                  f"--log-facility={self.tmp}/site-dhcp.log",
                  f"--pid-file={self.tmp}/site-dhcp.pid")  # fmt: skip
        with open(self.tmp / "serve.log", "w") as err:
            serve = lab.popen(lab.server, *SLIM, "serve", "--registry", str(self.registry),
                              "--state-dir", str(self.state), stdout=subprocess.PIPE, stderr=err)  # fmt: skip
        assert serve.stdout is not None
        self._serve = serve
        try:
            self.said = await_ready(serve.stdout, self.state / "logs")
        finally:
            serve.stdout.close()
        self.core = f"unix:{self.tmp}/core.sock"
        return self._connect()

    def write_registry(self) -> None:
        """(Re)write the registry; a running core reloads it (SIGHUP)."""
        disk = self.var_policy is not None
        pxe = self.network == "pxe"
        if not self.secret.exists():
            self.secret.write_text(secrets.token_hex(32) + "\n")
            self.secret.chmod(0o600)
        self.registry.write_text(
            REGISTRY.format(
                server=PXE_SERVER if pxe else "10.0.2.2",
                prefixes=PXE_SUBNET if pxe else "127.0.0.0/8, 10.0.2.0/24",
                dhcp="    dhcp: {mode: proxy, interface: br0, router_advertisements: true}\n" if pxe else "",
                firmware=self.firmware or ("uefi" if pxe and not self.pxelinux else "bios"),
                wake=f", wake_to: {self.wake_to}" if self.wake_to else "",
                pools=self.pools,
                loader="pxelinux" if self.pxelinux else "ipxe",
                server_section=PXE_SERVER_SECTION.format(tmp=self.tmp, server=PXE_SERVER) if pxe else "",
                relay_urls=", ".join(f'"{u}"' for u in self.relay_urls(PXE_SERVER if pxe else "10.0.2.2")),
                image=self.image,
                nfs=self.nfs_port,
                mac=MAC,
                modules=", ".join([NIC_MODULES[self.nic], *(["virtio_blk"] if disk else []), *self.modules]),
                kernel_args=f"slim.init={self.init_path}" if self.init_path else "",
                up_timeout=f"    up_timeout: {self.up_timeout:g}\n" if self.up_timeout else "",
                var=f"      /var: {self.var_policy}\n" if disk else "",
                disk=", disk: /dev/vda" if disk else "",
                secret=self.secret,
                secret_path=SECRET_PATH,
            )
        )
        core = getattr(self, "_core", None)
        if core is not None:
            core.send_signal(signal.SIGHUP)
        if self._serve is not None:  # `slim serve` passes it on to its core
            self._serve.send_signal(signal.SIGHUP)

    def relay_urls(self, server: str) -> list[str]:
        """The relay's URLs as the registry names them: https first, when it serves it."""
        http = [f"http://{server}:{self.relay_port}/"]
        if self.https_port is None:
            return http
        # before the relay serves, any port: the build needs only to know that relays speak https
        return [f"https://{server}:{self.https_port or 1}/", *http]

    def build(self) -> dict[str, Any]:
        """``slim ee build vmtest``: its JSON report."""
        out = self._slim(
            "ee",
            "build",
            "vmtest",
            "--json",
            "--registry",
            str(self.registry),
            "--store",
            str(self.store),
            "--keys",
            str(self.keys),
            *(["--ca", str(self.tmp / "ca")] if self.network == "user" else []),  # the relays' CA
        )
        report: dict[str, Any] = json.loads(out)[0]
        return report

    # -- booting ------------------------------------------------------------
    def boot(self, *qemu_args: str, medium: Path | None = None, usb: bool = False) -> Boot:
        """Boot the VM once, until the core says the boot is up or failed (and, with the test
        init, until the VM powered itself off); the console is read on a thread and
        timestamped as lines arrive.  ``medium`` (user network): from this boot medium
        (slim media build), as a CD or, ``usb``, a USB stick; no PXE."""
        serial = self.tmp / "serial.log"
        before = self._status()
        started = time.time()
        argv = self._argv(medium, usb)
        # -no-reboot: a kernel panic (an init that died) ends QEMU instead of booting again
        proc = subprocess.Popen(
            [*argv, "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot", *qemu_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace",
        )  # fmt: skip
        console = _Console(proc, serial)
        status: pb.BootStatus | None = None
        up_seen = 0.0
        stopped = False
        try:
            deadline = started + BOOT_TIMEOUT + (self.up_timeout or 0)
            while time.time() < deadline:  # bounded; the core's state is polled
                exited = proc.poll() is not None
                current = self._status()
                if current is not None and (before is None or current.boot_id != before.boot_id):
                    status = current
                    if status.state == "up" and not up_seen:
                        up_seen = time.time()
                    done = status.state in ("up", "failed")
                    # a systemd EE runs on: stop it once the serial console (slower than the
                    # network the report takes) has shown its init's milestone, or 20 s after up
                    shown = INIT_MILESTONE in console.milestones or time.time() - up_seen > CONSOLE_GRACE
                    if done and (exited or status.state == "failed" or (self.init_path is None and shown)):
                        break
                if exited and (status is None or status.state not in ("starting", "booting")):
                    break  # QEMU is gone and nothing more will come
                time.sleep(0.5)
        finally:
            if proc.poll() is None:  # a systemd EE runs on, or the deadline passed
                stopped = True
                proc.kill()
            code = proc.wait(timeout=30)
            console.join()
        if status is None or status.state not in ("up", "failed"):
            raise AssertionError(
                f"the boot did not end (core: {status}, qemu exit {code}):\n{console.text[-3000:]}"
            )
        assert self._client is not None
        events = self._client.call(
            self.admin.ListBootEvents, pb.ListBootEventsRequest(node="vm1", boot_id=status.boot_id)
        ).events
        active = console.active
        if not active:  # no test init to print /run/slim/ee: the core knows the boot
            plan = next((e for e in events if e.stage == "plan"), None)
            release = plan.message.split()[1] if plan is not None and len(plan.message.split()) > 1 else ""
            active = {"node": "vm1", "environment": status.environment, "boot_id": status.boot_id,
                      "release": release.rstrip(";")}  # fmt: skip
        marker_at = console.marker_at or up_seen
        return Boot(
            active, list(events), console.text, started, console.kernel_at, marker_at,
            None if stopped else code, console.milestones, status, self.secret.read_bytes(),
        )  # fmt: skip

    def _argv(self, medium: Path | None, usb: bool) -> list[str]:
        """QEMU's command line for the lab's kind of boot (see :meth:`boot`), without the
        common tail (TCG, memory, console)."""
        if medium is not None:  # a home PC: no PXE ROM, the medium's own boot
            # bootindex: the firmware boots the medium first, whatever other disks the PC has
            drive = (
                ["-drive", f"if=none,id=stick,format=raw,file={medium}", "-device", "qemu-xhci",
                 "-device", "usb-storage,drive=stick,bootindex=0"]
                if usb else ["-drive", f"if=none,id=cd,media=cdrom,readonly=on,format=raw,file={medium}",
                             "-device", "ide-cd,drive=cd,bootindex=0"]
            )  # fmt: skip
            return [self.qemu, *drive, *self._uefi(), "-netdev", "user,id=n0",
                    "-device", f"{self.nic},netdev=n0,mac={MAC},romfile="]  # fmt: skip
        if self.netlab is not None and self.pxelinux:  # BIOS; QEMU's iPXE ROM as the PXE ROM
            return [
                *self.netlab.cmd(self.netlab.server, self.qemu), "-boot", "n",
                "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device", f"{self.nic},netdev=n0,mac={MAC}",
            ]  # fmt: skip
        if self.netlab is not None:  # UEFI firmware's own PXE on the lab's bridge
            return [
                *self.netlab.cmd(self.netlab.server, self.qemu),
                *self._uefi(force=True),
                "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device", f"{self.nic},netdev=n0,mac={MAC},romfile=",
            ]  # fmt: skip
        # QEMU's iPXE ROM, told the boot script's URL by QEMU's own DHCP
        return [
            self.qemu, "-boot", "n",
            "-netdev", f"user,id=n0,bootfile=http://10.0.2.2:{self.relay_port}/boot/{MAC}.ipxe",
            "-device", f"{self.nic},netdev=n0,mac={MAC}",
        ]  # fmt: skip

    def _uefi(self, force: bool = False) -> list[str]:
        """QEMU's arguments for UEFI firmware (OVMF, fresh variables), if the lab's is UEFI."""
        if not force and self.firmware != "uefi":
            return []
        vars_copy = self.tmp / "OVMF_VARS.fd"
        if self.secure_boot:  # q35 with SMM: OVMF keeps its variables out of the guest's reach
            shutil.copyfile(OVMF_VARS_MS, vars_copy)
            return ["-machine", "q35,smm=on", "-global", "driver=cfi.pflash01,property=secure,value=on",
                    "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE_SECURE}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]  # fmt: skip
        shutil.copyfile(OVMF_VARS, vars_copy)
        return ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,file={vars_copy}"]  # fmt: skip

    def console_until(
        self,
        pattern: str,
        medium: Path,
        usb: bool = False,
        seconds: float = BOOT_TIMEOUT,
        typed: tuple[str, str] | None = None,
    ) -> str:
        """Boot from ``medium`` until the console shows ``pattern`` (a regular expression),
        then stop the VM: the console so far.  AssertionError if it never does (bounded).
        ``typed`` = (prompt, text): once the console shows ``prompt`` (a regular expression),
        ``text`` and Enter are typed on the serial console (QEMU's standard input), once."""
        serial = self.tmp / "serial-until.log"
        proc = subprocess.Popen(
            [*self._argv(medium, usb), "-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if typed else subprocess.DEVNULL, text=True, errors="replace",
        )  # fmt: skip
        console = _Console(proc, serial)
        deadline = time.time() + seconds
        try:
            while time.time() < deadline and proc.poll() is None:  # bounded
                if re.search(pattern, console.text):
                    break
                if typed is not None and proc.stdin is not None and re.search(typed[0], console.text):
                    proc.stdin.write(typed[1] + "\r")
                    proc.stdin.flush()
                    typed = None
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            console.join()
            if proc.stdin is not None:
                proc.stdin.close()
        if not re.search(pattern, console.text):
            raise AssertionError(f"the console never showed {pattern!r}:\n{console.text[-3000:]}")
        return console.text

    def wait_for_kernel_args(self, text: str, seconds: float = 30.0) -> None:
        """Until the core (which reloads the registry on SIGHUP) boots vm1 with ``text`` in
        its kernel arguments; bounded."""
        assert self._client is not None
        req = pb.GetBootScriptRequest(mac=MAC, origin="10.0.2.15", peek=True)
        for _ in range(int(seconds / 0.1)):
            if text in self._client.call(self._client.core.GetBootScript, req).script:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the core did not take the new registry within {seconds} s")

    def _status(self) -> pb.BootStatus | None:
        assert self._client is not None
        node = self._client.call(self.admin.GetNode, pb.GetNodeRequest(node=pb.NodeRef(name="vm1")))
        return node.boot if node.HasField("boot") else None

    # -- processes ----------------------------------------------------------
    def slim(self, *args: str) -> str:
        """Run ``slim ARGS`` (the product's command); its standard output."""
        return self._slim(*args)

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
        if self._client is not None:
            self._client.close()
        if self.front is not None:
            self.front.close()
        if self.netlab is not None:
            self.netlab.close()  # stops `slim serve` and the site's DHCP server, removes the namespaces
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
