"""Wake-on-LAN from a relay: magic packets for a pool's desktops, sent on the relay's own
segment (a magic packet is a broadcast: it does not cross routers unless directed).

The packet is the ``wakeonlan`` package's (6 x 0xFF then the MAC 16 times, UDP, port 9 by
default).  :class:`Waker` sends one per desktop, spaced to at most ``per_minute`` a minute (a
night's wake-up is a storm of DHCP and boots: the pool says how fast), off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import wakeonlan

from slim.errors import InvalidArgument
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

    async def wake(self, macs: Sequence[str], per_minute: int) -> list[str]:
        """Send one packet for each of ``macs``, at most ``per_minute`` a minute; the MACs
        woken, in order.  Datagrams go out from a thread, never from the event loop."""
        if per_minute < 1:
            raise InvalidArgument(f"per_minute must be at least 1, not {per_minute}")
        loop = asyncio.get_running_loop()
        gap = 60.0 / per_minute
        sent = []
        for i, mac in enumerate(macs):
            if i:
                await asyncio.sleep(gap)  # the pool's rate, not synchronization
            await loop.run_in_executor(None, self.send, mac)
            sent.append(normalize_mac(mac))
        log.info(
            "woke %d desktop(s) (%s:%d, at most %d a minute)", len(sent), self.host, self.port, per_minute
        )
        return sent
