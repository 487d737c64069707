"""The core's side of the relays' heartbeat streams (slim/core/control/relayhub.py)."""

from __future__ import annotations

from slim.core.control.relayhub import RelayHub
from slim.v1 import core_pb2 as pb


async def test_a_watched_prefetch_sends_every_relays_last_status_even_one_that_came_meanwhile() -> None:
    """A status that changes while the watcher hands on another is still sent before the end
    (CI found room-1's final status lost when it came while room-2's was being handed on)."""
    hub = RelayHub()
    hub.connect("room-1")  # room-2 has no stream: done at once, "not connected"
    order, _ = hub.prefetch("jdk14", "sha256:" + "a" * 64, ["room-1", "room-2"])
    watch = hub.watch(order)
    first = await anext(watch)
    second = await anext(watch)
    assert (first[0], first[1].done) == ("room-1", False)
    assert (second[0], second[1].done, "not connected" in second[1].error) == ("room-2", True, True)
    # while the watcher waits on its consumer, room-1 finishes
    hub.update("room-1", [pb.PrefetchStatus(id=order, done=True, objects_done=3, objects_total=3)])
    last = await anext(watch)
    assert (last[0], last[1].done, last[1].objects_done) == ("room-1", True, 3)
    assert [x async for x in watch] == []  # then the stream ends
