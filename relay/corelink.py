"""The relay's side of the core's gRPC contract: calls, heartbeats, orders.

* :class:`CoreLink` makes unary calls with a deadline; a failed call raises the
  core's error (:mod:`slim.rpc`; a core that cannot be reached is ``Unreachable``).
* :meth:`CoreLink.heartbeats` keeps one heartbeat stream open for the relay's
  life: a beat every interval the core asks for, with ±20 % jitter so that
  relays restarted together do not beat together; early beats when prefetch
  progress changes; reconnection with jittered exponential backoff.  The
  core's replies carry the current releases (to pin) and prefetch orders.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from slim.rpc import NONE, AsyncCoreClient, Credentials
from slim.v1 import core_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")
CALL_TIMEOUT = 5.0
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
JITTER = 0.2


class CoreLink:
    """The relay's connection to the core: one channel for its life (kept alive), unary
    calls with a deadline, the heartbeat stream."""

    def __init__(self, address: str, timeout: float = CALL_TIMEOUT, credentials: Credentials = NONE) -> None:
        self.address = address
        self.timeout = timeout
        self.client = AsyncCoreClient(address, timeout, keepalive=True, credentials=credentials)
        self.core = self.client.core
        self.connected = False  # a heartbeat stream is open

    async def close(self) -> None:
        await self.client.close()

    async def call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        return await self.client.call(method, request)

    async def report_events(self, events: Sequence[pb.BootEvent]) -> int:
        resp = await self.client.send(self.core.ReportBootEvents, events)
        return resp.accepted

    async def heartbeats(
        self,
        beat: Callable[[], Awaitable[pb.Heartbeat]],
        on_reply: Callable[[pb.HeartbeatReply], None],
        poke: asyncio.Event,
        stopping: asyncio.Event,
    ) -> None:
        """Beat until ``stopping`` is set; ``poke`` asks for an early beat."""
        backoff = BACKOFF_MIN
        interval = 5.0
        while not stopping.is_set():
            call = self.core.RelayHeartbeat()
            replies = 0
            reader: asyncio.Task[None] | None = None

            async def read(call: Any = call) -> None:
                nonlocal interval, replies
                async for reply in call:
                    replies += 1
                    if not self.connected:
                        self.connected = True
                        log.info("heartbeat stream to the core at %s open", self.address)
                    if reply.interval_ms:
                        interval = reply.interval_ms / 1000
                    on_reply(reply)

            try:
                reader = asyncio.create_task(read())
                while not stopping.is_set():
                    await call.write(await beat())
                    wait = interval * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311 - jitter
                    await _first(poke.wait(), stopping.wait(), reader, seconds=wait)
                    poke.clear()
                    if reader.done():
                        reader.result()  # raises what ended the stream
                        raise grpc.aio.UsageError("the core closed the heartbeat stream")
                    if replies:
                        backoff = BACKOFF_MIN
                await call.done_writing()
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                what = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                level = logging.WARNING if self.connected or backoff == BACKOFF_MIN else logging.DEBUG
                log.log(
                    level, "heartbeats to the core at %s: %s; retrying in %.1f s", self.address, what, backoff
                )
                self.connected = False
                await _first(stopping.wait(), seconds=backoff * random.uniform(1 - JITTER, 1 + JITTER))  # noqa: S311
                backoff = min(BACKOFF_MAX, backoff * 2)
            finally:
                call.cancel()
                if reader is not None:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
        self.connected = False


async def _first(*aws: Awaitable[Any], seconds: float) -> None:
    """Wait until any of ``aws`` finishes or ``seconds`` pass; cancel the
    coroutines made here (tasks passed in are left running)."""
    tasks = []
    made = []
    for aw in aws:
        if isinstance(aw, asyncio.Task):
            tasks.append(aw)
        else:
            t = asyncio.ensure_future(aw)
            tasks.append(t)
            made.append(t)
    try:
        await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in made:
            t.cancel()
        if made:
            await asyncio.gather(*made, return_exceptions=True)
