"""Wake-on-LAN: the relay's magic packets, and the lab's listener that stands in for a NIC."""

from __future__ import annotations

import asyncio
import socket
import threading

import wakeonlan

from labs.wakelab import MagicPacketListener, magic_mac
from slim.relay.wake import WakeQueue, Waker

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


async def test_the_relay_sends_each_order_once_and_says_what_failed() -> None:
    woken: list[str] = []
    done = threading.Event()

    def on_wake(mac: str) -> None:
        woken.append(mac)
        if len(woken) == 2:
            done.set()

    results: list[tuple[str, bool, str]] = []
    listener = MagicPacketListener([PC01, PC02], on_wake, ("127.0.0.1", 0)).start()
    queue = WakeQueue(Waker(host="127.0.0.1", port=listener.port),  # directed: the test has no segment
                      lambda node, mac, ok, why: results.append((node, ok, why)))  # fmt: skip
    task = asyncio.create_task(queue.run())
    try:
        # a stranger's packet and a datagram that is no packet are ignored, saying why
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", ("127.0.0.1", listener.port))
        assert queue.order([("x", STRANGER)], per_minute=6000) == 1
        assert queue.order([("pc01", PC01), ("bad", "52:54:00"), ("pc02", "52-54-00-00-03-02")], 6000) == 3
        assert await asyncio.to_thread(done.wait, 10)
        assert woken == [PC01, PC02]
        assert listener.ignored == [
            "not a magic packet (5 bytes)",
            f"a magic packet for {STRANGER}, not one of ours",
        ]
        for _ in range(100):  # bounded: the last result follows the last packet
            if len(results) == 4:
                break
            await asyncio.sleep(0.05)
        assert [(n, ok) for n, ok, _ in results] == [
            ("x", True),
            ("pc01", True),
            ("bad", False),
            ("pc02", True),
        ]
        assert "is not a MAC address" in results[2][2]
        assert (queue.packets, queue.failures) == (3, 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        listener.stop()
