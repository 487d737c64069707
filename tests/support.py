"""What the tests share: host requirements, the test registry, a small image, servers
in-process and as processes, and raw protocol helpers.  Fixtures are in conftest.py;
test modules import helpers from here only, never from each other."""

from __future__ import annotations

import asyncio
import functools
import http.client
import os
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from slim.agent import manifest as mf
from slim.core.control.server import CoreServer
from slim.core.control.service import CoreService
from slim.core.registry import Registry
from slim.core.store import Store
from slim.objects.server import ObjectServer
from slim.pki import CertificateAuthority
from slim.relay.config import RelayConfig
from slim.relay.server import RelayServer
from slim.rpc import Credentials
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc
from slim.vocabulary import relay_observed

ROOT = Path(__file__).resolve().parent.parent
STARTUP = 30.0


# -- what a test needs from the host ---------------------------------------------------------
def need(condition: bool, why: str) -> None:
    """Skip (locally) or fail (in CI) with ``why`` unless ``condition`` holds."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must be able to run this test: {why}")
    pytest.skip(why)


def need_tool(name: str, package: str | None = None) -> str:
    """The tool's path, by :func:`need`."""
    path = shutil.which(name)
    need(path is not None, f"{name} is not installed (apt-get install {package or name})")
    assert path is not None
    return path


def need_netns() -> None:
    need(os.geteuid() == 0, "network namespaces need root")
    need_tool("dnsmasq", "dnsmasq-base")
    need_tool("busybox", "busybox-static")


# -- the test registry ------------------------------------------------------------------------
TEST_REGISTRY = """\
settings:
  # the tests' nodes call from 127.0.0.1, an address of no site: identified by name or MAC
  # there (the default for such addresses is a node token: tests/test_trust.py)
  node_identity: mac
  heartbeat_interval: 2
  stale_after: 30
  boot_menu_timeout: 3
  nfs_server: 10.9.0.1
sites:
  room:
    prefixes: [10.1.0.0/16, "fd00:1::/64"]
    nfs_server: 10.1.0.1
  lab:
    prefixes: [10.2.0.0/16]
relays:
  hub:
    urls: [http://10.9.0.2:8080/]
    site: lab
    capacity: 2
  room-1:
    urls: [http://10.1.0.2:8080/]
    site: room
    parent: hub
  room-2:
    urls: [http://10.1.0.3:8080/]
    site: room
    parent: hub
  lab-1:
    urls: [http://10.2.0.2:8080/]
    site: lab
profiles:
  vm:
    modules: [virtio_pci, virtio_net]
    kernel_args: console=ttyS0
environments:
  base:
    image: /srv/images/base
    kernel_args: quiet
    default_policy: ram
    directories:
      /usr: nfs
      /tmp: {policy: ram, size: 256m}
  jdk14:
    image: /srv/images/jdk14
    default_policy: sync
    directories:
      /usr: {policy: nfs, options: "ro,nolock,actimeo=900,proto=tcp"}
      /var: disk
  unbuilt:
    image: /srv/images/unbuilt
nodes:
  n1:
    macs: ["52:54:00:00:00:01"]
    profile: vm
    environment: base
    site: room
    disk: /dev/vda2
    groups: [rack1]
  n2:
    macs: ["52:54:00:00:00:02", "52:54:00:00:00:22"]
    profile: vm
    environment: base
    site: lab
    groups: [rack2]
  n3:
    macs: ["52:54:00:00:00:03"]
    profile: vm
    environment: unbuilt
"""


# -- a small image (slim ee build, the agent) ----------------------------------------------
KVER = "6.1.0-99-test"


def make_image(root: Path) -> None:
    """A small root file system with a kernel, modules and every kind of directory."""
    for d in (
        "etc",
        "usr/bin",
        "usr/share/doc",
        "var/lib",
        "srv/data",
        "tmp",
        "boot",
        f"lib/modules/{KVER}/kernel",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text("ee\n")
    (root / "etc" / "motd").write_text("welcome\n" * 100)
    (root / "usr" / "bin" / "tool").write_bytes(b"\x7fELF" + os.urandom(50_000))
    (root / "usr" / "share" / "doc" / "README").write_text("read me\n" * 1000)
    (root / "var" / "lib" / "state").write_text("0\n")
    (root / "srv" / "data" / "small").write_text("small file\n")
    (root / "srv" / "data" / "big").write_bytes(os.urandom(mf.CHUNKED_ABOVE + 100))
    (root / "boot" / f"vmlinuz-{KVER}").write_bytes(b"KERNEL" + os.urandom(1000))
    (root / "vmlinuz").symlink_to(f"boot/vmlinuz-{KVER}")
    (root / "sbin").mkdir(exist_ok=True)
    (root / "sbin" / "init").write_text("#!/bin/sh\nexec sleep infinity\n")
    (root / "sbin" / "init").chmod(0o755)
    mods = root / "lib" / "modules" / KVER
    for name in ("virtio", "virtio_ring", "virtio_pci", "virtio_net", "failover", "net_failover", "overlay"):
        (mods / "kernel" / f"{name}.ko").write_bytes(name.encode() * 100)
    (mods / "modules.dep").write_text(
        "kernel/virtio.ko:\n"
        "kernel/virtio_ring.ko:\n"
        "kernel/virtio_pci.ko: kernel/virtio_ring.ko kernel/virtio.ko\n"
        "kernel/failover.ko:\n"
        "kernel/net_failover.ko: kernel/failover.ko\n"
        "kernel/virtio_net.ko: kernel/net_failover.ko kernel/failover.ko "
        "kernel/virtio_ring.ko kernel/virtio.ko\n"
        "kernel/overlay.ko:\n"
    )
    (mods / "modules.builtin").write_text("kernel/fs/nfs/nfsv4.ko\n")


@dataclass
class Core:
    """A real gRPC core in-process (the ``core`` fixture) and a client channel to it."""

    server: CoreServer
    address: str
    channel: grpc.aio.Channel
    core: pb_grpc.CoreAsyncStub
    admin: pb_grpc.AdminAsyncStub


# -- the session's CA ---------------------------------------------------------------------------
@dataclass
class TestPki:
    """The CA every test's core trusts (made once per session by tests/conftest.py), and
    identities issued from it, one per (role, name)."""

    ca_dir: Path
    root: Path
    _made: dict[tuple[str, str], Path] = field(default_factory=dict)

    def identity(self, name: str, role: str = "relay") -> Path:
        found = self._made.get((role, name))
        if found is None:
            found = self.root / f"{role}-{name}"
            CertificateAuthority.load(self.ca_dir).enroll(name, role, found)  # type: ignore[arg-type]
            self._made[(role, name)] = found
        return found


PKI: list[TestPki] = []  # the session's, set by tests/conftest.py


def pki() -> TestPki:
    return PKI[0]


def relay_identity(name: str) -> Path:
    """An identity of relay ``name`` from the session's CA."""
    return pki().identity(name, "relay")


def relay_credentials(name: str) -> Credentials:
    return Credentials.from_identity(relay_identity(name))


def from_nodes(events: list[pb.BootEvent], origin: str = "10.1.0.9") -> list[pb.BootEvent]:
    """``events`` as a relay passes a node's on: each node stage with the node's address (the
    core checks it may speak for the node); the relay's own observations as they are."""
    for e in events:
        if not relay_observed(e.stage):
            e.origin = origin
    return events


def admin_credentials() -> Credentials:
    return Credentials.from_identity(pki().identity("tester", "admin"))


def short_socket() -> str:
    """A path for a local socket short enough for AF_UNIX (108 bytes), in a fresh directory."""
    return str(Path(tempfile.mkdtemp(prefix="slim-")) / "core.sock")


# -- the core as a process ------------------------------------------------------------------
@dataclass
class Served:
    proc: subprocess.Popen[str]
    address: str
    registry_file: Path


def start_core(registry_file: Path, tmp: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slim.cli",
            "core",
            "serve",
            "--registry",
            str(registry_file),
            "--state",
            str(tmp / "state.db"),
            "--store",
            str(tmp / "store"),
            "--keys",
            str(tmp / "keys"),
            "--listen",
            "127.0.0.1:0",
            *(["--no-socket"] if "--socket" not in extra else []),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_address(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the process prints it once it accepts calls
    assert line.startswith("listening on 127.0.0.1:"), (line, proc.stderr.read() if proc.stderr else "")
    return line.split()[-1]


def stop(proc: subprocess.Popen[str], signal_it: bool = True) -> tuple[int, str]:
    """SIGTERM ``proc`` (unless ``signal_it`` is false) and wait, bounded, for it to exit."""
    if signal_it and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=STARTUP)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


# -- relays and origins ---------------------------------------------------------------------
SLIM = [sys.executable, "-m", "slim.cli"]


def blob(size: int, seed: int) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(seed).randbytes(size)


def put(store: Store, data: bytes) -> str:
    return store.put_bytes(data).digest[7:]


@asynccontextmanager
async def origin(store: Store) -> AsyncIterator[ObjectServer]:
    server = ObjectServer(store.objects, "127.0.0.1:0")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def url(server: ObjectServer | RelayServer) -> str:
    return f"http://127.0.0.1:{server.port}"


@asynccontextmanager
async def relay(
    cache_dir: Path, upstreams: list[str], max_bytes: int = 1 << 30, **kw: object
) -> AsyncIterator[RelayServer]:
    core = kw.get("core")
    if isinstance(core, str) and not core.startswith("unix:") and "identity" not in kw:
        kw["identity"] = relay_identity(str(kw.get("name") or "room-1"))  # as `slim relay enroll` gives
    config = RelayConfig(
        upstreams=upstreams, cache_dir=cache_dir, max_bytes=max_bytes, listen="127.0.0.1:0", **kw
    )
    server = RelayServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1)


async def metrics(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with session.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = sample.value
    return out


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """Send a request line exactly as given (no client-side normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        await writer.wait_closed()
    m = re.match(rb"HTTP/1\.1 (\d{3})", data)
    assert m is not None, data[:200]
    return int(m.group(1)), data


async def serve_on_loopback(app: web.Application) -> tuple[web.AppRunner, str]:
    """``app`` served on 127.0.0.1 at a port the kernel picks: its runner (to clean up) and URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


class FakeUpstream:
    """An upstream that serves given objects, optionally with one byte flipped;
    counts requests.  (A real HTTP server: it stands in for a broken parent.)"""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.corrupt = False
        self.requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        data = self.objects.get(request.match_info["name"])
        if data is None:
            raise web.HTTPNotFound()
        if self.corrupt:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        return web.Response(body=data, content_type="application/octet-stream")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/objects/sha256/{name}", self.handle)
        self._runner, url = await serve_on_loopback(app)
        self.port = int(url.rpartition(":")[2])
        return url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class RelayProcess:
    proc: subprocess.Popen[str]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)


def start_relay_process(cache_dir: Path, upstream: str | None, *extra: str) -> RelayProcess:
    """``slim relay serve`` on 127.0.0.1 port 0; ``upstream`` None: no --upstream (give --registry)."""
    proc = subprocess.Popen(
        [
            *SLIM,
            "relay",
            "serve",
            *(["--upstream", upstream] if upstream is not None else []),
            "--cache-dir",
            str(cache_dir),
            "--listen",
            "127.0.0.1:0",
            "--max-bytes",
            "1G",
            "--log-level",
            "warning",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until ready (or the process dies: "")
    m = re.match(r"listening on [\d.]+:(\d+)", line)
    if m is None:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"relay did not start: {line!r} {err}")
    return RelayProcess(proc, int(m.group(1)))


def stop_process(p: RelayProcess, timeout: float = 20) -> tuple[int, str]:
    p.kill(signal.SIGTERM)
    try:
        _, err = p.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.proc.kill()
        _, err = p.proc.communicate(timeout=10)
    return p.proc.returncode, err


Check = Callable[[], bool]


# -- waiting, and NFS spoken by hand ----------------------------------------------------------
def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)  # polling interval; the condition is what we wait for


def xdr_opaque(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data + b"\0" * (-len(data) % 4)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def rpc_call(
    port: int, xid: int, proc: int, cred: bytes, args: bytes = b"", host: str = "127.0.0.1"
) -> bytes:
    """One ONC RPC call to program 100003 (NFS) version 4 over TCP (with the record
    marker); returns the results after an accepted SUCCESS reply with the same xid."""
    call = struct.pack(">6I", xid, 0, 2, 100003, 4, proc) + cred + struct.pack(">2I", 0, 0) + args
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(struct.pack(">I", 0x80000000 | len(call)) + call)
        reply = b""
        last = False
        while not last:
            (marker,) = struct.unpack(">I", _recv_exact(sock, 4))
            last = bool(marker & 0x80000000)
            reply += _recv_exact(sock, marker & 0x7FFFFFFF)
    rxid, mtype, reply_stat, _flavor, verf_len = struct.unpack(">5I", reply[:20])
    off = 20 + verf_len + (-verf_len % 4)
    (accept_stat,) = struct.unpack(">I", reply[off : off + 4])
    assert (rxid, mtype, reply_stat, accept_stat) == (xid, 1, 0, 0), "not an accepted SUCCESS reply"
    return reply[off + 4 :]


AUTH_NONE = struct.pack(">2I", 0, 0)
AUTH_SYS = struct.pack(">I", 1) + xdr_opaque(
    struct.pack(">I", 0) + xdr_opaque(b"slim-test") + struct.pack(">3I", 0, 0, 0)
)


def rpc_null(port: int) -> bool:
    xid = random.getrandbits(32)
    return rpc_call(port, xid, 0, AUTH_NONE) == b""


async def reload_registry(service: CoreService) -> Registry:
    """What the core's SIGHUP does: the registry file read off the event loop, used on it."""
    registry = await asyncio.to_thread(service.read_registry)
    service.use_registry(registry)
    return registry


# -- blocking calls on the event loop, on purpose ----------------------------------------------
# (functions, file, functions they may be called from, why): the one list of exceptions
# to the loop-blocking check (tests/conftest.py, loop_not_blocked).  Also on the loop on
# purpose, though blockbuster does not watch them: the object routes' os.open of a cached
# object (a metadata call) and os.pread of a small one (at most 128 KiB, once: then it is
# served from memory), where a thread hop would cost more than the call (P3, docs/benchmarks);
# and over TLS, os.pread of each 256 KiB piece of a body (a hop per piece doubled the CPU).
LOOP_BLOCKING_ALLOWED: list[tuple[tuple[str, ...], str, set[str], str]] = [
    (
        ("io.TextIOWrapper.write", "io.BufferedWriter.write"), "logging/__init__.py", {"emit"},
        "a log record: one line to standard error or the log file, as every asyncio server writes them",
    ),
    (
        ("os.stat",), "objects/source.py", {"acquire"},
        "the core's object server: one stat per request, of a store object (the relays' upstream; each "
        "object is fetched once per relay), to learn its size",
    ),
    (
        ("os.stat", "io.TextIOWrapper.read"), "core/store.py", {"_ref"},
        "the core's hot path (locate, plan, menu, heartbeat replies): one stat of an environment's "
        "release ref, so that a rebuild is seen at once; the ref (its digest and signature, under 300 "
        "bytes) is read again only when it changed",
    ),
    (
        ("io.BufferedReader.read",), "core/store.py", {"release"},
        "the same hot path: a release document (a few KB) is read once, when its ref names a new one, "
        "and kept",
    ),
    (
        ("os.stat",), "slim/signing.py", {"_stamp"},
        "the core's signer, per plan it signs: one stat of the key file, so that a new key (slim keys "
        "rotate) signs from the next plan on, as the store's refs are seen at once",
    ),
    (
        ("io.BufferedReader.read",), "slim/signing.py", {"load"},
        "the same: the key file (under 200 bytes) is read again only when that stat says it changed",
    ),
    (
        ("io.TextIOWrapper.read",), "slim/signing.py", {"endorsements"},
        "the same: the chain of key rotations (a few hundred bytes a rotation) is read with the new key",
    ),
    (
        ("os.sendfile",), "objects/routes.py", {"_sendfile_dup"},
        "sendfile to a non-blocking socket, as asyncio's own loop.sendfile does (uvloop has none): it "
        "never waits for the client; the file's pages come from the page cache",
    ),
    (
        ("os.unlink",), "relay/cache.py", {"_evict"},
        "eviction removes a cached file on the loop, in the same step as its bytes leave the budget, so "
        "the cache directory never holds more than --max-bytes",
    ),
]  # fmt: skip


# -- HTTPS: the session CA's certificates on object servers and relays -------------------------
def core_https() -> ssl.SSLContext:
    """The server context of the core's object server: the core's certificate (name slim-core)
    from the session's CA, as ``slim core serve`` makes it."""
    from slim.core.control.server import ServerTls
    from slim.objects.server import server_context

    ca = pki().ca_dir
    ServerTls.from_ca(ca)  # makes core.key and core.crt if missing
    return server_context(ca / "core.crt", ca / "core.key")


def foreign_https(directory: Path) -> ssl.SSLContext:
    """A server context whose certificate says ``slim-core`` but comes from another CA."""
    from slim.objects.server import server_context

    other = CertificateAuthority.load_or_create(directory)
    other.server_identity()
    return server_context(directory / "core.crt", directory / "core.key")


def client_https(name: str) -> dict[str, Any]:
    """aiohttp's request arguments to check a server against the session CA and ``name``."""
    ctx = ssl.create_default_context(cadata=(pki().ca_dir / "ca.crt").read_text())
    return {"ssl": ctx, "server_hostname": name}


@asynccontextmanager
async def https_origin(store: Store, tls: ssl.SSLContext) -> AsyncIterator[ObjectServer]:
    """The core's object server over HTTPS with ``tls``."""
    server = ObjectServer(store.objects, "127.0.0.1:0", tls=tls)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def https_url(server: ObjectServer | RelayServer) -> str:
    """The HTTPS base URL of an object server with TLS or of a relay with https_listen."""
    port = server.https_port if isinstance(server, RelayServer) else server.port
    assert port, "not serving HTTPS"
    return f"https://127.0.0.1:{port}"


def https_get(
    port: int, path: str, name: str = "slim-core", ca: Path | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from 127.0.0.1:``port`` over HTTPS, checking the server's certificate
    against ``ca`` (default: the session CA's certificate) and ``name`` (whatever address it
    is reached at, as relays do)."""
    ctx = ssl.create_default_context(cadata=(ca or pki().ca_dir / "ca.crt").read_text())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as sock,
    ):
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()


@functools.cache
def initrd_busybox() -> str:
    """The busybox the initrd carries and the agent copies into the EE (its report and
    orders scripts run it), built as `slim ee build` builds it (core/build/smallbusybox.py)."""
    from slim.core.build import smallbusybox
    from slim.core.build.agentrt import BUSYBOX_APPLETS
    from slim.core.build.image import default_cache_dir

    need_tool("musl-gcc", "musl-tools")
    return str(smallbusybox.build(default_cache_dir(), BUSYBOX_APPLETS))


def cpus(monkeypatch: pytest.MonkeyPatch, n: int) -> list[int]:
    """This process may run on ``n`` CPUs (as the agent asks: ``sched_getaffinity``); the
    list fills with the processes it forks."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)))
    forked: list[int] = []
    fork = os.fork

    def counted() -> int:
        pid = fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", counted)
    return forked
