"""The agent's HTTP client against relays that shed load: 503 with Retry-After is waited
for (within the boot deadline), a relay that is down is left at once, resuming by Range
survives a busy relay; and a storm of 200 agents against one relay process with
``--max-transfers 8`` where every agent finishes.

Real servers on 127.0.0.1 port 0: scripted aiohttp servers for the focused cases, a
``slim relay serve`` process for the storm.  Waits are asserted by what the client
counted and planned (``stats.busy``, ``stats.waited``, requests seen), not by clocks.
And relays named by https:// URLs: their certificates checked against SLIM's CA."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from slim.agent.ee import Reporter
from slim.agent.fetch import MAX_RETRY_AFTER, PIPELINE_HEAD, FetchError, Relays, pipelined_head, retry_after
from slim.agent.plan import DEFAULT_DEADLINE, BootArgs, ObjectRef, PlanError
from slim.core.store import Store
from tests.support import (
    blob,
    core_https,
    foreign_https,
    https_origin,
    https_url,
    origin,
    pki,
    put,
    relay,
    relay_identity,
    serve_on_loopback,
    start_relay_process,
    stop_process,
    url,
)

MiB = 1 << 20
DATA = blob(3 * MiB + 17, 16)
REF = ObjectRef("sha256:" + hashlib.sha256(DATA).hexdigest(), len(DATA))


class Scripted:
    """A relay stand-in that answers its first requests from a script — ``(status,
    Retry-After or None)``, or ``"cut"`` for half the object and a closed connection —
    then serves the object (honouring ``Range: bytes=N-``) and the plan."""

    def __init__(self, script: list[tuple[int, str | None] | str]) -> None:
        self.script = list(script)
        self.requests: list[str] = []  # the Range header of each request ("" for none)
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.headers.get("Range", ""))
        if self.script:
            step = self.script.pop(0)
            if step == "cut":
                resp = web.StreamResponse(headers={"Content-Length": str(len(DATA))})
                await resp.prepare(request)
                await resp.write(DATA[: len(DATA) // 2])
                assert request.transport is not None
                request.transport.close()
                return resp
            assert isinstance(step, tuple)
            status, after = step
            headers = {"Retry-After": after} if after is not None else {}
            return web.json_response({"error": "relay busy"}, status=status, headers=headers)
        if request.path.startswith("/v1/"):
            return web.json_response({"ok": True})
        start = 0
        if rng := request.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            return web.Response(
                body=DATA[start:],
                status=206,
                headers={"Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"},
            )
        return web.Response(body=DATA)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/objects/sha256/{name}", self.handle)
        app.router.add_get("/v1/nodes/{node}/plan", self.handle)
        self._runner, self.url = await serve_on_loopback(app)
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@asynccontextmanager
async def scripted(*script: tuple[int, str | None] | str) -> AsyncIterator[Scripted]:
    server = Scripted(list(script))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def refused_url() -> str:
    """A loopback port nothing listens on (bound, then closed: connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def fetch(relays: Relays) -> tuple[str, bytes]:
    got = bytearray()
    try:
        used = relays.stream(REF, got.extend)
    finally:
        relays.close()
    return used, bytes(got)


async def in_thread(relays: Relays) -> tuple[str, bytes]:
    return await asyncio.get_running_loop().run_in_executor(None, fetch, relays)


# -- Retry-After ---------------------------------------------------------------------
def test_retry_after_seconds_and_dates() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert retry_after(None) is None
    assert retry_after("3") == 3.0 and retry_after(" 0 ") == 0.0
    assert retry_after("86400") == MAX_RETRY_AFTER  # capped
    assert retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now) == 7.0
    assert retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now) == 0.0  # past: now
    for bad in ("soon", "-1", "1.5", ""):
        assert retry_after(bad, now) is None


def test_boot_deadline_from_the_command_line() -> None:
    base = "slim.node=n1 slim.relays=http://127.0.0.1:1"
    assert BootArgs.from_cmdline(base).deadline == DEFAULT_DEADLINE
    assert BootArgs.from_cmdline(base + " slim.deadline=120").deadline == 120.0
    for bad in ("0", "-5", "soon", "nan", "inf"):
        with pytest.raises(PlanError, match=f"slim.deadline: '{bad}' is not a positive number of seconds"):
            BootArgs.from_cmdline(f"{base} slim.deadline={bad}")
    with pytest.raises(FetchError, match="boot deadline must be a positive"):
        Relays(["http://127.0.0.1:1"], deadline=0)


async def test_busy_relay_is_asked_again_after_its_retry_after() -> None:
    """Three 503s (seconds, an HTTP date, none) on the only relay, more than ``rounds``:
    each is waited for as told, and the fourth request gets the object."""
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=1), usegmt=True)
    async with scripted((503, "1"), (503, soon), (503, None)) as relay:
        relays = Relays([relay.url], rounds=2)
        used, got = await in_thread(relays)
    assert used == relay.url and got == DATA
    assert len(relay.requests) == 4 and relays.stats.busy == 3
    assert relays.stats.relay_failures == []
    # what it planned to sleep: at least the 1 s asked for (the date may be a second
    # nearer by the time it is read), and the backoff of a bare 503
    assert relays.stats.waited >= 1.0 + 0.5


async def test_api_call_waits_for_a_busy_relay() -> None:
    """The plan (and events) go through the same waiting: 503 + Retry-After, then 200."""
    async with scripted((503, "1"), (503, "1"), (503, "1")) as relay:
        relays = Relays([relay.url], rounds=1)
        loop = asyncio.get_running_loop()
        used, body = await loop.run_in_executor(None, relays.call, "GET", "/v1/nodes/n1/plan")
        relays.close()
    assert used == relay.url and body == b'{"ok": true}'
    assert len(relay.requests) == 4 and relays.stats.busy == 3 and relays.stats.waited > 0


async def test_deadline_shorter_than_retry_after_fails_naming_it() -> None:
    async with scripted((503, "30")) as relay:
        relays = Relays([relay.url], deadline=5)
        with pytest.raises(FetchError) as err:
            await in_thread(relays)
    text = str(err.value)
    assert "boot deadline (5 s, slim.deadline=)" in text
    assert f"{relay.url}: 503: relay busy (Retry-After 30)" in text
    assert len(relay.requests) == 1 and relays.stats.waited == 0  # gave up without sleeping


async def test_deadline_bounds_waiting_only() -> None:
    """Past the deadline a relay that need not be waited for still serves (a long boot is
    not cut short); one that is busy is not waited for."""
    async with scripted() as free, scripted((503, "1")) as busy:
        late = Relays([free.url], deadline=1e-9)
        used, got = await in_thread(late)
        assert used == free.url and got == DATA
        late = Relays([busy.url], deadline=1e-9)
        with pytest.raises(FetchError, match="boot deadline"):
            await in_thread(late)
    assert len(busy.requests) == 1


async def test_down_relay_is_left_at_once_for_the_next() -> None:
    down = refused_url()
    async with scripted() as relay:
        relays = Relays([down, relay.url])
        used, got = await in_thread(relays)
    assert used == relay.url and got == DATA
    assert len(relay.requests) == 1 and relays.stats.waited == 0 and relays.stats.busy == 0
    assert relays.stats.relay_failures == [f"{down} at byte 0 of {REF.digest}"]


async def test_busy_relay_is_passed_over_for_a_free_one() -> None:
    async with scripted((503, "30")) as busy, scripted() as free:
        relays = Relays([busy.url, free.url])
        used, got = await in_thread(relays)
    assert used == free.url and got == DATA
    assert relays.stats.busy == 1 and relays.stats.waited == 0


async def test_resume_by_range_after_a_cut_and_a_busy_answer() -> None:
    """Half the object, the connection cut; then 503; then the rest by Range."""
    async with scripted("cut", (503, "1")) as relay:
        relays = Relays([relay.url], rounds=2)
        used, got = await in_thread(relays)
    half = len(DATA) // 2
    assert used == relay.url and got == DATA and relays.stats.resumed == 1 and relays.stats.busy == 1
    assert relay.requests == ["", f"bytes={half}-", f"bytes={half}-"]


async def test_all_down_says_what_each_answered() -> None:
    down = refused_url()
    async with scripted((500, None), (500, None)) as broken:
        relays = Relays([down, broken.url], rounds=2)
        with pytest.raises(FetchError) as err:
            await in_thread(relays)
    text = str(err.value)
    assert "no relay could serve it" in text
    assert f"{broken.url}: answered 500 at byte 0" in text and f"{down}: " in text
    assert len(broken.requests) == 2 and relays.stats.waited == 0


class _Refused(Exception):
    """The sink's own failure (as ee's is: zstd took no more)."""


def into_pipe(
    relays: Relays, verify: bool, close_reader_after: int | None = None, times: int = 1
) -> tuple[bytes, int, int]:
    """Stream REF ``times`` into a pipe through a sink that also splices (as the agent's
    unpacking does, into zstd's stdin): (what came out of the pipe, bytes spliced, calls
    to write).  ``close_reader_after``: the reader closes its end after that many bytes."""
    r, w = os.pipe()
    out = bytearray()
    spliced, writes = [0], [0]

    def read() -> None:
        while chunk := os.read(r, 1 << 16):
            out.extend(chunk)
            if close_reader_after is not None and len(out) >= close_reader_after:
                break
        os.close(r)

    def write(chunk: bytes | memoryview) -> None:
        writes[0] += 1
        os.write(w, chunk)

    def take(fd: int, most: int) -> int:
        try:
            n = os.splice(fd, w, most)
        except BrokenPipeError as exc:
            raise _Refused(str(exc)) from exc
        spliced[0] += n
        return n

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(times):
            relays.stream(REF, write, verify=verify, splice=take)
    finally:
        os.close(w)
        reader.join(timeout=30)
        relays.close()
    return bytes(out), spliced[0], writes[0]


async def in_pipe(
    relays: Relays, verify: bool, close_reader_after: int | None = None, times: int = 1
) -> tuple[bytes, int, int]:
    return await asyncio.get_running_loop().run_in_executor(
        None, into_pipe, relays, verify, close_reader_after, times
    )


async def test_a_sink_that_splices_takes_the_socket_s_bytes_and_a_cut_resumes_where_it_stopped() -> None:
    """Where nothing here checks the bytes (verify False, no local cache), a plain HTTP
    answer's bytes go from the socket to the sink's pipe by os.splice; cut halfway, the
    rest comes by Range from where the pipe's bytes stopped; with verify, nothing is
    spliced (the bytes are hashed here)."""
    async with scripted("cut") as relay:
        relays = Relays([relay.url], rounds=2)
        got, spliced, writes = await in_pipe(relays, False)
    half = len(DATA) // 2
    assert got == DATA and relays.stats.resumed == 1
    assert relay.requests == ["", f"bytes={half}-"]
    assert spliced > len(DATA) // 2 and writes <= 2  # (what each answer's reader held already)
    async with scripted() as relay:  # (twice on one connection: the spliced answer is closed)
        relays = Relays([relay.url])
        got, spliced, _ = await in_pipe(relays, False, times=2)
    assert got == DATA * 2 and spliced > len(DATA) and not relays.stats.relay_failures
    async with scripted() as relay:
        relays = Relays([relay.url])
        got, spliced, writes = await in_pipe(relays, True)
    assert got == DATA and spliced == 0 and writes > 1


async def test_a_sink_that_fails_while_splicing_is_not_the_relay_s_failure() -> None:
    """The pipe's reader gone (zstd died), the sink's error comes out as it is, and no
    other relay or Range is tried for it."""
    async with scripted() as relay, scripted() as other:
        relays = Relays([relay.url, other.url])
        with pytest.raises(_Refused):
            await in_pipe(relays, False, 1 << 20)
    assert len(relay.requests) + len(other.requests) == 1 and not relays.stats.relay_failures


# -- a storm against one relay ---------------------------------------------------------
STORM_AGENTS = 200
STORM_SIZE = 8 * MiB
MAX_TRANSFERS = 8
PACE = 0.01  # seconds an agent spends on each 1 MiB chunk it receives (a bounded pace)


def overloaded(relay_url: str) -> float:
    with urllib.request.urlopen(f"{relay_url}/metrics", timeout=10) as resp:  # noqa: S310 - loopback
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "slim_relay_object_overloaded_total":
                return sample.value
    raise AssertionError("the relay's /metrics has no slim_relay_object_overloaded_total")


def hold_slots(relay_url: str, name: str, n: int) -> list[socket.socket]:
    """``n`` requests for the object that read nothing: with a tiny receive buffer each
    keeps one of the relay's transfer slots busy (the object outgrows the socket buffers)."""
    port = int(relay_url.rsplit(":", 1)[1])
    held = []
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET /objects/sha256/{name} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        assert s.recv(12).startswith(b"HTTP/1.1 200")
        held.append(s)
    return held


def storm(relay_url: str, ref: ObjectRef) -> tuple[list[Relays], list[str], float]:
    """Hold every slot, start the agents (each is shed at once), free the slots once the
    relay counted a 503 for each agent, and let them all finish; bounded in time."""
    held = hold_slots(relay_url, ref.hex, MAX_TRANSFERS)
    agents = [Relays([relay_url], deadline=240) for _ in range(STORM_AGENTS)]
    errors: list[str] = []
    received = [0] * STORM_AGENTS

    def agent(i: int) -> None:
        def write(chunk: bytes | memoryview) -> None:
            received[i] += len(chunk)
            time.sleep(PACE)  # the pace of a node writing what it gets, not synchronisation

        try:
            agents[i].stream(ref, write)  # returns only when the sha256 matched
            if received[i] != ref.size:
                errors.append(f"agent {i}: {received[i]} bytes of {ref.size}")
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            errors.append(f"agent {i}: {exc}")
        finally:
            agents[i].close()

    threads = [threading.Thread(target=agent, args=(i,), daemon=True) for i in range(STORM_AGENTS)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while overloaded(relay_url) < STORM_AGENTS:  # every agent was shed at least once
            if time.monotonic() > deadline:
                raise AssertionError(f"only {overloaded(relay_url)} 503s with every slot held")
            time.sleep(0.05)  # polling interval; the count is what we wait for
    finally:
        for s in held:
            s.close()
    end = time.monotonic() + 240
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "agents still fetching after 240 s"
    return agents, errors, overloaded(relay_url)


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_storm_of_200_agents_against_8_transfer_slots_all_finish(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    data = blob(STORM_SIZE, 17)
    name = put(store, data)
    ref = ObjectRef(f"sha256:{name}", len(data))
    loop = asyncio.get_running_loop()
    async with origin(store) as core:
        relay = await loop.run_in_executor(
            None,
            start_relay_process,
            tmp_path / "relay",
            url(core),
            "--max-transfers",
            str(MAX_TRANSFERS),
        )
        try:
            warm = Relays([relay.url])  # the relay fetches the object once from upstream
            await loop.run_in_executor(None, warm.read, ref)
            warm.close()
            agents, errors, shed = await loop.run_in_executor(None, storm, relay.url, ref)
        finally:
            await loop.run_in_executor(None, stop_process, relay)
    assert errors == []
    assert all(a.stats.objects == 1 and a.stats.bytes == ref.size for a in agents)
    assert all(a.stats.busy >= 1 for a in agents)  # each was shed, waited, and came back
    assert shed >= STORM_AGENTS and shed == sum(a.stats.busy for a in agents)


# -- HTTPS -------------------------------------------------------------------------
def session_ca() -> Path:
    return pki().ca_dir / "ca.crt"


async def test_objects_and_calls_over_https_from_a_slim_relay(tmp_path: Path) -> None:
    """A relay named by an https:// URL: the agent checks its certificate against SLIM's CA
    (a relay's, whatever address it is reached at) and fetches and calls over TLS."""
    store = Store(tmp_path / "store")
    put(store, DATA)
    identity = await asyncio.to_thread(relay_identity, "edge-a")
    async with (
        origin(store) as o,
        relay(tmp_path / "cache", [url(o)], identity=identity, https_listen="127.0.0.1:0") as r,
    ):
        relays = Relays([https_url(r)], ca=session_ca())
        used, got = await in_thread(relays)
        assert used == https_url(r) and got == DATA and relays.stats.relay_failures == []
        clone = relays.clone()  # the sync workers' connections: the same check
        _, health = await asyncio.to_thread(clone.call, "GET", "/healthz")
        clone.close()
        assert b'"healthy": true' in health


@pytest.mark.parametrize("server", ["another CA", "the core's certificate"])
async def test_a_server_without_a_slim_relays_certificate_is_refused(tmp_path: Path, server: str) -> None:
    """A server whose certificate SLIM's CA did not issue, or did but not to a relay (the
    core's), gets nothing asked of it: the boot fails saying why."""
    store = Store(tmp_path / "store")
    put(store, DATA)
    if server == "another CA":
        tls, why = await asyncio.to_thread(foreign_https, tmp_path / "other-ca"), "not from SLIM's CA"
    else:
        tls, why = await asyncio.to_thread(core_https), "not a relay's (role 'core', name 'slim-core')"
    async with https_origin(store, tls) as o:
        relays = Relays([https_url(o)], ca=session_ca(), rounds=1)
        with pytest.raises(FetchError, match="no relay could serve it") as err:
            await in_thread(relays)
    assert why in str(err.value), err.value
    assert o.objects.counters.requests == 0


def test_an_https_relay_without_the_ca_fails_before_connecting(tmp_path: Path) -> None:
    relays = Relays(["https://127.0.0.1:1"], ca=tmp_path / "missing.pem")
    with pytest.raises(FetchError, match=r"SLIM's CA certificate .*missing\.pem cannot be read"):
        relays.stream(REF, lambda _: None)


_NO_UNICODEDATA = """
import sys
sys.modules["unicodedata"] = None  # as in the initrd's Python (slim.core.build.smallpython)
import socket
try:
    socket.getaddrinfo("127.0.0.1", 1)
except LookupError as exc:
    print("before:", exc)
from slim.agent.fetch import FetchError, Relays, ascii_host_names
Relays(["http://127.0.0.1:1"])  # every Relays registers it: all connections start there
ascii_host_names()  # once is enough; twice changes nothing
try:
    Relays(["http://bücher.example:1"])
except FetchError as exc:
    print("relay:", exc)
print("after:", socket.getaddrinfo("127.0.0.1", 1, type=socket.SOCK_STREAM)[0][4])
try:
    socket.getaddrinfo("bücher.example", 1)
except UnicodeError as exc:
    print("refused:", exc)
"""


def test_without_unicodedata_ascii_host_names_still_resolve() -> None:
    """The socket module encodes every host name (IP addresses too) with the "idna" codec,
    which needs unicodedata; the agent's own passes ASCII names and refuses the rest."""
    proc = subprocess.run(
        [sys.executable, "-S", "-c", _NO_UNICODEDATA],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert proc.stdout.splitlines() == [
        "before: unknown encoding: idna",
        "relay: relay URL 'http://bücher.example:1': host names must be ASCII (IDNA ones as xn--)",
        "after: ('127.0.0.1', 1)",
        "refused: encoding with 'idna' codec failed (UnicodeError: 'bücher.example': only ASCII host"
        " names can be used here (no IDNA codec))",
    ]


# -- boot events ---------------------------------------------------------------------------
async def test_boot_events_go_on_their_own_while_the_boot_goes_on() -> None:
    """The reporter sends events from a thread of its own: a call returns while the relay
    has not answered; events arrive in order; a failed send is kept and goes with the next
    event; drain says whether the relays took them all, and close ends the sender."""
    got: list[list[str]] = []
    arrived, release = asyncio.Event(), asyncio.Event()
    refuse = [False]

    async def events(request: web.Request) -> web.Response:
        stages = [e["stage"] for e in (await request.json())["events"]]
        got.append(stages)
        arrived.set()
        await release.wait()
        if refuse[0]:
            refuse[0] = False
            return web.json_response({"error": "refused"}, status=400)
        return web.json_response({"accepted": len(stages)})

    app = web.Application()
    app.router.add_post("/v1/nodes/{node}/events", events)
    runner, url = await serve_on_loopback(app)
    reporter = Reporter(Relays([url], timeout=30), "n1", "base")
    try:
        await asyncio.to_thread(reporter, "plan")  # returns, the relay holding its answer
        await asyncio.wait_for(arrived.wait(), 30)
        await asyncio.to_thread(reporter, "ram:/")
        assert got == [["plan"]] and [e.stage for e in reporter._unsent] == ["plan", "ram:/"]
        release.set()
        assert await asyncio.to_thread(reporter.drain, 0)
        assert got == [["plan"], ["ram:/"]]
        refuse[0] = True
        await asyncio.to_thread(reporter, "sync:/")
        assert not await asyncio.to_thread(reporter.drain, 0)  # refused: kept
        await asyncio.to_thread(reporter, "done")
        assert await asyncio.to_thread(reporter.drain, 0)
        assert got[-2:] == [["sync:/"], ["sync:/", "done"]]
        assert [e.stage for e in reporter.events] == ["plan", "ram:/", "sync:/", "done"]
    finally:
        release.set()
        await asyncio.to_thread(reporter.close)
        await runner.cleanup()
    assert reporter._sender is not None and not reporter._sender.is_alive()


def test_a_sender_that_fails_never_stops_the_boot(capsys: pytest.CaptureFixture[str]) -> None:
    """A bug in sending events (here: the request raises) does not raise into the boot:
    draining says the events were not taken, stderr says why, and close returns."""
    reporter = Reporter(Relays([refused_url()]), "n1", "base")

    def broken(relays: Relays, batch: list[object]) -> bool:
        raise ValueError("a bug")

    reporter._post = broken  # type: ignore[method-assign,assignment]
    reporter("plan")
    assert not reporter.drain(tries=3, pause=0)
    reporter("done")  # after the failure: kept, not sent
    assert not reporter.close()
    assert [e.stage for e in reporter.events] == ["plan", "done"]
    assert "boot events could not be sent: ValueError('a bug')" in capsys.readouterr().err
    assert reporter._sender is not None and not reporter._sender.is_alive()


# -- pipelined small objects ------------------------------------------------------------
def pipelined(relays: Relays, refs: list[ObjectRef]) -> tuple[int, list[tuple[int, bytes]]]:
    got: list[tuple[int, bytes]] = []
    n = relays.fetch_pipelined(refs, lambda i, data: got.append((i, data)))
    return n, got


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_small_objects_come_pipelined_in_order_cached_or_not(tmp_path: Path, scheme: str) -> None:
    """Twenty small objects asked for at once on one connection, half of them already in the
    relay's cache (its fast path answers them) and half not (it fetches them upstream first):
    every one comes, verified, in order, and the connection is still there for the next."""
    store = Store(tmp_path / "store")
    datas = [blob(1000 + 97 * i, 200 + i) for i in range(20)]
    refs = [ObjectRef("sha256:" + put(store, d), len(d)) for d in datas]
    identity = await asyncio.to_thread(relay_identity, "edge-p") if scheme == "https" else None
    https = "127.0.0.1:0" if identity else None
    async with (
        origin(store) as o,
        relay(tmp_path / "cache", [url(o)], identity=identity, https_listen=https) as r,
    ):
        base = https_url(r) if scheme == "https" else url(r)
        warm = Relays([base], ca=session_ca())
        for ref in refs[::2]:
            await asyncio.to_thread(warm.read, ref)
        warm.close()
        relays = Relays([base], ca=session_ca())
        n, got = await asyncio.to_thread(pipelined, relays, refs)
        assert n == 20 and got == list(enumerate(datas))
        assert relays.stats.objects == 20 and relays.stats.bytes == sum(map(len, datas))
        assert relays._conns  # the connection stays, idle: the next request goes on it
        assert await asyncio.to_thread(relays.read, refs[3]) == datas[3]
        relays.close()
    assert r.objects.counters.hits >= 10  # the cached half came from the fast path


class Misbehaving:
    """A raw HTTP/1.1 server on loopback: the first connection's answer to request ``bad``
    is spoiled (``how``), every other answer is a plain 200 of the object."""

    def __init__(self, objects: dict[str, bytes], bad: int, how: str) -> None:
        self.objects, self.bad, self.how = objects, bad, how
        self.connections = 0
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = self.connections == 0
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.add(writer)
        try:
            for k in range(1000):  # bounded: one connection's requests
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                path = head.split(b" ", 2)[1].decode()
                data = self.objects[path.rsplit("/", 1)[1]]
                writer.write(self.answer(data, spoil=first and k == self.bad))
                await writer.drain()
                if first and k == self.bad and self.how in ("close", "cut"):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
        self.writers.discard(writer)

    def answer(self, data: bytes, spoil: bool) -> bytes:
        ok = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
        if not spoil:
            return ok
        return {
            "404": b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}",
            "503": b"HTTP/1.1 503 Busy\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n",
            "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
            % (len(data), data),
            "length": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data) - 1, data[:-1]),
            "digest": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), bytes(len(data))),
            "http/1.0": b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data),
            "close": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(data), data),
            "cut": ok[: len(ok) // 2],
        }[self.how]

    async def stop(self) -> None:
        for writer in list(self.writers):  # the handlers waiting for a request see the end
            writer.close()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.mark.parametrize("how", ["404", "503", "chunked", "length", "digest", "http/1.0", "close", "cut"])
async def test_a_pipelined_answer_that_is_not_a_plain_200_leaves_the_rest_to_stream(how: str) -> None:
    """Whatever goes wrong with the fourth answer of eight, the three before it are given,
    the connection is dropped, and the agent fetches the rest one by one (stream), which
    gets them right; a relay that closes after a good answer keeps that one."""
    datas = [blob(500 + i, 300 + i) for i in range(8)]
    objects = {hashlib.sha256(d).hexdigest(): d for d in datas}
    refs = [ObjectRef("sha256:" + h, len(d)) for h, d in objects.items()]
    server = Misbehaving(objects, bad=3, how=how)
    base = await server.start()
    try:
        relays = Relays([base], rounds=2)
        n, got = await asyncio.to_thread(pipelined, relays, refs)
        assert n == (4 if how == "close" else 3) and got == list(enumerate(datas[:n]))
        assert not relays._conns  # dropped
        rest = [await asyncio.to_thread(relays.read, ref) for ref in refs[n:]]
        assert rest == datas[n:] and server.connections == 2
        relays.close()
    finally:
        await server.stop()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=PIPELINE_HEAD + 64))
def test_a_pipelined_answer_head_is_read_or_refused_never_anything_else(head: bytes) -> None:
    try:
        length, close = pipelined_head(io.BytesIO(head))
    except ValueError:
        return
    assert length >= 0 and isinstance(close, bool) and head.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", "repeated Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", "bad or repeated Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: identity\r\n\r\n", "transfer coding"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "no Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nno colon\r\n\r\n", "not a header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\n\r\n", "too long, or cut"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * PIPELINE_HEAD + b"\r\nContent-Length: 5\r\n\r\n", "too long"),
        (b"HTTP/1.1 206 Partial\r\nContent-Length: 5\r\n\r\n", "not a plain 200"),
    ],
)
def test_pipelined_answer_heads_that_are_refused(head: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        pipelined_head(io.BytesIO(head))


def test_a_plain_pipelined_answer_head() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length:  17 \r\nETag: x\r\nConnection: Close\r\n\r\nbody"
    assert pipelined_head(io.BytesIO(head)) == (17, True)


async def test_a_relay_that_does_not_pipeline_is_asked_one_by_one_from_then_on() -> None:
    """A first pipelined answer that is not a plain 200 (here HTTP/1.0, as some proxies
    answer): the agent asks that relay one object per request from then on, without
    trying the pipeline again for every batch."""
    datas = [blob(400 + i, 700 + i) for i in range(4)]
    objects = {hashlib.sha256(d).hexdigest(): d for d in datas}
    refs = [ObjectRef("sha256:" + h, len(d)) for h, d in objects.items()]
    server = Misbehaving(objects, bad=0, how="http/1.0")
    base = await server.start()
    try:
        relays = Relays([base], rounds=2)
        assert await asyncio.to_thread(pipelined, relays, refs) == (0, [])
        assert server.connections == 1
        asked = server.requests
        assert await asyncio.to_thread(pipelined, relays, refs) == (0, [])
        assert server.connections == 1 and server.requests == asked  # not asked again
        assert [await asyncio.to_thread(relays.read, ref) for ref in refs] == datas
        relays.close()
    finally:
        await server.stop()
