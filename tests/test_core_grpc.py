"""Loopback tests: the real gRPC core on 127.0.0.1 port 0; every RPC and its error statuses."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator, Awaitable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest

from labs.placeholders import publish_placeholder_releases
from slim.core.control.service import CoreService
from slim.core.store import Store
from slim.errors import NotFound, Unavailable
from slim.rpc import ERROR_KEY, AsyncCoreClient
from slim.signing import verify
from slim.v1 import core_pb2 as pb
from tests.support import TEST_REGISTRY, Core, admin_credentials, relay_credentials, reload_registry

ROOM = "10.1.4.4"


async def expect_status(call: Awaitable[Any], code: grpc.StatusCode, *words: str) -> str:
    """Await ``call``; assert it fails with ``code`` and a message containing ``words``."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    for w in words:
        assert w in details, details
    return details


async def beats(*hbs: pb.Heartbeat) -> AsyncIterator[pb.Heartbeat]:
    for hb in hbs:
        yield hb


async def events(evs: Iterable[pb.BootEvent]) -> AsyncIterator[pb.BootEvent]:
    for e in evs:
        yield e


async def heartbeat(c: Core, relay: str, load: float = 0.0, healthy: bool = True) -> list[pb.HeartbeatReply]:
    call = c.core.RelayHeartbeat(beats(pb.Heartbeat(relay=relay, load=load, healthy=healthy)))
    return [r async for r in call]


def by_name(name: str) -> pb.NodeRef:
    return pb.NodeRef(name=name)


# -- Locate ------------------------------------------------------------------------
async def test_locate_by_name_and_mac(core: Core) -> None:
    await heartbeat(core, "room-1", load=5)
    await heartbeat(core, "room-2", load=1)
    resp = await core.core.Locate(pb.LocateRequest(node=by_name("n1"), origin=ROOM))
    assert resp.node == "n1"
    assert resp.site == "room"
    names = [r.name for r in resp.relays]
    assert names[:2] == ["room-2", "room-1"]  # lower load first
    assert resp.relays[0].tier == pb.RELAY_TIER_SITE
    assert names[2] == "hub" and resp.relays[2].tier == pb.RELAY_TIER_PARENT
    assert resp.relays[3].tier == pb.RELAY_TIER_OTHER
    by_mac = await core.core.Locate(
        pb.LocateRequest(node=pb.NodeRef(mac="52-54-00-00-00-22"), origin="10.2.0.9")
    )
    assert by_mac.node == "n2" and by_mac.site == "lab"


async def test_locate_ipv6_origin(core: Core) -> None:
    resp = await core.core.Locate(pb.LocateRequest(node=by_name("n2"), origin="fd00:1::42"))
    assert resp.site == "room"


async def test_locate_errors(core: Core) -> None:
    loc = core.core.Locate
    nf = grpc.StatusCode.NOT_FOUND
    bad = grpc.StatusCode.INVALID_ARGUMENT
    await expect_status(loc(pb.LocateRequest(node=by_name("nosuch"), origin=ROOM)), nf, "nosuch")
    await expect_status(
        loc(pb.LocateRequest(node=pb.NodeRef(mac="52:54:00:99:99:99"), origin=ROOM)), nf, "MAC"
    )
    await expect_status(loc(pb.LocateRequest(node=pb.NodeRef(mac="zz:zz"), origin=ROOM)), bad, "MAC")
    await expect_status(loc(pb.LocateRequest(origin=ROOM)), bad, "node")
    await expect_status(loc(pb.LocateRequest(node=by_name("n1"), origin="10.1.999.1")), bad, "origin")
    await expect_status(loc(pb.LocateRequest(node=by_name("n1"))), bad, "origin")


async def test_locate_unavailable_when_no_relay_is_live(core: Core, service: CoreService) -> None:
    for relay in ("hub", "room-1", "room-2", "lab-1"):
        await heartbeat(core, relay, healthy=False)
    await expect_status(
        core.core.Locate(pb.LocateRequest(node=by_name("n1"), origin=ROOM)),
        grpc.StatusCode.UNAVAILABLE,
        "no relay",
    )


# -- GetBootPlan -------------------------------------------------------------------
async def test_boot_plan(core: Core, store: Store) -> None:
    plan = await core.core.GetBootPlan(pb.GetBootPlanRequest(node=by_name("n1"), origin=ROOM))
    assert plan.node == "n1" and plan.environment == "base" and plan.reason == "default"
    assert plan.release_digest.startswith("sha256:")
    assert plan.kernel.digest.startswith("sha256:") and plan.kernel.size > 0
    assert list(plan.modules) == ["virtio_pci", "virtio_net"]
    assert plan.disk == "/dev/vda2"
    dirs = {d.path: d for d in plan.directories}
    assert set(dirs) == {"/", "/tmp", "/usr"}
    assert dirs["/"].policy == pb.POLICY_RAM and dirs["/"].archive.digest.startswith("sha256:")
    assert dirs["/tmp"].tmpfs_size == "256m"
    usr = dirs["/usr"]
    assert usr.policy == pb.POLICY_NFS
    built = store.release("base")
    assert built is not None
    tree = built[1].directories["/usr"].manifest
    assert tree is not None  # the export is named by the tree's content
    assert (usr.nfs.server, usr.nfs.export) == ("10.1.0.1", f"/slim/{tree.digest[7:]}")
    assert usr.nfs.options == "ro,nolock,noatime,actimeo=600,proto=tcp"
    for arg in (
        "slim.node=n1",
        "slim.env=base",
        f"slim.release={plan.release_digest}",
        "console=ttyS0",
        "quiet",
    ):
        assert arg in plan.kernel_args.split()
    assert plan.relays[0].site == "room"
    # what the agent acts on: the same plan as a document the core signed, for this request
    signed = await core.core.GetBootPlan(pb.GetBootPlanRequest(node=by_name("n1"), origin=ROOM, nonce="ab12"))
    signer = core.server.service.signer
    assert signer is not None
    assert verify(signed.document, signed.signature, [signer.public], "plan") == signer.public
    doc = json.loads(signed.document)
    assert (doc["node"], doc["nonce"], doc["release_digest"]) == ("n1", "ab12", plan.release_digest)
    assert doc["expires_at"] - doc["issued_at"] == 300
    assert [d["path"] for d in doc["directories"]] == [d.path for d in plan.directories]


async def test_boot_plan_follows_next_boot_and_sync(core: Core) -> None:
    await core.admin.SetNextBoot(pb.SetNextBootRequest(node="n1", environment="ee:jdk14", set_by="test"))
    plan = await core.core.GetBootPlan(pb.GetBootPlanRequest(node=by_name("n1"), origin=ROOM))
    assert (plan.environment, plan.reason) == ("jdk14", "next-boot")
    dirs = {d.path: d for d in plan.directories}
    assert dirs["/"].policy == pb.POLICY_SYNC and dirs["/"].manifest.digest.startswith("sha256:")
    assert dirs["/var"].policy == pb.POLICY_DISK and dirs["/var"].archive.size > 0
    assert dirs["/usr"].nfs.options == "ro,nolock,actimeo=900,proto=tcp"


async def test_boot_plan_errors(core: Core) -> None:
    plan = core.core.GetBootPlan
    await expect_status(
        plan(pb.GetBootPlanRequest(node=by_name("n3"), origin=ROOM)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "unbuilt",
        "slim ee build",
    )
    await expect_status(
        plan(pb.GetBootPlanRequest(node=by_name("nosuch"), origin=ROOM)), grpc.StatusCode.NOT_FOUND
    )
    await expect_status(
        plan(pb.GetBootPlanRequest(node=by_name("n1"), origin="nonsense")), grpc.StatusCode.INVALID_ARGUMENT
    )
    await expect_status(
        plan(pb.GetBootPlanRequest(node=by_name("n1"), origin=ROOM, nonce="not hex")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "nonce",
    )


# -- GetBootScript -----------------------------------------------------------------
async def test_boot_script_ipxe_and_pxelinux(core: Core) -> None:
    req = pb.GetBootScriptRequest(mac="52:54:00:00:00:01", origin=ROOM)
    s = await core.core.GetBootScript(req)
    assert s.node == "n1" and s.default_environment == "base"
    assert s.script.startswith("#!ipxe\n")
    assert "choose --default ee-base --timeout 3000" in s.script
    assert "item ee-jdk14" in s.script
    assert "# not built yet, so not offered: unbuilt" in s.script
    req.format = pb.SCRIPT_FORMAT_PXELINUX
    p = await core.core.GetBootScript(req)
    assert "DEFAULT ee-base" in p.script and "LOCALBOOT 0" in p.script


async def test_boot_script_errors(core: Core) -> None:
    gs = core.core.GetBootScript
    await expect_status(
        gs(pb.GetBootScriptRequest(mac="52:54:00:aa:aa:aa", origin=ROOM)), grpc.StatusCode.NOT_FOUND
    )
    await expect_status(
        gs(pb.GetBootScriptRequest(mac="52:54:00:00:00:01", origin=ROOM, format=99)),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
        "format",
    )
    await expect_status(
        gs(pb.GetBootScriptRequest(mac="52:54:00:00:00:03", origin=ROOM)), grpc.StatusCode.FAILED_PRECONDITION
    )


# -- SetNextBoot -------------------------------------------------------------------
async def test_set_next_boot(core: Core) -> None:
    info = await core.admin.SetNextBoot(pb.SetNextBootRequest(node="n1", environment="jdk14", set_by="alice"))
    assert info.next_environment == "jdk14"
    # "set by" is who the credential says, not what the client wrote
    assert info.next_boot.environment == "jdk14" and info.next_boot.set_by == "admin:tester"
    assert info.next_boot.set_at.seconds > 0
    info = await core.admin.SetNextBoot(pb.SetNextBootRequest(node="n1", environment="ee=base"))
    assert info.next_environment == "base"
    cleared = await core.admin.SetNextBoot(pb.SetNextBootRequest(node="n1", environment=""))
    assert not cleared.HasField("next_boot") and cleared.next_environment == "base"


async def test_set_next_boot_errors(core: Core) -> None:
    snb = core.admin.SetNextBoot
    await expect_status(
        snb(pb.SetNextBootRequest(node="n1", environment="nosuch")), grpc.StatusCode.NOT_FOUND, "known: base"
    )
    await expect_status(
        snb(pb.SetNextBootRequest(node="zz", environment="base")), grpc.StatusCode.NOT_FOUND, "zz"
    )
    await expect_status(snb(pb.SetNextBootRequest(environment="base")), grpc.StatusCode.INVALID_ARGUMENT)
    # jdk14 copies to disk; n2 has no disk partition
    await expect_status(
        snb(pb.SetNextBootRequest(node="n2", environment="jdk14")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "disk",
    )


# -- ReportBootEvents / ListBootEvents ---------------------------------------------
async def test_report_and_list_boot_events(core: Core) -> None:
    stages = ["dhcp", "plan", "fetch:/", "mount:/usr", "switch_root"]
    sent = []
    for i, stage in enumerate(stages):
        ev = pb.BootEvent(node="n1", boot_id="b1", stage=stage, relay="room-1", bytes=i * 100, ok=True)
        ev.time.FromSeconds(1_700_000_000 + i)
        sent.append(ev)
    resp = await core.core.ReportBootEvents(events(sent))
    assert resp.accepted == len(stages)
    listed = await core.admin.ListBootEvents(pb.ListBootEventsRequest(node="n1"))
    assert [e.stage for e in listed.events] == stages[::-1]
    assert listed.events[0].time.seconds == 1_700_000_004
    assert listed.events[0].bytes == 400
    limited = await core.admin.ListBootEvents(pb.ListBootEventsRequest(limit=2))
    assert len(limited.events) == 2
    node = await core.admin.GetNode(pb.GetNodeRequest(node=by_name("n1")))
    assert node.last_event.stage == "switch_root"
    # switch_root done: the environment's init runs, but only the environment says it is up
    assert (node.boot.boot_id, node.boot.state, node.boot.stage) == ("b1", "starting", "switch_root")
    assert node.boot.since.seconds > 1_700_000_004  # the core's clock, not the event's
    up = pb.BootEvent(stage="up", boot_id="b1", ok=True, environment="base", message="multi-user.target")
    await core.core.ReportBootEvents(events([up]))  # no node: the boot id names it; no time: now
    node = await core.admin.GetNode(pb.GetNodeRequest(node=by_name("n1")))
    assert (node.boot.state, node.boot.environment, node.boot.message) == ("up", "base", "multi-user.target")
    whole = await core.admin.ListBootEvents(pb.ListBootEventsRequest(node="n1", boot_id="latest"))
    assert [e.stage for e in whole.events] == [*stages, "up"]  # oldest first
    # a relay's record of a boot no event names yet (another relay sent the script) waits
    # for the event that names its node, then joins it; it costs the batch nothing
    early = pb.BootEvent(stage="kernel", boot_id="b9", bytes=5)
    kept = pb.BootEvent(stage="kernel", boot_id="b1", bytes=5)
    assert (await core.core.ReportBootEvents(events([early, kept]))).accepted == 2
    assert not (await core.admin.ListBootEvents(pb.ListBootEventsRequest(boot_id="b9"))).events
    script = pb.BootEvent(node="n1", stage="script", boot_id="b9", environment="base")
    await core.core.ReportBootEvents(events([script]))
    b9 = await core.admin.ListBootEvents(pb.ListBootEventsRequest(boot_id="b9"))
    assert sorted((e.node, e.stage) for e in b9.events) == [("n1", "kernel"), ("n1", "script")]
    bad = pb.BootEvent(
        node="n1", boot_id="b2", stage="ram:/", ok=False, message="no space", environment="jdk14"
    )
    bad.time.FromSeconds(1_700_000_020)
    await core.core.ReportBootEvents(events([bad]))
    listed_nodes = await core.admin.ListNodes(pb.ListNodesRequest())
    n1 = next(n for n in listed_nodes.nodes if n.name == "n1")
    assert (n1.boot.state, n1.boot.stage, n1.boot.message, n1.boot.environment) == (
        "failed",
        "ram:/",
        "no space",
        "jdk14",
    )


async def test_boot_event_errors(core: Core) -> None:
    await expect_status(
        core.core.ReportBootEvents(events([pb.BootEvent(node="ghost", stage="dhcp")])),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_status(
        core.core.ReportBootEvents(events([pb.BootEvent(node="n1", stage="")])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    # a stream with an error writes nothing, even its valid events
    mixed = [pb.BootEvent(node="n1", stage="dhcp"), pb.BootEvent(node="ghost", stage="dhcp")]
    await expect_status(core.core.ReportBootEvents(events(mixed)), grpc.StatusCode.NOT_FOUND)
    assert not (await core.admin.ListBootEvents(pb.ListBootEventsRequest())).events
    lbe = core.admin.ListBootEvents
    await expect_status(lbe(pb.ListBootEventsRequest(node="ghost")), grpc.StatusCode.NOT_FOUND)
    await expect_status(
        lbe(pb.ListBootEventsRequest(limit=10_001)), grpc.StatusCode.INVALID_ARGUMENT, "limit"
    )


# -- RelayHeartbeat / ListRelays ---------------------------------------------------
async def test_heartbeat_stream_and_list_relays(core: Core) -> None:
    call = core.core.RelayHeartbeat(
        beats(
            pb.Heartbeat(
                relay="room-1", load=2, active_transfers=2, egress_bytes_per_second=1e6, healthy=True
            ),
            pb.Heartbeat(relay="room-1", load=3, active_transfers=3, cache_bytes=12345, healthy=True),
        )
    )
    replies = [r async for r in call]
    assert [r.interval_ms for r in replies] == [2000, 2000]
    relays = {r.name: r for r in (await core.admin.ListRelays(pb.ListRelaysRequest())).relays}
    assert relays["room-1"].status == "live"
    assert relays["room-1"].last_heartbeat.load == 3
    assert relays["room-1"].last_heartbeat.cache_bytes == 12345
    assert relays["room-1"].last_seen.seconds > 0
    assert relays["room-2"].status == "unknown"
    await heartbeat(core, "room-2", healthy=False)
    relays = {r.name: r for r in (await core.admin.ListRelays(pb.ListRelaysRequest())).relays}
    assert relays["room-2"].status == "unhealthy"


async def test_heartbeat_errors(core: Core) -> None:
    async def drain(*hbs: pb.Heartbeat) -> None:
        async for _ in core.core.RelayHeartbeat(beats(*hbs)):
            pass

    await expect_status(
        drain(pb.Heartbeat(relay="nosuch", healthy=True)), grpc.StatusCode.NOT_FOUND, "nosuch"
    )
    await expect_status(
        drain(pb.Heartbeat(relay="room-1", healthy=True), pb.Heartbeat(relay="room-2", healthy=True)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "one relay",
    )
    await expect_status(
        drain(pb.Heartbeat(relay="room-1", load=-1, healthy=True)), grpc.StatusCode.INVALID_ARGUMENT, "load"
    )
    await expect_status(
        drain(pb.Heartbeat(relay="room-1", load=float("nan"), healthy=True)), grpc.StatusCode.INVALID_ARGUMENT
    )


# -- admin reads -------------------------------------------------------------------
async def test_environments(core: Core) -> None:
    envs = {e.name: e for e in (await core.admin.ListEnvironments(pb.ListEnvironmentsRequest())).environments}
    assert set(envs) == {"base", "jdk14", "unbuilt"}
    assert envs["jdk14"].feature == "ee:jdk14"
    assert envs["unbuilt"].release_digest == ""
    assert envs["base"].release_digest.startswith("sha256:")
    one = await core.admin.GetEnvironment(pb.GetEnvironmentRequest(name="base"))
    assert [(d.path, d.policy) for d in one.directories] == [
        ("/", pb.POLICY_RAM),
        ("/tmp", pb.POLICY_RAM),
        ("/usr", pb.POLICY_NFS),
    ]
    await expect_status(
        core.admin.GetEnvironment(pb.GetEnvironmentRequest(name="zz")), grpc.StatusCode.NOT_FOUND
    )


async def test_nodes(core: Core) -> None:
    nodes = (await core.admin.ListNodes(pb.ListNodesRequest())).nodes
    assert [n.name for n in nodes] == ["n1", "n2", "n3"]
    rack2 = (await core.admin.ListNodes(pb.ListNodesRequest(group="rack2"))).nodes
    assert [n.name for n in rack2] == ["n2"]
    n2 = await core.admin.GetNode(pb.GetNodeRequest(node=pb.NodeRef(mac="52:54:00:00:00:22")))
    assert n2.name == "n2" and list(n2.macs) == ["52:54:00:00:00:02", "52:54:00:00:00:22"]
    assert not n2.HasField("last_event")
    await expect_status(core.admin.GetNode(pb.GetNodeRequest(node=by_name("zz"))), grpc.StatusCode.NOT_FOUND)
    await expect_status(core.admin.GetNode(pb.GetNodeRequest()), grpc.StatusCode.INVALID_ARGUMENT)


async def test_unexpected_error_is_internal_and_core_keeps_serving(
    core: Core, service: CoreService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(service, "locate", boom)
    details = await expect_status(
        core.core.Locate(pb.LocateRequest(node=by_name("n1"), origin=ROOM)),
        grpc.StatusCode.INTERNAL,
        "Locate",
    )
    assert "secret detail" not in details
    monkeypatch.undo()
    resp = await core.core.Locate(pb.LocateRequest(node=by_name("n1"), origin=ROOM))
    assert resp.node == "n1"


# -- graceful stop -----------------------------------------------------------------
async def test_stop_finishes_in_flight_calls_within_grace(core: Core) -> None:
    """A call in flight when stop begins goes on until it ends; new calls are refused."""
    queue: asyncio.Queue[pb.Heartbeat | None] = asyncio.Queue()

    async def from_queue() -> AsyncIterator[pb.Heartbeat]:
        while (hb := await queue.get()) is not None:
            yield hb

    call = core.core.RelayHeartbeat(from_queue())
    await queue.put(pb.Heartbeat(relay="room-1", load=1, healthy=True))
    assert isinstance(await call.read(), pb.HeartbeatReply)  # the server is in the call
    stopping = asyncio.ensure_future(core.server.stop(grace=30))
    # wait (bounded) until the server refuses new calls: shutdown has begun
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    refused: grpc.StatusCode | None = None
    while refused is None:
        try:
            await core.admin.ListRelays(pb.ListRelaysRequest(), timeout=2)
        except grpc.aio.AioRpcError as exc:
            refused = exc.code()
        else:
            assert loop.time() < deadline, "the server kept accepting new calls after stop()"
            await asyncio.sleep(0.01)
    assert refused in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    # the in-flight call still works, and ends cleanly
    await queue.put(pb.Heartbeat(relay="room-1", load=2, healthy=True))
    assert isinstance(await asyncio.wait_for(call.read(), 10), pb.HeartbeatReply)
    await queue.put(None)
    assert await asyncio.wait_for(call.code(), 10) == grpc.StatusCode.OK
    assert core.server.service.list_relays()[2].beat is not None
    await asyncio.wait_for(stopping, 25)  # returns long before the 30 s grace


async def test_stop_cancels_calls_that_outlive_grace(core: Core) -> None:
    forever = asyncio.Event()

    async def endless() -> AsyncIterator[pb.Heartbeat]:
        yield pb.Heartbeat(relay="room-1", healthy=True)
        await forever.wait()
        yield pb.Heartbeat(relay="room-1", healthy=True)  # pragma: no cover

    call = core.core.RelayHeartbeat(endless())
    first = await call.read()
    assert isinstance(first, pb.HeartbeatReply)
    await asyncio.wait_for(core.server.stop(grace=0.2), 10)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call.read(), 10)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    forever.set()


# -- statuses found in review ------------------------------------------------------
async def test_event_times_out_of_range_are_refused_and_reads_keep_working(core: Core) -> None:
    bad = pb.BootEvent(node="n1", stage="dhcp")
    bad.time.seconds = 10**12
    await expect_status(core.core.ReportBootEvents(events([bad])), grpc.StatusCode.INVALID_ARGUMENT, "9999")
    negative = pb.BootEvent(node="n1", stage="dhcp")
    negative.time.seconds = -5
    await expect_status(core.core.ReportBootEvents(events([negative])), grpc.StatusCode.INVALID_ARGUMENT)
    assert (await core.admin.ListNodes(pb.ListNodesRequest())).nodes


async def test_too_many_events_in_one_stream(core: Core) -> None:
    many = (pb.BootEvent(node="n1", stage="dhcp") for _ in range(10_001))
    await expect_status(core.core.ReportBootEvents(events(many)), grpc.StatusCode.INVALID_ARGUMENT, "10000")
    assert not (await core.admin.ListBootEvents(pb.ListBootEventsRequest())).events


async def test_empty_names_are_invalid_arguments(core: Core) -> None:
    async def drain() -> None:
        async for _ in core.core.RelayHeartbeat(beats(pb.Heartbeat(relay="", healthy=True))):
            pass

    await expect_status(drain(), grpc.StatusCode.INVALID_ARGUMENT, "relay")
    await expect_status(
        core.admin.GetEnvironment(pb.GetEnvironmentRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )


async def test_boot_script_argument_errors_and_unavailable(core: Core) -> None:
    gs = core.core.GetBootScript
    await expect_status(
        gs(pb.GetBootScriptRequest(mac="nonsense", origin=ROOM)), grpc.StatusCode.INVALID_ARGUMENT
    )
    await expect_status(
        gs(pb.GetBootScriptRequest(mac="52:54:00:00:00:01")), grpc.StatusCode.INVALID_ARGUMENT
    )
    for relay in ("hub", "room-1", "room-2", "lab-1"):
        await heartbeat(core, relay, healthy=False)
    await expect_status(
        gs(pb.GetBootScriptRequest(mac="52:54:00:00:00:01", origin=ROOM)), grpc.StatusCode.UNAVAILABLE
    )
    await expect_status(
        core.core.GetBootPlan(pb.GetBootPlanRequest(node=by_name("n1"), origin=ROOM)),
        grpc.StatusCode.UNAVAILABLE,
    )


async def test_set_next_boot_refuses_an_unbuilt_environment(core: Core) -> None:
    await expect_status(
        core.admin.SetNextBoot(pb.SetNextBootRequest(node="n1", environment="unbuilt")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "slim ee build unbuilt",
    )
    node = await core.admin.GetNode(pb.GetNodeRequest(node=by_name("n1")))
    assert not node.HasField("next_boot")


async def test_plan_without_disk_after_the_registry_changed(
    core: Core, service: CoreService, registry_file: Path
) -> None:
    await core.admin.SetNextBoot(pb.SetNextBootRequest(node="n1", environment="jdk14"))
    registry_file.write_text(TEST_REGISTRY.replace("    disk: /dev/vda2\n", ""))
    await reload_registry(service)
    await expect_status(
        core.core.GetBootPlan(pb.GetBootPlanRequest(node=by_name("n1"), origin=ROOM)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no 'disk'",
    )


async def test_plan_with_nfs_but_no_nfs_server(core: Core, service: CoreService, registry_file: Path) -> None:
    registry_file.write_text(TEST_REGISTRY.replace("  nfs_server: 10.9.0.1\n", ""))
    await reload_registry(service)
    await expect_status(
        core.core.GetBootPlan(pb.GetBootPlanRequest(node=by_name("n2"), origin="10.2.0.7")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no NFS server",
    )
    # the room site names its own server
    plan = await core.core.GetBootPlan(pb.GetBootPlanRequest(node=by_name("n1"), origin=ROOM))
    assert {d.nfs.server for d in plan.directories if d.policy == pb.POLICY_NFS} == {"10.1.0.1"}


async def test_plan_when_the_release_lacks_a_directory(core: Core, store: Store) -> None:
    found = store.release("base")
    assert found is not None
    _, release = found
    dirs = {k: v for k, v in release.directories.items() if k != "/tmp"}
    store.publish_release(release.model_copy(update={"directories": dirs}))
    await expect_status(
        core.core.GetBootPlan(pb.GetBootPlanRequest(node=by_name("n1"), origin=ROOM)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "no archive for /tmp",
    )


async def test_plan_when_the_release_document_is_missing(core: Core, store: Store) -> None:
    digest = store.release_digest("base")
    assert digest is not None
    store.object_path(digest).unlink()
    await expect_status(
        core.core.GetBootPlan(pb.GetBootPlanRequest(node=by_name("n1"), origin=ROOM)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "cannot be read",
    )


# -- redirection over the wire -----------------------------------------------------
SPREAD_REGISTRY = """\
sites:
  s: {prefixes: [10.0.0.0/8]}
relays:
  r1: {urls: [http://10.0.0.1/], site: s}
  r2: {urls: [http://10.0.0.2/], site: s}
  r3: {urls: [http://10.0.0.3/], site: s}
  r4: {urls: [http://10.0.0.4/], site: s}
profiles:
  p: {}
environments:
  e: {image: /srv/e}
nodes:
"""


@pytest.fixture
def spread_registry(registry_file: Path) -> Path:
    nodes = "".join(
        f'  m{i:04d}: {{macs: ["52:54:00:01:{i >> 8:02x}:{i & 255:02x}"], profile: p, environment: e}}\n'
        for i in range(1000)
    )
    registry_file.write_text(SPREAD_REGISTRY + nodes)
    return registry_file


async def test_a_thousand_locates_spread_over_four_equal_relays(
    core: Core, service: CoreService, spread_registry: Path
) -> None:
    await reload_registry(service)
    for relay in ("r1", "r2", "r3", "r4"):
        await heartbeat(core, relay, load=2)
    answers = await asyncio.gather(
        *(
            core.core.Locate(pb.LocateRequest(node=by_name(f"m{i:04d}"), origin=f"10.0.{i >> 8}.{i & 255}"))
            for i in range(1000)
        )
    )
    firsts = collections.Counter(a.relays[0].name for a in answers)
    assert set(firsts) == {"r1", "r2", "r3", "r4"}
    for relay, count in firsts.items():
        assert 200 <= count <= 300, (relay, firsts)
    # counting each answer makes it even, not merely random: ties alone would
    # scatter the counts by about +-14
    assert max(firsts.values()) - min(firsts.values()) <= 2, firsts


async def test_one_boot_keeps_its_relay_and_counts_once(
    core: Core, service: CoreService, spread_registry: Path, store: Store
) -> None:
    publish_placeholder_releases(await reload_registry(service), store)
    for relay in ("r1", "r2", "r3", "r4"):
        await heartbeat(core, relay, load=2)
    ref = by_name("m0001")
    script = await core.core.GetBootScript(
        pb.GetBootScriptRequest(mac="52:54:00:01:00:01", origin="10.0.0.9")
    )
    chosen = script.script.split("slim.relays=")[1].split(",")[0]
    plan = await core.core.GetBootPlan(pb.GetBootPlanRequest(node=ref, origin="10.0.0.9"))
    located = await core.core.Locate(pb.LocateRequest(node=ref, origin="10.0.0.9"))
    assert plan.relays[0].urls[0] == chosen == located.relays[0].urls[0]
    # counted once: another node sees that relay one node busier, the others not at all
    other = await core.core.Locate(pb.LocateRequest(node=by_name("m0002"), origin="10.0.0.10", peek=True))
    scores = {r.urls[0]: r.score for r in other.relays}
    assert scores.pop(chosen) == 3.0
    assert set(scores.values()) == {2.0}


async def test_peek_counts_nothing(core: Core, service: CoreService, spread_registry: Path) -> None:
    await reload_registry(service)
    for _ in range(5):
        resp = await core.core.Locate(pb.LocateRequest(node=by_name("m0003"), origin="10.0.0.1", peek=True))
        assert {r.score for r in resp.relays} == {0.0}


async def test_the_core_names_its_error_class(core: Core) -> None:
    """The core aborts with the error's class name in the trailing metadata, so a client
    tells "the core has no live relay" (Unavailable) from "no core answered" (Unreachable),
    which share UNAVAILABLE."""
    for relay in ("hub", "room-1", "room-2", "lab-1"):
        await heartbeat(core, relay, healthy=False)
    relay_side = await asyncio.to_thread(relay_credentials, "room-1")
    admin_side = await asyncio.to_thread(admin_credentials)
    async with (
        AsyncCoreClient(core.address, credentials=relay_side) as client,
        AsyncCoreClient(core.address, credentials=admin_side) as admin,
    ):
        with pytest.raises(Unavailable) as info:
            await client.call(client.core.Locate, pb.LocateRequest(node=by_name("n1"), origin=ROOM))
        assert type(info.value) is Unavailable and "none is live" in info.value.message
        with pytest.raises(NotFound):
            await admin.call(admin.admin.GetNode, pb.GetNodeRequest(node=by_name("nosuch")))
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await core.core.Locate(pb.LocateRequest(node=by_name("n1"), origin=ROOM))
    assert (ERROR_KEY, "Unavailable") in tuple(raw.value.trailing_metadata() or ())
