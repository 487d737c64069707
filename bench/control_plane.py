"""P5 control plane: Locate + GetBootPlan requests per second, and a 10,000-node storm.

    PYTHONPATH=. .venv/bin/python bench/control_plane.py            # full run (about a minute)
    PYTHONPATH=. .venv/bin/python bench/control_plane.py --quick    # a short smoke run

Starts the real core (`slim core serve`, a separate process) on 127.0.0.1
port 0 with a synthetic registry of --nodes nodes on 4 sites and 12 relays,
then measures:

- throughput with h2load (nghttp2's HTTP/2 load generator, written in C, so
  the load costs little of the machine's 2 cores): gRPC Locate and
  GetBootPlan calls alternating, --h2load-requests of them, 4 connections with
  32 streams each.  (LocateRequest and GetBootPlanRequest share their field
  numbers, so one request body serves both.)  Skipped with a note if h2load
  is missing (`apt-get install nghttp2-client`; `./run bench` installs it);
- throughput with --clients Python grpc.aio client processes (--concurrency
  calls in flight each), looping Locate + GetBootPlan for random nodes for
  --seconds (at most --max-calls pairs per client): what relays, themselves
  Python, can draw, though here they compete with the core for the CPUs;
- storm: every one of the --nodes nodes asks once (Locate then GetBootPlan),
  all at once, from the Python clients; the time until the last answer.

For every run the core's CPU time per request is read from /proc: it is the
figure least disturbed by this shared machine, and 10^6 / it is what one core
of the core can answer.

The same run is made against the core on uvloop (the default) and on the
stock asyncio loop, side by side; each figure is the median of --repeat
runs.  Results go to docs/benchmarks/control_plane.json.  This machine is
shared and has 2 cores; the clients compete with the core for them, so the
figures are a floor, and ratios matter more than absolute numbers.

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
from pathlib import Path
from typing import Any

import grpc
import uvloop

from labs.placeholders import publish_placeholder_releases
from slim.core.registry import load_registry
from slim.core.store import Store
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "control_plane.json"
SITES = 4
RELAYS_PER_SITE = 3


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


async def _heartbeats(address: str) -> None:
    async def one(relay: str) -> AsyncIterator[pb.Heartbeat]:
        yield pb.Heartbeat(relay=relay, load=random.random() * 4, healthy=True)

    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.CoreStub(ch)
        for s in range(SITES):
            for r in range(RELAYS_PER_SITE):
                async for _ in stub.RelayHeartbeat(one(f"relay{s}-{r}")):
                    pass


async def _client(
    address: str,
    nodes: list[int],
    concurrency: int,
    seconds: float,
    max_calls: int,
    start_at: float,
    storm: bool,
) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(address) as ch:
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
    address: str,
    node_slices: list[list[int]],
    concurrency: int,
    seconds: float,
    max_calls: int,
    storm: bool,
    server_pid: int,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 3.0  # time for the spawned clients to import and connect
    procs = [
        ctx.Process(
            target=_client_proc, args=((address, s, concurrency, seconds, max_calls, start_at, storm), queue)
        )
        for s in node_slices
    ]
    for p in procs:
        p.start()
    server_cpu0 = cpu_seconds(server_pid)
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    server_cpu = cpu_seconds(server_pid) - server_cpu0
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


def check_answers(address: str) -> tuple[bytes, bytes]:
    """The h2load body must get real answers (h2load sees HTTP status, not grpc-status);
    return them serialized (the floor server replays them)."""

    async def ask() -> tuple[bytes, bytes]:
        async with grpc.aio.insecure_channel(address) as ch:
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


def start_core(tmp: Path, registry: Path, loop: str) -> tuple[subprocess.Popen[str], str]:
    return spawn_listening(
        [sys.executable, "-m", "slim.cli", "core", "serve", "--registry", str(registry),
         "--state", str(tmp / f"state-{loop}.db"), "--store", str(tmp / "store"), "--keys", str(tmp / "keys"),
         "--listen", "127.0.0.1:0", "--log-level", "warning", "--event-loop", loop],
        "core",
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000, help="nodes in the registry and in the storm")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--concurrency", type=int, default=32, help="calls in flight per client process")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each throughput run")
    ap.add_argument("--max-calls", type=int, default=200_000, help="upper bound of pairs per client per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is reported)")
    ap.add_argument("--h2load-requests", type=int, default=40_000, help="requests per h2load run")
    ap.add_argument("--quick", action="store_true", help="small and short: 1,000 nodes, 2 s, 1 repeat")
    ap.add_argument("--out", type=Path, default=OUT, help="where to write the JSON results")
    ap.add_argument("--floor-server", type=Path, help=argparse.SUPPRESS)  # internal: the floor server
    args = ap.parse_args()
    if args.floor_server:
        uvloop.run(serve_floor(args.floor_server))
        return
    if args.quick:
        args.nodes, args.seconds, args.repeat, args.h2load_requests = 1000, 2.0, 1, 4000

    results: dict[str, Any] = {
        "benchmark": "P5 control plane (Locate + GetBootPlan over gRPC, loopback)",
        "command": "python bench/control_plane.py" + (" --quick" if args.quick else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "parameters": {k: v for k, v in vars(args).items() if k not in ("out", "quick", "floor_server")},
        "target_requests_per_second": 5000,
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="slim-bench-") as tmpdir:
        tmp = Path(tmpdir)
        registry = tmp / "registry.yaml"
        registry.write_text(synthetic_registry(args.nodes))
        t = time.perf_counter()
        reg = load_registry(registry)
        results["registry_load_seconds"] = time.perf_counter() - t
        publish_placeholder_releases(reg, Store(tmp / "store"))
        all_nodes = list(range(args.nodes))
        slices = [all_nodes[i :: args.clients] for i in range(args.clients)]
        for loop in ("uvloop", "asyncio"):
            proc, address = start_core(tmp, registry, loop)
            try:
                asyncio.run(_heartbeats(address))
                answers = check_answers(address)
                h2 = [h2load_run(address, args.h2load_requests, proc.pid) for _ in range(args.repeat)]
                tput = [
                    run_clients(
                        address, slices, args.concurrency, args.seconds, args.max_calls, False, proc.pid
                    )
                    for _ in range(args.repeat)
                ]
                storms = [
                    run_clients(address, slices, args.concurrency, 600.0, args.nodes, True, proc.pid)
                    for _ in range(args.repeat)
                ]
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            med = statistics.median(r["requests_per_second"] for r in tput)
            storm_s = statistics.median(r["wall_seconds"] for r in storms)
            cpu_us = statistics.median(r["server_cpu_us_per_request"] for r in tput)
            h2_runs = [r for r in h2 if r is not None]
            h2_med = statistics.median(r["requests_per_second"] for r in h2_runs) if h2_runs else None
            h2_cpu = statistics.median(r["server_cpu_us_per_request"] for r in h2_runs) if h2_runs else None
            results["variants"][loop] = {
                "h2load_requests_per_second_median": round(h2_med) if h2_med else None,
                "h2load_server_cpu_us_per_request_median": h2_cpu,
                "h2load_runs": h2_runs or "h2load not installed",
                "python_clients_requests_per_second_median": round(med),
                "python_clients_server_cpu_us_per_request_median": cpu_us,
                "requests_per_second_per_server_core": round(1e6 / (h2_cpu or cpu_us)),
                "python_clients_runs": tput,
                "storm_nodes": args.nodes,
                "storm_seconds_median": round(storm_s, 3),
                "storm_runs": storms,
            }
            h2_text = (
                f"{h2_med:6.0f} req/s ({h2_cpu:4.0f} us CPU each)" if h2_med and h2_cpu else "   (no h2load)"
            )
            print(
                f"{loop:8} h2load {h2_text}   python clients {med:6.0f} req/s ({cpu_us:4.0f} us)   "
                f"storm of {args.nodes} nodes: {storm_s:5.2f} s   "
                f"errors {sum(r['errors'] for r in tput + storms) + sum(r['failed'] for r in h2_runs)}",
                flush=True,
            )
        if shutil.which("h2load"):
            floor_file = tmp / "answers.json"
            floor_file.write_text(json.dumps([answers[0].hex(), answers[1].hex()]))
            fproc, faddress = start_floor(floor_file)
            try:
                fl = [h2load_run(faddress, args.h2load_requests, fproc.pid) for _ in range(args.repeat)]
            finally:
                fproc.send_signal(signal.SIGTERM)
                fproc.wait(timeout=30)
            fl_runs = [r for r in fl if r is not None]
            f_med = statistics.median(r["requests_per_second"] for r in fl_runs)
            f_cpu = statistics.median(r["server_cpu_us_per_request"] for r in fl_runs)
            results["grpc_floor"] = {
                "what": "a grpc.aio server on uvloop answering Locate and GetBootPlan with fixed, "
                "real-sized answers: the cost of Python gRPC itself on this machine",
                "h2load_requests_per_second_median": round(f_med),
                "h2load_server_cpu_us_per_request_median": f_cpu,
                "h2load_runs": fl_runs,
            }
            print(
                f"floor    h2load {f_med:6.0f} req/s ({f_cpu:4.0f} us CPU each)   (fixed answers: gRPC alone)"
            )
    u, a = results["variants"]["uvloop"], results["variants"]["asyncio"]
    key = "h2load_requests_per_second_median"
    if not u[key]:
        key = "python_clients_requests_per_second_median"
    results["uvloop_over_asyncio"] = round(u[key] / a[key], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
