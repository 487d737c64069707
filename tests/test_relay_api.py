"""A relay with a real core: the node API, heartbeats, pins, prefetch, TFTP from
the core, metrics and health, and `slim relay serve` stopping gracefully.

Real gRPC core and aiohttp relay on 127.0.0.1 port 0; the TFTP client is tftpy's.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest
import tftpy
import zstandard

from slim.agent import manifest as mf
from slim.agent.tree import Entry
from slim.core.control.service import CoreService
from slim.core.store import Store
from slim.release import ObjectRef, Release, ReleaseDirectory
from slim.signing import KeyDirectory, ReloadingSigner, SigningKey, verify
from slim.v1 import core_pb2 as pb
from slim.vocabulary import Policy
from tests.support import Core, blob, metrics, need, origin, relay, start_relay_process, stop_process, url

IPXE = Path("/usr/lib/ipxe/undionly.kpxe")


def publish_sync_release(store: Store, signer: SigningKey, files: int = 12) -> tuple[str, set[str]]:
    """A release of ``jdk14`` whose /var is copy-if-needed with a real manifest:
    (release digest, every object digest (hex) a prefetch must warm)."""
    items = []
    wanted: set[str] = set()
    for i in range(files):
        data = blob(1000 + 997 * i, 100 + i)
        ref = store.put_bytes(data)
        wanted.add(ref.digest[7:])
        items.append(
            mf.ManifestEntry(
                Entry(f"f{i:02d}", "file", 0o644, 0, 0, 0, size=len(data)), sha256=ref.digest[7:]
            )
        )
    big = blob(5 * mf.CHUNK_SIZE + 17, 99)  # a chunked file: its chunks are the objects
    chunks = []
    for off in range(0, len(big), mf.CHUNK_SIZE):
        ref = store.put_bytes(big[off : off + mf.CHUNK_SIZE])
        chunks.append(ref.digest[7:])
        wanted.add(ref.digest[7:])
    items.append(
        mf.ManifestEntry(
            Entry("big", "file", 0o644, 0, 0, 0, size=len(big)),
            sha256=hashlib.sha256(big).hexdigest(),
            chunks=tuple(chunks),
        )
    )
    manifest = store.put_bytes(zstandard.ZstdCompressor().compress(mf.encode(mf.make("/var", items))))
    archive = store.put_bytes(blob(50_000, 7))
    kernel, initrd = store.put_bytes(blob(40_000, 8)), store.put_bytes(blob(60_000, 9))
    nfs_manifest = store.put_bytes(b"placeholder nfs manifest")
    release = Release(
        environment="jdk14",
        kernel=kernel,
        initrd=initrd,
        directories={
            "/": ReleaseDirectory(policy=Policy.SYNC, archive=archive, manifest=manifest, bytes=1, files=1),
            "/usr": ReleaseDirectory(policy=Policy.NFS, manifest=nfs_manifest),
            "/var": ReleaseDirectory(policy=Policy.DISK, archive=archive, manifest=manifest),
        },
    )
    for r in (kernel, initrd, archive, manifest, nfs_manifest):
        wanted.add(r.digest[7:])
    digest = store.publish_release(release, signer)
    wanted.add(digest[7:])
    return digest, wanted


async def wait_until(predicate: object, seconds: float = 20.0) -> None:
    """Poll ``predicate`` (a zero-argument callable) on the event loop, bounded."""
    assert callable(predicate)
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not met within {seconds} s")


async def events_of(core: Core, node: str) -> list[pb.BootEvent]:
    resp = await core.admin.ListBootEvents(pb.ListBootEventsRequest(node=node))
    return list(resp.events)


# -- the node API --------------------------------------------------------------------
async def test_node_api_through_the_relay(core: Core, store: Store, tmp_path: Path) -> None:
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address) as r,
        aiohttp.ClientSession() as s,
    ):
        base = url(r)
        async with s.get(f"{base}/boot/52:54:00:00:00:01.ipxe") as resp:
            assert resp.status == 200
            script = await resp.text()
            assert script.startswith("#!ipxe") and "n1" in script
        async with s.get(f"{base}/boot/52-54-00-00-00-01.ipxe") as resp:
            assert resp.status == 200
        async with s.get(f"{base}/v1/locate", params={"node": "n1"}) as resp:
            assert resp.status == 200
            doc = await resp.json()
            assert doc["node"] == "n1" and doc["relays"] and doc["relays"][0]["tier"] == "site"
        async with s.get(f"{base}/v1/locate", params={"mac": "52:54:00:00:00:22"}) as resp:
            assert (await resp.json())["node"] == "n2"
        for ref in ("n1", "52:54:00:00:00:01"):
            async with s.get(f"{base}/v1/nodes/{ref}/plan", params={"nonce": "c0ffee"}) as resp:
                assert resp.status == 200
                envelope = await resp.json()
                # the core's signed document, handed on untouched; the relay's clock beside it
                assert isinstance(envelope["relay_time"], float)
                signer = core.server.service.signer
                assert signer is not None
                document = envelope["document"].encode()
                assert verify(document, envelope["signature"], [signer.public], "plan") == signer.public
                plan = json.loads(document)
                assert plan["node"] == "n1" and plan["environment"] == "base" and plan["nonce"] == "c0ffee"
                assert plan["issued_at"] < plan["expires_at"]
                assert isinstance(plan["kernel"]["size"], int) and plan["kernel"]["digest"].startswith(
                    "sha256:"
                )
                dirs = {d["path"]: d for d in plan["directories"]}
                assert dirs["/"]["policy"] == "ram" and dirs["/usr"]["policy"] == "nfs"
                assert dirs["/usr"]["nfs"]["options"].startswith("ro")
                assert dirs["/usr"]["archive"] is None
        # a node fetches its kernel through the relay by the plan's digest
        async with s.get(f"{base}/objects/sha256/{plan['kernel']['digest'][7:]}") as resp:
            assert resp.status == 200 and len(await resp.read()) == plan["kernel"]["size"]
        events = {
            "events": [
                {
                    "boot_id": "b1",
                    "stage": "plan",
                    "time": 1_700_000_000.5,
                    "ok": True,
                    "environment": "base",
                },
                {"boot_id": "b1", "stage": "fetch:/", "bytes": 1234, "message": "ok"},
            ]
        }
        async with s.post(f"{base}/v1/nodes/n1/events", json=events) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["accepted"] == 2
        async with s.post(
            f"{base}/v1/nodes/n1/events", json={"boot_id": "b1", "stage": "switch_root"}
        ) as resp:
            assert (await resp.json())["accepted"] == 1
        recorded = [e for e in await events_of(core, "n1") if e.boot_id == "b1"]
        assert {e.stage for e in recorded} == {"plan", "fetch:/", "switch_root"}
        assert all(e.relay == "room-1" for e in recorded)
        assert next(e for e in recorded if e.stage == "fetch:/").bytes == 1234


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("GET", "/boot/52:54:00:99:99:99.ipxe", None, 404, "MAC"),
        ("GET", "/boot/not-a-mac.ipxe", None, 400, "MAC"),
        ("GET", "/v1/locate", None, 400, "?node="),
        ("GET", "/v1/locate?node=n1&mac=52:54:00:00:00:01", None, 400, "one of them"),
        ("GET", "/v1/nodes/nosuch/plan", None, 404, "nosuch"),
        ("GET", "/v1/nodes/n1/plan?nonce=not-hex", None, 400, "nonce"),
        ("GET", "/v1/nodes/n3/plan", None, 409, "unbuilt"),
        ("POST", "/v1/nodes/n1/events", b"{not json", 400, "not JSON"),
        ("POST", "/v1/nodes/n1/events", b"[]", 400, "non-empty"),
        ("POST", "/v1/nodes/n1/events", b'{"stage": "x"}', 400, "boot_id"),
        ("POST", "/v1/nodes/n1/events", b'{"boot_id": "b", "stage": "x", "bytes": -1}', 400, "bytes"),
        ("POST", "/v1/nodes/n1/events", b'{"boot_id": "b", "stage": "x", "time": "noon"}', 400, "time"),
        ("POST", "/v1/nodes/n1/events", b'{"boot_id": "b", "stage": "x", "colour": 1}', 400, "colour"),
        ("POST", "/v1/nodes/n1/events", b'{"boot_id": "b", "stage": "x", "node": "n2"}', 400, "differs"),
        ("POST", "/v1/nodes/52:54:00:00:00:01/events", b'{"boot_id": "b", "stage": "x"}', 400, "name"),
        ("POST", "/v1/nodes/nosuch/events", b'{"boot_id": "b", "stage": "x"}', 404, "nosuch"),
    ],
)
async def test_node_api_errors(
    core: Core,
    store: Store,
    tmp_path: Path,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    words: str,
) -> None:
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address) as r,
        aiohttp.ClientSession() as s,
        s.request(method, url(r) + path, data=body) as resp,
    ):
        assert resp.status == status, await resp.text()
        doc = await resp.json()
        assert words in doc["error"], doc


async def test_node_api_when_the_core_is_down(store: Store, tmp_path: Path) -> None:
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core="127.0.0.1:1") as r,
        aiohttp.ClientSession() as s,
        s.get(f"{url(r)}/v1/nodes/n1/plan") as resp,
    ):
        assert resp.status == 503
        assert resp.headers["Retry-After"]
        assert "unreachable" in (await resp.json())["error"]


async def test_oversized_event_body_is_refused(core: Core, store: Store, tmp_path: Path) -> None:
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address) as r,
        aiohttp.ClientSession() as s,
    ):
        body = b'{"events": [' + b",".join([b'{"boot_id": "b", "stage": "x"}'] * 1001) + b"]}"
        async with s.post(f"{url(r)}/v1/nodes/n1/events", data=body) as resp:
            assert resp.status == 400 and "1000" in (await resp.json())["error"]
        async with s.post(f"{url(r)}/v1/nodes/n1/events", data=io.BytesIO(b"x" * (2 << 20))) as resp:
            assert resp.status in (400, 413)


# -- heartbeats, pins, prefetch ------------------------------------------------------
def core_key(tmp_path: Path) -> list[Path]:
    """The fixtures' core key's public half (what --trust names)."""
    return [tmp_path / "keys" / "signing.pub"]


async def test_heartbeats_reach_the_core_and_pin_current_releases(
    core: Core, store: Store, tmp_path: Path
) -> None:
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address, trust=core_key(tmp_path)) as r,
        aiohttp.ClientSession() as s,
    ):
        await wait_until(lambda: r.link is not None and r.link.connected)
        relays = await core.admin.ListRelays(pb.ListRelaysRequest())
        info = next(x for x in relays.relays if x.name == "room-1")
        assert info.status == "live" and info.last_heartbeat.healthy
        base = store.release("base")
        assert base is not None
        kernel = base[1].kernel.digest[7:]
        await wait_until(lambda: kernel in r.cache.pins)  # the core's reply named the release
        assert base[0][7:] in r.cache.pins
        m = await metrics(s, url(r))
        assert m["slim_relay_core_connected"] == 1
        assert m["slim_relay_cache_pinned_objects"] >= 1  # the release document was fetched to read it
        async with s.get(f"{url(r)}/healthz") as resp:
            doc = await resp.json()
            assert resp.status == 200 and doc["healthy"] and doc["core_connected"]


async def test_prefetch_warms_every_object_and_reports_progress(
    core: Core, service: CoreService, store: Store, tmp_path: Path
) -> None:
    digest, wanted = publish_sync_release(store, SigningKey.load_or_create(tmp_path / "keys"))
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address, trust=core_key(tmp_path)) as r,
        aiohttp.ClientSession() as s,
    ):
        await wait_until(lambda: r.link is not None and r.link.connected)
        progress = [
            p async for p in core.admin.Prefetch(pb.PrefetchRequest(environment="jdk14", nodes=["n1"]))
        ]
        relays = {p.relay for p in progress}
        assert relays == {"room-1", "room-2"}  # n1's site has two relays; room-2 is not running
        done = {p.relay: p.status for p in progress if p.status.done}
        assert "not connected" in done["room-2"].error
        warm = done["room-1"]
        assert warm.error == "" and warm.release_digest == digest
        assert warm.objects_done == warm.objects_total == len(wanted) - 1  # all but the release document
        assert warm.bytes_done == warm.bytes_total == warm.bytes_fetched > 5 * mf.CHUNK_SIZE
        assert all(h in r.cache for h in wanted)
        before = (await metrics(s, url(o)))["slim_origin_object_requests_total"]
        # every object is pinned once the release is current, and a second prefetch fetches nothing
        await wait_until(lambda: wanted <= r.cache.pins)
        again = [
            p.status
            async for p in core.admin.Prefetch(pb.PrefetchRequest(environment="jdk14", relays=["room-1"]))
            if p.status.done
        ]
        assert again[-1].bytes_fetched == 0 and again[-1].objects_done == len(wanted) - 1
        assert (await metrics(s, url(o)))["slim_origin_object_requests_total"] == before
        # a node's requests are hits now
        m0 = await metrics(s, url(r))
        chunk = next(iter(wanted))
        async with s.get(f"{url(r)}/objects/sha256/{chunk}") as resp:
            assert resp.status == 200
        m1 = await metrics(s, url(r))
        assert m1["slim_relay_object_hits_total"] == m0["slim_relay_object_hits_total"] + 1


async def test_prefetch_errors(core: Core, store: Store) -> None:
    async def first(req: pb.PrefetchRequest) -> AsyncIterator[pb.PrefetchProgress]:
        async for p in core.admin.Prefetch(req):
            yield p

    for req, code, words in (
        (pb.PrefetchRequest(environment="nosuch"), grpc.StatusCode.NOT_FOUND, "nosuch"),
        (pb.PrefetchRequest(environment="unbuilt"), grpc.StatusCode.FAILED_PRECONDITION, "slim ee build"),
        (pb.PrefetchRequest(environment="base", relays=["nosuch"]), grpc.StatusCode.NOT_FOUND, "nosuch"),
        (pb.PrefetchRequest(environment="base", nodes=["nosuch"]), grpc.StatusCode.NOT_FOUND, "nosuch"),
        (pb.PrefetchRequest(), grpc.StatusCode.INVALID_ARGUMENT, "environment"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [p async for p in first(req)]
        assert info.value.code() == code and words in (info.value.details() or "")
    # no relay connected: every relay of the registry reports it, the call ends
    statuses = [p async for p in core.admin.Prefetch(pb.PrefetchRequest(environment="base"))]
    assert {p.relay for p in statuses} == {"hub", "room-1", "room-2", "lab-1"}
    assert all(p.status.done and "not connected" in p.status.error for p in statuses)


async def test_prefetch_of_a_broken_release_reports_the_error(
    core: Core, store: Store, tmp_path: Path
) -> None:
    """The release names an object the origin does not have: the relay says so."""
    release = store.release("base")
    assert release is not None
    missing = ObjectRef(digest="sha256:" + "ee" * 32, size=10)
    store.publish_release(
        release[1].model_copy(update={"kernel": missing}), SigningKey.load_or_create(tmp_path / "keys")
    )
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address, trust=core_key(tmp_path)) as r,
    ):
        await wait_until(lambda: r.link is not None and r.link.connected)
        statuses = [
            p.status
            async for p in core.admin.Prefetch(pb.PrefetchRequest(environment="base", relays=["room-1"]))
            if p.status.done
        ]
        assert "not on any upstream" in statuses[-1].error


async def test_a_relay_pins_and_warms_only_releases_its_trusted_key_signed(
    core: Core, store: Store, tmp_path: Path
) -> None:
    """jdk14 published unsigned, base signed by the core: a relay that trusts the core
    pins and warms base only; one that trusts another key pins and warms nothing."""
    jdk14 = store.release("jdk14")
    assert jdk14 is not None
    store.publish_release(jdk14[1])  # the same document, without the core's signature
    other = tmp_path / "other"
    (other / "signing.pub").parent.mkdir()
    (other / "signing.pub").write_text(SigningKey.generate().public.text())
    base = store.release("base")
    assert base is not None
    for trust, pinned in ((core_key(tmp_path), True), ([other / "signing.pub"], False)):
        async with (
            origin(store) as o,
            relay(tmp_path / f"r{pinned}", [url(o)], name="room-1", core=core.address, trust=trust) as r,
            aiohttp.ClientSession() as s,
        ):
            await wait_until(lambda: r.link is not None and r.link.connected)
            refusals = 1 if pinned else 2  # jdk14 only; or both
            await wait_until(lambda r=r, n=refusals: len(r.warmer.refused) == n)
            if pinned:  # base's pin and jdk14's refusal come in either order
                await wait_until(lambda r=r: base[1].kernel.digest[7:] in r.cache.pins)
            assert (base[1].kernel.digest[7:] in r.cache.pins) is pinned
            assert jdk14[1].kernel.digest[7:] not in r.cache.pins
            assert (await metrics(s, url(r)))["slim_relay_releases_refused_total"] == len(r.warmer.refused)
            statuses = [
                p.status
                async for p in core.admin.Prefetch(pb.PrefetchRequest(environment="jdk14", relays=["room-1"]))
                if p.status.done
            ]
            assert "comes without the core's signature" in statuses[-1].error
            assert jdk14[1].initrd.digest[7:] not in r.cache  # nothing it names was fetched


async def test_a_relay_given_the_key_directory_follows_a_key_rotation(
    core: Core, store: Store, tmp_path: Path
) -> None:
    """During a rotation, a relay that trusts the core's key directory (as slim serve's does)
    pins releases signed with either key; once the rotation ends, it refuses one the old key
    signed.  No restart: it reads the directory again when it changes."""
    keys = KeyDirectory(tmp_path / "keys")  # the store's releases are signed with its key
    old = keys.signer()
    base, jdk14 = store.release("base"), store.release("jdk14")
    assert base is not None and jdk14 is not None

    def again(release: Release, signer: SigningKey) -> str:
        """A new release of the same environment (same objects, another date), signed by ``signer``."""
        return store.publish_release(release.model_copy(update={"created": f"{signer.public.id}"}), signer)

    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address, trust=[keys.path]) as r,
    ):
        await wait_until(lambda: {base[0][7:], jdk14[0][7:]} <= r.cache.pins)
        new = SigningKey.generate()
        keys.begin_rotation(new)
        base_new = again(base[1], new)
        await wait_until(lambda: base_new[7:] in r.cache.pins)  # the new key's release: pinned
        assert jdk14[0][7:] in r.cache.pins and not r.warmer.refused  # the old key's: still pinned
        keys.finish_rotation()
        jdk14_old = again(jdk14[1], old)
        await wait_until(lambda: jdk14_old in r.warmer.refused)
        assert jdk14_old[7:] not in r.cache.pins and base_new[7:] in r.cache.pins
        assert r.warmer.refused == {jdk14_old}


async def test_a_relay_given_an_old_key_file_follows_the_cores_rotations(
    core: Core, service: CoreService, store: Store, tmp_path: Path
) -> None:
    """An ISP's relay holds a copy of the core's public key, not its key directory: the core's
    heartbeat replies carry the rotations' chain, so releases the next key signs are pinned
    (and their NFS trees built); a key nobody endorsed is refused."""
    keys = KeyDirectory(tmp_path / "keys")
    service.signer = ReloadingSigner(keys.path)  # as slim core serve signs: its directory's chain
    copy = tmp_path / "isp" / "core.pub"
    copy.parent.mkdir()
    copy.write_text(keys.signer().public.text())
    base = store.release("base")
    assert base is not None
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address, trust=[copy]) as r,
    ):
        await wait_until(lambda: base[0][7:] in r.cache.pins)
        new = SigningKey.generate()
        keys.begin_rotation(new)
        keys.finish_rotation()
        signed_new = store.publish_release(base[1].model_copy(update={"created": "next"}), new)
        await wait_until(lambda: signed_new[7:] in r.cache.pins)
        assert not r.warmer.refused and len(r.warmer.endorsements) == 1
        stranger = store.publish_release(
            base[1].model_copy(update={"created": "other"}), SigningKey.generate()
        )
        await wait_until(lambda: stranger in r.warmer.refused)
        assert stranger[7:] not in r.cache.pins


# -- TFTP ----------------------------------------------------------------------------
async def test_tftp_serves_ipxe_and_pxelinux_from_the_core(core: Core, store: Store, tmp_path: Path) -> None:
    need(IPXE.is_file(), "Debian's ipxe package (/usr/lib/ipxe/undionly.kpxe)")
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address, tftp_listen="127.0.0.1:0") as r,
    ):
        assert r.tftp_port

        def download(name: str, out: Path) -> None:
            tftpy.TftpClient("127.0.0.1", r.tftp_port).download(name, str(out), timeout=2)

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, download, "undionly.kpxe", tmp_path / "undi")
        assert (tmp_path / "undi").read_bytes() == IPXE.read_bytes()
        await loop.run_in_executor(None, download, "pxelinux.cfg/01-52-54-00-00-00-01", tmp_path / "cfg")
        cfg = (tmp_path / "cfg").read_text()
        assert "n1" in cfg and "KERNEL" in cfg.upper()
        with pytest.raises(tftpy.TftpException):
            await loop.run_in_executor(None, download, "pxelinux.cfg/01-52-54-00-99-99-99", tmp_path / "x")
        with pytest.raises(tftpy.TftpException):
            await loop.run_in_executor(None, download, "../../etc/passwd", tmp_path / "y")
        assert r.tftp is not None and r.tftp.stats.completed == 2


# -- the command ---------------------------------------------------------------------
@pytest.mark.slow
async def test_relay_serve_stops_gracefully_finishing_a_transfer(store: Store, tmp_path: Path) -> None:
    data = blob(48 << 20, 12)
    name = store.put_bytes(data).digest[7:]
    async with origin(store) as o, aiohttp.ClientSession() as s:
        p = start_relay_process(tmp_path / "r", url(o))
        try:
            async with s.get(f"{p.url}/objects/sha256/{name}") as resp:
                first = await resp.content.readexactly(1 << 20)
                p.kill(signal.SIGTERM)  # in the middle of the body: the transfer still completes
                rest = await resp.read()
            assert first + rest == data
            _, err = await asyncio.get_running_loop().run_in_executor(None, p.proc.communicate, None, 30)
        finally:
            stop_process(p)
        assert p.proc.returncode == 0, err
        assert "Traceback" not in err


async def test_cli_prefetch(core: Core, store: Store, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from slim.cli import main

    _, wanted = publish_sync_release(store, SigningKey.load_or_create(tmp_path / "keys"))
    runner = CliRunner()
    loop = asyncio.get_running_loop()
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address, trust=core_key(tmp_path)) as r,
    ):
        await wait_until(lambda: r.link is not None and r.link.connected)
        ok = await loop.run_in_executor(
            None,
            runner.invoke,
            main,
            ["relay", "prefetch", "jdk14", "--relay", "room-1", "--core", core.address],
        )
        assert ok.exit_code == 0, ok.output
        assert f"room-1: warm ({len(wanted) - 1}/{len(wanted) - 1} objects" in ok.output
        assert all(h in r.cache for h in wanted)
        bad = await loop.run_in_executor(
            None,
            runner.invoke,
            main,
            ["relay", "prefetch", "jdk14", "--relay", "room-2", "--core", core.address],
        )
        assert bad.exit_code == 1 and "not connected" in bad.output
        quick = await loop.run_in_executor(
            None, runner.invoke, main, ["relay", "prefetch", "base", "--no-wait", "--core", core.address]
        )
        assert quick.exit_code == 0 and "prefetch of base sent to" in quick.output
        unknown = await loop.run_in_executor(
            None, runner.invoke, main, ["relay", "prefetch", "nosuch", "--core", core.address]
        )
        assert unknown.exit_code == 1 and "nosuch" in unknown.output


# -- what the relay sees of a boot ---------------------------------------------------
async def test_relay_records_stage_one_script_kernel_and_initrd_under_the_core_boot_id(
    core: Core, store: Store, tmp_path: Path
) -> None:
    """TFTP (matched by address and time), the boot script (the core names the boot), the
    kernel and initrd (their URLs name it), each with bytes and a duration; the agent's
    events join the same boot through slim.boot=; a second relay serving the initrd
    knows no node and the core finds it by the boot id."""
    need(IPXE.is_file(), "Debian's ipxe package (/usr/lib/ipxe/undionly.kpxe)")
    async with (
        origin(store) as o,
        relay(tmp_path / "r", [url(o)], name="room-1", core=core.address, tftp_listen="127.0.0.1:0") as r,
        relay(tmp_path / "r2", [url(o)], name="room-2", core=core.address) as r2,
        aiohttp.ClientSession() as s,
    ):
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(
            None,
            lambda: tftpy.TftpClient("127.0.0.1", r.tftp_port).download(
                "undionly.kpxe", str(tmp_path / "undi"), timeout=2
            ),
        )
        async with s.get(f"{url(r)}/boot/52:54:00:00:00:01.ipxe") as resp:
            script = await resp.text()
        boot_id = re.search(r"slim\.boot=([0-9a-f]+)", script)
        assert boot_id, script
        bid = boot_id.group(1)
        kernel_url = re.search(r"kernel (\S+\?boot=\S+)", script)
        initrd_url = re.search(r"initrd --name initrd (\S+\?boot=\S+)", script)
        assert kernel_url and initrd_url and f"?boot={bid}&stage=kernel" in kernel_url.group(1)
        # the registry's relay URLs are not these test relays': only the path and query are asked
        kernel_path = "/objects/" + kernel_url.group(1).split("/objects/", 1)[1]
        initrd_path = "/objects/" + initrd_url.group(1).split("/objects/", 1)[1]
        async with s.get(url(r) + kernel_path) as resp:
            kernel = await resp.read()
        async with s.get(url(r2) + initrd_path) as resp:  # another relay: it knows no node
            initrd = await resp.read()
        async with s.post(  # the agent, under the boot script's id
            f"{url(r)}/v1/nodes/n1/events", json={"boot_id": bid, "stage": "plan", "environment": "base"}
        ) as resp:
            assert resp.status == 200

        async def recorded() -> dict[str, pb.BootEvent]:
            got = await core.admin.ListBootEvents(pb.ListBootEventsRequest(boot_id=bid))
            return {e.stage: e for e in got.events}

        for _ in range(1500):  # bounded (30 s): the relays send their own events in the background
            events = await recorded()
            if {"tftp:undionly.kpxe", "script", "kernel", "initrd", "plan"} <= set(events):
                break
            await asyncio.sleep(0.02)
        assert set(events) == {"tftp:undionly.kpxe", "script", "kernel", "initrd", "plan"}, events
        assert all(e.node == "n1" for e in events.values())
        tftp = events["tftp:undionly.kpxe"]
        assert tftp.bytes == IPXE.stat().st_size and "by address and time" in tftp.message
        assert events["script"].bytes == len(script.encode()) and events["script"].relay == "room-1"
        assert (events["kernel"].bytes, events["kernel"].relay) == (len(kernel), "room-1")
        assert (events["initrd"].bytes, events["initrd"].relay) == (len(initrd), "room-2")
        assert all(e.duration >= 0 for e in events.values())
        order = [events[k].time.ToNanoseconds() for k in ("tftp:undionly.kpxe", "script", "kernel", "initrd")]
        assert order == sorted(order)
        async with aiohttp.ClientSession() as s2:
            counted = await metrics(s2, url(r))
        assert counted["slim_relay_tftp_transfers_matched_total"] == 1
