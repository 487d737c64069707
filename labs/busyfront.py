"""A lab's busy relay: answers 503 to the first object requests, then passes every request
through to the real relay behind it.

``retry_afters`` says how many requests are refused and how: ``[1, None]`` answers the
first ``503`` with ``Retry-After: 1`` (iPXE's HTTP client waits that long and asks again by
itself) and the second a bare ``503`` (iPXE gives up on it: the boot script waits and goes
round the relays again).  The VM lab puts it in front of its relay to prove that a boot
survives a relay that sheds load.  It runs an aiohttp
server on 127.0.0.1 port 0 on a thread of its own; :meth:`BusyFront.close` stops it.
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
from aiohttp import web

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class BusyFront:
    def __init__(self, upstream: str, retry_afters: list[int | None]) -> None:
        self.upstream = upstream.rstrip("/")
        self.answers = list(retry_afters)  # for the object requests still to refuse
        self.refused: list[str] = []  # the paths refused, in order
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="busy front", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> int:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the busy front did not start within 30 s")
        if self._error is not None:
            raise RuntimeError(f"the busy front did not start: {self._error}")
        return self.port

    def close(self) -> None:
        if self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession(auto_decompress=False) as session:

            async def forward(request: web.Request) -> web.StreamResponse:
                if request.path.startswith("/objects/") and self.answers:
                    wait = self.answers.pop(0)
                    self.refused.append(request.path_qs)
                    headers = {"Retry-After": str(wait)} if wait is not None else {}
                    return web.Response(status=503, text="lab: busy\n", headers=headers)
                headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
                body = await request.read()
                async with session.request(
                    request.method, self.upstream + request.path_qs, headers=headers, data=body or None
                ) as up:
                    resp = web.StreamResponse(
                        status=up.status,
                        headers={k: v for k, v in up.headers.items() if k.lower() not in HOP_HEADERS},
                    )
                    if up.content_length is not None:
                        resp.content_length = up.content_length
                    await resp.prepare(request)
                    async for chunk in up.content.iter_chunked(1 << 20):
                        await resp.write(chunk)
                    await resp.write_eof()
                    return resp

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", forward)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            server = site._server  # the port bound for port 0
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()
