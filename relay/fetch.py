"""Fetching missing objects from upstream: one fetch per object, verified while streaming.

A relay's upstreams are parent relays or the core's object server, tried in
order (an upstream that just failed goes to the back for a while).  For each
missing object there is at most one :class:`Fetch` at a time, however many
clients ask (collapsed forwarding).  The fetch writes into a temporary file
and hashes as it writes; only when the SHA-256 matches the object's name is
the file fsynced and renamed into the cache.

Clients waiting on a fetch **stream as bytes arrive** (from the temporary
file), so a boot storm on a cold relay runs at upstream speed instead of
waiting for whole objects.  The last byte is held back until the digest is
verified: a client can never receive a complete response for bad bytes.  If
the digest does not match, the fetch fails, every waiting response is cut
short (the client sees fewer bytes than Content-Length), nothing is
published, and the next request fetches again.

An upstream connection that breaks mid-object is resumed with a Range
request, from the same or the next upstream; the digest covers the joined
bytes.

An ``https://`` upstream must show a certificate that chains to SLIM's CA (the
relay's ``ca.pem``, :func:`upstream_context`) and names the peer the relay expects:
``slim-core`` for the core's object server, ``PARENT.relay.slim`` for a parent
relay (:class:`slim.relay.config.Upstream`); one that does not is refused like a
broken upstream, and the relay says why.  ``http://`` upstreams are not
authenticated (a man in the middle can refuse or corrupt objects, never make the
relay keep bad bytes, and can read them).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import ssl
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from slim.errors import BadGateway, InvalidArgument, NotFound, SlimError
from slim.objects.source import CachedObject, Fetch
from slim.relay.cache import ObjectCache, Reservation
from slim.relay.config import Upstream

log = logging.getLogger(__name__)

FAILED_UPSTREAM_BACKOFF = 30.0  # seconds an upstream that failed is tried last
CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
MIN_WRITE = 256 * 1024  # bytes gathered before a write+hash on the I/O pool


@dataclass
class FetchCounters:
    fetches: int = 0  # upstream fetches started (one per cold object, however many clients)
    fetch_failures: int = 0
    verify_failures: int = 0
    resumed: int = 0  # upstream connections resumed by Range
    bytes_fetched: int = 0


def _write_and_hash(fd: int, h: Any, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    h.update(data)


def upstream_context(ca_pem: bytes) -> ssl.SSLContext:
    """The TLS client context for https upstreams: only certificates that chain to
    ``ca_pem`` (SLIM's CA; the system's CAs are not trusted), TLS 1.2 or later, host names
    checked (against the name each :class:`Upstream` expects)."""
    try:
        ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    except (ssl.SSLError, ValueError) as exc:
        raise InvalidArgument(f"the upstream CA certificate cannot be used: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # left for the cache's next start, which empties tmp/
        log.warning("cannot remove %s: %s", path, exc)


class Fetcher:
    """Collapsed, verified fetches from a list of upstream base URLs."""

    def __init__(
        self,
        cache: ObjectCache,
        upstreams: list[str],
        session: aiohttp.ClientSession,
        io: Executor,
        max_fetches: int = 16,
        on_bytes: Callable[[int], None] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``upstreams``: base URLs (:class:`Upstream`); ``tls``: the context for the
        https ones (:func:`upstream_context`), required if there is one."""
        self.cache = cache
        self.upstreams = [Upstream.parse(u) for u in upstreams]
        if tls is None and any(u.tls for u in self.upstreams):
            raise InvalidArgument("an https upstream needs the CA its certificate must chain to")
        self.tls = tls
        self.session = session
        self.io = io
        self.counters = FetchCounters()
        self._slots = asyncio.Semaphore(max_fetches)
        self._inflight: dict[str, Fetch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._penalty: dict[str, float] = {}
        self._serial = 0
        self._on_bytes = on_bytes

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def get(self, hexdigest: str) -> Fetch:
        """The fetch of this object: the one in flight, or a new one."""
        fetch = self._inflight.get(hexdigest)
        if fetch is None:
            fetch = Fetch(hexdigest)
            self._inflight[hexdigest] = fetch
            task = asyncio.get_running_loop().create_task(self._run(fetch), name=f"fetch {hexdigest[:12]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fetch

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _ordered(self) -> list[Upstream]:
        now = time.monotonic()
        return sorted(self.upstreams, key=lambda u: self._penalty.get(u.base, 0.0) > now)

    def _failed(self, upstream: Upstream) -> None:
        self._penalty[upstream.base] = time.monotonic() + FAILED_UPSTREAM_BACKOFF

    def _tls(self, upstream: Upstream) -> dict[str, Any]:
        """aiohttp's arguments for a request to ``upstream``: over https, SLIM's CA and the
        name its certificate must carry (whatever host the URL names)."""
        if not upstream.tls:
            return {}
        return {"ssl": self.tls, "server_hostname": upstream.peer}

    @staticmethod
    def _refused(upstream: Upstream, exc: BaseException) -> BadGateway:
        """Why a request to ``upstream`` failed, saying so plainly when its certificate did."""
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            return BadGateway(
                f"upstream {upstream.base}: refused its certificate, which is not {upstream.peer}'s "
                f"from SLIM's CA ({exc.certificate_error})"
            )
        return BadGateway(f"upstream {upstream.base}: {exc or type(exc).__name__}")

    async def head(self, hexdigest: str) -> int:
        """The size of an object upstream (no fetch); NotFound if no upstream has it."""
        last: SlimError = NotFound(f"object sha256:{hexdigest} is not on any upstream")
        for up in self._ordered():
            try:
                url = f"{up.base}/objects/sha256/{hexdigest}"
                async with self.session.head(url, **self._tls(up)) as resp:
                    if resp.status == 200 and resp.content_length is not None:
                        return resp.content_length
                    if resp.status != 404:
                        last = BadGateway(f"upstream {up.base} answered HEAD with {resp.status}")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self._failed(up)
                last = self._refused(up, exc)
        raise last

    async def _run(self, fetch: Fetch) -> None:
        reservation: Reservation | None = None
        error: SlimError | None = None
        fd = -1
        try:
            async with self._slots:
                self.counters.fetches += 1
                h = hashlib.sha256()
                not_found = 0
                last: SlimError | None = None
                bases = self._ordered()
                for attempt in range(2 * len(bases)):
                    up = bases[attempt % len(bases)]
                    base = up.base
                    url = f"{base}/objects/sha256/{fetch.hex}"
                    headers = {"Range": f"bytes={fetch.written}-"} if fetch.written else {}
                    copying = False
                    try:
                        async with self.session.get(url, headers=headers, **self._tls(up)) as resp:
                            if resp.status == 404:
                                not_found += 1
                                if not_found >= len(bases):
                                    raise NotFound(f"object sha256:{fetch.hex} is not on any upstream")
                                continue
                            if fetch.size is None:
                                if resp.status != 200:
                                    raise BadGateway(f"upstream {base} answered {resp.status}")
                                if resp.content_length is None:
                                    raise BadGateway(f"upstream {base} sent no Content-Length")
                                reservation = self.cache.reserve(resp.content_length)
                                self._serial += 1
                                fetch.tmp = self.cache.tmp_path(fetch.hex, self._serial)
                                fd = await asyncio.get_running_loop().run_in_executor(
                                    self.io, _create, fetch.tmp
                                )
                                fetch.size = resp.content_length
                                fetch.started.set()
                                fetch._notify()
                            elif fetch.written == 0:  # a retry before any byte arrived
                                if resp.status != 200 or resp.content_length != fetch.size:
                                    raise BadGateway(
                                        f"upstream {base} answered {resp.status} with "
                                        f"{resp.content_length} bytes, not 200 with {fetch.size}"
                                    )
                            else:
                                self._check_resume(base, resp, fetch)
                                self.counters.resumed += 1
                            copying = True
                            await self._copy(resp, fetch, fd, h)
                        break
                    except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                        self._failed(up)
                        last = self._refused(up, exc)
                        log.warning("fetch %s: %s (at byte %d)", fetch.hex[:12], last, fetch.written)
                        continue
                    except BadGateway as exc:
                        self._failed(up)
                        last = exc
                        if copying:  # the bytes themselves are wrong: no retry
                            raise
                        continue
                else:
                    raise last or BadGateway(f"no upstream could send sha256:{fetch.hex}")
                assert fetch.size is not None and fetch.tmp is not None and reservation is not None
                if h.hexdigest() != fetch.hex:
                    self.counters.verify_failures += 1
                    raise BadGateway(
                        f"upstream sent bytes whose sha256 is {h.hexdigest()}, not {fetch.hex}; discarded"
                    )
                # fsynced and renamed into place in one trip off the loop; cancelled meanwhile
                # (only when the relay stops), the rename still ends in its thread and the
                # cache's next load() indexes the object
                await asyncio.get_running_loop().run_in_executor(
                    self.io, self._settle, fd, fetch.hex, fetch.tmp
                )
                os.close(fd)
                fd = -1
                fetch.obj = self.cache.publish(fetch.hex, reservation)
                reservation = None
        except SlimError as exc:
            error = exc
        except asyncio.CancelledError:
            error = BadGateway("the relay is shutting down")
            raise
        except Exception as exc:  # a bug: log it, fail this fetch only
            log.exception("fetch %s failed unexpectedly", fetch.hex)
            error = BadGateway(f"internal error fetching sha256:{fetch.hex}: {exc}")
        finally:
            if fd >= 0:
                os.close(fd)
            if reservation is not None:
                self.cache.cancel(reservation)
            try:
                if fetch.obj is None and fetch.tmp is not None:
                    # gone before anyone learns the fetch failed (off the loop: an unlink)
                    await asyncio.get_running_loop().run_in_executor(self.io, _remove, fetch.tmp)
            finally:  # whatever became of that, the readers learn how the fetch ended
                if fetch.obj is None and error is None:
                    error = BadGateway("the relay is shutting down")
                fetch.error = error
                if fetch.error is not None:
                    self.counters.fetch_failures += 1
                    log.warning("fetch %s failed: %s", fetch.hex[:12], fetch.error)
                self._inflight.pop(fetch.hex, None)
                fetch.started.set()
                fetch._notify()

    def _settle(self, fd: int, hexdigest: str, tmp: Path) -> None:
        """A verified object's file: on disk for good, then in its place in the cache."""
        os.fsync(fd)
        self.cache.place(hexdigest, tmp)

    @staticmethod
    def _check_resume(base: str, resp: aiohttp.ClientResponse, fetch: Fetch) -> None:
        m = CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range", ""))
        if resp.status != 206 or m is None:
            raise BadGateway(f"upstream {base} cannot resume (answered {resp.status} to a Range request)")
        start, _, total = (int(g) for g in m.groups())
        if start != fetch.written or total != fetch.size:
            raise BadGateway(
                f"upstream {base} resumed at {start} of {total}, not {fetch.written} of {fetch.size}"
            )

    async def _copy(self, resp: aiohttp.ClientResponse, fetch: Fetch, fd: int, h: Any) -> None:
        assert fetch.size is not None
        pending = bytearray()
        async for chunk in resp.content.iter_any():
            if fetch.written + len(pending) + len(chunk) > fetch.size:
                raise BadGateway(f"upstream sent more than the {fetch.size} bytes it announced")
            pending += chunk
            if len(pending) < MIN_WRITE and fetch.written + len(pending) < fetch.size:
                continue
            data, pending = pending, bytearray()
            await self._write(fetch, fd, h, data)
        if pending:
            await self._write(fetch, fd, h, pending)
        if fetch.written != fetch.size:
            raise ConnectionError(f"upstream closed after {fetch.written} of {fetch.size} bytes")

    async def _write(self, fetch: Fetch, fd: int, h: Any, data: bytearray) -> None:
        await asyncio.get_running_loop().run_in_executor(self.io, _write_and_hash, fd, h, data)
        fetch.written += len(data)
        self.counters.bytes_fetched += len(data)
        if self._on_bytes is not None:
            self._on_bytes(len(data))
        fetch._notify()


class CachingSource:
    """The relay's object source: the cache, and the fetcher for what it lacks."""

    def __init__(self, cache: ObjectCache, fetcher: Fetcher) -> None:
        self.cache = cache
        self.fetcher = fetcher

    def acquire(self, hexdigest: str) -> CachedObject | None:
        return self.cache.acquire(hexdigest)

    def release(self, obj: CachedObject) -> None:
        self.cache.release(obj)

    def lost(self, obj: CachedObject) -> None:
        self.cache.lost(obj)

    def remember(self, obj: CachedObject, body: bytes) -> None:
        self.cache.remember(obj, body)

    def fetch(self, hexdigest: str) -> Fetch:
        return self.fetcher.get(hexdigest)

    async def head(self, hexdigest: str) -> int:
        fetch = self.fetcher._inflight.get(hexdigest)
        if fetch is not None:
            await fetch.started.wait()
            if fetch.size is not None:
                return fetch.size
        return await self.fetcher.head(hexdigest)

    async def ensure(self, hexdigest: str) -> tuple[int, bool]:
        """Have the object in the cache: (size, fetched now?).  Raises the fetch's error."""
        obj = self.cache.acquire(hexdigest)
        if obj is not None:
            self.cache.release(obj)
            return obj.size, False
        fetch = self.fetcher.get(hexdigest)
        while not fetch.finished:
            await fetch.wait_beyond(fetch.available())
        if fetch.error is not None:
            raise fetch.error
        assert fetch.obj is not None
        return fetch.obj.size, True
