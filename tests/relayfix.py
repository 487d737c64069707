"""Helpers for relay tests: origins, relays in-process and as processes, raw HTTP."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from slim.core.store import Store
from slim.relay.server import ObjectServer, RelayConfig, RelayServer

ROOT = Path(__file__).resolve().parent.parent
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
    config = RelayConfig(upstreams=upstreams, cache_dir=cache_dir, max_bytes=max_bytes, listen="127.0.0.1:0")
    for k, v in kw.items():
        setattr(config, k, v)
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
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{self.port}"

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


def start_relay_process(cache_dir: Path, upstream: str, *extra: str) -> RelayProcess:
    proc = subprocess.Popen(
        [
            *SLIM,
            "relay",
            "serve",
            "--upstream",
            upstream,
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
