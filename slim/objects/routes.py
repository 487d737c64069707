"""``GET``/``HEAD /objects/sha256/<hex>``: immutable objects over HTTP, by sendfile.

Shared by relays (objects from the cache, missing ones fetched upstream, see
:mod:`slim.relay.fetch`) and the core's object server (objects straight from
the store, nothing fetched).

* ``ETag`` is ``"sha256:<hex>"``; responses are ``immutable`` for a year.
* One byte range per request (``bytes=a-b``, ``a-``, ``-n``) for resuming;
  an unsatisfiable range gets 416 with ``Content-Range: bytes */size``.  A
  malformed or multi-part Range header is ignored (the whole object is
  sent), as RFC 9110 allows.  ``If-Range`` and ``If-None-Match`` are honoured.
* The name must be 64 lowercase hex digits (checked after percent-decoding),
  so no request can name a path: anything else is 400.
* Bodies over SMALL go out with ``sendfile(2)``.  uvloop has no
  ``loop.sendfile``; here the socket is duplicated and ``os.sendfile`` runs on
  the duplicate, waiting for writability on it (the transport's own buffer is
  empty by then).  Cached objects usually never get here: the fast path
  (:mod:`slim.objects.fastpath`) answers them before aiohttp sees the request.
  Over TLS (an HTTPS listener) there is no sendfile: the bytes are read in
  :data:`TLS_CHUNK` pieces and written through the TLS transport, waiting
  whenever its buffer is full.  The pieces are read on the event loop, like
  sendfile's pages: from the page cache a read costs less than encrypting it,
  and a hop to a thread per piece doubled the relay's CPU per GB (measured,
  docs/benchmarks, relay over HTTPS).
* At most ``max_transfers`` responses at once; beyond that 503 with
  Retry-After.  A cached object is marked in use while it is sent, so the
  cache never evicts it under a reader.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, cast

from aiohttp import web

from slim.errors import NotFound, Overloaded, SlimError
from slim.objects.source import CachedObject, Fetch, Source
from slim.vocabulary import HEX_RE

log = logging.getLogger(__name__)

SMALL = 128 * 1024  # bodies up to this size are read and sent with the headers in one write
TLS_CHUNK = 256 * 1024  # over TLS: bytes read and written per step
IMMUTABLE = "public, max-age=31536000, immutable"
RANGE_RE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")  # longer numbers: ignored (malformed)


@dataclass
class ObjectCounters:
    requests: int = 0
    hits: int = 0  # served from disk
    misses: int = 0  # served while (or after) fetching upstream
    not_found: int = 0
    bad_requests: int = 0
    overloaded: int = 0
    failed: int = 0  # cut short: upstream failure or bad digest
    aborted: int = 0  # responses ended before their last byte (client gone or upstream failed)
    bytes_sent: int = 0
    active: int = 0


def parse_range(header: str | None, size: int) -> tuple[int, int] | Literal[False] | None:
    """(start, end exclusive) for one satisfiable range; None to send everything
    (no header, or one that is malformed: numbers of more than 19 digits too);
    False when the range cannot be satisfied (416).  Never raises."""
    if header is None:
        return None
    m = RANGE_RE.fullmatch(header.strip())
    if m is None:  # multi-range, other units, garbage: ignore
        return None
    first, last = m.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:  # nothing to send the last n bytes of: 416 (RFC 9110 14.1.1)
            return False
        return max(0, size - n), size
    start = int(first)
    end = size if not last else int(last) + 1
    if last and end <= start:
        return None  # syntactically invalid (last < first): ignore
    if start >= size:
        return False
    return start, min(end, size)


ABORTED = "slim.aborted"  # request key: the response was cut short (see ObjectRoutes._gone)
# called when a request whose URL names a boot (``?boot=``) has been answered: its query,
# when it started (time.time()), the status (0: broken off) and the body bytes sent
Observer = Callable[[Mapping[str, str], float, int, int], None]


class ObjectRoutes:
    def __init__(self, source: Source, max_transfers: int = 1024, observe: Observer | None = None) -> None:
        self.source = source
        self.max_transfers = max_transfers
        self.observe = observe
        self.counters = ObjectCounters()
        self.idle = asyncio.Event()  # set while no transfer is in progress
        self.idle.set()

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/objects/sha256/{name}", self.handle)  # and HEAD
        app.router.add_get("/objects/{tail:.*}", self.bad_path)  # other methods: 405

    async def bad_path(self, request: web.Request) -> web.StreamResponse:
        self.counters.bad_requests += 1
        raise web.HTTPNotFound(text="objects live at /objects/sha256/<64 lowercase hex digits>\n")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.observe is None or "boot" not in request.query:
            return await self._handle(request)
        started = time.time()
        try:
            resp = await self._handle(request)
        except web.HTTPException as exc:
            self.observe(request.query, started, exc.status, 0)
            raise
        except BaseException:
            self.observe(request.query, started, 0, 0)
            raise
        if request.method != "HEAD":
            broken = request.get(ABORTED, False)  # the client saw fewer bytes than Content-Length
            self.observe(
                request.query,
                started,
                0 if broken else resp.status,
                0 if broken else resp.content_length or 0,
            )
        return resp

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        c = self.counters
        c.requests += 1
        name = request.match_info["name"]
        if not HEX_RE.fullmatch(name):
            c.bad_requests += 1
            raise web.HTTPBadRequest(text=f"{name[:80]!r} is not a sha256 digest (64 lowercase hex digits)\n")
        if c.active >= self.max_transfers:
            c.overloaded += 1
            raise web.HTTPServiceUnavailable(
                text=f"relay busy: {c.active} transfers in progress\n", headers={"Retry-After": "1"}
            )
        c.active += 1
        self.idle.clear()
        try:
            obj = self.source.acquire(name)
            if obj is not None:
                try:
                    c.hits += 1
                    return await self._send_cached(request, obj)
                finally:
                    self.source.release(obj)
            if request.method == "HEAD":
                size = await self.source.head(name)
                return self._head_only(request, name, size)
            c.misses += 1
            return await self._send_fetching(request, self.source.fetch(name))
        except SlimError as exc:
            if isinstance(exc, NotFound):
                c.not_found += 1
            elif isinstance(exc, Overloaded):
                c.overloaded += 1
            else:
                c.failed += 1
            headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
            raise _http_error(exc, headers) from None
        finally:
            c.active -= 1
            if not c.active:
                self.idle.set()

    # -- responses ----------------------------------------------------------
    def _start(
        self, request: web.Request, name: str, size: int
    ) -> tuple[web.StreamResponse, int, int] | web.StreamResponse:
        """Headers for a body of ``size`` bytes; (response, start, end) or a
        finished 304/416 response."""
        etag = f'"sha256:{name}"'
        headers = {
            "ETag": etag,
            "Cache-Control": IMMUTABLE,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        inm = request.headers.get("If-None-Match")
        if inm is not None and (inm.strip() == "*" or etag in (t.strip() for t in inm.split(","))):
            return web.Response(status=304, headers=headers)
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            rng = None
        parsed = parse_range(rng, size)
        if parsed is False:
            headers["Content-Range"] = f"bytes */{size}"
            return web.Response(status=416, headers=headers)
        resp = web.StreamResponse(headers=headers)
        if parsed is None:
            start, end = 0, size
        else:
            start, end = parsed
            resp.set_status(206)
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp.content_length = end - start
        return resp, start, end

    def _head_only(self, request: web.Request, name: str, size: int) -> web.StreamResponse:
        started = self._start(request, name, size)
        if isinstance(started, web.StreamResponse):
            return started
        return started[0]  # headers only: aiohttp sends no body for HEAD

    async def _send_cached(self, request: web.Request, obj: CachedObject) -> web.StreamResponse:
        started = self._start(request, obj.hex, obj.size)
        if isinstance(started, web.StreamResponse):
            return started
        resp, start, end = started
        count = end - start
        if request.method != "HEAD" and obj.size <= SMALL:
            try:
                body = small_body(self.source, obj)[start:end]
            except FileNotFoundError:
                self.source.lost(obj)
                raise NotFound(f"object sha256:{obj.hex} vanished from the cache; ask again") from None
            self.counters.bytes_sent += count
            return web.Response(status=resp.status, headers=resp.headers, body=body)
        try:
            fd = os.open(obj.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.source.lost(obj)
            raise NotFound(f"object sha256:{obj.hex} vanished from the cache; ask again") from None
        try:
            if request.method == "HEAD":
                return resp
            try:
                await resp.prepare(request)
                await send_file(request, resp, fd, start, count)
                self.counters.bytes_sent += count
                await resp.write_eof()
            except ConnectionError:
                return self._gone(request, resp)
            return resp
        finally:
            os.close(fd)

    async def _send_fetching(self, request: web.Request, fetch: Fetch) -> web.StreamResponse:
        await fetch.started.wait()
        if fetch.error is not None and fetch.obj is None:
            raise fetch.error
        if fetch.obj is not None:  # finished meanwhile: serve it from the cache like any hit
            obj = self.source.acquire(fetch.hex)
            if obj is not None:
                try:
                    return await self._send_cached(request, obj)
                finally:
                    self.source.release(obj)
        assert fetch.size is not None and fetch.tmp is not None
        started = self._start(request, fetch.hex, fetch.size)
        if isinstance(started, web.StreamResponse):
            return started
        resp, start, end = started
        try:
            fd = os.open(fetch.tmp, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # published or failed between the checks above
            if fetch.error is not None:
                raise fetch.error from None
            obj = self.source.acquire(fetch.hex)
            if obj is None:
                raise NotFound(f"object sha256:{fetch.hex} was evicted at once; ask again") from None
            try:
                return await self._send_cached(request, obj)
            finally:
                self.source.release(obj)
        try:
            await resp.prepare(request)
            position = start
            while position < end:
                await fetch.wait_beyond(position)
                if fetch.error is not None:
                    self.counters.failed += 1
                    log.info("cutting a response for sha256:%s short: %s", fetch.hex[:12], fetch.error)
                    return self._gone(request, resp)
                upto = min(end, fetch.available())
                await send_file(request, resp, fd, position, upto - position)
                self.counters.bytes_sent += upto - position
                position = upto
            await resp.write_eof()
            return resp
        except ConnectionError:
            return self._gone(request, resp)
        finally:
            os.close(fd)

    def _gone(self, request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """End a response whose body cannot be completed: close the connection
        (the client sees fewer bytes than Content-Length)."""
        self.counters.aborted += 1
        request[ABORTED] = True
        if request.transport is not None:
            request.transport.abort()
        return resp


def small_body(source: Source, obj: CachedObject) -> bytes:
    """A small object's bytes: from memory, or read whole (and kept in memory while its
    budget allows).  FileNotFoundError when the file is gone or shorter than recorded."""
    if obj.body is not None:
        return obj.body
    fd = os.open(obj.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        body = os.pread(fd, obj.size, 0)
    finally:
        os.close(fd)
    if len(body) != obj.size:
        raise FileNotFoundError(f"{obj.path} is shorter than recorded")
    source.remember(obj, body)
    return body


def _http_error(exc: SlimError, headers: dict[str, str] | None) -> web.HTTPException:
    cls: type[web.HTTPException] = {
        400: web.HTTPBadRequest,
        404: web.HTTPNotFound,
        409: web.HTTPConflict,
        502: web.HTTPBadGateway,
        503: web.HTTPServiceUnavailable,
    }.get(exc.http_status, web.HTTPInternalServerError)
    return cls(text=exc.message + "\n", headers=headers)


async def send_file(request: web.Request, resp: web.StreamResponse, fd: int, offset: int, count: int) -> None:
    """Send ``count`` bytes of ``fd`` from ``offset`` after the (prepared) headers of
    ``resp``: by sendfile, or over TLS through the transport."""
    if count <= 0:
        return
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client went away")
    if is_tls(transport):
        end = offset + count
        while offset < end:
            data = read_chunk(fd, offset, min(TLS_CHUNK, end - offset))
            await resp.write(data)  # waits while the transport's buffer is full
            offset += len(data)
            await asyncio.sleep(0)  # the other connections' turn, piece by piece
        return
    await _flush(transport, request)
    await sendfile_fd(transport, fd, offset, count)


def is_tls(transport: asyncio.BaseTransport) -> bool:
    """Whether the connection is TLS (then sendfile would bypass the encryption)."""
    return transport.get_extra_info("ssl_object") is not None


def read_chunk(fd: int, offset: int, count: int) -> bytes:
    """Up to ``count`` (at most :data:`TLS_CHUNK`) bytes of ``fd`` at ``offset``, on the
    event loop (see the module's docstring); ConnectionResetError when the file ends first
    (it is shorter than recorded)."""
    data = os.pread(fd, count, offset)
    if not data:
        raise ConnectionResetError("the file is shorter than expected")
    return data


async def sendfile_fd(transport: asyncio.BaseTransport, fd: int, offset: int, count: int) -> None:
    """``sendfile(2)`` on a duplicate of the transport's socket (the transport's own
    buffer must be empty).  uvloop has no ``loop.sendfile`` and refuses
    ``add_writer`` on a transport's descriptor; a duplicate works on every loop.
    Never on a TLS connection (:func:`is_tls`): the bytes would bypass the encryption."""
    if count <= 0:
        return
    if is_tls(transport):
        raise RuntimeError("sendfile on a TLS connection would send plaintext")
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise ConnectionResetError("the connection is closed")
    await _sendfile_dup(asyncio.get_running_loop(), sock.fileno(), fd, offset, count)


async def _flush(transport: asyncio.BaseTransport, request: web.Request) -> None:
    """Wait until the transport's buffer is empty (headers, earlier chunks on the wire)."""
    transport = cast(asyncio.WriteTransport, transport)  # uvloop's transports are not registered subclasses
    if transport.get_write_buffer_size() == 0:
        return
    low_high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0)
    try:
        writer = request._payload_writer
        await writer.drain()
    finally:
        transport.set_write_buffer_limits(high=low_high[1], low=low_high[0])
    if transport.get_write_buffer_size():
        raise ConnectionResetError("could not flush the response headers")


async def _sendfile_dup(
    loop: asyncio.AbstractEventLoop, sockfd: int, fd: int, offset: int, count: int
) -> None:
    dup = os.dup(sockfd)
    try:
        while count > 0:
            try:
                n = os.sendfile(dup, fd, offset, count)
            except BlockingIOError:
                await _writable(loop, dup)
                continue
            if n == 0:
                raise ConnectionResetError("the file is shorter than expected")
            offset += n
            count -= n
    finally:
        os.close(dup)


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await fut
    finally:
        loop.remove_writer(fd)
