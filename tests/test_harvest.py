"""A night of desktop harvesting on real parts (a gRPC core, a relay, magic packets over UDP,
the EE's order script run by busybox), with the core's clock injected: windows of a night
pass in a second.  The QEMU desktop and the Slurm pool are in test_desktop_vm and
test_slurm_cluster."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import grpc
import pytest

from labs.placeholders import publish_placeholder_releases
from labs.wakelab import MagicPacketListener
from slim.agent import report_up
from slim.core.control.harvest import Harvest
from slim.core.control.server import CoreServer
from slim.core.control.service import BootStatus, CoreService
from slim.core.control.state import BootEvent, State
from slim.core.registry import load_registry_text
from slim.core.store import Store
from slim.relay.server import RelayServer
from slim.rpc import aio_channel
from slim.signing import SigningKey
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc
from tests.support import initrd_busybox, origin, relay, short_socket, url

PARIS = ZoneInfo("Europe/Paris")
MACS = {"pc01": "52:54:00:00:03:01", "pc02": "52:54:00:00:03:02", "pc03": "52:54:00:00:03:03"}
REGISTRY = """\
settings: {{heartbeat_interval: 0.2}}
sites:
  lab: {{prefixes: [127.0.0.0/8], node_identity: mac}}
relays:
  r1: {{urls: ["http://127.0.0.1:1/"], site: lab}}
profiles:
  pc: {{}}
environments:
  night: {{image: /srv/images/night, default_policy: ram}}
nodes:
{nodes}
pools:
  room101:
    groups: [room101]
    environment: night
    time_zone: Europe/Paris
    windows: [{{days: [weekdays], start: "20:00", end: "07:00"}}]
    wakes_per_minute: {rate}
    wake_timeout: 600
    grace: 900
    menu_timeout: 5
"""
RATE = 60  # a packet a second at most


def paris(day: int, hour: int, minute: int, second: int = 0) -> float:
    return dt.datetime(2026, 12, day, hour, minute, second, tzinfo=PARIS).timestamp()


@dataclass
class Night:
    now: list[float]
    service: CoreService
    server: CoreServer
    admin: pb_grpc.AdminAsyncStub
    relay: RelayServer
    listener: MagicPacketListener
    woken: list[tuple[str, float]]
    http: aiohttp.ClientSession

    @property
    def relay_url(self) -> str:
        return f"http://127.0.0.1:{self.relay.port}/"

    async def status(self) -> dict[str, pb.DesktopStatus]:
        reply = await self.admin.HarvestStatus(pb.HarvestStatusRequest())
        return {d.node: d for d in reply.pools[0].desktops}

    async def until(self, what: str, check: object) -> None:
        async def ok() -> bool:
            return bool(await check()) if asyncio.iscoroutinefunction(check) else bool(check())  # type: ignore[operator]

        deadline = time.monotonic() + 20
        while not await ok():
            assert time.monotonic() < deadline, f"never: {what}"
            await asyncio.sleep(0.05)

    async def boot(self, node: str, boot_id: str, *stages: str) -> None:
        events = [BootEvent(node, boot_id, s, time.time(), environment="night") for s in stages]
        await asyncio.to_thread(self.service.report_events, events)

    async def script(self, node: str) -> str:
        """The node's menu; after the test moved the clock, the relay is live again at its next
        beat (a fifth of a second)."""
        for _ in range(100):  # bounded
            async with self.http.get(f"{self.relay_url}boot/{MACS[node]}.ipxe") as r:
                if r.status != 503:
                    assert r.status == 200, await r.text()
                    return await r.text()
            await asyncio.sleep(0.1)
        raise AssertionError("the relay stayed unavailable")

    async def order(self, node: str, boot_id: str) -> str:
        async with self.http.post(
            f"{self.relay_url}v1/nodes/{node}/order", data=json.dumps({"boot_id": boot_id})
        ) as r:
            assert r.status == 200, await r.text()
            return await r.text()


@pytest.fixture
async def night(tmp_path: Path) -> AsyncIterator[Night]:
    nodes = "\n".join(
        f'  {n}: {{macs: ["{m}"], profile: pc, environment: night, groups: [room101], site: lab}}'
        for n, m in MACS.items()
    )
    registry = load_registry_text(REGISTRY.format(nodes=nodes, rate=RATE))
    store = Store(tmp_path / "store")
    signer = SigningKey.load_or_create(tmp_path / "keys")  # secure by default: releases signed
    publish_placeholder_releases(registry, store, signer=signer)
    state = await asyncio.to_thread(State, tmp_path / "state.db")
    now = [paris(8, 19, 40)]  # a Tuesday evening, before the window
    service = CoreService(registry, state, store, clock=lambda: now[0], signer=signer)
    sock = short_socket()
    server = CoreServer(service, f"unix:{sock}")
    await server.start()
    channel = aio_channel(f"unix:{sock}")
    woken: list[tuple[str, float]] = []
    listener = MagicPacketListener(MACS.values(), lambda mac: woken.append((mac, time.monotonic())),
                                   ("127.0.0.1", 0)).start()  # fmt: skip
    n: Night | None = None
    async with aiohttp.ClientSession() as http, origin(store) as objects:
        try:
            async with relay(
                tmp_path / "cache", [url(objects)], core=f"unix:{sock}", name="r1",
                wake_to=f"127.0.0.1:{listener.port}", trust=[tmp_path / "keys" / "signing.pub"],
            ) as r:  # fmt: skip
                n = Night(now, service, server, pb_grpc.AdminStub(channel), r, listener, woken, http)
                await n.until("the relay's heartbeat stream is open", lambda: server.hub.connected())
                yield n
        finally:
            listener.stop()
            await channel.close()
            await (n.server if n is not None else server).stop(grace=1)  # a test may restart it
            await asyncio.to_thread(state.close)
            Path(sock).unlink(missing_ok=True)
            Path(sock).parent.rmdir()


async def test_the_relays_warm_the_pools_ee_before_its_window(night: Night) -> None:
    found = night.service.store.release("night")
    assert found is not None
    release = found[1]
    objects = {release.kernel.digest, release.initrd.digest}
    objects |= {d.archive.digest for d in release.directories.values() if d.archive is not None}
    hexes = {o.removeprefix("sha256:") for o in objects}
    assert not any(h in night.relay.cache for h in hexes)  # 19:40: cold, 20 minutes before
    night.now[0] = paris(8, 19, 45, 1)  # within the pool's prefetch_lead (15 min) of 20:00
    await night.until(
        "the pool's EE warm on the site's relay", lambda: all(h in night.relay.cache for h in hexes)
    )
    assert not night.woken  # and nobody woken yet: the window has not opened


async def test_a_night_wakes_the_pool_at_its_rate_and_sends_it_back_at_the_end(night: Night) -> None:
    # before the window: everyone in their own OS, whose menu boots it by default
    assert {d.state for d in (await night.status()).values()} == {"own-os"}
    assert (
        "choose" not in (s := await night.script("pc01")) and "goto local" in s
    )  # no menu: straight to the local disk
    # the Slurm side reads the windows ahead (for its reservations) and the pool's settings
    ahead = await night.admin.HarvestStatus(pb.HarvestStatusRequest(horizon_seconds=2 * 86400))
    windows = [(w.start.seconds, w.end.seconds) for w in ahead.pools[0].upcoming]
    assert windows == [(paris(8, 20, 0), paris(9, 7, 0)), (paris(9, 20, 0), paris(10, 7, 0))]
    assert (ahead.pools[0].grace, ahead.pools[0].time_zone) == (900, "Europe/Paris")
    # the window opens (Tuesday 20:00, Paris): the relay wakes all three, at most the pool's rate
    night.now[0] = paris(8, 20, 0, 1)
    await night.until("three magic packets", lambda: len(night.woken) == 3)
    assert sorted(m for m, _ in night.woken) == sorted(MACS.values())
    gaps = [b - a for (_, a), (_, b) in zip(night.woken, night.woken[1:], strict=False)]
    assert all(g >= 60 / RATE * 0.7 for g in gaps), gaps  # the rate limit, counted at the listener
    assert {d.state for d in (await night.status()).values()} == {"waking"}, await night.status()
    # pc01 boots the EE (its menu now offers the EE first, with the owner's short timeout)
    script = await night.script("pc01")
    assert "choose --default ee-night --timeout 5000" in script
    b1 = script.split("slim.boot=")[1].split()[0]  # the boot this script starts
    await night.boot("pc01", b1, "plan", "switch_root", "up")
    # pc02's owner picks their own OS at the menu: the relay sees it, pc02 is out until tomorrow
    script = await night.script("pc02")
    boot_id = script.split(" local?boot=")[1].split()[0]
    async with night.http.get(f"{night.relay_url}boot/local?boot={boot_id}") as r:
        assert r.status == 200
    await night.until("pc02 opted out", _state(night, "pc02", "opted-out"))
    assert (
        "choose" not in (s := await night.script("pc02")) and "goto local" in s
    )  # for the rest of the window
    status = await night.status()
    assert status["pc01"].state == "idle" and status["pc01"].woken_from_off
    assert "picked their own OS at the menu" in status["pc02"].reason
    # pc03 never comes up (its owner is on it): after the wake timeout it is left alone
    night.now[0] = paris(8, 20, 11)
    assert (await night.status())["pc03"].state == "in-use"
    # grace before the end: pc01 (no job) is told to power off (SLIM woke it from off)
    night.now[0] = paris(9, 6, 46)
    await night.until("pc01 told to go back", _state(night, "pc01", "returning"))
    assert await night.order("pc01", b1) == "poweroff 10\n"
    assert (await night.status())["pc01"].state == "own-os"
    reply = await night.admin.HarvestStatus(pb.HarvestStatusRequest(pool="room101"))
    assert reply.pools[0].node_hours_ee > 0


async def test_a_desktop_not_woken_by_slim_is_rebooted_and_one_in_a_job_may_finish(night: Night) -> None:
    night.now[0] = paris(8, 21, 0)
    await night.until("the window's wake", lambda: len(night.woken) == 3)
    await night.boot("pc01", "c1", "plan", "switch_root", "up")  # woken
    night.now[0] = paris(8, 21, 30)  # long after any wake: its owner rebooted it into the EE
    await night.boot("pc02", "c2", "plan", "switch_root", "up")
    reply = await night.admin.ReleaseDesktops(pb.DesktopsRequest(nodes=["pc02", "nobody"], reason="test"))
    assert [(r.node, r.ok) for r in reply.results] == [("pc02", True), ("nobody", False)]
    assert await night.order("pc02", "c2") == "reboot 10\n"  # it was on: back to its own OS
    assert "choose" not in (s := await night.script("pc02")) and "goto local" in s  # not the EE again tonight
    # an order is for its boot only
    assert await night.order("pc02", "c0") == "none 10\n"


async def test_a_desktop_sent_back_by_slim_may_be_woken_again_but_not_one_its_owner_took(
    night: Night,
) -> None:
    """Slurm's SuspendProgram sends an idle desktop back mid-window (ReleaseDesktops) and its
    ResumeProgram wakes it again for a job (WakeDesktops); an owner's opt-out holds."""
    night.now[0] = paris(8, 21, 0)
    await night.until("the window's wake", lambda: len(night.woken) == 3)
    await night.boot("pc01", "e1", "plan", "switch_root", "up")
    await night.admin.ReleaseDesktops(pb.DesktopsRequest(nodes=["pc01"], reason="slurm suspend"))
    assert "choose" not in (s := await night.script("pc01")) and "goto local" in s
    assert await night.order("pc01", "e1") == "poweroff 10\n"  # it goes back (and is off)
    reply = await night.admin.WakeDesktops(pb.DesktopsRequest(nodes=["pc01"], reason="slurm resume"))
    assert [(r.node, r.ok) for r in reply.results] == [("pc01", True)], reply
    await night.until("pc01 woken again", lambda: len(night.woken) == 4)
    assert "choose --default ee-night" in await night.script("pc01")  # the EE again
    script = await night.script("pc02")
    boot_id = script.split(" local?boot=")[1].split()[0]
    async with night.http.get(f"{night.relay_url}boot/local?boot={boot_id}") as r:
        assert r.status == 200
    await night.until("pc02 opted out", _state(night, "pc02", "opted-out"))
    reply = await night.admin.WakeDesktops(pb.DesktopsRequest(nodes=["pc02"], reason="slurm resume"))
    assert not reply.results[0].ok and "picked their own OS" in reply.results[0].message


def _state(night: Night, node: str, state: str) -> object:
    async def check() -> bool:
        return (await night.status())[node].state == state

    return check


async def test_the_ees_order_script_powers_off_when_told(night: Night, tmp_path: Path) -> None:
    """The script the agent leaves in a desktop's /run, run by busybox: it asks the relay until
    told, then runs the action (here a stand-in command instead of poweroff)."""
    busybox = initrd_busybox()
    night.now[0] = paris(8, 20, 0, 1)
    await night.until("the window's wake", lambda: len(night.woken) == 3)
    await night.boot("pc01", "d1", "plan", "switch_root", "up")
    root = tmp_path / "newroot"
    (root / "sbin").mkdir(parents=True)
    (root / "sbin" / "init").write_text("#!/bin/sh\n")
    written = report_up.install(
        root, node="pc01", boot_id="d1", environment="night", init="/sbin/init", nfs=False,
        relays=[night.relay_url], busybox=Path(busybox), desktop=True, nics={"eth9": MACS["pc01"]},
    )  # fmt: skip
    assert "/run/slim/orders" in written and "/run/systemd/network/10-slim-wol.link" in written
    assert "WakeOnLan=magic" in (root / "run/systemd/network/10-slim-wol.link").read_text()
    night.now[0] = paris(9, 7, 0, 1)  # the window is over
    await night.until("pc01 told to go back", _state(night, "pc01", "returning"))
    done = tmp_path / "done"
    (tmp_path / "act").write_text(f'#!/bin/sh\necho "$1" > {done}\n')
    (tmp_path / "act").chmod(0o755)
    proc = await asyncio.create_subprocess_exec(
        busybox, "sh", str(root / "run/slim/orders"), str(tmp_path / "act"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    assert "told to poweroff" in out.decode() and done.read_text() == "poweroff\n"


async def test_a_restarted_core_remembers_the_night(night: Night, tmp_path: Path) -> None:
    """Whom SLIM woke and who is out of the pool survive a restart of the core mid-window (the
    state database): the restarted core does not wake the pool again, and keeps pc03 out."""
    night.now[0] = paris(8, 20, 0, 1)
    await night.until("the window's wake", lambda: len(night.woken) == 3)
    await night.admin.ReleaseDesktops(pb.DesktopsRequest(nodes=["pc03"], reason="test"))

    async def saved() -> bool:
        records = await asyncio.to_thread(night.service.state.harvest_records)
        return '"out_reason": "test by' in records.get("desktop:pc03", "")  # the release's reason, saved

    await night.until("the records saved", saved)
    socket = night.server.listen
    await night.server.stop(grace=1)
    night.server = CoreServer(night.service, socket)
    ordered: list[tuple[str, list[tuple[str, str]], int]] = []
    wake = night.server.hub.wake

    def counted(relay: str, targets: list[tuple[str, str]], per_minute: int) -> bool:
        ordered.append((relay, targets, per_minute))
        return wake(relay, targets, per_minute)

    night.server.hub.wake = counted  # type: ignore[method-assign]
    await night.server.start()
    assert (await night.status())["pc01"].state == "waking"  # it knows it woke them
    # past the wake timeout: the restarted core's ticks find pc01, pc02 in use, pc03 still out
    night.now[0] = paris(8, 20, 11)
    await night.until("a tick of the restarted core", lambda: night.server.harvest.last_tick == night.now[0])
    await night.until("pc02 in use", _state(night, "pc02", "in-use"))
    status = await night.status()
    assert status["pc03"].state == "own-os" and "test by" in status["pc03"].reason, status["pc03"]
    assert night.server.harvest.menu_default("pc03", night.now[0]) is not None  # its own OS tonight
    assert ordered == [] and len(night.woken) == 3  # nobody woken twice
    again = Harvest(night.service, lambda *a: True, lambda *a: None, lambda: ["r1"])
    again.load({"desktop:pc09": "{not json", "pool:room101": '{"unknown": 1}'})  # dropped, said


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"not json", 400, "must be JSON"),
        (b'{"boot_id": "ab", "extra": 1}', 400, "a JSON object with boot_id"),
        (b'{"boot_id": "../x"}', 400, "boot_id must name the running boot"),
        (b'{"boot_id": "ab", "token": "t0k3n-that-is-long-enough-0123456789abcdef"}', 400, "over HTTPS only"),
        (b'{"boot_id": "ab", "boot_key": "not/a key"}', 400, "boot_key must be the boot's key"),
    ],
)
async def test_bad_order_requests_are_refused_by_name(
    night: Night, body: bytes, status: int, says: str
) -> None:
    async with night.http.post(f"{night.relay_url}v1/nodes/pc01/order", data=body) as r:
        assert r.status == status and says in (await r.json())["error"], await r.text()
    async with night.http.post(f"{night.relay_url}v1/nodes/pc99/order", data=b'{"boot_id": "ab"}') as r:
        assert r.status == 404 and "pc99" in (await r.json())["error"]


async def test_only_the_address_that_got_the_menu_may_say_it_went_local(night: Night) -> None:
    async with night.http.get(f"{night.relay_url}boot/local") as r:
        assert r.status == 400 and "?boot=" in (await r.json())["error"]
    async with night.http.get(f"{night.relay_url}boot/local?boot=abcdef0123456789") as r:
        assert r.status == 404 and "sent no menu of boot" in (await r.json())["error"]
    # a boot that ran the agent did not go to the local disk, whatever a stray request says
    night.now[0] = paris(8, 21, 0)
    await night.until("the window's wake", lambda: len(night.woken) == 3)
    b1 = (await night.script("pc01")).split("slim.boot=")[1].split()[0]
    await night.boot("pc01", b1, "plan", "switch_root", "up")
    async with night.http.get(f"{night.relay_url}boot/local?boot={b1}") as r:
        assert r.status == 200  # the relay sent that menu to this address: it records it
    await asyncio.sleep(0)  # (the relay's batch goes on its own task; the check below polls)
    await night.until("pc01 idle, not opted out", _state(night, "pc01", "idle"))
    status = await night.status()
    assert status["pc01"].state == "idle", status["pc01"]


async def test_bad_harvest_status_requests(night: Night) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await night.admin.HarvestStatus(pb.HarvestStatusRequest(pool="room999"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "room101" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await night.admin.HarvestStatus(pb.HarvestStatusRequest(horizon_seconds=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await night.admin.HarvestStatus(pb.HarvestStatusRequest(pool="p" * 10_000))
    assert len(caught.value.details() or "") < 200  # named, not echoed whole
    reply = await night.admin.ReleaseDesktops(pb.DesktopsRequest(nodes=["n" * 10_000, "pc77"]))
    assert [(r.ok, len(r.node) <= 80, len(r.message) < 200) for r in reply.results] == [
        (False, True, True)
    ] * 2
    assert "too long" in reply.results[0].message and "pc77" in reply.results[1].message


def _harvest(
    registry_text: str, tmp_path: Path, now: list[float], sent: list[list[str]], ok: list[bool]
) -> Harvest:
    registry = load_registry_text(registry_text)
    store = Store(tmp_path / "store")
    publish_placeholder_releases(registry, store)
    service = CoreService(registry, State(tmp_path / "state.db"), store, clock=lambda: now[0])

    def send(relay: str, targets: list[tuple[str, str]], per_minute: int) -> bool:
        sent.append(sorted(n for n, _ in targets))
        return ok.pop(0) if ok else True

    return Harvest(service, send, lambda env, nodes: None, lambda: ["r1"])


def _registry(partition: str = "") -> str:
    nodes = "\n".join(
        f'  {n}: {{macs: ["{m}"], profile: pc, environment: night, groups: [room101], site: lab}}'
        for n, m in MACS.items()
    )
    text = REGISTRY.format(nodes=nodes, rate=RATE)
    return text + (f"    partition: {partition}\n" if partition else "")


def test_a_wake_that_could_not_go_out_is_tried_again(tmp_path: Path) -> None:
    now, sent = [paris(8, 20, 0, 1)], list[list[str]]()
    harvest = _harvest(_registry(), tmp_path, now, sent, ok=[False])  # the relay's stream just closed
    harvest.tick({})
    assert sent == [["pc01", "pc02", "pc03"]]
    now[0] += 1
    harvest.tick({})  # again, as the packets never left
    assert sent == [["pc01", "pc02", "pc03"]] * 2
    now[0] += 1
    harvest.tick({})  # sent: not again (they are waking, or in use)
    assert len(sent) == 2


def test_with_a_slurm_partition_the_core_leaves_the_windows_edges_to_slurm(tmp_path: Path) -> None:
    now, sent = [paris(8, 20, 0, 1)], list[list[str]]()
    harvest = _harvest(_registry("desktops"), tmp_path, now, sent, ok=[])
    up = BootStatus("b1", "night", "up", "up", "", now[0], now[0], now[0])
    harvest.tick({"pc01": up})
    assert sent == []  # Slurm's ResumeProgram wakes them
    now[0] = paris(9, 6, 50)  # end - grace
    harvest.tick({"pc01": up})
    assert harvest.order_for("pc01", "b1")[0] == ""  # Slurm's POWER_DOWN sends it back
    now[0] = paris(9, 7, 0, 1)  # the window is over: whatever is still in the EE goes back
    harvest.order_for("pc01", "b1")  # (its EE asks every order_poll: it is still there)
    harvest.tick({"pc01": up})
    assert harvest.order_for("pc01", "b1")[0] == "reboot"


def test_a_desktop_whose_ee_stops_asking_is_back_with_its_owner(tmp_path: Path) -> None:
    """Powered off or reset mid-night (its owner took it): its EE no longer asks for orders;
    after three polls and 30 s it is in its own OS, and no longer counted in the EE."""
    now, sent = [paris(8, 20, 0, 1)], list[list[str]]()
    harvest = _harvest(_registry(), tmp_path, now, sent, ok=[])
    up = BootStatus("b1", "night", "up", "up", "", now[0], now[0], now[0])
    harvest.tick({"pc01": up})
    harvest.order_for("pc01", "b1")
    now[0] += 30
    harvest.tick({"pc01": up})
    view = {d.node: d for d in harvest.status("room101", {"pc01": up})[0].desktops}
    assert view["pc01"].state == "idle"
    now[0] += 61
    harvest.tick({"pc01": up})
    view = {d.node: d for d in harvest.status("room101", {"pc01": up})[0].desktops}
    assert view["pc01"].state == "own-os" and "stopped asking" in view["pc01"].reason
    hours = harvest.status("room101", {"pc01": up})[0].node_hours_ee
    now[0] += 3600
    harvest.tick({"pc01": up})
    assert harvest.status("room101", {"pc01": up})[0].node_hours_ee == hours
