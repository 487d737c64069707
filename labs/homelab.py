"""A home PC behind broadband, an ISP with a relay, SLIM's centre: three network namespaces and a
QEMU VM booted from its medium (issue 19's lab; tests/test_home.py).

::

    core ns   10.99.0.2     slim core serve (objects over HTTPS), slim nfs serve (the centre's /usr)
      | veth 10.99.0.0/30, unshaped: the ISP's uplink
    isp ns    10.99.0.1, 100.64.0.1      slim relay serve (HTTP :8080, HTTPS :8443, its own NFS :2049)
      | labs.wanlink: TUN devices, tbf at ``rate`` each way, ``delay_ms`` each way (the broadband)
    home ns   100.64.0.2, 192.168.77.1 on br0      the home router: DHCP (dnsmasq), forwarding
      | br0 + tap0
    the VM    192.168.77.50-99, from the home router; boots from its medium (no PXE)

The home network is routed, not NATed (the ISP routes 192.168.77.0/24 to the home): the relay
sees the PC's own address, in the ``home`` site's prefixes, whose nodes must show their
token.  The test process talks to the core over its local socket (a file: namespaces do not
matter).  Everything started here is stopped here, by PID; the namespaces go with
:meth:`HomeLab.close`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from labs.host import enroll
from labs.netlab import NetLab, _ip
from labs.vmlab import MAC, SECRET_PATH, SLIM, TEST_INIT_PATH, Lab
from labs.wanlink import WanLink
from slim.v1 import core_pb2 as pb

HOME_SUBNET = "192.168.77.0/24"
CORE_ADDR, ISP_UP = "10.99.0.2", "10.99.0.1"
ISP_WAN, HOME_WAN = "100.64.0.1", "100.64.0.2"
RELAY_HTTP, RELAY_HTTPS, CORE_GRPC, CORE_OBJECTS = 8080, 8443, 50051, 8081
HOME_DHCP = """\
# the home router: addresses and a default route, nothing about booting
port=0
interface=br0
bind-interfaces
dhcp-range=192.168.77.50,192.168.77.99,255.255.255.0,1h
dhcp-option=3,192.168.77.1
dhcp-leasefile={tmp}/home-dhcp.leases
"""
REGISTRY = """\
settings: {{nfs_server: {core}, boot_menu_timeout: 0, heartbeat_interval: 1}}
sites:
  home:
    prefixes: [{home}]
    node_identity: token
relays:
  isp1: {{urls: ["https://{isp}:{https}/", "http://{isp}:{http}/"], site: home, nfs: {isp}}}
profiles:
  pc: {{firmware: uefi, modules: [{modules}], kernel_args: "console=ttyS0 panic=-1"}}
environments:
  vmtest:
    image: {image}
    default_policy: ram
    kernel_args: "slim.init={init}"
    secrets: [{{source: {secret}, path: {secret_path}, mode: "0400"}}]
    directories:
      /usr: {{policy: nfs, options: "{nfs_options}"}}
nodes:
  vm1: {{macs: ["{mac}"], profile: pc, environment: vmtest, site: home}}
"""
# the drivers of the VM's NIC, and those the release's agent needs for the medium's cache
MODULES = ("virtio_pci", "virtio_net", "xhci_pci", "usb_storage", "sd_mod", "ext4", "crc32c_generic")
NFS_OPTIONS = "ro,nolock,noatime,proto=tcp,port=2049,vers=4.1,hard,timeo=600,nocto,actimeo=3600"


class HomeLab(Lab):
    """``HomeLab(tmp).start()``, then :meth:`Lab.boot` with ``medium=`` (the VM runs in the home
    namespace on tap0).  ``rate``: the broadband's rate each way (None: unshaped); ``delay_ms``:
    its one-way delay."""

    def __init__(self, tmp: Path, qemu: str = "qemu-system-x86_64", rate: str | None = "3mbit",
                 delay_ms: float = 20.0) -> None:  # fmt: skip
        super().__init__(tmp, qemu=qemu, firmware="uefi", https=True, modules=MODULES)
        self.rate, self.delay_ms = rate, delay_ms
        self.wan: WanLink | None = None
        self._served: list[subprocess.Popen[str]] = []  # what runs in the namespaces (NetLab stops them)
        self.home = self.isp = self.core_ns = ""

    # -- the registry ----------------------------------------------------------------------
    def write_registry(self) -> None:
        if not self.secret.exists():
            self.secret.write_text("a home PC's secret\n")
            self.secret.chmod(0o600)
        self.registry.write_text(
            REGISTRY.format(
                core=CORE_ADDR,
                home=HOME_SUBNET,
                isp=ISP_WAN,
                https=RELAY_HTTPS,
                http=RELAY_HTTP,
                modules=", ".join(MODULES),
                image=self.image,
                init=TEST_INIT_PATH,
                secret=self.secret,
                secret_path=SECRET_PATH,
                nfs_options=NFS_OPTIONS,
                mac=MAC,
            )
        )

    def relay_urls(self, server: str) -> list[str]:
        return [f"https://{ISP_WAN}:{RELAY_HTTPS}/", f"http://{ISP_WAN}:{RELAY_HTTP}/"]

    # -- setup -------------------------------------------------------------------------------
    def start(self) -> HomeLab:
        """The EE built, the namespaces, the WAN link, the home router, the centre and the ISP's
        relay; returns once the core hears the relay (which then builds its NFS trees: see
        :meth:`wait_relay_nfs`)."""
        self.write_registry()
        self._slim("ee", "import", "vmtest", "--from", "debootstrap:bookworm", "--add-kernel",
                   "--registry", str(self.registry))  # fmt: skip
        self._write_inits()
        self.built = self.build()
        self.netlab = lab = NetLab(self.tmp, HOME_SUBNET)
        lab.add_tap("tap0")
        home, isp, core = self.home, self.isp, self.core_ns = lab.server, f"{lab.tag}-isp", f"{lab.tag}-core"
        for ns in (isp, core):
            lab._add_ns(ns)
        _ip("-n", isp, "link", "add", "up0", "type", "veth", "peer", "name", "up0", "netns", core)
        for ns, addr in ((isp, ISP_UP), (core, CORE_ADDR)):
            _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", "up0")
            _ip("-n", ns, "link", "set", "up0", "up")
        self.wan = WanLink(home, isp, HOME_WAN, ISP_WAN, rate=self.rate, delay_ms=self.delay_ms).start()
        _ip("-n", home, "route", "add", "default", "dev", "wan0")
        _ip("-n", isp, "route", "add", HOME_SUBNET, "dev", "wan0")
        _ip("-n", core, "route", "add", "default", "via", ISP_UP)
        for ns in (home, isp):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        conf, tmp = self.tmp / "home-dhcp.conf", self.tmp
        conf.write_text(HOME_DHCP.format(tmp=tmp))
        lab.popen(home, "dnsmasq", "--keep-in-foreground", f"--conf-file={conf}", "--user=root",
                  f"--log-facility={tmp}/home-dhcp.log", f"--pid-file={tmp}/home-dhcp.pid")  # fmt: skip
        ca = tmp / "ca"
        relay_identity = enroll(ca, "isp1", "relay", tmp / "relay-isp1")
        self.core = f"unix:{tmp}/core.sock"
        where = ("--registry", str(self.registry), "--store", str(self.store))
        self._ready(self._in(core, "core", "serve", *where, "--keys", str(self.keys), "--ca", str(ca),
                             "--socket", f"{tmp}/core.sock", "--state", str(tmp / "state.db"),
                             "--listen", f"{CORE_ADDR}:{CORE_GRPC}", "--tls-name", CORE_ADDR,
                             "--objects-listen", f"{CORE_ADDR}:{CORE_OBJECTS}"),
                    "listening on", "core")  # fmt: skip
        self._ready(self._in(core, "nfs", "serve", *where, "--listen", f"{CORE_ADDR}:2049",
                             "--workdir", str(tmp / "nfs")), "listening on", "nfs")  # fmt: skip
        self._ready(self._in(isp, "relay", "serve", "--identity", str(relay_identity),
                             "--core", f"{CORE_ADDR}:{CORE_GRPC}", "--upstream", f"https://{CORE_ADDR}:{CORE_OBJECTS}",
                             "--cache-dir", str(tmp / "cache"), "--max-bytes", "2G",
                             "--listen", f"0.0.0.0:{RELAY_HTTP}", "--https-listen", f"0.0.0.0:{RELAY_HTTPS}",
                             "--trust", str(self.keys), "--nfs-listen", f"{ISP_WAN}:2049",
                             "--nfs-dir", str(tmp / "relay-nfs")),
                    "listening on", "relay")  # fmt: skip
        self.relay_port, self.https_port = RELAY_HTTP, RELAY_HTTPS
        self._connect()
        return self  # the ISP's relay builds its NFS trees meanwhile: wait_relay_nfs() before a boot

    def wait_relay_nfs(self, seconds: float = 600.0) -> list[str]:
        """Wait (bounded) until the ISP's relay exports every NFS tree of the current release
        (it builds them from objects it fetches over the uplink); the trees."""
        wanted = {d["manifest"]["digest"] for d in self.built["directories"] if d["policy"] == "nfs"}
        assert self._client is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            relays = self._client.call(self.admin.ListRelays, pb.ListRelaysRequest()).relays
            isp1 = next(r for r in relays if r.name == "isp1")
            if wanted <= set(isp1.last_heartbeat.nfs_trees):
                return sorted(wanted)
            time.sleep(0.5)
        raise RuntimeError(f"the ISP's relay never exported {sorted(wanted)} (see {self.tmp}/relay.log)")

    def _in(self, netns: str, *args: str) -> subprocess.Popen[str]:
        """``slim ARGS`` in namespace ``netns`` (its log: TMP/ARGS[0].log), stopped at close."""
        assert self.netlab is not None
        with open(self.tmp / f"{args[0]}.log", "w") as err:
            proc: subprocess.Popen[str] = self.netlab.popen(  # type: ignore[assignment]
                netns, *SLIM, *args, stdout=subprocess.PIPE, stderr=err, text=True
            )
        self._served.append(proc)
        return proc

    def ping(self, count: int = 5) -> float:
        """The average round trip from the home router to the ISP's relay, in ms (busybox ping)."""
        assert self.netlab is not None
        out = subprocess.run(
            self.netlab.cmd(self.home, "busybox", "ping", "-c", str(count), "-q", ISP_WAN),
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
        return float(out.rsplit("=", 1)[1].split("/")[1])

    def _argv(self, medium: Path | None, usb: bool) -> list[str]:
        assert self.netlab is not None and medium is not None, "a home PC boots from its medium"
        argv = super()._argv(medium, usb)
        qemu, rest = argv[0], argv[1:]
        i = rest.index("-netdev")
        rest[i + 1] = "tap,id=n0,ifname=tap0,script=no,downscript=no"
        return [*self.netlab.cmd(self.home, qemu), *rest]

    def __enter__(self) -> HomeLab:
        return self

    def close(self) -> None:
        try:
            if self.wan is not None:
                self.wan.close()  # the delayer, by PID
        finally:
            super().close()  # the client, then the namespaces and what runs in them
            for proc in self._served:
                if proc.stdout is not None:
                    proc.stdout.close()
