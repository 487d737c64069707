"""Wake-on-LAN from a relay: magic packets for a pool's desktops, sent on the relay's own
segment (a magic packet is a broadcast: it does not cross routers unless directed).

The packet is the ``wakeonlan`` package's (6 x 0xFF then the MAC 16 times, UDP, port 9 by
default).  :class:`Waker` sends one; :class:`WakeQueue` sends the core's orders, one packet at
a time, spaced to at most the order's ``per_minute`` a minute (a night's wake-up is a storm of
DHCP and boots: the pool says how fast), off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import wakeonlan

from slim.errors import InvalidArgument
from slim.listen import parse_listen
from slim.vocabulary import names_a_mac, normalize_mac

log = logging.getLogger(__name__)
BROADCAST = "255.255.255.255"
PORT = 9


@dataclass(frozen=True)
class Waker:
    """Sends magic packets to ``host`` (the segment's broadcast address, or a directed
    broadcast such as 10.3.255.255) from ``interface`` (an address of the relay's, or any)."""

    host: str = BROADCAST
    port: int = PORT
    interface: str | None = None

    def send(self, mac: str) -> None:
        """One magic packet for ``mac`` (blocking: a datagram)."""
        if not names_a_mac(mac):
            raise InvalidArgument(f"{mac[:40]!r} is not a MAC address")
        wakeonlan.wake(normalize_mac(mac), host=self.host, port=self.port, interface=self.interface)


MAX_QUEUED = 100_000  # packets waiting to go out (a wake order beyond this is cut short)


class WakeQueue:
    """The relay's wake orders, one packet at a time: however many orders arrive, the
    packets leave at most at the rate each asks for (the gap before a packet is 60 s over
    its order's ``per_minute``).  ``sent`` is called (on the loop) for each packet."""

    def __init__(self, waker: Waker, sent: Callable[[str, str, bool, str], None] | None = None) -> None:
        self.waker = waker
        self._queue: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
        self._sent = sent
        self._last = 0.0
        self.packets = 0
        self.failures = 0

    def order(self, targets: Sequence[tuple[str, str]], per_minute: int) -> int:
        """Queue one packet per (node, mac); the number queued."""
        queued = 0
        for node, mac in targets:
            if self._queue.qsize() >= MAX_QUEUED:
                log.warning("wake queue full (%d packets): dropped the rest of an order", MAX_QUEUED)
                break
            self._queue.put_nowait((node, mac, max(1, per_minute)))
            queued += 1
        return queued

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            node, mac, per_minute = await self._queue.get()
            wait = self._last + 60.0 / per_minute - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the pool's rate, not synchronization
            self._last = time.monotonic()
            try:
                await loop.run_in_executor(None, self.waker.send, mac)
                ok, why = True, ""
                self.packets += 1
            except (OSError, InvalidArgument) as exc:
                ok, why = False, str(exc)
                self.failures += 1
                log.warning("wake of %s (%s) failed: %s", node, mac, why)
            if self._sent is not None:
                self._sent(node, mac, ok, why)


def waker_for(to: str, source: str | None = None) -> Waker:
    """A Waker from a relay's settings: ``to`` is HOST[:PORT] (port 9 by default)."""
    host, port = parse_listen(to, PORT)
    return Waker(host=host, port=port, interface=source)
