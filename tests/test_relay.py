"""Loopback tests of the relay's object cache: real aiohttp servers on 127.0.0.1 port 0.

Every test runs on uvloop (what relays run: sendfile through a duplicated
socket) and on the stock loop (loop.sendfile), see conftest.py.

Chains of origin (the core's object server) → relay A → relay B, collapsed
fetches, verification, ranges, traversal, budget and pins, a relay
killed mid-download, and the same chain over HTTPS with SLIM's CA.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from slim.core.store import Store
from slim.objects.routes import parse_range
from slim.relay.config import RelayConfig, Upstream
from tests.support import (
    FakeUpstream,
    blob,
    client_https,
    core_https,
    foreign_https,
    https_origin,
    https_url,
    metrics,
    origin,
    put,
    raw_get,
    relay,
    relay_identity,
    start_relay_process,
    stop_process,
    url,
)

MiB = 1 << 20


@pytest.fixture
def objstore(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


async def fetch_all(
    session: aiohttp.ClientSession, target: str, headers: dict[str, str] | None = None, **kw: Any
) -> bytes:
    async with session.get(target, headers=headers, **kw) as resp:
        assert resp.status in (200, 206), (resp.status, await resp.text())
        return await resp.read()


async def read_until_cut(resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The body as far as it came, and whether it was cut short."""
    got = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            got += chunk
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        return bytes(got), True
    return bytes(got), False


# -- collapsed forwarding through a chain ---------------------------------------------
async def test_chain_fifty_clients_one_fetch_each_hop(objstore: Store, tmp_path: Path) -> None:
    data = blob(24 * MiB + 123, 1)
    name = put(objstore, data)
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)]) as a,
        relay(tmp_path / "b", [url(a)]) as b,
        aiohttp.ClientSession() as s,
    ):
        bodies = await asyncio.gather(*(fetch_all(s, f"{url(b)}/objects/sha256/{name}") for _ in range(50)))
        assert all(body == data for body in bodies)
        mb, ma, mo = await metrics(s, url(b)), await metrics(s, url(a)), await metrics(s, url(core))
        assert mb["slim_relay_upstream_fetches_total"] == 1
        assert ma["slim_relay_upstream_fetches_total"] == 1
        assert mo["slim_origin_object_requests_total"] == 1
        assert mb["slim_relay_object_requests_total"] == 50
        # cached now on both relays, published under its name and nothing left in tmp
        for r in (a, b):
            assert (r.cache.objects_dir / name).read_bytes() == data
            assert list(r.cache.tmp_dir.iterdir()) == []
        # a second round is served from B's cache alone
        again = await fetch_all(s, f"{url(b)}/objects/sha256/{name}")
        assert again == data
        assert (await metrics(s, url(a)))["slim_relay_object_requests_total"] == 1


async def test_missing_everywhere_is_404_and_not_cached(objstore: Store, tmp_path: Path) -> None:
    name = "ab" * 32
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)]) as a,
        aiohttp.ClientSession() as s,
    ):
        for method in ("GET", "HEAD"):
            async with s.request(method, f"{url(a)}/objects/sha256/{name}") as resp:
                assert resp.status == 404
        assert name not in a.cache


async def test_head_cold_does_not_fetch(objstore: Store, tmp_path: Path) -> None:
    data = blob(300_000, 2)
    name = put(objstore, data)
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)]) as a,
        aiohttp.ClientSession() as s,
    ):
        async with s.head(f"{url(a)}/objects/sha256/{name}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(data))
            assert resp.headers["ETag"] == f'"sha256:{name}"'
        assert name not in a.cache
        assert (await metrics(s, url(a)))["slim_relay_upstream_fetches_total"] == 0


# -- verification --------------------------------------------------------------------
async def test_corrupt_upstream_never_published_then_refetched(tmp_path: Path) -> None:
    data = blob(3 * MiB + 5, 3)
    name = hashlib.sha256(data).hexdigest()
    up = FakeUpstream({name: data})
    base = await up.start()
    try:
        async with relay(tmp_path / "a", [base]) as a, aiohttp.ClientSession() as s:
            target = f"{url(a)}/objects/sha256/{name}"
            up.corrupt = True
            for attempt in (1, 2):
                async with s.get(target) as resp:
                    assert resp.status == 200
                    got, cut = await read_until_cut(resp)
                assert cut and len(got) < len(data)  # the last byte is held back until verified
                assert name not in a.cache
                assert not (a.cache.objects_dir / name).exists()
                assert list(a.cache.tmp_dir.iterdir()) == []
                assert up.requests == attempt  # each request refetches
            m = await metrics(s, url(a))
            assert m["slim_relay_upstream_verify_failures_total"] == 2
            up.corrupt = False
            assert await fetch_all(s, target) == data
            assert (a.cache.objects_dir / name).read_bytes() == data
    finally:
        await up.stop()


async def test_corrupt_small_object_gives_502(tmp_path: Path) -> None:
    """A client that arrives after the bad fetch failed gets 502, not bytes."""
    data = blob(1000, 4)
    name = hashlib.sha256(data).hexdigest()
    up = FakeUpstream({name: data})
    up.corrupt = True
    base = await up.start()
    try:
        async with relay(tmp_path / "a", [base]) as a, aiohttp.ClientSession() as s:
            async with s.get(f"{url(a)}/objects/sha256/{name}") as resp:
                if resp.status == 200:  # streaming had begun: the body is cut short
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await resp.read()
                else:
                    assert resp.status == 502
                    assert "sha256" in await resp.text()
            assert name not in a.cache
    finally:
        await up.stop()


# -- ranges --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-", 10, (0, 10)),
        ("bytes=3-5", 10, (3, 6)),
        ("bytes=3-500", 10, (3, 10)),
        ("bytes=-4", 10, (6, 10)),
        ("bytes=-40", 10, (0, 10)),
        ("bytes=10-", 10, False),
        ("bytes=-0", 10, False),
        ("bytes=5-3", 10, None),
        ("bytes=0-1,4-5", 10, None),
        ("items=0-1", 10, None),
        ("bytes=-", 10, None),
        ("bytes=0-", 0, False),
    ],
)
def test_parse_range(header: str | None, size: int, expected: object) -> None:
    assert parse_range(header, size) == expected


async def test_range_resume_at_any_offset(objstore: Store, tmp_path: Path) -> None:
    data = blob(2 * MiB + 77, 5)
    name = put(objstore, data)
    rng = random.Random(5)
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)]) as a,
        aiohttp.ClientSession() as s,
    ):
        target = f"{url(a)}/objects/sha256/{name}"
        # cold: the first request is a range (streamed from the fetch in flight)
        offsets = [
            len(data) - 1,
            0,
            1,
            131071,
            131072,
            131073,
            *(rng.randrange(len(data)) for _ in range(20)),
        ]
        for off in offsets:
            async with s.get(target, headers={"Range": f"bytes={off}-"}) as resp:
                assert resp.status == 206
                assert resp.headers["Content-Range"] == f"bytes {off}-{len(data) - 1}/{len(data)}"
                assert await resp.read() == data[off:]
        for _ in range(10):
            a0 = rng.randrange(len(data))
            b0 = rng.randrange(a0, len(data))
            async with s.get(target, headers={"Range": f"bytes={a0}-{b0}"}) as resp:
                assert resp.status == 206
                assert await resp.read() == data[a0 : b0 + 1]
        async with s.get(target, headers={"Range": "bytes=-100"}) as resp:
            assert await resp.read() == data[-100:]
        async with s.get(target, headers={"Range": f"bytes={len(data)}-"}) as resp:
            assert resp.status == 416
            assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
        # If-Range with another validator: the whole object
        async with s.get(target, headers={"Range": "bytes=5-", "If-Range": '"sha256:00"'}) as resp:
            assert resp.status == 200 and await resp.read() == data
        async with s.get(target, headers={"If-None-Match": f'"sha256:{name}"'}) as resp:
            assert resp.status == 304
        async with s.get(target) as resp:
            assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
            assert resp.headers["Accept-Ranges"] == "bytes"
            assert await resp.read() == data


async def test_range_on_cold_object_while_fetching(objstore: Store, tmp_path: Path) -> None:
    data = blob(16 * MiB, 6)
    name = put(objstore, data)
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)]) as a,
        aiohttp.ClientSession() as s,
    ):
        target = f"{url(a)}/objects/sha256/{name}"
        ranges = [(0, 99), (8 * MiB, 8 * MiB + 5), (len(data) - 10, len(data) - 1), (3, len(data) - 1)]
        bodies = await asyncio.gather(
            *(fetch_all(s, target, {"Range": f"bytes={x}-{y}"}) for x, y in ranges), fetch_all(s, target)
        )
        for (x, y), body in zip(ranges, bodies, strict=False):
            assert body == data[x : y + 1]
        assert bodies[-1] == data
        assert (await metrics(s, url(a)))["slim_relay_upstream_fetches_total"] == 1


# -- bad names -----------------------------------------------------------------------
async def test_traversal_and_bad_names(objstore: Store, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET")
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)]) as a,
        aiohttp.ClientSession() as s,
    ):
        (a.cache.root / "secret").write_text("TOP-SECRET")
        targets = [
            "/objects/sha256/../secret",
            "/objects/sha256/..%2Fsecret",
            "/objects/sha256/%2e%2e%2f%2e%2e%2fsecret",
            "/objects/sha256/..%2f..%2f..%2f..%2fetc%2fpasswd",
            "/objects/sha256/" + "%2e" * 2,
            f"/objects/sha256/{secret}",
            "/objects/sha256//etc/passwd",
            "/objects/sha256/" + "A" * 64,
            "/objects/sha256/" + "a" * 63,
            "/objects/sha256/" + "a" * 65,
            "/objects/sha256/" + "g" * 64,
            "/objects/sha256/" + "a" * 63 + "%00",
            "/objects/sha256/" + "a" * 64 + "/x",
            "/objects/md5/" + "a" * 32,
            "/objects/../../etc/passwd",
            "/../../etc/passwd",
            "//etc/passwd",
            "/objects/sha256/" + "a" * 64 + "%0a",
        ]
        for target in targets:
            for port in (a.port, core.port):
                status, body = await raw_get(port, target)
                assert status in (400, 404), (target, status)
                assert b"TOP-SECRET" not in body and b"root:" not in body
        m = await metrics(s, url(a))
        assert m["slim_relay_upstream_fetches_total"] == 0
        assert m["slim_relay_object_hits_total"] == 0


# -- budget, pins, readers -----------------------------------------------------------
def cache_bytes_on_disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


async def test_budget_under_churn_never_evicts_pinned_or_in_use(objstore: Store, tmp_path: Path) -> None:
    rng = random.Random(8)
    objects = {put(objstore, d): d for d in (blob(rng.randrange(50_000, 400_000), i) for i in range(40))}
    names = list(objects)
    budget = 2 * MiB
    pinned = names[:3]
    held = names[3]
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)], max_bytes=budget) as a,
        aiohttp.ClientSession() as s,
    ):
        target = f"{url(a)}/objects/sha256/"
        for n in pinned:
            assert await fetch_all(s, target + n) == objects[n]
        a.cache.set_pins(pinned)
        # a slow reader holds a large object open: read a little, then stall
        big = put(objstore, blob(1 * MiB, 99))
        objects[big] = blob(1 * MiB, 99)
        slow = await s.get(target + big)
        first = await slow.content.readexactly(1000)
        assert (a.cache.objects_dir / big).exists() or big not in a.cache
        peak = 0
        statuses: dict[int, int] = {}
        for round_ in range(8):
            batch = [rng.choice(names[3:]) for _ in range(12)]

            async def one(n: str) -> None:
                async with s.get(target + n) as resp:
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    if resp.status == 200:
                        assert await resp.read() == objects[n]
                    else:
                        assert resp.status == 503 and "Retry-After" in resp.headers

            await asyncio.gather(*(one(n) for n in batch))
            peak = max(peak, cache_bytes_on_disk(a.cache.root))
            stats = a.cache.stats()
            assert stats.bytes + stats.reserved <= budget
            for n in pinned:
                assert (a.cache.objects_dir / n).read_bytes() == objects[n], (
                    f"pinned object evicted in round {round_}"
                )
        assert peak <= budget
        assert statuses.get(200, 0) > 0
        assert a.cache.evictions > 0
        # the slow reader's object was never taken away under it
        rest = await slow.read()
        slow.release()
        assert first + rest == objects[big]
        assert held in objects


async def test_eviction_takes_the_least_recently_used_first(objstore: Store, tmp_path: Path) -> None:
    """Five equal objects fill the budget; reading a, c and then b (a HEAD is a read too)
    leaves d, e, a, c, b from least to most recently used; each new object evicts exactly
    the next of those, and a read between two arrivals moves an object to the back."""
    size = 100_000
    a, b, c, d, e, f, g, h, i = (put(objstore, blob(size, 200 + n)) for n in range(9))
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)], max_bytes=5 * size) as r,
        aiohttp.ClientSession() as s,
    ):
        target = f"{url(r)}/objects/sha256/"

        async def cached() -> set[str]:
            return {n for n in (a, b, c, d, e, f, g, h, i) if n in r.cache}

        for n in (a, b, c, d, e):
            await fetch_all(s, target + n)
        assert await cached() == {a, b, c, d, e} and r.cache.evictions == 0
        await fetch_all(s, target + a)
        await fetch_all(s, target + c)
        async with s.head(target + b) as resp:
            assert resp.status == 200
        await fetch_all(s, target + f)  # evicts d, the least recently used
        assert await cached() == {a, b, c, e, f}
        await fetch_all(s, target + g)  # then e
        assert await cached() == {a, b, c, f, g}
        await fetch_all(s, target + a)  # a moves behind f and g: c goes next, not a
        await fetch_all(s, target + h)
        assert await cached() == {a, b, f, g, h}
        await fetch_all(s, target + i)  # then b
        assert await cached() == {a, f, g, h, i}
        assert r.cache.evictions == 4
        assert sorted(p.name for p in r.cache.objects_dir.iterdir()) == sorted([a, f, g, h, i])
        assert (await metrics(s, url(r)))["slim_relay_cache_evictions_total"] == 4


async def test_object_larger_than_budget_is_503(objstore: Store, tmp_path: Path) -> None:
    name = put(objstore, blob(200_000, 9))
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)], max_bytes=100_000) as a,
        aiohttp.ClientSession() as s,
    ):
        resp = await s.get(f"{url(a)}/objects/sha256/{name}")
        assert resp.status == 503
        assert "larger than the whole cache budget" in await resp.text()
        assert resp.headers["Retry-After"]


async def test_cache_survives_restart_and_shrinks_to_budget(objstore: Store, tmp_path: Path) -> None:
    names = [put(objstore, blob(100_000, i)) for i in range(5)]
    async with origin(objstore) as core:
        async with relay(tmp_path / "a", [url(core)]) as a, aiohttp.ClientSession() as s:
            for n in names:
                await fetch_all(s, f"{url(a)}/objects/sha256/{n}")
        (tmp_path / "a" / "tmp" / "leftover").write_bytes(b"x" * 10)
        async with relay(tmp_path / "a", [url(core)], max_bytes=250_000) as a2:
            assert a2.cache.stats().objects == 2
            assert a2.cache.stats().bytes <= 250_000
            assert list(a2.cache.tmp_dir.iterdir()) == []


async def test_too_many_transfers_get_503(objstore: Store, tmp_path: Path) -> None:
    name = put(objstore, blob(48 * MiB, 10))  # more than socket buffers hold: the held transfer stays active
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)], max_transfers=1) as a,
        aiohttp.ClientSession() as s,
    ):
        target = f"{url(a)}/objects/sha256/{name}"
        await fetch_all(s, target)
        held = await s.get(target)
        await held.content.readexactly(100)
        async with s.get(target) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
        assert (await metrics(s, url(a)))["slim_relay_object_overloaded_total"] == 1  # 503s counted
        await held.read()
        held.release()
        assert await fetch_all(s, target)


# -- a relay killed mid-download -----------------------------------------------------
@pytest.mark.slow
async def test_sigkill_mid_download_resume_from_another_relay(objstore: Store, tmp_path: Path) -> None:
    data = blob(64 * MiB, 11)
    name = put(objstore, data)
    async with origin(objstore) as core, aiohttp.ClientSession() as s:
        r1 = start_relay_process(tmp_path / "r1", url(core))
        r2 = start_relay_process(tmp_path / "r2", url(core))
        try:
            async with s.get(f"{r1.url}/objects/sha256/{name}") as resp:
                assert resp.status == 200
                got = bytearray(await resp.content.readexactly(MiB))
                r1.kill()
                rest, cut = await read_until_cut(resp)
                got += rest
            assert cut and MiB <= len(got) < len(data)
            async with s.get(
                f"{r2.url}/objects/sha256/{name}", headers={"Range": f"bytes={len(got)}-"}
            ) as resp:
                assert resp.status == 206
                got += await resp.read()
            assert bytes(got) == data
        finally:
            r1.kill()
            r1.proc.communicate(timeout=10)
            code, err = stop_process(r2)
            assert code == 0, err


# -- the upstream from the registry ----------------------------------------------------
def two_tier_registry(tmp_path: Path, hub_url: str) -> Path:
    """A registry in which relay ``edge`` has ``hub`` (at ``hub_url``) as its parent."""
    file = tmp_path / "registry.yaml"
    file.write_text(
        f"""
sites: {{lo: {{prefixes: [127.0.0.0/8]}}}}
relays:
  hub: {{urls: ["{hub_url}"], site: lo}}
  edge: {{urls: ["http://127.0.0.1:9/"], site: lo, parent: hub}}
"""
    )
    return file


async def test_a_relay_fetches_through_the_parent_its_registry_names(objstore: Store, tmp_path: Path) -> None:
    data, other = blob(3 * MiB, 21), blob(MiB, 22)
    name, other_name = put(objstore, data), put(objstore, other)
    async with (
        origin(objstore) as core,
        relay(tmp_path / "hub", [url(core)]) as hub,
        aiohttp.ClientSession() as s,
    ):
        registry = two_tier_registry(tmp_path, url(hub))
        edge = start_relay_process(tmp_path / "edge", None, "--registry", str(registry), "--name", "edge")
        try:
            assert await fetch_all(s, f"{edge.url}/objects/sha256/{name}") == data
        finally:
            code, err = stop_process(edge)
            assert code == 0, err
        hub_seen = await metrics(s, url(hub))
        assert hub_seen["slim_relay_upstream_fetches_total"] == 1  # the edge's miss went through the hub
        # --upstream comes after the parent: with the parent down, the core's object server serves
        (tmp_path / "down").mkdir()
        parent_down = two_tier_registry(tmp_path / "down", "http://127.0.0.1:9/")
        direct = start_relay_process(
            tmp_path / "direct", url(core), "--registry", str(parent_down), "--name", "edge"
        )
        try:
            assert await fetch_all(s, f"{direct.url}/objects/sha256/{other_name}") == other
            direct_seen = await metrics(s, direct.url)
        finally:
            code, err = stop_process(direct)
            assert code == 0, err
        assert direct_seen["slim_relay_upstream_fetches_total"] == 1
        assert (await metrics(s, url(hub)))["slim_relay_upstream_fetches_total"] == 1  # the hub saw nothing


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--name", "hub"],
            "relay 'hub' has no parent in REG: its upstream is the core's object server; give",
        ),
        (["--name", "nosuch"], "unknown relay 'nosuch' (known: edge, hub)"),
        ([], "--registry needs --name"),
    ],
)
def test_a_relay_without_a_parent_in_the_registry_needs_upstream(
    tmp_path: Path, args: list[str], message: str
) -> None:
    from click.testing import CliRunner

    from slim.cli import main

    registry = two_tier_registry(tmp_path, "http://127.0.0.1:9/")
    argv = ["relay", "serve", "--registry", str(registry), "--cache-dir", str(tmp_path / "c"), *args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 1
    assert message.replace("REG", str(registry)) in result.output


# -- the fast path -------------------------------------------------------------------
async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
    return status, headers, body


async def test_fast_path_keepalive_pipelining_and_handover(objstore: Store, tmp_path: Path) -> None:
    small, large = blob(5000, 20), blob(3 * MiB, 21)
    s_name, l_name = put(objstore, small), put(objstore, large)
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)]) as a,
        aiohttp.ClientSession() as s,
    ):
        for n in (s_name, l_name):  # cache both (misses go through aiohttp)
            await fetch_all(s, f"{url(a)}/objects/sha256/{n}")
        assert a.front is not None and a.front.fast is not None
        before = a.front.fast.handovers
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        try:
            get = "GET /objects/sha256/{} HTTP/1.1\r\nHost: x\r\n{}\r\n"
            # three pipelined requests in one write: small, large, HEAD small
            writer.write(
                (
                    get.format(s_name, "")
                    + get.format(l_name, "")
                    + get.format(s_name, "").replace("GET", "HEAD")
                ).encode()
            )
            status, headers, body = await read_response(reader)
            assert status == 200 and body == small and headers["etag"] == f'"sha256:{s_name}"'
            status, headers, body = await read_response(reader)
            assert status == 200 and body == large
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert b"200 OK" in head and f"Content-Length: {len(small)}".encode() in head
            assert a.front.fast.handovers == before  # all three on the fast path
            # a Range request on the same connection goes to aiohttp, which keeps the connection
            writer.write(get.format(l_name, "Range: bytes=10-19\r\n").encode())
            status, headers, body = await read_response(reader)
            assert status == 206 and body == large[10:20]
            assert a.front.fast.handovers == before + 1
            writer.write(get.format(s_name, "").encode())
            status, _, body = await read_response(reader)
            assert status == 200 and body == small
        finally:
            writer.close()
            await writer.wait_closed()
        # HTTP/1.0 without keep-alive: answered, then closed
        reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
        writer.write(f"GET /objects/sha256/{s_name} HTTP/1.0\r\n\r\n".encode())
        status, headers, body = await read_response(reader)
        assert status == 200 and body == small and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await writer.wait_closed()
        # garbage, and requests the fast path does not take, still get proper answers
        host = "HTTP/1.1\r\nHost: x\r\n"
        for raw, expected in (
            (b"BLAH\r\n\r\n", 400),
            (f"POST /objects/sha256/{s_name} {host}Content-Length: 2\r\n\r\nhi".encode(), 405),
            (f'GET /objects/sha256/{s_name} {host}If-None-Match: "sha256:{s_name}"\r\n\r\n'.encode(), 304),
            (f"GET /healthz {host}\r\n".encode(), 200),
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", a.port)
            try:
                writer.write(raw)
                line = await asyncio.wait_for(reader.readline(), 10)
                assert int(line.split()[1]) == expected, (raw, line)
            finally:
                writer.close()
                await writer.wait_closed()
        m = await metrics(s, url(a))
        assert m["slim_relay_object_hits_total"] >= 5


async def test_memory_cache_stays_in_budget_and_follows_evictions(objstore: Store, tmp_path: Path) -> None:
    objects = {put(objstore, d): d for d in (blob(50_000, 30 + i) for i in range(8))}
    async with (
        origin(objstore) as core,
        relay(tmp_path / "a", [url(core)], max_bytes=220_000, memory_bytes=120_000) as a,
        aiohttp.ClientSession() as s,
    ):
        for n, d in objects.items():
            for _ in range(2):  # the first request fetches (aiohttp), the second is a hit (fast path)
                assert await fetch_all(s, f"{url(a)}/objects/sha256/{n}") == d
                held = [o for o in a.cache._lru.values() if o.body is not None]
                assert a.cache.memory_used == sum(len(o.body or b"") for o in held) <= 120_000
                assert all(o.body == objects[o.hex] for o in held)
        assert a.cache.evictions > 0 and a.cache.memory_used > 0
        assert a.cache.stats().bytes <= 220_000


# -- HTTPS ---------------------------------------------------------------------------
@pytest.fixture
def core_tls() -> ssl.SSLContext:
    return core_https()


async def test_https_from_the_core_through_a_relay_and_its_child(
    objstore: Store, tmp_path: Path, core_tls: ssl.SSLContext
) -> None:
    """The core's object server over HTTPS (slim-core), relay A fetching from it and serving
    HTTPS with its certificate, relay B fetching from A over HTTPS (A's name), a client of B
    over HTTPS: every path a body takes over TLS (streamed while fetched, the fast path's
    small and large bodies, aiohttp's ranges) gives the right bytes, and plain HTTP still works."""
    large, small = blob(3 * MiB + 5, 21), blob(10_000, 22)
    big, little = put(objstore, large), put(objstore, small)
    a_id, b_id = (
        await asyncio.to_thread(relay_identity, "edge-a"),
        await asyncio.to_thread(relay_identity, "edge-b"),
    )
    https = "127.0.0.1:0"
    async with (
        https_origin(objstore, core_tls) as core,
        relay(tmp_path / "a", [https_url(core)], identity=a_id, https_listen=https) as a,
        relay(tmp_path / "b", [f"{https_url(a)}#edge-a.relay.slim"], identity=b_id, https_listen=https) as b,
        aiohttp.ClientSession() as s,
    ):
        tls = await asyncio.to_thread(client_https, "edge-b.relay.slim")
        base = f"{https_url(b)}/objects/sha256"
        cold = await asyncio.gather(*(fetch_all(s, f"{base}/{big}", **tls) for _ in range(3)))
        assert all(body == large for body in cold)  # streamed to all three while B fetched it
        assert b.front is not None and b.front.fast is not None
        handovers = b.front.fast.handovers
        assert await fetch_all(s, f"{base}/{big}", **tls) == large  # a hit: the fast path, in pieces
        assert b.front.fast.handovers == handovers
        assert await fetch_all(s, f"{base}/{little}", **tls) == small  # a miss, then ...
        assert await fetch_all(s, f"{base}/{little}", **tls) == small  # ... a small hit
        tail = await fetch_all(s, f"{base}/{big}", {"Range": f"bytes={2 * MiB}-"}, **tls)
        assert tail == large[2 * MiB :]  # a range: aiohttp's path
        assert await fetch_all(s, f"{url(b)}/objects/sha256/{big}") == large  # plain HTTP beside it
        for r in (a, b):
            m = await metrics(s, url(r))
            assert m["slim_relay_upstream_fetches_total"] == 2  # one per object, over HTTPS
        assert (await metrics(s, url(b)))["slim_relay_object_aborted_total"] == 0


@pytest.mark.parametrize("case", ["another CA", "another name"])
async def test_an_https_upstream_without_the_expected_certificate_is_refused(
    objstore: Store, tmp_path: Path, case: str, core_tls: ssl.SSLContext
) -> None:
    """An upstream whose certificate is not from SLIM's CA, or not the one the relay expects
    (slim-core, or the parent's name), sends nothing: 502, and the relay says why."""
    name = put(objstore, blob(50_000, 23))
    if case == "another CA":
        tls, suffix, why = await asyncio.to_thread(foreign_https, tmp_path / "other-ca"), "", "SLIM's CA"
    else:
        tls, suffix, why = core_tls, "#edge-x.relay.slim", "edge-x.relay.slim"
    identity = await asyncio.to_thread(relay_identity, "edge-a")
    async with (
        https_origin(objstore, tls) as core,
        relay(tmp_path / "a", [https_url(core) + suffix], identity=identity) as a,
        aiohttp.ClientSession() as s,
    ):
        async with s.get(f"{url(a)}/objects/sha256/{name}") as resp:
            assert resp.status == 502
            text = await resp.text()
        assert "certificate" in text and why in text, text
        assert name not in a.cache
        assert core.objects.counters.requests == 0


def test_relay_https_settings_are_checked(tmp_path: Path) -> None:
    base = {"cache_dir": tmp_path, "listen": "127.0.0.1:0"}
    with pytest.raises(ValueError, match="https_listen needs --identity"):
        RelayConfig(upstreams=["http://127.0.0.1:1"], https_listen="127.0.0.1:0", **base)
    with pytest.raises(ValueError, match="is https: give --identity"):
        RelayConfig(upstreams=["https://127.0.0.1:1"], **base)
    with pytest.raises(ValueError, match="only https:// has"):
        RelayConfig(upstreams=["http://127.0.0.1:1#edge-a.relay.slim"], **base)
    ok = RelayConfig(
        upstreams=["https://127.0.0.1:1/#edge-a.relay.slim"], upstream_ca=tmp_path / "ca.pem", **base
    )
    assert [Upstream.parse(u) for u in ok.upstreams] == [Upstream("https://127.0.0.1:1", "edge-a.relay.slim")]
    assert Upstream.parse("https://[::1]:8443") == Upstream("https://[::1]:8443", "slim-core")
