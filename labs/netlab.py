"""A cluster on one machine: network namespaces on a bridge (tests and benchmarks).

One *server* namespace holds a Linux bridge with the server's address; each
*node* is a namespace of its own, joined to the bridge by a veth pair whose
node end is ``eth0`` with the node's MAC.  Links can be shaped with ``tbf``
(both directions: the bridge end shapes what the node receives, the node end
what it sends).  A tap device on the bridge lets a QEMU VM (started in the
server namespace) join the same L2 network, so DHCP on port 67 and TFTP on
port 69 are ours, not QEMU's.

Everything is created here and removed by :meth:`NetLab.close` (deleting a
namespace removes its interfaces); processes started through :meth:`popen`
are stopped there too, by PID.  Needs root (CAP_NET_ADMIN).  Addresses are
private (10.x) and live only inside these namespaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from slim.core.build.agentrt import UDHCPC
from slim.errors import FailedPrecondition

HOST_RESOLV_CONF = "/etc/resolv.conf"


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise FailedPrecondition(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


@dataclass
class NodeNs:
    name: str
    netns: str
    mac: str
    veth: str  # the bridge end, in the server namespace
    address: str | None = None


class NetLab:
    """``with NetLab(tmp) as lab: lab.add_node("n1", mac); lab.dhcp("n1")``."""

    def __init__(
        self, tmp: Path, subnet: str = "10.77.0.0/24", tag: str | None = None, ipv6: str | None = None
    ) -> None:
        """``ipv6``: also give the bridge this address (e.g. a ULA ``fd77::1/64``)."""
        if os.geteuid() != 0:
            raise FailedPrecondition("the namespace lab needs root (it creates network namespaces)")
        self.tmp = tmp
        self.subnet = ipaddress.IPv4Network(subnet)
        self.server_ip = str(self.subnet.network_address + 1)
        self.tag = tag or f"sl{secrets.token_hex(3)}"
        self.server = f"{self.tag}-srv"
        self.nodes: dict[str, NodeNs] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        # The initrd's own script, as a node runs it, but writing the lease's name servers
        # here: `ip netns exec` shares this machine's /etc, and the initrd's script would
        # empty this machine's resolv.conf (and with it every name look-up, apt's too).
        self.resolv_conf = tmp / "resolv.conf"
        if UDHCPC.count(HOST_RESOLV_CONF) != 2:
            raise AssertionError(f"the initrd's udhcpc script no longer writes {HOST_RESOLV_CONF} twice")
        self._script = tmp / "udhcpc.sh"
        self._script.write_text(UDHCPC.replace(HOST_RESOLV_CONF, shlex.quote(str(self.resolv_conf))))
        self._script.chmod(0o755)
        try:
            self._add_ns(self.server)
            _ip("-n", self.server, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.server, "addr", "add", f"{self.server_ip}/{self.subnet.prefixlen}", "dev", "br0")
            if ipv6 is not None:
                _ip("-n", self.server, "addr", "add", ipv6, "dev", "br0", "nodad")
            _ip("-n", self.server, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    # -- topology -----------------------------------------------------------------------
    def add_node(self, name: str, mac: str, rate: str | None = None, address: str | None = None) -> NodeNs:
        """A node namespace on the bridge; ``rate`` (e.g. ``100mbit``) shapes its link;
        ``address``: a fixed one on ``eth0`` (in the lab's subnet), instead of asking DHCP."""
        netns = f"{self.tag}-{name}"
        veth = f"v{len(self.nodes)}"
        self._add_ns(netns)
        _ip("-n", self.server, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", netns, "link", "set", "eth0", "address", mac)
        _ip("-n", self.server, "link", "set", veth, "master", "br0")
        _ip("-n", self.server, "link", "set", veth, "up")
        _ip("-n", netns, "link", "set", "eth0", "up")
        if address is not None:
            _ip("-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        node = self.nodes[name] = NodeNs(name, netns, mac, veth, address)
        if rate is not None:
            self.shape(self.server, veth, rate)
            self.shape(netns, "eth0", rate)
        return node

    def add_tap(self, name: str = "tap0") -> str:
        """A tap device on the bridge, for a QEMU VM run in the server namespace."""
        _ip("-n", self.server, "tuntap", "add", name, "mode", "tap")
        _ip("-n", self.server, "link", "set", name, "master", "br0")
        _ip("-n", self.server, "link", "set", name, "up")
        return name

    def add_host(self, name: str, address: str) -> str:
        """Another machine on the bridge with a fixed address (e.g. the site's own DHCP server)."""
        netns = f"{self.tag}-{name}"
        veth = f"h{len(self._namespaces)}"
        self._add_ns(netns)
        _ip("-n", self.server, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", self.server, "link", "set", veth, "master", "br0")
        _ip("-n", self.server, "link", "set", veth, "up")
        _ip("-n", netns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        return netns

    @staticmethod
    def shape(netns: str, dev: str, rate: str, burst: str = "64kb", latency: str = "50ms") -> None:
        """Egress of ``dev`` in ``netns`` at ``rate`` (a token bucket)."""
        _ip_tc = ["ip", "netns", "exec", netns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf"]
        proc = subprocess.run(
            [*_ip_tc, "rate", rate, "burst", burst, "latency", latency],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise FailedPrecondition(f"tc tbf on {netns}/{dev}: {proc.stderr.strip()}")

    # -- running things -----------------------------------------------------------------
    def cmd(self, netns: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", netns, *argv]

    def popen(self, netns: str, *argv: str, **kwargs: object) -> subprocess.Popen[bytes]:
        # its own process group, so that close() can take down what it started, too
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            self.cmd(netns, *argv), start_new_session=True, **kwargs
        )
        self._procs.append(proc)
        return proc

    def dhcp(self, node: str, tries: int = 3, timeout: float = 2.0) -> str | None:
        """Ask for an address on the node's eth0 (busybox udhcpc, bounded: ``tries``
        discovers ``timeout`` s apart); the address, or None if nobody answered."""
        n = self.nodes[node]
        wait = str(max(1, round(timeout)))
        argv = ["busybox", "udhcpc", "-i", "eth0", "-q", "-n", "-f", "-t", str(tries), "-T", wait,
                "-A", "1", "-s", str(self._script)]  # fmt: skip
        subprocess.run(
            self.cmd(n.netns, *argv), capture_output=True, timeout=tries * (timeout + 2) + 10, check=False
        )
        shown = subprocess.run(
            ["ip", "-n", n.netns, "-4", "-o", "addr", "show", "dev", "eth0"],
            capture_output=True, text=True, timeout=30, check=False,
        ).stdout  # fmt: skip
        m = re.search(r"\binet (\d+\.\d+\.\d+\.\d+)/", shown)
        n.address = m.group(1) if m else None
        return n.address

    def reap(self) -> None:
        """Forget the processes that have ended (a long benchmark starts thousands)."""
        self._procs = [p for p in self._procs if p.poll() is None]

    # -- cleanup ------------------------------------------------------------------------
    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # anything left in its group
            proc.wait()
        self._procs.clear()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30, check=False)
        self._namespaces.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
