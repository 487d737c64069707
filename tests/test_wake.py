"""Wake-on-LAN: the relay's magic packets, and the lab's listener that stands in for a NIC."""

from __future__ import annotations

import socket
import threading

import pytest
import wakeonlan

from labs.wakelab import MagicPacketListener, magic_mac
from slim.errors import InvalidArgument
from slim.relay.wake import Waker

PC01, PC02, STRANGER = "52:54:00:00:03:01", "52:54:00:00:03:02", "52:54:00:00:09:09"


def test_the_listener_takes_only_well_formed_packets_for_its_macs() -> None:
    packet = wakeonlan.create_magic_packet(PC01)
    assert magic_mac(packet) == PC01
    assert magic_mac(packet + bytes(6)) == PC01  # with a SecureOn password
    assert magic_mac(packet[:-1]) is None
    assert magic_mac(b"\x00" + packet[1:]) is None  # the six 0xFF are not all there
    broken = bytearray(packet)
    broken[50] ^= 1  # one repetition of the MAC differs
    assert magic_mac(bytes(broken)) is None


async def test_the_relay_wakes_each_desktop_once_at_the_pool_rate() -> None:
    woken: list[str] = []
    done = threading.Event()

    def on_wake(mac: str) -> None:
        woken.append(mac)
        if len(woken) == 2:
            done.set()

    listener = MagicPacketListener([PC01, PC02], on_wake, ("127.0.0.1", 0)).start()
    try:
        waker = Waker(host="127.0.0.1", port=listener.port)  # directed, as the test has no segment
        # a stranger's packet and a datagram that is no packet are ignored, saying why
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", ("127.0.0.1", listener.port))
        await waker.wake([STRANGER], per_minute=6000)
        sent = await waker.wake([PC01, "52-54-00-00-03-02"], per_minute=6000)
        assert sent == [PC01, PC02]
        assert done.wait(10)
        assert woken == [PC01, PC02]
        assert listener.ignored == [
            "not a magic packet (5 bytes)",
            f"a magic packet for {STRANGER}, not one of ours",
        ]
    finally:
        listener.stop()


async def test_bad_wake_orders_are_refused() -> None:
    waker = Waker(host="127.0.0.1", port=9)
    with pytest.raises(InvalidArgument, match="is not a MAC address"):
        waker.send("52:54:00")
    with pytest.raises(InvalidArgument, match="per_minute"):
        await waker.wake([PC01], per_minute=0)
