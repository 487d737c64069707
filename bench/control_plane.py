"""P5 control plane: Locate + GetBootPlan requests per second, and a 10,000-node storm,
with and without TLS.

    PYTHONPATH=. .venv/bin/python bench/control_plane.py            # full run (about 8 minutes)
    PYTHONPATH=. .venv/bin/python bench/control_plane.py --quick    # a short smoke run

Starts the real core (`slim core serve`, a separate process per variant) on
127.0.0.1 port 0 with a synthetic registry of --nodes nodes on 4 sites and 12
relays.  The variants (--variants), all started first and then measured in
turn, round by round, so that the machine's drift falls on each alike:

- ``uvloop`` (the default loop) and ``asyncio`` (the stock loop), plaintext
  (``--insecure-no-tls``);
- ``uvloop-tls`` and ``asyncio-tls``: mutual TLS, as the core runs by default.
  The bench makes the CA (``--ca``) and enrolls one relay certificate
  (``relay0-0``) that every client presents, as a relay would; heartbeats for
  the 12 relays go over the core's local socket (``--socket``), which needs no
  certificate.

For each it measures:

- throughput with h2load (nghttp2's HTTP/2 load generator, written in C, so
  the load costs little of the machine's 2 cores): gRPC Locate and
  GetBootPlan calls alternating, --h2load-requests of them, 4 connections with
  32 streams each.  (LocateRequest and GetBootPlanRequest share their field
  numbers, so one request body serves both.)  Plaintext variants only: h2load
  cannot present a client certificate, which the core's mutual TLS demands.
  Skipped with a note if h2load is missing (`apt-get install
  nghttp2-client`; `./run bench` installs it);
- throughput with --clients Python grpc.aio client processes (--concurrency
  calls in flight each, one connection each), looping Locate + GetBootPlan for
  random nodes for --seconds (at most --max-calls pairs per client): what
  relays, themselves Python, can draw, though here they compete with the core
  for the CPUs.  This is the TLS-against-plaintext comparison; with TLS the
  clients encrypt too, so its requests/s drop says more than the core's share;
- storm: every one of the --nodes nodes asks once (Locate then GetBootPlan),
  all at once, from the Python clients; the time until the last answer;
- connection setup: --connections new connections, one after the other, each
  until it is ready and then through one Locate: what a relay pays once per
  connection (with TLS: the handshake, both certificates checked).

For every run the core's CPU time per request (or per connection) is read
from /proc: it is the figure least disturbed by this shared machine, and
10^6 / it is what one core of the core can answer.  The TLS cost is the
difference of the core's CPU per request between a TLS variant and its
plaintext twin.

A gRPC floor follows (plaintext, h2load): a grpc.aio server answering both
calls with fixed answers, Python gRPC's own cost.  Each figure is the median
of --repeat runs.  Results go to docs/benchmarks/control_plane.json.  This
machine is shared and has 2 cores; the clients compete with the core for
them, so the figures are a floor, and ratios matter more than absolute
numbers.

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import uvloop

from labs.placeholders import publish_placeholder_releases
from slim.core.registry import load_registry
from slim.core.store import Store
from slim.pki import CertificateAuthority
from slim.rpc import Credentials, aio_channel
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "control_plane.json"
SITES = 4
RELAYS_PER_SITE = 3
VARIANTS = {  # name: (event loop, TLS)
    "uvloop": ("uvloop", False),
    "uvloop-tls": ("uvloop", True),
    "asyncio": ("asyncio", False),
    "asyncio-tls": ("asyncio", True),
}
PLAINTEXT = Credentials(insecure=True)
NO_H2LOAD_TLS = "not applicable: h2load cannot present a client certificate (the core's mutual TLS needs one)"


@dataclass
class Core:
    """One variant's core process, and how clients and heartbeats reach it."""

    name: str
    loop: str
    tls: bool
    proc: subprocess.Popen[str]
    address: str  # 127.0.0.1:PORT
    credentials: Credentials  # what the load's clients present (a relay's identity with TLS)
    beat_address: str  # where heartbeats go: the local socket with TLS (no certificate needed)

    @property
    def pid(self) -> int:
        return self.proc.pid


def synthetic_registry(nodes: int) -> str:
    lines = ["settings:", "  stale_after: 600", "  nfs_server: 10.0.0.1", "sites:"]
    for s in range(SITES):
        lines += [f"  site{s}:", f"    prefixes: [10.{s}.0.0/16]"]
    lines.append("relays:")
    for s in range(SITES):
        for r in range(RELAYS_PER_SITE):
            lines += [f"  relay{s}-{r}:", f"    urls: [http://10.{s}.0.{r + 2}:8080/]", f"    site: site{s}"]
    lines += [
        "profiles:",
        "  pc:",
        "    modules: [e1000, ahci]",
        "environments:",
        "  base:",
        "    image: /srv/images/base",
        "    directories: {/usr: nfs, /var: ram, /tmp: {policy: ram, size: 1g}}",
        "nodes:",
    ]
    for n in range(nodes):
        mac = f"52:54:{(n >> 24) & 255:02x}:{(n >> 16) & 255:02x}:{(n >> 8) & 255:02x}:{n & 255:02x}"
        lines += [f"  n{n:05d}:", f'    macs: ["{mac}"]', "    profile: pc", "    environment: base"]
    return "\n".join(lines) + "\n"


def origin_of(n: int) -> str:
    return f"10.{n % SITES}.{(n // 250) % 250 + 1}.{n % 250 + 1}"


async def _heartbeats(address: str, credentials: Credentials) -> None:
    async def one(relay: str) -> AsyncIterator[pb.Heartbeat]:
        yield pb.Heartbeat(relay=relay, load=random.random() * 4, healthy=True)

    async with aio_channel(address, credentials) as ch:
        stub = pb_grpc.CoreStub(ch)
        for s in range(SITES):
            for r in range(RELAYS_PER_SITE):
                async for _ in stub.RelayHeartbeat(one(f"relay{s}-{r}")):
                    pass


def heartbeats(core: Core) -> None:
    """Every relay beats once (again before each round: heartbeats go stale)."""
    asyncio.run(_heartbeats(core.beat_address, PLAINTEXT if not core.tls else Credentials()))


async def _client(
    address: str,
    credentials: Credentials,
    nodes: list[int],
    concurrency: int,
    seconds: float,
    max_calls: int,
    start_at: float,
    storm: bool,
) -> dict[str, Any]:
    async with aio_channel(address, credentials) as ch:
        await asyncio.wait_for(ch.channel_ready(), 30)
        stub = pb_grpc.CoreStub(ch)
        await asyncio.sleep(max(0.0, start_at - time.time()))  # a common start for all clients
        t0 = time.perf_counter()
        deadline = t0 + seconds
        latencies: list[float] = []
        done = 0
        errors = 0
        todo = list(nodes)

        async def worker() -> None:
            nonlocal done, errors
            rng = random.Random()
            while True:
                if storm:
                    if not todo:
                        return
                    n = todo.pop()
                else:
                    if time.perf_counter() > deadline or done >= max_calls:
                        return
                    n = rng.choice(nodes)
                name = f"n{n:05d}"
                origin = origin_of(n)
                s = time.perf_counter()
                try:
                    await stub.Locate(pb.LocateRequest(node=pb.NodeRef(name=name), origin=origin), timeout=30)
                    await stub.GetBootPlan(
                        pb.GetBootPlanRequest(node=pb.NodeRef(name=name), origin=origin), timeout=30
                    )
                except grpc.aio.AioRpcError:
                    errors += 1
                latencies.append(time.perf_counter() - s)
                done += 1

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "cpu_seconds": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
            "pairs": done,
            "errors": errors,
            "elapsed": time.perf_counter() - t0,
            "finished_at": time.time(),
            "latencies": latencies,
        }


def _client_proc(args: tuple[Any, ...], queue: Any) -> None:
    queue.put(asyncio.run(_client(*args)))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_clients(
    core: Core,
    node_slices: list[list[int]],
    concurrency: int,
    seconds: float,
    max_calls: int,
    storm: bool,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 3.0  # time for the spawned clients to import and connect
    procs = [
        ctx.Process(
            target=_client_proc,
            args=(
                (core.address, core.credentials, s, concurrency, seconds, max_calls, start_at, storm),
                queue,
            ),
        )
        for s in node_slices
    ]
    for p in procs:
        p.start()
    server_cpu0 = cpu_seconds(core.pid)
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    server_cpu = cpu_seconds(core.pid) - server_cpu0
    for p in procs:
        p.join(timeout=30)
    pairs = sum(r["pairs"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    wall = max(r["finished_at"] for r in results) - start_at
    requests = 2 * pairs
    return {
        "pairs": pairs,
        "server_cpu_us_per_request": round(1e6 * server_cpu / requests, 1),
        "client_cpu_us_per_request": round(1e6 * sum(r["cpu_seconds"] for r in results) / requests, 1),
        "errors": sum(r["errors"] for r in results),
        "wall_seconds": wall,
        "requests_per_second": 2 * pairs / wall,
        "pair_latency_ms_p50": 1000 * lat[len(lat) // 2] if lat else None,
        "pair_latency_ms_p99": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
    }


def h2load_run(address: str, requests: int, server_pid: int) -> dict[str, Any] | None:
    """Alternate Locate and GetBootPlan with h2load; None if h2load is not installed."""
    if shutil.which("h2load") is None:
        return None
    msg = pb.LocateRequest(node=pb.NodeRef(name="n00042"), origin=origin_of(42)).SerializeToString()
    with tempfile.NamedTemporaryFile(suffix=".grpc") as body:
        body.write(b"\0" + struct.pack(">I", len(msg)) + msg)  # gRPC framing: uncompressed, length
        body.flush()
        cpu0 = cpu_seconds(server_pid)
        out = subprocess.run(
            ["h2load", "-n", str(requests), "-c", "4", "-m", "32", "-d", body.name,
             "-H", "content-type: application/grpc", "-H", "te: trailers",
             f"http://{address}/slim.v1.Core/Locate", f"http://{address}/slim.v1.Core/GetBootPlan"],
            capture_output=True, text=True, timeout=600, check=True,
        ).stdout  # fmt: skip
        cpu = cpu_seconds(server_pid) - cpu0
    done = re.search(r"finished in ([\d.]+)(ms|s), ([\d.]+) req/s", out)
    ok = re.search(r"requests: .* (\d+) succeeded, (\d+) failed", out)
    if not done or not ok:
        raise SystemExit(f"cannot read h2load's output:\n{out}")
    return {
        "requests": requests,
        "succeeded": int(ok.group(1)),
        "failed": int(ok.group(2)),
        "seconds": float(done.group(1)) / (1000 if done.group(2) == "ms" else 1),
        "requests_per_second": float(done.group(3)),
        "server_cpu_us_per_request": round(1e6 * cpu / requests, 1),
    }


def check_answers(core: Core) -> tuple[bytes, bytes]:
    """The h2load body must get real answers (h2load sees HTTP status, not grpc-status),
    and the clients' credentials must be taken; return the answers serialized (the floor
    server replays them)."""

    async def ask() -> tuple[bytes, bytes]:
        async with aio_channel(core.address, core.credentials) as ch:
            stub = pb_grpc.CoreStub(ch)
            ref = pb.NodeRef(name="n00042")
            loc = await stub.Locate(pb.LocateRequest(node=ref, origin=origin_of(42)), timeout=30)
            plan = await stub.GetBootPlan(pb.GetBootPlanRequest(node=ref, origin=origin_of(42)), timeout=30)
            assert loc.relays and plan.directories, "the core gave empty answers"
            return loc.SerializeToString(), plan.SerializeToString()

    return asyncio.run(ask())


def floor_handler(locate: bytes, plan: bytes) -> grpc.GenericRpcHandler:
    """Locate and GetBootPlan answered with fixed, real-sized answers: gRPC's own cost."""
    locate_msg = pb.LocateResponse.FromString(locate)
    plan_msg = pb.BootPlan.FromString(plan)

    async def answer_locate(request: pb.LocateRequest, context: Any) -> pb.LocateResponse:
        return locate_msg

    async def answer_plan(request: pb.GetBootPlanRequest, context: Any) -> pb.BootPlan:
        return plan_msg

    return grpc.method_handlers_generic_handler(
        "slim.v1.Core",
        {
            "Locate": grpc.unary_unary_rpc_method_handler(
                answer_locate,
                request_deserializer=pb.LocateRequest.FromString,
                response_serializer=pb.LocateResponse.SerializeToString,
            ),
            "GetBootPlan": grpc.unary_unary_rpc_method_handler(
                answer_plan,
                request_deserializer=pb.GetBootPlanRequest.FromString,
                response_serializer=pb.BootPlan.SerializeToString,
            ),
        },
    )


async def serve_floor(answers: Path) -> None:
    locate, plan = json.loads(answers.read_text())  # noqa: ASYNC240 - before serving
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((floor_handler(bytes.fromhex(locate), bytes.fromhex(plan)),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def spawn_listening(cmd: list[str], what: str) -> tuple[subprocess.Popen[str], str]:
    """Start a server that prints "listening on HOST:PORT" first; return it and the address."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"{what} did not start: {line!r}")
    return proc, line.split()[-1]


def start_floor(answers: Path) -> tuple[subprocess.Popen[str], str]:
    return spawn_listening([sys.executable, __file__, "--floor-server", str(answers)], "floor server")


def start_core(tmp: Path, registry: Path, name: str, identity: Path) -> Core:
    """The core of variant ``name``; with TLS, its CA is tmp/ca, where ``identity`` was enrolled."""
    loop, tls = VARIANTS[name]
    socket = tmp / f"{name}.sock"
    security = (
        ["--ca", str(tmp / "ca"), "--socket", str(socket)] if tls else ["--insecure-no-tls", "--no-socket"]
    )
    proc, address = spawn_listening(
        [sys.executable, "-m", "slim.cli", "core", "serve", "--registry", str(registry),
         "--state", str(tmp / f"state-{name}.db"), "--store", str(tmp / "store"), "--keys", str(tmp / "keys"),
         "--listen", "127.0.0.1:0", "--log-level", "warning", "--event-loop", loop, *security],
        f"core ({name})",
    )  # fmt: skip
    if tls:
        return Core(name, loop, tls, proc, address, Credentials.from_identity(identity), f"unix:{socket}")
    return Core(name, loop, tls, proc, address, PLAINTEXT, address)


async def _connections(address: str, credentials: Credentials, count: int) -> list[tuple[float, float]]:
    """(seconds until ready, seconds until the first answer) of ``count`` new connections."""
    request = pb.LocateRequest(node=pb.NodeRef(name="n00042"), origin=origin_of(42))
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        ch = aio_channel(address, credentials)
        try:
            await asyncio.wait_for(ch.channel_ready(), 30)
            ready = time.perf_counter() - t0
            await pb_grpc.CoreStub(ch).Locate(request, timeout=30)
            times.append((ready, time.perf_counter() - t0))
        finally:
            await ch.close()  # the next channel makes a new connection (and handshake)
    return times


def connection_setup(core: Core, count: int) -> dict[str, Any]:
    """What a client (a relay) pays to connect: ``count`` new connections, one at a time."""
    cpu0 = cpu_seconds(core.pid)
    times = asyncio.run(_connections(core.address, core.credentials, count))
    cpu = cpu_seconds(core.pid) - cpu0
    return {
        "connections": count,
        "ready_ms_p50": round(1000 * statistics.median(t[0] for t in times), 3),
        "first_answer_ms_p50": round(1000 * statistics.median(t[1] for t in times), 3),
        "server_cpu_us_per_connection": round(1e6 * cpu / count, 1),
    }


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000, help="nodes in the registry and in the storm")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--concurrency", type=int, default=32, help="calls in flight per client process")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each throughput run")
    ap.add_argument("--max-calls", type=int, default=200_000, help="upper bound of pairs per client per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is reported)")
    ap.add_argument("--h2load-requests", type=int, default=40_000, help="requests per h2load run")
    ap.add_argument("--connections", type=int, default=500, help="new connections per connection-setup run")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated variants to compare, of {', '.join(VARIANTS)} (default: all)",
    )
    ap.add_argument("--quick", action="store_true", help="small and short: 1,000 nodes, 2 s, 1 repeat")
    ap.add_argument("--out", type=Path, default=OUT, help="where to write the JSON results")
    ap.add_argument("--floor-server", type=Path, help=argparse.SUPPRESS)  # internal: the floor server
    args = ap.parse_args()
    if args.floor_server:
        uvloop.run(serve_floor(args.floor_server))
        return
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(
            f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose of {', '.join(VARIANTS)}"
        )
    if args.quick:
        args.nodes, args.seconds, args.repeat, args.h2load_requests, args.connections = 1000, 2.0, 1, 4000, 20

    results: dict[str, Any] = {
        "benchmark": "P5 control plane (Locate + GetBootPlan over gRPC, loopback), with and without TLS",
        "command": "python bench/control_plane.py"
        + (" --quick" if args.quick else "")
        + (f" --variants {','.join(names)}" if names != list(VARIANTS) else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "grpcio": grpc.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],  # others' work on it
        },
        "parameters": {k: v for k, v in vars(args).items() if k not in ("out", "quick", "floor_server")},
        "target_requests_per_second": 5000,
        "variants": {},
    }
    have_h2load = shutil.which("h2load") is not None
    with tempfile.TemporaryDirectory(prefix="slim-bench-") as tmpdir:
        tmp = Path(tmpdir)
        registry = tmp / "registry.yaml"
        registry.write_text(synthetic_registry(args.nodes))
        t = time.perf_counter()
        reg = load_registry(registry)
        results["registry_load_seconds"] = time.perf_counter() - t
        publish_placeholder_releases(reg, Store(tmp / "store"))
        identity = tmp / "relay0-0"  # the one relay certificate every TLS client presents
        if any(VARIANTS[n][1] for n in names):
            CertificateAuthority.load_or_create(tmp / "ca").enroll("relay0-0", "relay", identity)
        all_nodes = list(range(args.nodes))
        slices = [all_nodes[i :: args.clients] for i in range(args.clients)]
        cores: list[Core] = []
        h2: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        tput: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        storms: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        setup: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        try:
            for name in names:  # one after the other: the first makes the signing key
                cores.append(start_core(tmp, registry, name, identity))
            for core in cores:
                heartbeats(core)
                answers = check_answers(core)
            # round by round, each variant in turn: drift on this shared machine falls on all
            for _ in range(args.repeat):
                for core in cores:
                    heartbeats(core)
                    setup[core.name].append(connection_setup(core, args.connections))
                    if have_h2load and not core.tls:
                        run = h2load_run(core.address, args.h2load_requests, core.pid)
                        h2[core.name] += [run] if run else []
            for _ in range(args.repeat):
                for core in cores:
                    heartbeats(core)
                    tput[core.name].append(
                        run_clients(core, slices, args.concurrency, args.seconds, args.max_calls, False)
                    )
            for _ in range(args.repeat):
                for core in cores:
                    heartbeats(core)
                    storms[core.name].append(
                        run_clients(core, slices, args.concurrency, 600.0, args.nodes, True)
                    )
        finally:
            for core in cores:
                core.proc.send_signal(signal.SIGTERM)
            for core in cores:
                core.proc.wait(timeout=30)

        print(
            f"{'variant':12} {'h2load req/s (core us CPU each)':>32} "
            f"{'Python clients req/s (core us, client us)':>42} "
            f"{'storm s':>8} {'connect ms (core us)':>21} {'errors':>6}"
        )
        for core in cores:
            n = core.name
            h2_med = median_of(h2[n], "requests_per_second") if h2[n] else None
            h2_cpu = median_of(h2[n], "server_cpu_us_per_request") if h2[n] else None
            med = median_of(tput[n], "requests_per_second")
            cpu_us = median_of(tput[n], "server_cpu_us_per_request")
            client_us = median_of(tput[n], "client_cpu_us_per_request")
            storm_s = median_of(storms[n], "wall_seconds")
            ready = median_of(setup[n], "ready_ms_p50")
            conn_cpu = median_of(setup[n], "server_cpu_us_per_connection")
            errors = sum(r["errors"] for r in tput[n] + storms[n]) + sum(r["failed"] for r in h2[n])
            h2_note = NO_H2LOAD_TLS if core.tls else "h2load not installed"
            results["variants"][n] = {
                "event_loop": core.loop,
                "tls": core.tls,
                "h2load_requests_per_second_median": round(h2_med) if h2_med else None,
                "h2load_server_cpu_us_per_request_median": h2_cpu,
                "h2load_runs": h2[n] or h2_note,
                "python_clients_requests_per_second_median": round(med),
                "python_clients_server_cpu_us_per_request_median": cpu_us,
                "python_clients_client_cpu_us_per_request_median": client_us,
                "requests_per_second_per_server_core": round(1e6 / (h2_cpu or cpu_us)),
                "python_clients_runs": tput[n],
                "storm_nodes": args.nodes,
                "storm_seconds_median": round(storm_s, 3),
                "storm_server_cpu_us_per_request_median": median_of(storms[n], "server_cpu_us_per_request"),
                "storm_runs": storms[n],
                "connection_ready_ms_median": ready,
                "connection_first_answer_ms_median": median_of(setup[n], "first_answer_ms_p50"),
                "connection_server_cpu_us_median": conn_cpu,
                "connection_runs": setup[n],
            }
            h2_text = (
                f"{h2_med:6.0f} ({h2_cpu:4.0f})" if h2_med and h2_cpu else ("n/a (mTLS)" if core.tls else "-")
            )
            print(
                f"{n:12} {h2_text:>32} {f'{med:6.0f} ({cpu_us:4.0f}, {client_us:4.0f})':>42} "
                f"{storm_s:8.2f} {f'{ready:6.2f} ({conn_cpu:5.0f})':>21} {errors:6}",
                flush=True,
            )
        if have_h2load:
            floor_file = tmp / "answers.json"
            floor_file.write_text(json.dumps([answers[0].hex(), answers[1].hex()]))
            fproc, faddress = start_floor(floor_file)
            try:
                fl = [h2load_run(faddress, args.h2load_requests, fproc.pid) for _ in range(args.repeat)]
            finally:
                fproc.send_signal(signal.SIGTERM)
                fproc.wait(timeout=30)
            fl_runs = [r for r in fl if r is not None]
            f_med = median_of(fl_runs, "requests_per_second")
            f_cpu = median_of(fl_runs, "server_cpu_us_per_request")
            results["grpc_floor"] = {
                "what": "a grpc.aio server on uvloop, plaintext, answering Locate and GetBootPlan with "
                "fixed, real-sized answers: the cost of Python gRPC itself on this machine",
                "h2load_requests_per_second_median": round(f_med),
                "h2load_server_cpu_us_per_request_median": f_cpu,
                "h2load_runs": fl_runs,
            }
            print(
                f"{'floor':12} {f'{f_med:6.0f} ({f_cpu:4.0f})':>32}   (fixed answers, plaintext: gRPC alone)"
            )

    v = results["variants"]
    if "uvloop" in v and "asyncio" in v:
        key = "h2load_requests_per_second_median"
        if not v["uvloop"][key]:
            key = "python_clients_requests_per_second_median"
        results["uvloop_over_asyncio"] = round(v["uvloop"][key] / v["asyncio"][key], 3)
    results["tls_over_plaintext"] = {}
    for loop in ("uvloop", "asyncio"):
        plain, tls = v.get(loop), v.get(f"{loop}-tls")
        if not plain or not tls:
            continue
        extra_us = round(
            tls["python_clients_server_cpu_us_per_request_median"]
            - plain["python_clients_server_cpu_us_per_request_median"],
            1,
        )
        cmp: dict[str, Any] = {
            "python_clients_requests_per_second": round(
                tls["python_clients_requests_per_second_median"]
                / plain["python_clients_requests_per_second_median"],
                3,
            ),
            "server_cpu_us_per_request": round(
                tls["python_clients_server_cpu_us_per_request_median"]
                / plain["python_clients_server_cpu_us_per_request_median"],
                3,
            ),
            "server_cpu_us_per_request_added": extra_us,
            "client_cpu_us_per_request_added": round(
                tls["python_clients_client_cpu_us_per_request_median"]
                - plain["python_clients_client_cpu_us_per_request_median"],
                1,
            ),
            "storm_seconds": round(tls["storm_seconds_median"] / plain["storm_seconds_median"], 3),
            "storm_server_cpu_us_per_request_added": round(
                tls["storm_server_cpu_us_per_request_median"]
                - plain["storm_server_cpu_us_per_request_median"],
                1,
            ),
            "connection_ready_ms": [plain["connection_ready_ms_median"], tls["connection_ready_ms_median"]],
            "connection_server_cpu_us": [
                plain["connection_server_cpu_us_median"],
                tls["connection_server_cpu_us_median"],
            ],
        }
        h2_cpu = plain["h2load_server_cpu_us_per_request_median"]
        if h2_cpu:
            # not measured (h2load cannot do mutual TLS): the plaintext h2load figure scaled by
            # the core's CPU per request with TLS added, as if the core stayed CPU-bound
            cmp["h2load_requests_per_second_estimated_with_tls"] = round(
                plain["h2load_requests_per_second_median"] * h2_cpu / (h2_cpu + extra_us)
            )
        results["tls_over_plaintext"][loop] = cmp
        ready_text = (
            f"{plain['connection_ready_ms_median']:.2f} -> {tls['connection_ready_ms_median']:.2f} ms"
        )
        cpu_text = (
            f"{plain['connection_server_cpu_us_median']:.0f} -> {tls['connection_server_cpu_us_median']:.0f}"
        )
        estimate = cmp.get("h2load_requests_per_second_estimated_with_tls")
        print(
            f"TLS / plaintext ({loop}): Python clients {cmp['python_clients_requests_per_second']:.2f}x "
            f"req/s, core CPU per request {cmp['server_cpu_us_per_request']:.2f}x ({extra_us:+.0f} us; "
            f"in the storm {cmp['storm_server_cpu_us_per_request_added']:+.0f} us), "
            f"storm {cmp['storm_seconds']:.2f}x, connection setup {ready_text} ({cpu_text} us of core CPU)"
            + (f"; h2load with TLS, estimated: {estimate} req/s" if estimate else "")
        )
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
