"""P3 relay throughput: the relay against nginx on the same files, and a cold cache's origin egress.

    PYTHONPATH=. .venv/bin/python bench/relay_throughput.py            # full run (about 10 minutes)
    PYTHONPATH=. .venv/bin/python bench/relay_throughput.py --quick    # a short smoke run (about a minute)

Everything runs on 127.0.0.1 with ports picked by the kernel (nginx cannot
report a port 0, so it gets one the kernel just handed out), in a temporary
directory (--tmp-dir; deleted at the end, whatever happens), as real processes
this script starts and stops by PID:

- the relay: ``slim relay serve --cache-dir DIR --max-bytes 4G --listen
  127.0.0.1:0 --log-level warning`` with its defaults (one process, uvloop;
  cache hits on the fast path, not aiohttp; bodies above 128 KiB by sendfile,
  smaller ones written with the headers in one go, from its 512 MiB memory
  cache once read), its cache directory filled beforehand (a relay trusts and
  indexes the files it finds there at start); for the small objects also
  "relay-files", the same with ``--memory-cache 0``;
- nginx (Debian's nginx-light), our own instance from a generated
  configuration: ``sendfile on; tcp_nopush on; access_log off;`` and keepalive,
  serving ``/objects/sha256/`` from **the same directory**, once with
  ``worker_processes 1`` (one process, like the relay) and once with
  ``worker_processes auto`` (one per core: 2 here);
- the origin for the cold-cache runs: SLIM's own object server
  (``slim.relay.server.ObjectServer``, what ``slim core serve --objects``
  runs), in a child process of this script, whose ``/metrics`` count the
  bytes it sent.

Workloads (--quick shrinks them; sizes are MiB/GiB, rates decimal MB/s, GB/s):

1. large: one --large-mib object (1 GiB of random bytes), --large-clients (64)
   clients each downloading it once, all starting at one instant.  Aggregate
   GB/s = bytes received ÷ time from that instant to the last client's end.
   The clients are curl processes writing to /dev/null, not h2load: h2load,
   one thread for all connections, spent a whole core in read(2) and topped
   out near 1.4 GB/s here, where curl processes reached ~2.9 GB/s on less CPU:
   h2load would have measured itself;
2. small: --small-objects (10,000) objects, sizes log-normal around 16 KiB
   clamped to 1 KiB-256 KiB (seeded; mean ~26 KiB; about 2 % are above
   128 KiB, which the relay sends by sendfile), over --small-clients (64) keep-alive connections with one
   request in flight on each, by h2load (``--h1 -m 1``, C, one thread: cheap).
   h2load sends every connection through the same URI list from its start, so
   the list is all the objects, shuffled (--small-rounds times), and each
   connection walks all of it: 64 x 10,000 = 640,000 requests per run.
   Requests/s and MB/s from h2load's own clock.  For scale, a bare aiohttp
   app on uvloop answering the same objects from memory (one route, one
   ``web.Response``: the least any aiohttp server costs) runs here too;
3. cold: the relay with an **empty** cache in front of the origin, and
   --cold-clients (64) clients asking at once for one --cold-mib (256 MiB)
   object it has never seen: origin egress ÷ object size (1.0 = one copy, the
   collapsed forwarding the relay promises), the relay's upstream fetches, and
   the time until every client has the whole object.  The same through nginx
   as a caching proxy (``proxy_cache`` with ``proxy_cache_lock on`` and a
   lock timeout long enough never to expire, one worker) for comparison: nginx
   makes the other clients wait until the whole object is in its cache, the
   relay streams it to all of them as it arrives.  A fresh, empty cache for
   each run.

Every measurement runs --repeat (3) times, the servers in alternating order;
the median is reported, with the CPU time each server used (from /proc: the
least noisy figure on a shared machine).  Every file is read once first so the
page cache holds them all (the machine has far more RAM than the data).  Every
response is checked: status 200 and the full size, or the run fails (exit 1).

Results go to --out (docs/benchmarks/)relay_throughput.json and a plot,
relay_throughput.png.  The machine has 2 cores shared by the server and the
load generator, and other work: absolute figures are a floor; read the ratios.
The target is relay >= 0.9 x nginx.  This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from labs.host import free_port, warm_page_cache

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"
KiB, MiB, GiB = 1024, 1024**2, 1024**3
NGINX = "/usr/sbin/nginx"
TARGET = 0.9  # relay >= 0.9 x nginx
START_TIMEOUT = 30.0  # seconds a server may take to start listening
STOP_TIMEOUT = 30.0
CHUNK = 16 * MiB  # object generation: bytes per write


# -- the data -----------------------------------------------------------------------
@dataclass
class Obj:
    hex: str
    size: int


@dataclass
class Data:
    cache: Path  # a relay cache directory: cache/objects/sha256/<hex>; nginx's root too
    origin: Path  # the origin's store: origin/<hex>
    large: Obj
    small: list[Obj]
    cold: Obj


def write_object(directory: Path, rng: random.Random, size: int) -> Obj:
    """``size`` seeded random bytes, stored under their sha256."""
    import hashlib

    h = hashlib.sha256()
    tmp = directory / ".partial"
    with open(tmp, "wb") as f:
        left = size
        while left > 0:
            chunk = rng.randbytes(min(CHUNK, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    hexdigest = h.hexdigest()
    tmp.rename(directory / hexdigest)
    (directory / hexdigest).chmod(0o444)
    return Obj(hexdigest, size)


def small_sizes(n: int, seed: int) -> list[int]:
    """Log-normal sizes, median 16 KiB, clamped to 1 KiB-256 KiB."""
    rng = random.Random(seed)
    return [max(KiB, min(256 * KiB, round(rng.lognormvariate(math.log(16 * KiB), 1.0)))) for _ in range(n)]


def make_data(tmp: Path, large: int, n_small: int, cold: int, seed: int) -> Data:
    cache = tmp / "cache"
    objects = cache / "objects" / "sha256"
    origin = tmp / "origin"
    objects.mkdir(parents=True)
    origin.mkdir()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    big = write_object(objects, rng, large)
    small = [write_object(objects, rng, s) for s in small_sizes(n_small, seed)]
    cold_obj = write_object(origin, rng, cold)
    if len({o.hex for o in [big, cold_obj, *small]}) != n_small + 2:
        raise SystemExit("two generated objects have the same digest (size 0?)")
    print(
        f"data: 1 x {large / MiB:,.0f} MiB, {n_small:,} small ({sum(o.size for o in small) / MiB:,.1f} MiB), "
        f"cold 1 x {cold / MiB:,.0f} MiB; generated in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return Data(cache, origin, big, small, cold_obj)


# -- processes ----------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its children (nginx's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(x) for x in task.read_text().split()]
    return out


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)
    tls_name: str = ""  # HTTPS: the name in its certificate, which curl checks (against ca)
    ca: Path | None = None

    @property
    def base(self) -> str:
        return f"{'https' if self.tls_name else 'http'}://127.0.0.1:{self.port}"

    @property
    def curl_base(self) -> str:
        """Where curl asks: over HTTPS by the certificate's name (resolved to 127.0.0.1)."""
        return f"https://{self.tls_name}:{self.port}" if self.tls_name else self.base

    @property
    def curl_args(self) -> list[str]:
        if not self.tls_name:
            return []
        return ["--cacert", str(self.ca), "--resolve", f"{self.tls_name}:{self.port}:127.0.0.1"]

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)


class Servers:
    """Every server this run started, stopped by PID at the end (SIGTERM, then SIGKILL)."""

    def __init__(self) -> None:
        self.running: list[Server] = []

    def add(self, s: Server) -> Server:
        self.running.append(s)
        return s

    def stop(self, s: Server) -> None:
        if s in self.running:
            self.running.remove(s)
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                s.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait(timeout=STOP_TIMEOUT)
        if s.proc.stdout is not None:
            s.proc.stdout.close()

    def stop_all(self) -> None:
        for s in list(reversed(self.running)):
            self.stop(s)


def _fail(what: str, proc: subprocess.Popen[bytes], log: Path, why: str) -> SystemExit:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    return SystemExit(f"{what} did not start: {why}\n{tail}")


def _listening_line(
    proc: subprocess.Popen[bytes], what: str, log: Path, prefixes: tuple[str, ...] = ("listening on",)
) -> list[int]:
    """Wait (at most START_TIMEOUT) for "listening on HOST:PORT" (and each other of
    ``prefixes``, line by line, in order) on the server's stdout; the ports."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + START_TIMEOUT
    buf = b""
    while buf.count(b"\n") < len(prefixes):
        left = deadline - time.monotonic()
        if left <= 0:
            raise _fail(what, proc, log, f"no {' and '.join(prefixes)!r} within {START_TIMEOUT:.0f} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise _fail(what, proc, log, f"exited with code {proc.wait(timeout=STOP_TIMEOUT)}")
            buf += chunk
    ports = []
    for prefix, line in zip(prefixes, buf.decode().splitlines(), strict=False):
        m = re.fullmatch(rf"{prefix} 127\.0\.0\.1:(\d+)", line.strip())
        if m is None:
            raise _fail(what, proc, log, f"unexpected line {line!r}")
        ports.append(int(m.group(1)))
    return ports


def start_relay(
    servers: Servers, name: str, cache_dir: Path, upstream: str, tmp: Path, *extra: str
) -> Server:
    log = tmp / f"{name}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slim.cli", "relay", "serve", "--upstream", upstream,
             "--cache-dir", str(cache_dir), "--max-bytes", "4G", "--listen", "127.0.0.1:0",
             "--log-level", "warning", *extra],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return servers.add(Server(name, proc, _listening_line(proc, name, log)[0], log))


def start_https_relay(
    servers: Servers, cache_dir: Path, tmp: Path, identity: Path, tls_name: str, ca: Path
) -> tuple[Server, Server]:
    """One relay serving HTTP and HTTPS (--https-listen, the certificate of ``identity``):
    (its HTTP side, its HTTPS side), the same process."""
    log = tmp / "relay.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slim.cli", "relay", "serve", "--upstream", "http://127.0.0.1:9",
             "--cache-dir", str(cache_dir), "--max-bytes", "4G", "--listen", "127.0.0.1:0",
             "--https-listen", "127.0.0.1:0", "--identity", str(identity), "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    http, https = _listening_line(proc, "relay", log, ("listening on", "https on"))
    plain = servers.add(Server("relay-http", proc, http, log))
    return plain, Server("relay-https", proc, https, log, tls_name=tls_name, ca=ca)


def start_origin(servers: Servers, objects_dir: Path, tmp: Path) -> Server:
    log = tmp / "origin.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--origin-server", str(objects_dir)],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return servers.add(Server("origin", proc, _listening_line(proc, "origin", log)[0], log))


async def _serve_origin(objects_dir: Path) -> None:
    from slim.objects.server import ObjectServer

    server = ObjectServer(objects_dir, "127.0.0.1:0")
    port = await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def start_floor(servers: Servers, objects_dir: Path, limit: int, tmp: Path) -> Server:
    log = tmp / "aiohttp-floor.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--floor-server", str(objects_dir), "--floor-limit", str(limit)],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return servers.add(Server("aiohttp-floor", proc, _listening_line(proc, "aiohttp floor", log)[0], log))


async def _serve_floor(objects_dir: Path, limit: int) -> None:
    """The least an aiohttp server on uvloop can do per object: every object up to ``limit``
    bytes held in memory, answered by one route with one ``web.Response``."""
    from aiohttp import web

    bodies = {p.name: p.read_bytes() for p in objects_dir.iterdir() if p.stat().st_size <= limit}  # noqa: ASYNC240 - before serving

    async def handle(request: web.Request) -> web.StreamResponse:
        body = bodies.get(request.match_info["name"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/objects/sha256/{name}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
{extra_http}
    server {{
        listen 127.0.0.1:{port} backlog=4096{ssl};
{extra_server}
        location /objects/sha256/ {{
{location}
        }}
    }}
}}
"""

NGINX_PROXY_HTTP = (
    "    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=objects:16m max_size=4g inactive=1h "
    "use_temp_path=off;"
)
NGINX_PROXY_LOCATION = """\
            proxy_pass {upstream};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache objects;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 600s;
            proxy_cache_lock_age 600s;"""


@dataclass(frozen=True)
class Tls:
    """The certificate both servers present over HTTPS (the relay's identity), and its CA."""

    cert: Path
    key: Path
    ca: Path
    name: str  # the DNS name in the certificate


def start_nginx(
    servers: Servers,
    name: str,
    tmp: Path,
    workers: str,
    root: Path | None,
    upstream: str = "",
    tls: Tls | None = None,
) -> Server:
    """Our own nginx: a generated configuration in ``tmp/name``; ``root`` (static files) or
    ``upstream`` (a caching proxy); over HTTPS with ``tls``."""
    prefix = tmp / name
    prefix.mkdir()
    port = free_port()
    if root is not None:
        location, extra = f"            root {root};", ""
    else:
        location = NGINX_PROXY_LOCATION.format(upstream=upstream)
        extra = NGINX_PROXY_HTTP.format(prefix=prefix)
    ssl, server_extra = "", ""
    if tls is not None:
        ssl = " ssl"
        # TLS 1.3 as the relay (nginx 1.22's default stops at 1.2): the same protocol and cipher
        server_extra = (
            f"        ssl_certificate {tls.cert};\n        ssl_certificate_key {tls.key};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;"
        )
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            workers=workers,
            prefix=prefix,
            port=port,
            location=location,
            extra_http=extra,
            ssl=ssl,
            extra_server=server_extra,
        )
    )
    log = prefix / "error.log"
    with open(prefix / "stderr.log", "wb") as err:
        proc = subprocess.Popen(
            [NGINX, "-c", str(conf), "-p", str(prefix), "-e", str(log)],
            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    server = servers.add(
        Server(
            name,
            proc,
            port,
            log,
            {"workers": workers},
            tls_name=tls.name if tls else "",
            ca=tls.ca if tls else None,
        )
    )
    deadline = time.monotonic() + START_TIMEOUT
    while True:  # until it accepts connections, at most START_TIMEOUT
        if proc.poll() is not None:
            servers.stop(server)
            raise _fail(name, proc, log, f"exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                servers.stop(server)
                raise _fail(name, proc, log, f"not accepting connections on port {port}") from None
            time.sleep(0.05)
    workers_seen = len(_children(proc.pid))
    server.extra["worker_processes"] = workers_seen
    return server


def metrics(server: Server) -> dict[str, float]:
    with urllib.request.urlopen(f"{server.base}/metrics", timeout=10) as r:  # noqa: S310 - our loopback URL
        text: str = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


# -- load ---------------------------------------------------------------------------
def at_once(
    cmds: list[list[str]], timeout: float
) -> tuple[list[subprocess.Popen[str]], list[str], float, float]:
    """Run ``cmds`` in parallel, all starting at the same instant: each is launched behind a
    ``sleep`` that ends at a common start time, so that launching 64 processes one by one does
    not count as transfer time.  Return the processes, their outputs (stdout + stderr) and the
    seconds from the common start to the last exit, and how late the last one was launched."""
    procs: list[subprocess.Popen[str]] = []
    start_at = time.monotonic() + 0.5 + 0.02 * len(cmds)
    try:
        for cmd in cmds:
            delay = max(0.0, start_at - time.monotonic())
            procs.append(
                subprocess.Popen(
                    ["sh", "-c", 'sleep "$0" && exec "$@"', f"{delay:.4f}", *cmd],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    text=True,
                )
            )
        late = max(0.0, time.monotonic() - start_at)  # launching took longer than planned
        outs = [p.communicate(timeout=timeout + 30)[0] for p in procs]
        seconds = time.monotonic() - start_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return procs, outs, seconds, late


def curl_all(
    url: str, clients: int, size: int, timeout: float, extra: list[str] | None = None
) -> dict[str, Any]:
    """``clients`` curl processes fetch ``url`` once each, all at once; every response must be
    200 with ``size`` bytes.  ``extra``: more curl arguments (HTTPS: the CA, the name)."""
    cmd = ["curl", "-sS", "--max-time", str(int(timeout)), "-o", "/dev/null",
           "-w", "%{http_code} %{size_download} %{time_total}\\n", *(extra or []), url]  # fmt: skip
    cpu0 = children_cpu()
    procs, outs, seconds, late = at_once([cmd] * clients, timeout)
    bad: list[str] = []
    times: list[float] = []
    received = 0
    for p, out in zip(procs, outs, strict=True):
        parts = out.split()
        if p.returncode != 0 or len(parts) != 3 or parts[0] != "200" or int(parts[1]) != size:
            bad.append(f"exit {p.returncode}: {out.strip()[:200]!r}")
            continue
        received += int(parts[1])
        times.append(float(parts[2]))
    if bad:
        raise SystemExit(f"{len(bad)} of {clients} downloads of {url} failed: {bad[:3]}")
    return {
        "seconds": round(seconds, 3),
        "bytes": received,
        "gb_per_second": round(received / seconds / 1e9, 3),
        "client_seconds_min": round(min(times), 3),
        "client_seconds_max": round(max(times), 3),
        "launched_late_seconds": round(late, 3),
        "loadgen_cpu_seconds": round(children_cpu() - cpu0, 2),
    }


H2LOAD_DONE = re.compile(r"finished in ([\d.]+)(ms|s),")
H2LOAD_REQS = re.compile(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed")
H2LOAD_CODES = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
H2LOAD_DATA = re.compile(r"traffic: .* total, .* headers .*, .*\((\d+)\) data")


def h2load(uris: Path, clients: int, requests: int, expect_bytes: int, timeout: float) -> dict[str, Any]:
    """``h2load --h1 -c clients -m 1 -n requests -i uris``: every request must succeed with a 2xx
    and the body bytes must add up to ``expect_bytes``."""
    cpu0 = children_cpu()
    cmd = ["h2load", "--h1", "-c", str(clients), "-m", "1", "-n", str(requests),
           "-T", str(int(timeout)), "-N", str(int(timeout)), "-i", str(uris)]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, check=False)
    wall = time.perf_counter() - t0
    out = p.stdout + p.stderr
    done, reqs, codes, traffic = (
        r.search(out) for r in (H2LOAD_DONE, H2LOAD_REQS, H2LOAD_CODES, H2LOAD_DATA)
    )
    if p.returncode != 0 or not done or not reqs or not codes or not traffic:
        raise SystemExit(f"h2load failed (exit {p.returncode}):\n{out[-2000:]}")
    seconds = float(done.group(1)) / (1000 if done.group(2) == "ms" else 1)
    total, succeeded, ok2xx, data = (
        int(reqs.group(1)),
        int(reqs.group(3)),
        int(codes.group(1)),
        int(traffic.group(1)),
    )
    if total != requests or succeeded != requests or ok2xx != requests or data != expect_bytes:
        raise SystemExit(
            f"small objects: {total} requests, {succeeded} succeeded, {ok2xx} answered 2xx, "
            f"{data} body bytes of {expect_bytes} expected"
        )
    return {
        "seconds": round(seconds, 3),
        "wall_seconds": round(wall, 3),
        "requests": requests,
        "bytes": data,
        "requests_per_second": round(requests / seconds),
        "mb_per_second": round(data / seconds / 1e6, 1),
        "loadgen_cpu_seconds": round(children_cpu() - cpu0, 2),
    }


def small_uri_list(tmp: Path, base: str, objs: list[Obj], rounds: int, seed: int) -> Path:
    """Every object ``rounds`` times, each round shuffled (h2load sends each connection
    through this whole list from its start)."""
    rng = random.Random(seed)
    order: list[Obj] = []
    for _ in range(rounds):
        r = list(objs)
        rng.shuffle(r)
        order += r
    path = tmp / f"uris-{base.rsplit(':', 1)[1]}"
    path.write_text("".join(f"{base}/objects/sha256/{o.hex}\n" for o in order))
    return path


# -- measuring ----------------------------------------------------------------------
@contextmanager
def server_cpu(server: Server, into: dict[str, Any]) -> Iterator[None]:
    c0 = server.cpu()
    yield
    into["server_cpu_seconds"] = round(server.cpu() - c0, 3)


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def alternate(names: list[str], rep: int) -> list[str]:
    """Servers in order, reversed on odd repeats: nobody always goes first."""
    return names if rep % 2 == 0 else names[::-1]


def bench_large(servers: dict[str, Server], data: Data, clients: int, repeat: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in servers}
    size = data.large.size
    timeout = max(120.0, clients * size / 2e8)  # 200 MB/s: far below anything seen
    for rep in range(repeat):
        for name in alternate(list(servers), rep):
            s = servers[name]
            r: dict[str, Any] = {}
            with server_cpu(s, r):
                r |= curl_all(
                    f"{s.curl_base}/objects/sha256/{data.large.hex}", clients, size, timeout, s.curl_args
                )
            r["server_cpu_seconds_per_gb"] = round(r["server_cpu_seconds"] / (r["bytes"] / 1e9), 3)
            runs[name].append(r)
            print(
                f"  large  {name:14} run {rep + 1}: {r['gb_per_second']:6.2f} GB/s  {r['seconds']:6.2f} s  "
                f"server CPU {r['server_cpu_seconds']:5.1f} s  curl CPU {r['loadgen_cpu_seconds']:5.1f} s",
                flush=True,
            )
    return {
        name: {
            "gb_per_second_median": round(median_of(rs, "gb_per_second"), 3),
            "seconds_median": round(median_of(rs, "seconds"), 3),
            "server_cpu_seconds_per_gb_median": round(median_of(rs, "server_cpu_seconds_per_gb"), 3),
            "runs": rs,
        }
        for name, rs in runs.items()
    }


def bench_small(
    servers: dict[str, Server], data: Data, tmp: Path, clients: int, rounds: int, repeat: int, seed: int
) -> dict[str, Any]:
    lists = {n: small_uri_list(tmp, s.base, data.small, rounds, seed) for n, s in servers.items()}
    per_connection = rounds * len(data.small)
    expect = clients * rounds * sum(o.size for o in data.small)
    timeout = 900.0
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in servers}
    for rep in range(repeat):
        for name in alternate(list(servers), rep):
            s = servers[name]
            r: dict[str, Any] = {}
            with server_cpu(s, r):
                r |= h2load(lists[name], clients, clients * per_connection, expect, timeout)
            r["server_cpu_us_per_request"] = round(1e6 * r["server_cpu_seconds"] / r["requests"], 1)
            runs[name].append(r)
            print(
                f"  small  {name:14} run {rep + 1}: {r['requests_per_second']:7,} req/s  "
                f"{r['mb_per_second']:6.1f} MB/s  {r['seconds']:6.2f} s  "
                f"server CPU {r['server_cpu_us_per_request']:5.0f} us/req  "
                f"h2load CPU {r['loadgen_cpu_seconds']:5.1f} s",
                flush=True,
            )
    return {
        name: {
            "requests_per_second_median": round(median_of(rs, "requests_per_second")),
            "mb_per_second_median": round(median_of(rs, "mb_per_second"), 1),
            "server_cpu_us_per_request_median": round(median_of(rs, "server_cpu_us_per_request"), 1),
            "runs": rs,
        }
        for name, rs in runs.items()
    }


def bench_cold(
    pool: Servers, origin: Server, data: Data, tmp: Path, clients: int, repeat: int, with_nginx: bool
) -> dict[str, Any]:
    size = data.cold.size
    timeout = max(120.0, clients * size / 1e8)
    kinds = ["relay", "nginx-proxy-cache"] if with_nginx else ["relay"]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rep in range(repeat):
        for kind in alternate(kinds, rep):
            name = f"cold-{kind}-{rep}"
            if kind == "relay":
                cache = tmp / name
                s = start_relay(pool, name, cache, origin.base, tmp)
            else:
                s = start_nginx(pool, name, tmp, "1", None, upstream=origin.base)
            try:
                before = metrics(origin)
                r: dict[str, Any] = {}
                with server_cpu(s, r):
                    r |= curl_all(f"{s.base}/objects/sha256/{data.cold.hex}", clients, size, timeout)
                after = metrics(origin)
                if kind == "relay":
                    m = metrics(s)
                    r["relay_upstream_fetches"] = int(m["slim_relay_upstream_fetches_total"])
                    r["relay_upstream_bytes"] = int(m["slim_relay_upstream_bytes_total"])
                    r["relay_cache_misses"] = int(m["slim_relay_object_misses_total"])
                    r["relay_cache_hits"] = int(m["slim_relay_object_hits_total"])
            finally:
                pool.stop(s)
                shutil.rmtree(tmp / name, ignore_errors=True)
            egress = after["slim_origin_sent_bytes_total"] - before["slim_origin_sent_bytes_total"]
            r["origin_requests"] = int(
                after["slim_origin_object_requests_total"] - before["slim_origin_object_requests_total"]
            )
            r["origin_egress_bytes"] = int(egress)
            r["origin_egress_copies"] = round(egress / size, 3)
            runs[kind].append(r)
            extra = f"  upstream fetches {r['relay_upstream_fetches']}" if kind == "relay" else ""
            print(
                f"  cold   {kind:17} run {rep + 1}: origin egress {r['origin_egress_copies']:.2f} x object, "
                f"{r['origin_requests']} origin requests, all {clients} done in {r['seconds']:5.2f} s "
                f"({r['gb_per_second']:.2f} GB/s){extra}",
                flush=True,
            )
    return {
        kind: {
            "origin_egress_copies_median": median_of(rs, "origin_egress_copies"),
            "origin_egress_copies_max": max(r["origin_egress_copies"] for r in rs),
            "seconds_median": round(median_of(rs, "seconds"), 3),
            "gb_per_second_median": round(median_of(rs, "gb_per_second"), 3),
            "runs": rs,
        }
        for kind, rs in runs.items()
    }


# -- reporting ----------------------------------------------------------------------
def _first_line(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    return (p.stdout or p.stderr).strip().splitlines()[0]


def machine() -> dict[str, Any]:
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                      if ln.startswith("model name")), "")  # fmt: skip
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tools": {
            "nginx": _first_line([NGINX, "-v"]),
            "h2load": _first_line(["h2load", "--version"]),
            "curl": _first_line(["curl", "--version"]),
            "aiohttp": version("aiohttp"),
            "uvloop": version("uvloop"),
        },
    }


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    large, small = results["large"], results["small"]
    out: dict[str, Any] = {}
    for ref in ("nginx-1-worker", "nginx-auto"):
        lr = large["relay"]["gb_per_second_median"] / large[ref]["gb_per_second_median"]
        sr = small["relay"]["requests_per_second_median"] / small[ref]["requests_per_second_median"]
        out[f"relay_over_{ref}"] = {
            "large_gb_per_second": round(lr, 3),
            "small_requests_per_second": round(sr, 3),
            "large_meets_target": lr >= TARGET,
            "small_meets_target": sr >= TARGET,
        }
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpus = results["machine"]["cpus"]
    style = {
        "relay": ("SLIM relay\n(1 process)", "#d95f02"),
        "relay-files": ("relay, no\nmemory cache", "#fc8d62"),
        "aiohttp-floor": ("bare\naiohttp", "#e6ab02"),
        "nginx-1-worker": ("nginx\n1 worker", "#7570b3"),
        "nginx-auto": (f"nginx\nauto ({cpus})", "#1b9e77"),
    }
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), width_ratios=[3, 4, 2.2])

    def bars(ax: Any, key: str, section: str, title: str, unit: str, fmt: Callable[[float], str]) -> None:
        names = [n for n in style if n in results[section]]
        meds = [results[section][n][f"{key}_median"] for n in names]
        runs = [[r[key] for r in results[section][n]["runs"]] for n in names]
        lo = [m - min(r) for m, r in zip(meds, runs, strict=True)]
        hi = [max(r) - m for m, r in zip(meds, runs, strict=True)]
        ax.bar(
            [style[n][0] for n in names], meds, color=[style[n][1] for n in names], yerr=[lo, hi], capsize=4
        )
        for i, m in enumerate(meds):
            ax.text(i, m / 2, fmt(m), ha="center", va="center", color="white", fontweight="bold")
        ref = results[section]["nginx-1-worker"][f"{key}_median"]
        ax.axhline(TARGET * ref, ls="--", lw=1, color="grey", label=f"target: {TARGET} x nginx, 1 worker")
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.set_ylim(0, max(m + h for m, h in zip(meds, hi, strict=True)) * 1.3)

    p = results["parameters"]
    bars(axes[0], "gb_per_second", "large",
         f"large: {p['large_clients']} clients x 1 object of {p['large_mib']:,} MiB", "GB/s (aggregate)",
         lambda v: f"{v:.2f}")  # fmt: skip
    bars(axes[1], "requests_per_second", "small",
         f"small: {p['small_objects']:,} objects (median 16 KiB), {p['small_clients']} keep-alive clients",
         "requests/s", lambda v: f"{v:,.0f}")  # fmt: skip
    cold = results["cold"]
    kinds = list(cold)
    ax = axes[2]
    copies = [cold[k]["origin_egress_copies_median"] for k in kinds]
    secs = [cold[k]["seconds_median"] for k in kinds]
    klabels = ["SLIM relay" if k == "relay" else "nginx proxy_cache\n+ proxy_cache_lock" for k in kinds]
    ax.bar(klabels, copies, color=["#d95f02", "#7570b3"][: len(kinds)])
    for i, (c, s) in enumerate(zip(copies, secs, strict=True)):
        ax.annotate(f"{c:.2f} copies\nall done in {s:.1f} s", (i, c), ha="center", va="bottom",
                    xytext=(0, 4), textcoords="offset points", fontsize=9)  # fmt: skip
    ax.set_ylim(0, max(2.0, max(copies) * 1.4))
    ax.set_ylabel("origin egress ÷ object size")
    ax.set_title(f"cold cache: {p['cold_clients']} clients, 1 object of {p['cold_mib']:,} MiB", fontsize=10)
    fig.suptitle(
        f"P3 relay throughput on loopback, {results['machine']['cpus']} shared cores "
        f"(medians of {p['repeat']}; bars: min-max)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------
def need_tools(*tools: str) -> None:
    """Stop with what to install if one of ``tools`` is missing."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is not installed (./run bench relay installs nginx-light and nghttp2-client)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large-mib", type=int, default=1024, help="size of the large object, MiB")
    ap.add_argument("--large-clients", type=int, default=64, help="clients downloading it at once")
    ap.add_argument("--small-objects", type=int, default=10_000, help="number of small objects")
    ap.add_argument(
        "--small-rounds", type=int, default=1, help="times each connection asks for every small object"
    )
    ap.add_argument("--small-clients", type=int, default=64, help="h2load's keep-alive connections")
    ap.add_argument("--cold-mib", type=int, default=256, help="size of the cold object, MiB")
    ap.add_argument("--cold-clients", type=int, default=64, help="clients asking for it at once")
    ap.add_argument("--no-nginx-proxy", action="store_true", help="skip nginx as a caching proxy (cold)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement (median reported)")
    ap.add_argument("--seed", type=int, default=3, help="seed of the object sizes and contents")
    ap.add_argument("--quick", action="store_true", help="smoke run: 256 MiB x 16, 2,000 small, 1 repeat")
    ap.add_argument("--tmp-dir", type=Path, help="where the temporary directory goes (default: $TMPDIR)")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="directory for the JSON results and the plot")
    ap.add_argument("--plot-from", type=Path, metavar="JSON", help="only redraw the plot of a results file")
    ap.add_argument(
        "--https",
        action="store_true",
        help="instead: the relay against nginx over HTTPS (same certificate, same files), with both "
        "over HTTP beside them for the cost of TLS; large and small only; relay_https.json",
    )
    ap.add_argument("--origin-server", type=Path, help=argparse.SUPPRESS)  # internal: the origin process
    ap.add_argument("--floor-server", type=Path, help=argparse.SUPPRESS)  # internal: the aiohttp floor
    ap.add_argument("--floor-limit", type=int, default=256 * KiB, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.origin_server or args.floor_server:
        import uvloop

        if args.origin_server:
            uvloop.run(_serve_origin(args.origin_server))
        else:
            uvloop.run(_serve_floor(args.floor_server, args.floor_limit))
        return
    if args.https:
        if args.quick:
            args.large_mib, args.large_clients, args.small_objects, args.small_rounds = 256, 16, 1000, 1
            args.repeat = 1
        run_https(args)
        return
    if args.plot_from:
        args.out.mkdir(parents=True, exist_ok=True)
        plot(json.loads(args.plot_from.read_text()), args.out / "relay_throughput.png")
        return
    if args.quick:
        args.large_mib, args.large_clients, args.small_objects, args.small_rounds = 256, 16, 1000, 1
        args.cold_mib, args.cold_clients, args.repeat = 64, 16, 1
    if min(args.repeat, args.large_mib, args.large_clients, args.small_objects, args.small_rounds,
           args.small_clients, args.cold_mib, args.cold_clients) < 1:  # fmt: skip
        ap.error("every count and size must be at least 1")
    need_tools(NGINX, "h2load", "curl")

    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "P3 relay throughput: SLIM relay vs nginx (same files, loopback), cold-cache egress",
        "command": " ".join(["python", "bench/relay_throughput.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "parameters": {
            k: v
            for k, v in vars(args).items()
            if k
            not in ("out", "tmp_dir", "origin_server", "floor_server", "floor_limit", "quick", "plot_from")
        }
        | {"quick": args.quick},
        "target": f"relay >= {TARGET} x nginx",
        "notes": [
            "large: one curl process per client writing to /dev/null, all starting at one instant (each "
            "behind a sleep that ends then); GB/s = bytes / time from that instant to the last end; "
            "1 GB = 1e9 bytes",
            "small: one h2load --h1 -m 1 -c CLIENTS; h2load walks every connection through the same URI "
            "list from its start, so each connection asks for every object (the list: all objects, "
            "shuffled, ROUNDS times): CLIENTS x OBJECTS x ROUNDS requests; rates from h2load's clock",
            "server CPU: user + system seconds from /proc (nginx: master + workers), per GB or per request",
            "cold: a fresh empty cache per run; origin = SLIM's ObjectServer in a child process; "
            "egress from its slim_origin_sent_bytes_total",
            "the load generators share the 2 cores with the servers",
            "nginx runs with its defaults beyond the lines above (sendfile_max_chunk 2m in 1.22); in a side "
            "experiment (32 clients x 512 MiB, 2 runs) nginx 1 worker with sendfile_max_chunk 0 or "
            "tcp_nopush off cost 0.23-0.25 s CPU/GB instead of 0.28-0.31 and came within 10 % of the relay",
        ],
    }
    tmp = Path(tempfile.mkdtemp(prefix="slim-bench-relay-", dir=args.tmp_dir))
    tmp.chmod(0o755)  # nginx's workers run as nobody and read the files too
    pool = Servers()
    try:
        data = make_data(tmp, args.large_mib * MiB, args.small_objects, args.cold_mib * MiB, args.seed)
        results["data"] = {
            "large_bytes": data.large.size,
            "small_objects": len(data.small),
            "small_bytes_total": sum(o.size for o in data.small),
            "small_bytes_median": statistics.median(o.size for o in data.small),
            "small_bytes_min": min(o.size for o in data.small),
            "small_bytes_max": max(o.size for o in data.small),
            "small_above_128kib": sum(o.size > 128 * KiB for o in data.small),
            "cold_bytes": data.cold.size,
        }
        files = sorted(data.cache.glob("objects/sha256/*")) + sorted(data.origin.iterdir())
        results["page_cache_warm_seconds"] = round(warm_page_cache(files), 2)
        origin = start_origin(pool, data.origin, tmp)
        servers = {
            "relay": start_relay(pool, "relay", data.cache, origin.base, tmp),
            "nginx-1-worker": start_nginx(pool, "nginx-1-worker", tmp, "1", data.cache),
            "nginx-auto": start_nginx(pool, "nginx-auto", tmp, "auto", data.cache),
        }
        workers = {n: servers[n].extra["worker_processes"] for n in ("nginx-1-worker", "nginx-auto")}
        results["servers"] = {
            "relay": "slim relay serve --max-bytes 4G --log-level warning (defaults: uvloop, the fast path, "
            "--memory-cache 512M, no access log)",
            "relay-files": "small objects only: the same with --memory-cache 0 "
            "(every hit opens and reads the file)",
            "nginx-1-worker": f"nginx worker_processes 1 ({workers['nginx-1-worker']} worker seen)",
            "nginx-auto": f"nginx worker_processes auto ({workers['nginx-auto']} workers seen)",
            "aiohttp-floor": "small objects only: a bare aiohttp app on uvloop answering from memory "
            "(one route, one web.Response): the least any aiohttp server can cost per request",
            "nginx_config": "sendfile on; tcp_nopush on; tcp_nodelay on; access_log off; keepalive; "
            "root = the relay's cache directory",
        }
        print("large object ...", flush=True)
        results["large"] = bench_large(servers, data, args.large_clients, args.repeat)
        print("small objects ...", flush=True)
        floor = start_floor(pool, data.cache / "objects" / "sha256", 256 * KiB, tmp)
        # the same relay without its memory cache: every small hit opens and reads the file
        relay_files = start_relay(pool, "relay-files", data.cache, origin.base, tmp, "--memory-cache", "0")
        results["small"] = bench_small(
            servers | {"relay-files": relay_files, "aiohttp-floor": floor},
            data,
            tmp,
            args.small_clients,
            args.small_rounds,
            args.repeat,
            args.seed,
        )
        pool.stop(floor)
        pool.stop(relay_files)
        m = metrics(servers["relay"])
        results["relay_warm_cache_check"] = {
            "upstream_fetches": int(m["slim_relay_upstream_fetches_total"]),
            "misses": int(m["slim_relay_object_misses_total"]),
        }
        if m["slim_relay_upstream_fetches_total"]:
            raise SystemExit("the warm relay fetched from upstream: its cache was not what it served")
        for name in list(servers):
            pool.stop(servers.pop(name))
        print("cold cache ...", flush=True)
        results["cold"] = bench_cold(
            pool, origin, data, tmp, args.cold_clients, args.repeat, not args.no_nginx_proxy
        )
    finally:
        pool.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    results["ratios"] = ratios(results)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "relay_throughput.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    plot(results, args.out / "relay_throughput.png")
    report(results)
    shown = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    print(f"whole run {results['total_seconds']:.0f} s; wrote {shown}/relay_throughput.json and .png")


# -- HTTPS -------------------------------------------------------------------------
TLS_NAME = "bench.relay.slim"  # the relay's certificate: relay "bench" of a CA made for the run
NEGOTIATED = re.compile(r"New, (\S+), Cipher is (\S+)")


def handshake(server: Server) -> dict[str, str]:
    """What a client and ``server`` negotiate, and whether its certificate checks out."""
    assert server.ca is not None
    p = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-servername", server.tls_name,
         "-CAfile", str(server.ca), "-verify_hostname", server.tls_name, "-verify_return_error"],
        input="", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    m = NEGOTIATED.search(p.stdout)
    if p.returncode != 0 or m is None or "Verify return code: 0 (ok)" not in p.stdout:
        raise SystemExit(f"{server.name}: TLS handshake failed:\n{p.stdout[-1500:]}{p.stderr[-1500:]}")
    return {"protocol": m.group(1), "cipher": m.group(2)}


def run_https(args: argparse.Namespace) -> None:
    """The relay against nginx over HTTPS: the relay's own certificate (an identity of a CA
    made for the run, ECDSA P-256) on both, the same files, the same clients (curl checks
    the certificate against the CA and its name)."""
    from slim.pki import CA_CERT, CERT_PEM, KEY_PEM, CertificateAuthority

    need_tools(NGINX, "h2load", "curl", "openssl")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "relay throughput over HTTPS: SLIM relay vs nginx, same certificate and files, loopback",
        "command": " ".join(["python", "bench/relay_throughput.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "parameters": {
            k: getattr(args, k)
            for k in (
                "large_mib",
                "large_clients",
                "small_objects",
                "small_rounds",
                "small_clients",
                "repeat",
                "seed",
            )
        }
        | {"quick": args.quick},
        "notes": [
            "both servers present the same certificate and key (relay 'bench' of a CA made for the run, "
            "ECDSA P-256) from the same files; nginx with ssl_certificate, ssl_protocols TLSv1.2 TLSv1.3 "
            "(1.22 stops at 1.2 by default) and its defaults otherwise: both negotiate the same protocol "
            "and cipher ('negotiated', openssl s_client)",
            "the relay: one process serving --listen (HTTP) and --https-listen (HTTPS); over TLS it "
            "cannot use sendfile: bodies are read and encrypted in user space (nginx-light too: no kTLS)",
            "large: curl processes checking the certificate (--cacert, the name by --resolve); "
            "small: h2load --h1 over TLS (keep-alive: one handshake per connection)",
            "relay-http and nginx-1-worker-http: the same servers over plain HTTP in the same run, for "
            "the cost of TLS",
            "the load generators share the 2 cores with the servers",
        ],
    }
    tmp = Path(tempfile.mkdtemp(prefix="slim-bench-https-", dir=args.tmp_dir))
    tmp.chmod(0o755)  # nginx's workers run as nobody and read the files too
    pool = Servers()
    try:
        data = make_data(tmp, args.large_mib * MiB, args.small_objects, MiB, args.seed)
        files = sorted(data.cache.glob("objects/sha256/*"))
        results["page_cache_warm_seconds"] = round(warm_page_cache(files), 2)
        ca = CertificateAuthority.init(tmp / "ca")
        identity = tmp / "identity"
        ca.enroll("bench", "relay", identity)
        tls = Tls(identity / CERT_PEM, identity / KEY_PEM, tmp / "ca" / CA_CERT, TLS_NAME)
        relay_http, relay_https = start_https_relay(pool, data.cache, tmp, identity, TLS_NAME, tls.ca)
        servers = {
            "relay-https": relay_https,
            "nginx-1-worker-https": start_nginx(pool, "nginx-1-worker-https", tmp, "1", data.cache, tls=tls),
            "nginx-auto-https": start_nginx(pool, "nginx-auto-https", tmp, "auto", data.cache, tls=tls),
            "relay-http": relay_http,
            "nginx-1-worker-http": start_nginx(pool, "nginx-1-worker-http", tmp, "1", data.cache),
        }
        results["negotiated"] = {n: handshake(s) for n, s in servers.items() if s.tls_name}
        if len({tuple(h.values()) for h in results["negotiated"].values()}) != 1:
            raise SystemExit(f"the servers negotiate different TLS: {results['negotiated']}")
        results["data"] = {
            "large_bytes": data.large.size,
            "small_objects": len(data.small),
            "small_bytes_total": sum(o.size for o in data.small),
            "small_bytes_median": statistics.median(o.size for o in data.small),
        }
        print("large object ...", flush=True)
        results["large"] = bench_large(servers, data, args.large_clients, args.repeat)
        print("small objects ...", flush=True)
        results["small"] = bench_small(
            servers, data, tmp, args.small_clients, args.small_rounds, args.repeat, args.seed
        )
        if metrics(relay_http)["slim_relay_upstream_fetches_total"]:
            raise SystemExit("the relay fetched from upstream: its cache was not what it served")
    finally:
        pool.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    lg, sm = results["large"], results["small"]
    results["ratios"] = {
        f"relay_https_over_{ref}": {
            "large_gb_per_second": round(
                lg["relay-https"]["gb_per_second_median"] / lg[ref]["gb_per_second_median"], 3
            ),
            "small_requests_per_second": round(
                sm["relay-https"]["requests_per_second_median"] / sm[ref]["requests_per_second_median"], 3
            ),
        }
        for ref in ("nginx-1-worker-https", "nginx-auto-https")
    } | {
        f"{who}_https_over_http": {
            "large_gb_per_second": round(
                lg[https]["gb_per_second_median"] / lg[http]["gb_per_second_median"], 3
            ),
            "small_requests_per_second": round(
                sm[https]["requests_per_second_median"] / sm[http]["requests_per_second_median"], 3
            ),
        }
        for who, https, http in (
            ("relay", "relay-https", "relay-http"),
            ("nginx_1_worker", "nginx-1-worker-https", "nginx-1-worker-http"),
        )
    }
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "relay_https.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"\n{'':22}{'large GB/s':>12}{'CPU s/GB':>10}{'small req/s':>13}{'MB/s':>8}{'CPU us/req':>12}")
    for n in servers:
        print(
            f"{n:22}{lg[n]['gb_per_second_median']:12.2f}{lg[n]['server_cpu_seconds_per_gb_median']:10.3f}"
            f"{sm[n]['requests_per_second_median']:13,}{sm[n]['mb_per_second_median']:8.0f}"
            f"{sm[n]['server_cpu_us_per_request_median']:12.0f}"
        )
    for name, r in results["ratios"].items():
        print(f"{name}: large {r['large_gb_per_second']:.2f}x, small {r['small_requests_per_second']:.2f}x")
    shown = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    print(f"whole run {results['total_seconds']:.0f} s; wrote {shown}/relay_https.json")


def report(results: dict[str, Any]) -> None:
    lg, sm = results["large"], results["small"]
    print(f"\n{'':16}{'large GB/s':>12}{'CPU s/GB':>10}{'small req/s':>13}{'MB/s':>8}{'CPU us/req':>12}")
    for n in sm:
        if n not in lg:
            print(
                f"{n:16}{'-':>12}{'-':>10}{sm[n]['requests_per_second_median']:13,}"
                f"{sm[n]['mb_per_second_median']:8.0f}{sm[n]['server_cpu_us_per_request_median']:12.0f}"
            )
            continue
        print(
            f"{n:16}{lg[n]['gb_per_second_median']:12.2f}{lg[n]['server_cpu_seconds_per_gb_median']:10.3f}"
            f"{sm[n]['requests_per_second_median']:13,}{sm[n]['mb_per_second_median']:8.0f}"
            f"{sm[n]['server_cpu_us_per_request_median']:12.0f}"
        )
    for ref, r in results["ratios"].items():
        print(
            f"{ref}: large {r['large_gb_per_second']:.2f}x "
            f"({'meets' if r['large_meets_target'] else 'MISSES'} {TARGET}x), "
            f"small {r['small_requests_per_second']:.2f}x "
            f"({'meets' if r['small_meets_target'] else 'MISSES'} {TARGET}x)"
        )
    for kind, c in results["cold"].items():
        print(
            f"cold {kind}: origin egress {c['origin_egress_copies_median']:.2f} copies, "
            f"all done in {c['seconds_median']:.2f} s"
        )


if __name__ == "__main__":
    main()
