"""The fast path: cached objects answered without aiohttp.

Most of what a relay answers is ``GET /objects/sha256/<hex>`` for an object
it has.  aiohttp costs about 45 µs of CPU per request before any handler
runs (measured here, bench/relay_throughput.py), four times what nginx
spends on a whole small response.  So each connection starts on this
protocol: it splits the byte stream into request heads itself, parses each
with httptools (llhttp, the parser Node.js uses), and answers plain
``GET``/``HEAD`` of a cached object directly: small bodies in one write with
the headers, large ones by ``sendfile`` (see :mod:`slim.objects.routes`), or
over TLS in pieces through the TLS transport.  An HTTPS listener runs the same
protocol behind asyncio's (or uvloop's) TLS layer.

Anything else — a miss (which needs a fetch), a ``Range`` or conditional
request, another path, a request with a body, a head that does not parse —
hands the connection over to aiohttp: its protocol is swapped in on the same
transport and given the bytes from the start of that request on.  The
connection stays with aiohttp from then on, and aiohttp gives every answer
the full treatment (:class:`slim.objects.routes.ObjectRoutes`).  Both paths
count in the same counters and mark objects in use the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from typing import cast

import httptools

from slim.objects.routes import (
    IMMUTABLE,
    SMALL,
    TLS_CHUNK,
    ObjectRoutes,
    is_tls,
    read_chunk,
    sendfile_fd,
    small_body,
)
from slim.objects.source import CachedObject

log = logging.getLogger(__name__)

MAX_HEAD = 8192  # bytes of a request head the fast path looks at; longer ones go to aiohttp
PATH_RE = re.compile(rb"/objects/sha256/([0-9a-f]{64})")
# Headers that need more than the fast path does; their presence hands the request to aiohttp.
SLOW_HEADERS = frozenset(
    {b"range", b"if-range", b"if-none-match", b"content-length", b"transfer-encoding", b"expect"}
)
SWEEP_SECONDS = 10.0
_FIXED = (
    f"Cache-Control: {IMMUTABLE}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\n"
).encode()


class FastPath:
    """What the connections share: the routes (source and counters), the factory of
    aiohttp's protocol, the open connections (closed when idle too long)."""

    def __init__(
        self, routes: ObjectRoutes, aiohttp_factory: Callable[[], asyncio.Protocol], keepalive: float = 75.0
    ) -> None:
        self.routes = routes
        self.aiohttp_factory = aiohttp_factory
        self.keepalive = keepalive
        self.connections: set[FastConnection] = set()
        self.handovers = 0
        self.tasks: set[asyncio.Task[None]] = set()  # large responses being sent
        self._sweeper: asyncio.Task[None] | None = None

    def protocol(self) -> FastConnection:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="fastpath sweep")
        return FastConnection(self)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            limit = time.monotonic() - self.keepalive
            for conn in list(self.connections):
                if not conn.busy and conn.last_active < limit:
                    conn.close()

    def close_idle(self) -> None:
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()

    async def close(self) -> None:
        """Close every connection; responses still being sent (after the grace period the
        caller gave them) are ended, and waited for until each released its file."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for conn in list(self.connections):
            conn.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class FastConnection(asyncio.Protocol):
    def __init__(self, shared: FastPath) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()
        self.busy = False  # a sendfile is running; requests wait in ``pending``
        self.last_active = time.monotonic()
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._slow = False
        self._close = False
        self._complete = False
        self._writable: asyncio.Future[None] | None = None
        self._paused = False

    # -- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.shared.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.shared.connections.discard(self)
        self.transport = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.pending += data
        self.last_active = time.monotonic()
        if not self.busy:
            self._process()

    def eof_received(self) -> bool | None:
        return None  # close when the peer is done sending

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- httptools callbacks -------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in SLOW_HEADERS:
            self._slow = True

    def on_message_complete(self) -> None:
        self._complete = True

    # -- requests -----------------------------------------------------------
    def _process(self) -> None:
        while self.transport is not None and not self.busy:
            end = self.pending.find(b"\r\n\r\n", 0, MAX_HEAD)
            if end < 0:
                if len(self.pending) >= MAX_HEAD:
                    self._handover()
                return
            head_len = end + 4
            self._url = b""
            self._slow = self._complete = False
            try:
                self._parser.feed_data(memoryview(self.pending)[:head_len])
            except httptools.HttpParserError:
                self._handover()  # aiohttp answers 400
                return
            method = self._parser.get_method()
            path, _, query = self._url.partition(b"?")
            m = PATH_RE.fullmatch(path)
            # a URL that names a boot (?boot=) goes to aiohttp, whose handler records it
            observed = b"boot=" in query and self.shared.routes.observe is not None
            if self._slow or observed or not self._complete or m is None or method not in (b"GET", b"HEAD"):
                self._handover()
                return
            obj = self.shared.routes.source.acquire(m.group(1).decode())
            if obj is None:  # a miss: aiohttp's handler fetches it
                self._handover()
                return
            self._close = not self._parser.should_keep_alive()
            if not self._serve(obj, method == b"HEAD", head_len):
                self._handover()
                return

    def _headers(self, obj: CachedObject, keep: bool) -> bytes:
        if keep and obj.head:
            return obj.head
        close = b"" if keep else b"Connection: close\r\n"
        head = b"".join(
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: ",
                str(obj.size).encode(),
                b'\r\nETag: "sha256:',
                obj.hex.encode(),
                b'"\r\n',
                _FIXED,
                close,
                b"\r\n",
            )
        )
        if keep:
            obj.head = head
        return head

    def _serve(self, obj: CachedObject, head: bool, head_len: int) -> bool:
        """Answer the request whose head is the first ``head_len`` pending bytes;
        False (nothing consumed) when aiohttp must answer it instead."""
        routes = self.shared.routes
        c = routes.counters
        source = routes.source
        transport = self.transport
        assert transport is not None
        if head or obj.size <= SMALL:
            try:
                body = b"" if head else small_body(source, obj)
            except FileNotFoundError:
                source.release(obj)
                source.lost(obj)
                return False  # aiohttp will fetch it again
            source.release(obj)
            del self.pending[:head_len]
            c.requests += 1
            c.hits += 1
            transport.writelines((self._headers(obj, not self._close), body))
            c.bytes_sent += len(body)
            if self._close:
                transport.close()
            return True
        if c.active >= routes.max_transfers:
            source.release(obj)
            return False  # aiohttp answers 503
        del self.pending[:head_len]
        c.requests += 1
        c.hits += 1
        self.busy = True
        c.active += 1
        routes.idle.clear()
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._send_large(obj))
        self.shared.tasks.add(task)
        task.add_done_callback(self.shared.tasks.discard)
        return True

    async def _send_large(self, obj: CachedObject) -> None:
        routes = self.shared.routes
        c = routes.counters
        transport = self.transport
        try:
            fd = os.open(obj.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            routes.source.release(obj)
            routes.source.lost(obj)
            self._done_large(ok=False)
            return
        ok = False
        try:
            assert transport is not None
            transport.write(self._headers(obj, not self._close))
            if is_tls(transport):
                await self._send_tls(transport, fd, obj.size)
            else:
                await self._drain()
                await sendfile_fd(transport, fd, 0, obj.size)
            c.bytes_sent += obj.size
            ok = True
        except (ConnectionError, AssertionError):
            pass
        finally:  # also when cancelled (FastPath.close)
            os.close(fd)
            routes.source.release(obj)
            if not ok:
                c.aborted += 1
            self._done_large(ok)

    def _done_large(self, ok: bool) -> None:
        routes = self.shared.routes
        routes.counters.active -= 1
        if not routes.counters.active:
            routes.idle.set()
        self.busy = False
        self.last_active = time.monotonic()
        if self.transport is None:
            return
        if not ok:
            self.transport.abort()
            return
        if self._close:
            self.transport.close()
            return
        self.transport.resume_reading()
        self._process()

    async def _send_tls(self, transport: asyncio.Transport, fd: int, size: int) -> None:
        """The body over TLS: read in pieces, written through the transport (no sendfile),
        waiting while the transport asks us to pause."""
        offset = 0
        while offset < size:
            data = read_chunk(fd, offset, min(TLS_CHUNK, size - offset))
            if self.transport is None:
                raise ConnectionResetError("connection lost")
            transport.write(data)
            offset += len(data)
            if not self._paused:
                await asyncio.sleep(0)  # the other connections' turn, piece by piece
            while self._paused:
                if self.transport is None:
                    raise ConnectionResetError("connection lost")
                self._writable = asyncio.get_running_loop().create_future()
                try:
                    await self._writable
                finally:
                    self._writable = None

    async def _drain(self) -> None:
        """Wait until the transport's buffer is empty."""
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("connection lost")
        if transport.get_write_buffer_size() == 0:
            return
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0)
        try:
            for _ in range(100_000):  # bounded: each round waits for the kernel to take bytes
                if self.transport is None or not transport.get_write_buffer_size():
                    break
                if self._paused:  # high=0 pauses the protocol until the buffer is empty
                    self._writable = asyncio.get_running_loop().create_future()
                    await self._writable
                else:
                    await asyncio.sleep(0)
        finally:
            self._writable = None
            with contextlib.suppress(Exception):
                transport.set_write_buffer_limits(high=high, low=low)
        if self.transport is None:
            raise ConnectionResetError("connection lost")

    def _handover(self) -> None:
        """Give the connection, from the start of the current request, to aiohttp."""
        transport = self.transport
        if transport is None:
            return
        self.shared.connections.discard(self)
        self.shared.handovers += 1
        self.transport = None
        proto = self.shared.aiohttp_factory()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if self.pending:
            data, self.pending = bytes(self.pending), bytearray()
            proto.data_received(data)
