"""An HTTP listener for objects: the fast path in front of an aiohttp app
(:class:`HttpFront`, which relays use too), and :class:`ObjectServer`, objects straight
from a store (the core's object server, ``slim core serve --objects-listen``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from slim.errors import Unavailable
from slim.listen import parse_listen
from slim.objects.fastpath import FastPath
from slim.objects.routes import ObjectCounters, ObjectRoutes
from slim.objects.source import StoreSource

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8080


class HttpFront:
    """An HTTP listener: the fast path for cached objects in front of an aiohttp app."""

    def __init__(
        self, app: web.Application, objects: ObjectRoutes, host: str, port: int, access_log: bool
    ) -> None:
        self.app = app
        self.objects = objects
        self.host = host
        self.requested_port = port
        self.access_log = access_log
        self.port = 0
        self.fast: FastPath | None = None
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self._runner = web.AppRunner(
            self.app, access_log=log if self.access_log else None, handle_signals=False, shutdown_timeout=0
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self.fast = FastPath(self.objects, self._runner.server)
        try:
            self._server = await asyncio.get_running_loop().create_server(
                self.fast.protocol, self.host, self.requested_port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            await self._runner.cleanup()
            raise Unavailable(
                f"cannot listen on {self.host}:{self.requested_port}: {exc.strerror or exc}"
            ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, grace: float) -> None:
        """No new connections; transfers get ``grace`` seconds; then everything closes."""
        if self._server is not None:
            self._server.close()
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
    """Objects straight from a store over HTTP (the core's object server)."""

    def __init__(
        self,
        objects_dir: Path,
        listen: str,
        max_transfers: int = 1024,
        metrics_executor: Executor | None = None,
    ) -> None:
        """``metrics_executor``: where ``/metrics`` is generated (for collectors registered in
        :attr:`metrics` that must not run on the event loop); None: on the loop."""
        self.metrics_executor = metrics_executor
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
        self.front = HttpFront(app, self.objects, self.host, self.requested_port, access_log=False)
        self.port = await self.front.start()
        return self.port

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
