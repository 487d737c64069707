"""slim.relay.observe: what a relay records of a boot itself, joined to the right boot."""

from __future__ import annotations

import asyncio

from slim.relay.observe import BootObserver
from slim.v1 import core_pb2 as pb


async def test_stage_one_joins_only_the_next_boot_from_its_address() -> None:
    """Behind NAT two boots come from one address: each script claims the TFTP transfers
    since the previous script from that address, the latest of each name; a pxelinux
    config is the script itself, not stage 1; another address's transfers stay put."""
    sent: list[pb.BootEvent] = []

    async def send(batch: list[pb.BootEvent]) -> int:
        sent.extend(batch)
        return len(batch)

    obs = BootObserver("r1", send)
    task = asyncio.create_task(obs.run())
    try:
        obs.tftp_done("10.0.0.9", "ipxe.efi", 100.0, 100.5, 900, False)  # a first try that failed
        obs.tftp_done("10.0.0.9", "ipxe.efi", 101.0, 101.5, 1000, True)
        obs.tftp_done("10.0.0.7", "undionly.kpxe", 101.0, 101.2, 70, True)  # someone else
        obs.script_served("n1", "aa01", "base", "10.0.0.9", 102.0, 10, "iPXE script over HTTP")
        obs.tftp_done("10.0.0.9", "pxelinux.cfg/01-52-54-00-00-00-01", 102.0, 102.1, 300, True)
        obs.tftp_done("10.0.0.9", "ipxe.efi", 150.0, 150.4, 1000, True)
        obs.script_served("n2", "bb02", "base", "10.0.0.9", 151.0, 10, "iPXE script over HTTP")
        obs.script_served("n3", "cc03", "base", "10.0.0.9", 152.0, 10, "iPXE script over HTTP")
        for _ in range(500):  # bounded: the sender runs on this loop
            if len(sent) == 5:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    got = [(e.boot_id, e.stage, e.bytes, e.ok) for e in sent]
    assert got == [
        ("aa01", "tftp:ipxe.efi", 1000, True),  # the latest try of that name
        ("aa01", "script", 10, True),
        ("bb02", "tftp:ipxe.efi", 1000, True),  # not aa01's again, and no pxelinux config
        ("bb02", "script", 10, True),
        ("cc03", "script", 10, True),  # nothing new from that address since bb02's script
    ], got
    assert all("by address and time" in e.message for e in sent if e.stage.startswith("tftp:"))
    assert obs.counters.tftp_matched == 2


async def test_a_batch_the_core_refuses_is_sent_again_one_by_one() -> None:
    from slim.errors import NotFound

    taken: list[str] = []

    async def send(batch: list[pb.BootEvent]) -> int:
        if any(e.node == "gone" for e in batch):
            raise NotFound("unknown node 'gone'")
        taken.extend(e.boot_id for e in batch)
        return len(batch)

    obs = BootObserver("r1", send)
    task = asyncio.create_task(obs.run())
    try:
        obs.script_served("n1", "aa01", "base", "10.0.0.1", 1.0, 10, "x")
        obs.script_served("gone", "bb02", "base", "10.0.0.2", 1.0, 10, "x")
        obs.script_served("n3", "cc03", "base", "10.0.0.3", 1.0, 10, "x")
        for _ in range(500):
            if obs.counters.sent + obs.counters.dropped == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert taken == ["aa01", "cc03"] and (obs.counters.sent, obs.counters.dropped) == (2, 1)
