"""A relay: objects over HTTP (cached, fetched upstream), the node API, TFTP for
stage 1, heartbeats and prefetch orders from the core, metrics.  With
``https_listen``, the same over HTTPS too, with the relay's certificate.

One process, one event loop (uvloop), plus one thread for TFTP and a small
pool for file work (writes, hashing, reads of manifests, the cache's scan at
start).  :class:`RelayServer` is used by ``slim relay serve`` and, in-process,
by the tests.  The object routes and the listener are :mod:`slim.objects`,
which the core's object server (``slim core serve --objects-listen``) uses too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from slim.daemons.ganesha import parse_listen as parse_nfs_listen
from slim.errors import InvalidArgument, NotFound
from slim.listen import parse_listen
from slim.objects.routes import ObjectRoutes
from slim.objects.server import HttpFront, Listener, metric_families, object_metrics, server_context
from slim.pki import CA_PEM, CERT_PEM, KEY_PEM, identity_of_pem, read_ca
from slim.relay.api import NodeApi
from slim.relay.cache import ObjectCache
from slim.relay.config import DEFAULT_HTTP_PORT, RelayConfig, Upstream
from slim.relay.corelink import CoreLink
from slim.relay.fetch import CachingSource, Fetcher, upstream_context
from slim.relay.nfs import RelayNfs
from slim.relay.observe import BootObserver
from slim.relay.tftp import StageOneServer
from slim.relay.wake import WakeQueue, waker_for
from slim.relay.warm import Warmer
from slim.release import Release
from slim.rpc import NONE, Credentials
from slim.signing import Endorsement, TrustedKeys
from slim.v1 import core_pb2 as pb
from slim.vocabulary import names_a_mac, normalize_mac

log = logging.getLogger(__name__)

IPXE_FILES = ("undionly.kpxe", "ipxe.efi", "snponly.efi", "undionly.kkpxe", "ipxe.pxe")
# the legacy path (Debian's pxelinux and syslinux-common), served when installed
PXELINUX_FILES = {
    "lpxelinux.0": Path("/usr/lib/PXELINUX/lpxelinux.0"),
    "pxelinux.0": Path("/usr/lib/PXELINUX/pxelinux.0"),
    "ldlinux.c32": Path("/usr/lib/syslinux/modules/bios/ldlinux.c32"),
}
PXELINUX_CFG = "pxelinux.cfg/01-"  # + the node's MAC with '-' (pxelinux's ARP type 01)
EGRESS_WINDOW = 5.0


def _http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Egress:
    """Bytes sent per second over a sliding window (for heartbeats)."""

    def __init__(self) -> None:
        self._samples: list[tuple[float, int]] = []

    def rate(self, total: int) -> float:
        now = time.monotonic()
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[0][0] > EGRESS_WINDOW:
            self._samples.pop(0)
        t0, b0 = self._samples[0]
        return (total - b0) / (now - t0) if now > t0 else 0.0


class RelayServer:
    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.host, self.requested_port = parse_listen(config.listen, DEFAULT_HTTP_PORT, allow_ephemeral=True)
        self.port = 0
        self.https: tuple[str, int] | None = None  # (host, requested port) with https_listen
        if config.https_listen is not None:
            self.https = parse_listen(config.https_listen, 8443, allow_ephemeral=True)
        self.https_port = 0
        self.tftp_port = 0
        self.cache = ObjectCache(config.cache_dir, config.max_bytes, config.memory_bytes)
        self.io = ThreadPoolExecutor(max_workers=config.io_threads, thread_name_prefix="slim-relay-io")
        self.link: CoreLink | None = None  # with a core: made in start (reading the identity)
        self.started_at = time.time()
        self._egress = _Egress()
        self._poke = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.front: HttpFront | None = None
        self._session: aiohttp.ClientSession | None = None
        self.fetcher: Fetcher
        self.source: CachingSource
        self.objects: ObjectRoutes
        self.warmer: Warmer
        self.api: NodeApi | None = None
        self.observer: BootObserver | None = None  # with a core: what the relay sees of boots
        self.tftp: StageOneServer | None = None
        self.nfs: RelayNfs | None = None  # with nfs_listen: the relay's own NFS trees and ganesha
        self._nfs_root = ""  # the registry's nfs_export_root, from the core's replies
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(_RelayCollector(self))

    def _credentials(self) -> Credentials:
        """The relay's credentials for the core; its name from its certificate if not given."""
        if self.config.core_insecure:
            return Credentials(insecure=True)
        if self.config.identity is None:
            return NONE  # a unix: core
        credentials = Credentials.from_identity(self.config.identity)
        assert credentials.cert is not None
        identity = identity_of_pem(credentials.cert)
        if identity.role != "relay":
            raise InvalidArgument(
                f"{self.config.identity} holds an {identity.role} certificate, not a relay's"
            )
        if self.config.name and self.config.name != identity.name:
            raise InvalidArgument(
                f"--name {self.config.name} but the certificate in {self.config.identity} is relay "
                f"{identity.name}'s (the core knows a relay by its certificate)"
            )
        self.config = self.config.model_copy(update={"name": identity.name})
        return credentials

    # -- life ---------------------------------------------------------------
    async def start(self) -> int:
        """Load the cache, listen, start TFTP and heartbeats; return the HTTP port."""
        self._loop = asyncio.get_running_loop()
        # a scan of the whole cache directory: off the loop (nothing else uses the cache yet)
        await self._loop.run_in_executor(self.io, self.cache.load)
        if self.config.core:
            credentials = await self._loop.run_in_executor(self.io, self._credentials)
            self.link = CoreLink(self.config.core, credentials=credentials)
        # the TLS contexts read key, certificate and CA files: off the loop
        serving, upstream_tls = await self._loop.run_in_executor(self.io, self._tls_contexts)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=30),
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=self.config.max_fetches * 2),
        )
        self.fetcher = Fetcher(
            self.cache, self.config.upstreams, self._session, self.io, self.config.max_fetches,
            tls=upstream_tls,
        )  # fmt: skip
        self.source = CachingSource(self.cache, self.fetcher)
        if self.link is not None:
            self.observer = BootObserver(self.config.name, self.link.report_events)
            self._tasks.append(asyncio.create_task(self.observer.run(), name="boot events"))
        observe = self.observer.object_served if self.observer is not None else None
        self.objects = ObjectRoutes(self.source, self.config.max_transfers, observe)
        trusted = await self._loop.run_in_executor(
            self.io, trusted_keys, self.config.trust
        )  # files: off the loop
        if self.config.nfs_listen is not None:
            bind, nfs_port = parse_nfs_listen(self.config.nfs_listen)
            self.nfs = RelayNfs(
                self.source, self.config.nfs_dir, bind=bind, port=nfs_port, clients=self.config.nfs_clients,
                concurrency=self.config.prefetch_concurrency * 2, keep=self.config.nfs_keep,
            )  # fmt: skip
            await self._loop.run_in_executor(None, self.nfs.start)  # ganesha starts: files, a process
        self.warmer = Warmer(
            self.source,
            self._poke.set,
            self.config.prefetch_concurrency,
            trusted,
            on_releases=self._nfs_releases,
        )
        self.wakes = WakeQueue(waker_for(self.config.wake_to, self.config.wake_from))
        app = web.Application(client_max_size=1 << 20)
        self.objects.add_to(app)
        if self.link is not None:
            self.api = NodeApi(self.link, self.config.name, self.config.max_core_calls, self.observer)
            self.api.add_to(app)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self.port = await self._listen(app, serving)
        if self.config.tftp_listen is not None:
            # the TFTP server runs on a thread of its own; starting it touches the disk
            self.tftp_port = await self._loop.run_in_executor(self.io, self._start_tftp)
        if self.link is not None:
            self._tasks.append(asyncio.create_task(self._heartbeats(), name="heartbeats"))
            self._tasks.append(asyncio.create_task(self.wakes.run(), name="wake-on-lan"))
        log.info(
            "relay %s serving http on %s:%d%s%s, upstream %s, cache %s (%d bytes)",
            self.config.name or "(unnamed)",
            self.host,
            self.port,
            f", https on {self.https[0]}:{self.https_port}" if self.https is not None else "",
            f", tftp on port {self.tftp_port}" if self.tftp_port else "",
            ", ".join(self.config.upstreams),
            self.config.cache_dir,
            self.config.max_bytes,
        )
        return self.port

    def _tls_contexts(self) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
        """(the HTTPS listener's context, the https upstreams' context), each None when not
        needed: the server's is the identity's key and certificate, the upstreams' trusts
        ``upstream_ca`` or else the identity's ca.pem (the settings check one is there)."""
        identity = self.config.identity
        serving = None
        if self.https is not None:
            assert identity is not None
            serving = server_context(identity / CERT_PEM, identity / KEY_PEM)
        upstream = None
        if any(Upstream.parse(u).tls for u in self.config.upstreams):
            ca = self.config.upstream_ca
            if ca is None:
                assert identity is not None
                ca = identity / CA_PEM
            upstream = upstream_context(read_ca(ca))
        return serving, upstream

    async def _listen(self, app: web.Application, serving: ssl.SSLContext | None) -> int:
        listeners = [Listener(self.host, self.requested_port)]
        if self.https is not None:
            listeners.append(Listener(*self.https, tls=serving))
        self.front = HttpFront(app, self.objects, listeners, self.config.access_log)
        ports = await self.front.start()
        if self.https is not None:
            self.https_port = ports[1]
        return ports[0]

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking connections, let transfers finish for ``grace`` seconds, end the rest."""
        self._stopping.set()
        if self.tftp is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.tftp.stop, min(grace, 5.0))
        if self.front is not None:
            await self.front.stop(grace)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.warmer.close()
        if self.nfs is not None:
            await self.nfs.stop()
        await self.fetcher.close()
        if self._session is not None:
            await self._session.close()
        if self.link is not None:
            await self.link.close()
        # writes in flight finish (their fetches are cancelled): wait for them off the loop
        await asyncio.get_running_loop().run_in_executor(None, self.io.shutdown)
        log.info("relay stopped")

    # -- heartbeats ---------------------------------------------------------
    async def heartbeat(self) -> pb.Heartbeat:
        healthy, message = await self._health()
        stats = self.cache.stats()
        return pb.Heartbeat(
            relay=self.config.name,
            load=float(self.objects.counters.active),
            active_transfers=self.objects.counters.active,
            egress_bytes_per_second=self._egress.rate(self.objects.counters.bytes_sent),
            cache_bytes=stats.bytes,
            healthy=healthy,
            message=message,
            prefetch=self.warmer.report(),
            nfs_trees=self.nfs.exported() if self.nfs is not None else [],
        )

    def _on_reply(self, reply: pb.HeartbeatReply) -> None:
        self._nfs_root = reply.nfs_export_root
        chain = [Endorsement(e.key, e.signature) for e in reply.endorsements]
        self.warmer.set_releases(reply.pinned_releases, reply.release_signatures, chain)
        for order in reply.prefetch:
            self.warmer.order(order)
        for wake in reply.wake:
            queued = self.wakes.order([(t.node, t.mac) for t in wake.targets], wake.per_minute)
            log.info("wake order %s: %d packet(s), at most %d a minute", wake.id, queued, wake.per_minute)

    def _nfs_releases(self, releases: list[tuple[str, Release]]) -> None:
        if self.nfs is not None and self._nfs_root:
            self.nfs.set_releases(releases, self._nfs_root)
            self._poke.set()  # the core learns soon which trees the relay exports

    async def _heartbeats(self) -> None:
        assert self.link is not None
        await self.link.heartbeats(self.heartbeat, self._on_reply, self._poke, self._stopping)

    async def _health(self) -> tuple[bool, str]:
        """:meth:`health`, off the event loop (it asks the file system), and not on the I/O
        pool either: a storm's writes there must not hold up heartbeats and /healthz."""
        return await asyncio.get_running_loop().run_in_executor(None, self.health)

    def health(self) -> tuple[bool, str]:
        try:
            st = os.statvfs(self.cache.root)
        except OSError as exc:
            return False, f"cache directory {self.cache.root}: {exc.strerror}"
        if not os.access(self.cache.tmp_dir, os.W_OK):
            return False, f"cache directory {self.cache.tmp_dir} is not writable"
        if st.f_bavail * st.f_frsize < 64 * 1024 * 1024:
            return False, f"less than 64 MiB free on the cache file system ({self.cache.root})"
        return True, ""

    # -- HTTP ---------------------------------------------------------------
    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        body = generate_latest(self.metrics)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        healthy, message = await self._health()
        stats = self.cache.stats()
        doc = {
            "healthy": healthy,
            "message": message,
            "relay": self.config.name,
            "core_connected": self.link.connected if self.link is not None else None,
            "cache_bytes": stats.bytes,
            "cache_objects": stats.objects,
            "max_bytes": stats.max_bytes,
            "active_transfers": self.objects.counters.active,
            "fetches_in_flight": self.fetcher.inflight,
        }
        return web.json_response(doc, status=200 if healthy else 503)

    # -- TFTP ---------------------------------------------------------------
    def _tftp_files(self) -> dict[str, Path]:
        """The files served over TFTP: the iPXE binaries and pxelinux that are installed."""
        static = {
            name: self.config.ipxe_dir / name
            for name in IPXE_FILES
            if (self.config.ipxe_dir / name).is_file()
        }
        if not static:
            log.warning(
                "no iPXE binaries in %s (install Debian's ipxe package); TFTP serves pxelinux only",
                self.config.ipxe_dir,
            )
        static.update({name: path for name, path in PXELINUX_FILES.items() if path.is_file()})
        static.update(self.config.extra_static)
        return static

    def _start_tftp(self) -> int:
        assert self.config.tftp_listen is not None
        host, port = parse_listen(self.config.tftp_listen, 69, allow_ephemeral=True)
        on_transfer = self.observer.tftp_done if self.observer is not None else None
        server = StageOneServer(
            self._tftp_files(), self._tftp_dynamic, host=host, port=port, on_transfer=on_transfer
        )
        self.tftp = server
        return server.start()

    def _tftp_dynamic(self, name: str, client: str) -> bytes | None:
        """pxelinux.cfg/01-<mac> from the core (called on the TFTP thread)."""
        name = name.lower()
        if not name.startswith(PXELINUX_CFG) or self.link is None or self._loop is None:
            return None
        mac = name[len(PXELINUX_CFG) :]
        if "-" not in mac or not names_a_mac(mac):  # pxelinux writes the MAC with '-'
            return None
        link = self.link
        req = pb.GetBootScriptRequest(mac=normalize_mac(mac), origin=client, format=pb.SCRIPT_FORMAT_PXELINUX)
        started = time.time()
        future = asyncio.run_coroutine_threadsafe(link.call(link.core.GetBootScript, req), self._loop)
        try:
            script = future.result(timeout=link.timeout + 1)
        except NotFound:
            return None
        body = script.script.encode()
        observer = self.observer
        if observer is not None:
            self._loop.call_soon_threadsafe(
                observer.script_served, script.node, script.boot_id, script.default_environment, client,
                started, len(body), f"pxelinux config {name} over TFTP",
            )  # fmt: skip
        return body


def trusted_keys(paths: list[Path]) -> TrustedKeys:
    """The core's public keys a relay trusts (``--trust``: files, or the core's key directory,
    read again when they change); a bad file is a clear error."""
    keys = TrustedKeys(paths)
    if not keys.current():
        log.warning("no --trust key: this relay pins and prefetches no release")
    return keys


class _RelayCollector(Collector):
    def __init__(self, relay: RelayServer) -> None:
        self.relay = relay

    def collect(self) -> Iterator[Metric]:
        r = self.relay
        if not hasattr(r, "objects"):  # not started
            return
        counters, gauges = object_metrics(r.objects.counters)
        f = r.fetcher.counters
        counters += [
            ("upstream_fetches", f.fetches, "objects fetched from upstream (one per cold object)"),
            ("upstream_fetch_failures", f.fetch_failures, "upstream fetches that failed"),
            ("upstream_verify_failures", f.verify_failures, "upstream objects whose sha256 did not match"),
            ("upstream_resumed", f.resumed, "upstream transfers resumed by Range"),
            ("upstream_bytes", f.bytes_fetched, "bytes received from upstream"),
            ("cache_evictions", r.cache.evictions, "objects evicted from the cache"),
            (
                "releases_refused",
                len(r.warmer.refused),
                "releases not pinned or warmed: no trusted signature",
            ),
        ]
        s = r.cache.stats()
        gauges += [
            ("cache_bytes", s.bytes, "bytes of cached objects"),
            ("cache_objects", s.objects, "cached objects"),
            ("cache_reserved_bytes", s.reserved, "bytes reserved for fetches in flight"),
            ("cache_max_bytes", s.max_bytes, "the cache's byte budget"),
            ("cache_pinned_objects", s.pinned_objects, "cached objects of current releases (never evicted)"),
            ("cache_pinned_bytes", s.pinned_bytes, "bytes of pinned objects"),
            ("cache_in_use_objects", s.in_use, "cached objects being sent"),
            ("cache_memory_bytes", r.cache.memory_used, "bytes of small objects kept in memory"),
            ("fetches_in_flight", r.fetcher.inflight, "upstream fetches in progress"),
            (
                "core_connected",
                int(bool(r.link and r.link.connected)),
                "1 while the heartbeat stream is open",
            ),
        ]
        if r.api is not None:
            counters += [
                ("api_errors", r.api.errors, "node API requests answered with an error"),
                ("api_overloaded", r.api.overloaded, "node API requests answered 503 (too many waiting)"),
            ]
        if r.observer is not None:
            o = r.observer.counters
            counters += [
                ("boot_events_recorded", o.recorded, "boot events the relay recorded itself"),
                ("boot_events_sent", o.sent, "... and sent to the core"),
                ("boot_events_dropped", o.dropped, "... dropped (queue full, or refused by the core)"),
                ("tftp_transfers_matched", o.tftp_matched, "TFTP transfers joined to a boot by address"),
            ]
        if r.tftp is not None:
            t = r.tftp.stats
            for key in ("sessions", "completed", "failed", "bad_packets", "refused", "busy", "bytes_sent"):
                counters.append((f"tftp_{key}", getattr(t, key), f"TFTP {key.replace('_', ' ')}"))
        yield from metric_families("slim_relay", counters, gauges)


async def serve(config: RelayConfig, on_ready: Callable[[RelayServer], None] | None = None) -> None:
    """Run a relay until SIGTERM or SIGINT (transfers get ``config.grace`` seconds)."""
    relay = RelayServer(config)
    try:
        await relay.start()
    except BaseException:
        if relay.nfs is not None:  # ganesha runs in a session of its own: it would outlive us
            await relay.nfs.stop()
        raise
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop() -> None:
        if stopping.is_set():
            log.info("already stopping (transfers get %.1f s to finish)", config.grace)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    if on_ready is not None:
        on_ready(relay)
    try:
        await stopping.wait()
        log.info("stopping: finishing transfers (grace %.1f s)", config.grace)
        await relay.stop(config.grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(config: RelayConfig, on_ready: Callable[[RelayServer], None] | None = None) -> None:
    """``slim relay serve``: a relay on uvloop until SIGTERM or SIGINT."""
    uvloop.run(serve(config, on_ready))
