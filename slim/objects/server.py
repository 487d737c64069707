"""HTTP and HTTPS listeners for objects: the fast path in front of an aiohttp app
(:class:`HttpFront`, which relays use too), and :class:`ObjectServer`, objects straight
from a store (the core's object server, ``slim core serve --objects-listen``).

A listener speaks HTTPS when it is given an :class:`ssl.SSLContext`
(:func:`server_context`: a key and certificate of SLIM's CA).  TLS changes only how
bodies leave: ``sendfile(2)`` would put plaintext on the wire, so over TLS the bytes are
read (off the event loop) and written through the TLS transport instead
(:func:`slim.objects.routes.send_body`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slim.errors import InvalidArgument, Unavailable
from slim.listen import parse_listen
from slim.objects.fastpath import FastPath
from slim.objects.routes import ObjectCounters, ObjectRoutes
from slim.objects.source import StoreSource

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8080
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds a client may take to finish its TLS handshake


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context with ``cert`` and ``key`` (PEM files: an identity's
    ``cert.pem`` and ``key.pem``, or the core's ``core.crt`` and ``core.key``); TLS 1.2 or
    later, HTTP/1.1.  Reads the files: call it off the event loop."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot use {cert} and {key} as a TLS server certificate: {exc}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


@dataclass(frozen=True)
class Listener:
    """One address an :class:`HttpFront` listens on: HTTPS with ``tls``, else HTTP."""

    host: str
    port: int  # 0: any free port
    tls: ssl.SSLContext | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


class HttpFront:
    """HTTP (and HTTPS) listeners: the fast path for cached objects in front of an aiohttp
    app.  Every listener serves the same app, objects and counters."""

    def __init__(
        self, app: web.Application, objects: ObjectRoutes, listeners: Sequence[Listener], access_log: bool
    ) -> None:
        if not listeners:
            raise InvalidArgument("an HTTP front needs at least one listener")
        self.app = app
        self.objects = objects
        self.listeners = list(listeners)
        self.access_log = access_log
        self.ports: list[int] = []  # bound, in the order of ``listeners``
        self.fast: FastPath | None = None
        self._runner: web.AppRunner | None = None
        self._servers: list[asyncio.AbstractServer] = []

    @property
    def port(self) -> int:
        """The first listener's bound port."""
        return self.ports[0] if self.ports else 0

    async def start(self) -> list[int]:
        """Listen on every listener; their bound ports, in order."""
        self._runner = web.AppRunner(
            self.app, access_log=log if self.access_log else None, handle_signals=False, shutdown_timeout=0
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self.fast = FastPath(self.objects, self._runner.server)
        loop = asyncio.get_running_loop()
        for where in self.listeners:
            timeout = TLS_HANDSHAKE_TIMEOUT if where.tls is not None else None
            try:
                server = await loop.create_server(
                    self.fast.protocol, where.host, where.port, reuse_address=True, backlog=1024,
                    ssl=where.tls, ssl_handshake_timeout=timeout,
                )  # fmt: skip
            except OSError as exc:
                for started in self._servers:
                    started.close()
                await self.fast.close()
                await self._runner.cleanup()
                raise Unavailable(
                    f"cannot listen for {where.scheme} on {where.host}:{where.port}: {exc.strerror or exc}"
                ) from None
            self._servers.append(server)
            self.ports.append(int(server.sockets[0].getsockname()[1]))
        return self.ports

    async def stop(self, grace: float) -> None:
        """No new connections; transfers get ``grace`` seconds; then everything closes."""
        for server in self._servers:
            server.close()
        if self.fast is not None:
            self.fast.close_idle()
        try:
            await asyncio.wait_for(self.objects.idle.wait(), grace)
        except TimeoutError:
            log.warning(
                "%d transfers still running after %.1f s; ending them", self.objects.counters.active, grace
            )
        if self.fast is not None:
            await self.fast.close()
        if self._runner is not None:
            await self._runner.cleanup()


class ObjectServer:
    """Objects straight from a store over HTTP, or HTTPS with ``tls`` (the core's object
    server: with the core's certificate, whose name ``slim-core`` the relays check)."""

    def __init__(
        self,
        objects_dir: Path,
        listen: str,
        max_transfers: int = 1024,
        metrics_executor: Executor | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``metrics_executor``: where ``/metrics`` is generated (for collectors registered in
        :attr:`metrics` that must not run on the event loop); None: on the loop."""
        self.metrics_executor = metrics_executor
        self.tls = tls
        self.host, self.requested_port = parse_listen(listen, DEFAULT_HTTP_PORT, allow_ephemeral=True)
        self.objects = ObjectRoutes(StoreSource(objects_dir), max_transfers)
        self.port = 0
        self.front: HttpFront | None = None
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(_ObjectCollector(self.objects, "slim_origin"))

    async def start(self) -> int:
        app = web.Application()
        self.objects.add_to(app)

        async def metrics(request: web.Request) -> web.StreamResponse:
            if self.metrics_executor is None:
                body = generate_latest(self.metrics)
            else:
                loop = asyncio.get_running_loop()
                body = await loop.run_in_executor(self.metrics_executor, generate_latest, self.metrics)
            return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

        app.router.add_get("/metrics", metrics)
        listener = Listener(self.host, self.requested_port, self.tls)
        self.front = HttpFront(app, self.objects, [listener], access_log=False)
        self.port = (await self.front.start())[0]
        return self.port

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"

    async def stop(self, grace: float = 5.0) -> None:
        if self.front is not None:
            await self.front.stop(grace)


Row = tuple[str, float, str]  # metric name (without prefix), value, help


def metric_families(prefix: str, counters: Iterable[Row], gauges: Iterable[Row]) -> Iterator[Metric]:
    for name, value, doc in counters:
        yield CounterMetricFamily(f"{prefix}_{name}", doc, value=value)
    for name, value, doc in gauges:
        yield GaugeMetricFamily(f"{prefix}_{name}", doc, value=value)


def object_metrics(c: ObjectCounters) -> tuple[list[Row], list[Row]]:
    """(counters, gauges) of the object routes."""
    return [
        ("object_requests", c.requests, "object requests (GET and HEAD)"),
        ("object_hits", c.hits, "object requests served from disk or memory"),
        ("object_misses", c.misses, "object requests that waited on an upstream fetch"),
        ("object_not_found", c.not_found, "object requests answered 404"),
        ("object_bad_requests", c.bad_requests, "object requests with a malformed name"),
        ("object_overloaded", c.overloaded, "object requests answered 503 (busy or cache full)"),
        ("object_failed", c.failed, "object responses cut short or answered 502"),
        ("object_aborted", c.aborted, "object responses ended before their last byte"),
        ("sent_bytes", c.bytes_sent, "object bytes sent to clients"),
    ], [("active_transfers", c.active, "object responses in progress")]


class _ObjectCollector(Collector):
    def __init__(self, routes: ObjectRoutes, prefix: str) -> None:
        self.routes = routes
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        yield from metric_families(self.prefix, *object_metrics(self.routes.counters))
