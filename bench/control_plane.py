"""P5 control plane: Locate + GetBootPlan requests per second, and a 10,000-node storm.

    .venv/bin/python bench/control_plane.py            # full run (about a minute)
    .venv/bin/python bench/control_plane.py --quick    # a short smoke run

Starts the real core (`slim core serve`, a separate process) on 127.0.0.1
port 0 with a synthetic registry of --nodes nodes on 4 sites and 12 relays,
then drives it from --clients client processes (grpc.aio, --concurrency calls
in flight each):

- throughput: every client loops Locate + GetBootPlan for random nodes for
  --seconds (and at most --max-calls per client); req/s counts both RPCs;
- storm: every node asks once (Locate then GetBootPlan), all at once; the
  time until the last answer.

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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from slim.core.registry import load_registry
from slim.core.store import Store
from slim.demo import publish_placeholder_releases
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

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {
            "pairs": done,
            "errors": errors,
            "elapsed": time.perf_counter() - t0,
            "finished_at": time.time(),
            "latencies": latencies,
        }


def _client_proc(args: tuple[Any, ...], queue: Any) -> None:
    queue.put(asyncio.run(_client(*args)))


def run_clients(
    address: str, node_slices: list[list[int]], concurrency: int, seconds: float, max_calls: int, storm: bool
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
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    pairs = sum(r["pairs"] for r in results)
    lat = sorted(x for r in results for x in r["latencies"])
    wall = max(r["finished_at"] for r in results) - start_at
    return {
        "pairs": pairs,
        "errors": sum(r["errors"] for r in results),
        "wall_seconds": wall,
        "requests_per_second": 2 * pairs / wall,
        "pair_latency_ms_p50": 1000 * lat[len(lat) // 2] if lat else None,
        "pair_latency_ms_p99": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
    }


def start_core(tmp: Path, registry: Path, loop: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "slim.cli", "core", "serve", "--registry", str(registry),
         "--state", str(tmp / f"state-{loop}.db"), "--store", str(tmp / "store"),
         "--listen", "127.0.0.1:0", "--log-level", "warning", "--event-loop", loop],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"core did not start: {line!r}")
    return proc, line.split()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=10_000, help="nodes in the registry and in the storm")
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--concurrency", type=int, default=32, help="calls in flight per client process")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each throughput run")
    ap.add_argument("--max-calls", type=int, default=200_000, help="upper bound of pairs per client per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is reported)")
    ap.add_argument("--quick", action="store_true", help="small and short: 1,000 nodes, 2 s, 1 repeat")
    ap.add_argument("--out", type=Path, default=OUT, help="where to write the JSON results")
    args = ap.parse_args()
    if args.quick:
        args.nodes, args.seconds, args.repeat = 1000, 2.0, 1

    results: dict[str, Any] = {
        "benchmark": "P5 control plane (Locate + GetBootPlan over gRPC, loopback)",
        "command": "python bench/control_plane.py" + (" --quick" if args.quick else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "parameters": {k: v for k, v in vars(args).items() if k not in ("out", "quick")},
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
                tput = [
                    run_clients(address, slices, args.concurrency, args.seconds, args.max_calls, storm=False)
                    for _ in range(args.repeat)
                ]
                storms = [
                    run_clients(address, slices, args.concurrency, 600.0, args.nodes, storm=True)
                    for _ in range(args.repeat)
                ]
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            med = statistics.median(r["requests_per_second"] for r in tput)
            storm_s = statistics.median(r["wall_seconds"] for r in storms)
            results["variants"][loop] = {
                "requests_per_second_median": round(med),
                "throughput_runs": tput,
                "storm_nodes": args.nodes,
                "storm_seconds_median": round(storm_s, 3),
                "storm_runs": storms,
            }
            print(
                f"{loop:8}  {med:8.0f} req/s (Locate+GetBootPlan, median of {args.repeat})   "
                f"storm of {args.nodes} nodes answered in {storm_s:6.2f} s   "
                f"errors {sum(r['errors'] for r in tput + storms)}",
                flush=True,
            )
    u, a = results["variants"]["uvloop"], results["variants"]["asyncio"]
    results["uvloop_over_asyncio"] = round(
        u["requests_per_second_median"] / a["requests_per_second_median"], 3
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
