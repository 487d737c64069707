"""Live relays: their heartbeat streams, the orders sent down them, and the
progress that comes back.

The core answers each relay's heartbeat stream from a queue; besides the
reply to each beat, a prefetch order is put on the queue of the relay that
must run it and goes out at once.  Relays report progress in their beats;
:meth:`RelayHub.watch` turns those reports into one stream per order for the
caller of ``Admin.Prefetch``.  Everything runs on the core's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Iterable

from slim.v1 import core_pb2 as pb

log = logging.getLogger(__name__)

MAX_QUEUE = 64  # replies waiting for a relay that does not read: the stream is closed beyond this


class RelayHub:
    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[pb.HeartbeatReply | None]] = {}
        self._orders: dict[str, dict[str, pb.PrefetchStatus]] = {}  # order id -> relay -> last status
        self._changed = asyncio.Event()

    def connected(self) -> list[str]:
        return sorted(self._queues)

    def connect(self, relay: str) -> asyncio.Queue[pb.HeartbeatReply | None]:
        """A new stream for ``relay``; an older one of the same relay is closed."""
        old = self._queues.get(relay)
        if old is not None:
            log.warning("relay %s opened a second heartbeat stream; closing the first", relay)
            old.put_nowait(None)
        queue: asyncio.Queue[pb.HeartbeatReply | None] = asyncio.Queue()
        self._queues[relay] = queue
        return queue

    def disconnect(self, relay: str, queue: asyncio.Queue[pb.HeartbeatReply | None]) -> None:
        if self._queues.get(relay) is queue:
            del self._queues[relay]
            for statuses in self._orders.values():
                status = statuses.get(relay)
                if status is not None and not status.done:
                    status.done = True
                    status.error = "the relay's heartbeat stream closed before it finished"
            self._notify()

    def reply(self, relay: str, reply: pb.HeartbeatReply) -> bool:
        queue = self._queues.get(relay)
        if queue is None:
            return False
        if queue.qsize() >= MAX_QUEUE:
            log.warning("relay %s is not reading its heartbeat replies; closing its stream", relay)
            queue.put_nowait(None)
            return False
        queue.put_nowait(reply)
        return True

    def update(self, relay: str, statuses: Iterable[pb.PrefetchStatus]) -> None:
        changed = False
        for s in statuses:
            order = self._orders.get(s.id)
            if order is None or relay not in order:
                continue  # an order nobody watches any more, or not this relay's
            copy = pb.PrefetchStatus()
            copy.CopyFrom(s)
            order[relay] = copy
            changed = True
        if changed:
            self._notify()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def wake(self, relay: str, targets: list[tuple[str, str]], per_minute: int) -> bool:
        """Order ``relay`` to send magic packets for (node, MAC) ``targets``, at most
        ``per_minute`` a minute; False if it has no stream open."""
        order = pb.WakeOrder(
            id=secrets.token_hex(6),
            targets=[pb.WakeTarget(node=n, mac=m) for n, m in targets],
            per_minute=per_minute,
        )
        return self.reply(relay, pb.HeartbeatReply(wake=[order]))

    def prefetch(
        self, environment: str, digest: str, relays: list[str], signature: str = "", watched: bool = True
    ) -> tuple[str, dict[str, pb.PrefetchStatus]]:
        """Send the order (with the release's signature) to each relay; (order id, first
        status per relay)."""
        order_id = secrets.token_hex(6)
        statuses: dict[str, pb.PrefetchStatus] = {}
        order = pb.PrefetchOrder(
            id=order_id, environment=environment, release_digest=digest, release_signature=signature
        )
        for relay in relays:
            status = pb.PrefetchStatus(id=order_id, release_digest=digest)
            if not self.reply(relay, pb.HeartbeatReply(prefetch=[order])):
                status.done = True
                status.error = "not connected: the core has no heartbeat stream from this relay"
            statuses[relay] = status
        if watched:  # else nobody reads its progress: nothing kept
            self._orders[order_id] = statuses
        return order_id, statuses

    async def watch(self, order_id: str) -> AsyncIterator[tuple[str, pb.PrefetchStatus]]:
        """Each relay's status whenever it changes, until all are done."""
        statuses = self._orders[order_id]
        sent: dict[str, bytes] = {}
        try:
            while True:
                changed = self._changed
                news = []
                for relay, status in statuses.items():
                    data = status.SerializeToString(deterministic=True)
                    if sent.get(relay) != data:
                        sent[relay] = data
                        news.append((relay, status))
                for relay, status in news:
                    yield relay, status  # statuses may change meanwhile: looked at again below
                if news:
                    continue
                if all(s.done for s in statuses.values()):
                    return  # every last status sent
                await changed.wait()
        finally:
            self._orders.pop(order_id, None)
