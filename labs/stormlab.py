"""Boot storms on a namespace cluster (bench/boot_storm.py, bench/wan_boot.py, tests).

One server namespace runs `slim serve` (core, relay) on a bridge; N node
namespaces, each on a veth shaped with ``tbf`` (both directions), boot at once.
A node's boot is what happens after its firmware: it fetches the kernel and
initrd its boot script names (what iPXE does), then runs the agent in no-reboot
mode into its own directory.  The server's side of the bridge can be shaped too
(the server's uplink).  Per-node stage times come from the core's boot events;
each node also reports the CPU time of every stage (the simulator's calibration
needs it).

Run as root.  Addresses are 10.77.0.0/16 inside the namespaces only.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from labs import standin
from labs.host import lab_env
from labs.netlab import NetLab
from labs.table2 import generate
from slim.simulate import Directory, Workload
from slim.vocabulary import parse_rate

SERVER = "10.77.0.1"
RELAY = f"http://{SERVER}:8080"
MAC = "52:54:00:78:{:02x}:{:02x}"
NFS_DIRS = ("/bin", "/lib", "/sbin", "/usr")  # the paper's LAN set-up: these over NFS, the rest copied
BOOT_BYTES = 14_900_000  # Debian's kernel (7.9 MB) + SLIM's initrd (7.0 MB): what a node fetches first
TCP_OVER_ETHERNET = 1448 / 1514  # payload per frame as tbf counts it (MTU 1500, TCP timestamps)
POLICIES = {"full": "ram", "cin": "sync"}  # full copy to RAM; copy-if-needed
REGISTRY = """\
settings: {{heartbeat_interval: 1, nfs_server: {server}}}
sites:
  lab: {{prefixes: [10.77.0.0/16]}}
relays:
  r1: {{urls: ["{relay}/"], site: lab}}
profiles:
  ns: {{}}
environments:
{environments}
nodes:
{nodes}
server:
  core_listen: unix:{tmp}/core.sock
  relay_listen: {server}:8080
  tftp_listen: null
  nfs_listen: null
  dhcp: false
"""


def mac(i: int) -> str:
    return MAC.format(i >> 8, i & 0xFF)


def tbf_params(rate_bits: float) -> tuple[str, str]:
    """(burst, latency) for a token bucket at ``rate_bits``: a burst of 10 ms at the rate
    (at least two frames) and a queue of 200 ms, like a switch port's buffer."""
    burst = max(3028, int(rate_bits / 8 * 0.01))
    return f"{burst}b", "200ms"


@dataclass
class NodeResult:
    node: str
    launched: float  # wall clock, when the storm started this node
    returncode: int = 0
    boot_bytes: int = 0
    boot_files_at: float = 0.0  # wall clock: kernel and initrd fetched
    cpu: dict[str, float] = field(default_factory=dict)  # stage -> CPU seconds spent up to its event
    events: list[dict[str, Any]] = field(default_factory=list)  # from the core: stage, time, bytes
    stderr: str = ""

    def timeline(self, t0: float) -> list[dict[str, Any]]:
        """[{stage, start, end}] relative to ``t0`` (the storm's start): the boot files,
        then each agent event, each starting where the one before ended."""
        out = [{"stage": "kernel+initrd", "start": self.launched - t0, "end": self.boot_files_at - t0}]
        prev = self.boot_files_at
        for e in sorted(self.events, key=lambda e: e["time"]):
            out.append({"stage": e["stage"], "start": prev - t0, "end": e["time"] - t0})
            prev = e["time"]
        return out

    @property
    def done_at(self) -> float:
        done = [e["time"] for e in self.events if e["stage"] == "done"]
        return done[0] if done else 0.0


class StormLab:
    """``with StormLab(tmp, image, {"full": "ram"}, nodes=8, node_rate="10mbit") as lab: lab.storm("full")``.

    ``environments``: name -> default policy (``ram``, ``disk``, ``sync``) of the copied
    directories; /bin /lib /sbin /usr are NFS, as in the paper.  ``kernel_bytes``:
    the size of the stand-in kernel the nodes fetch (the EE's kernel and initrd).
    """

    def __init__(
        self,
        tmp: Path,
        image: Path,
        environments: dict[str, str],
        nodes: int,
        node_rate: str | None = None,
        uplink_rate: str | None = None,
        extra_unshaped: int = 0,
    ) -> None:
        from slim.core.build.release import build_environment
        from slim.core.registry import load_registry
        from slim.core.store import Store
        from slim.signing import SigningKey

        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.unshaped = [f"u{i}" for i in range(1, extra_unshaped + 1)]
        every = self.node_names + self.unshaped
        envs = "\n".join(
            f"  {name}: {{image: {image}, default_policy: {policy}, kernel: /vmlinuz, "
            f"directories: {{{', '.join(f'{d}: nfs' for d in NFS_DIRS)}}}}}"
            for name, policy in environments.items()
        )
        first = next(iter(environments))
        node_lines = "\n".join(
            f'  {n}: {{macs: ["{mac(i)}"], profile: ns, environment: {first}, site: lab, disk: /dev/sda1}}'
            for i, n in enumerate(every, start=1)
        )
        self.registry = tmp / "registry.yaml"
        self.registry.write_text(
            REGISTRY.format(server=SERVER, relay=RELAY, environments=envs, nodes=node_lines, tmp=tmp)
        )
        state = tmp / "state"
        self.trust = state / "keys" / "signing.pub"  # `slim serve` makes the core's key there
        registry = load_registry(self.registry)
        signer = SigningKey.load_or_create(state / "keys")  # what `slim serve` will sign with
        self.builds = {
            name: build_environment(registry, Store(state / "store"), name, signer=signer)
            for name in environments
        }
        # The nodes' roots are a tmpfs, as "ram" is on a real boot (and so that the host's
        # disk, shared by every node here, is not what is measured).
        self.roots = tmp / "roots"
        self.roots.mkdir(exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "mode=0755", "slim-storm", str(self.roots)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        try:
            self.lab = NetLab(tmp, subnet="10.77.0.0/16", tag=f"st{os.getpid() % 100000}")
            for i, n in enumerate(every, start=1):
                self.lab.add_node(n, mac(i), address=f"10.77.{1 + i // 250}.{1 + i % 250}")
                if node_rate is not None and n in self.node_names:
                    self.shape_node(n, node_rate)
            self.uplink_rate = uplink_rate
            self.serve = self.lab.popen(
                self.lab.server,
                sys.executable,
                "-m",
                "slim.cli",
                "serve",
                "--registry",
                str(self.registry),
                "--state-dir",
                str(state),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert self.serve.stdout is not None
            from slim.allinone import await_ready  # not at the top: nodes import this module too

            await_ready(self.serve.stdout, state / "logs")
        except BaseException:
            self.close()
            raise

    def shape_node(self, node: str, rate: str) -> None:
        n = self.lab.nodes[node]
        burst, latency = tbf_params(parse_rate(rate))
        self.lab.shape(self.lab.server, n.veth, rate, burst, latency)
        self.lab.shape(n.netns, "eth0", rate, burst, latency)

    def shape_uplink(self) -> None:
        """The server's uplink: everything the server sends into the bridge."""
        if self.uplink_rate is not None:
            burst, latency = tbf_params(parse_rate(self.uplink_rate))
            self.lab.shape(self.lab.server, "br0", self.uplink_rate, burst, latency)

    def wire_bytes(self, node: str) -> int:
        """Bytes the server side sent to ``node`` so far (the tbf qdisc's count: frames, headers included)."""
        n = self.lab.nodes[node]
        out = subprocess.run(
            self.lab.cmd(self.lab.server, "tc", "-s", "qdisc", "show", "dev", n.veth),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        m = re.search(r"Sent (\d+) bytes", out)
        return int(m.group(1)) if m else 0

    def set_environment(self, nodes: list[str], environment: str) -> None:
        from slim.rpc import CoreClient
        from slim.v1 import core_pb2 as pb

        with CoreClient(f"unix:{self.tmp}/core.sock", timeout=10) as client:
            for n in nodes:
                request = pb.SetNextBootRequest(node=n, environment=environment, set_by="storm")
                client.call(client.admin.SetNextBoot, request)

    def events(self, node: str) -> list[dict[str, Any]]:
        from slim.rpc import CoreClient
        from slim.v1 import core_pb2 as pb

        with CoreClient(f"unix:{self.tmp}/core.sock", timeout=10) as client:
            got = client.call(client.admin.ListBootEvents, pb.ListBootEventsRequest(node=node)).events
        return [
            {
                "boot_id": e.boot_id,
                "stage": e.stage,
                "time": e.time.ToNanoseconds() / 1e9,
                "bytes": e.bytes,
                "ok": e.ok,
                "message": e.message,
            }
            for e in got
        ]

    def storm(
        self, nodes: list[str], environment: str, fresh: bool, timeout: float = 1800
    ) -> list[NodeResult]:
        """Boot ``nodes`` at once into ``environment``; ``fresh``: empty their roots first
        (a full copy), else keep what is there (copy-if-needed compares with it)."""
        self.set_environment(nodes, environment)
        roots = {n: self.roots / n for n in nodes}
        if fresh:
            for root in roots.values():
                shutil.rmtree(root, ignore_errors=True)
        procs = {}
        results = {}
        for n in nodes:
            argv = [
                sys.executable,
                "-m",
                "labs.stormlab",
                "--relay",
                RELAY,
                "--mac",
                self.lab.nodes[n].mac,
                "--node",
                n,
                "--target",
                str(roots[n]),
                "--trust",
                str(self.trust),
            ]
            results[n] = NodeResult(n, time.time())
            procs[n] = self.lab.popen(
                self.lab.nodes[n].netns, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=lab_env()
            )
        deadline = time.monotonic() + timeout
        for n, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            r = results[n]
            r.returncode, r.stderr = proc.returncode, err.decode(errors="replace")[-3000:]
            try:
                said = json.loads(out.decode().strip().splitlines()[-1])
            except (IndexError, ValueError):
                said = {}
            r.boot_bytes = said.get("boot_bytes", 0)
            r.boot_files_at = said.get("boot_files_at", r.launched)
            r.cpu = said.get("cpu", {})
            boot_id = said.get("boot_id")
            r.events = [e for e in self.events(n) if e["boot_id"] == boot_id]
        self.lab.reap()
        return [results[n] for n in nodes]

    def close(self) -> None:
        lab: NetLab | None = getattr(self, "lab", None)
        if lab is not None:
            lab.close()
        if os.path.ismount(self.roots):
            subprocess.run(["umount", str(self.roots)], check=False, capture_output=True, timeout=60)
        if getattr(self, "serve", None) is not None and self.serve.stdout is not None:
            self.serve.stdout.close()

    def __enter__(self) -> StormLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- images and calibration (bench/boot_storm.py, bench/wan_boot.py) ---------------------


def cache_dir() -> Path:
    return Path(os.environ.get("SLIM_BENCH_CACHE", Path.home() / ".cache" / "slim-bench"))


def table2_image(where: Path, scale: float, cached: bool) -> Path:
    """The Table-2 image at ``scale`` with a stand-in kernel (outside the copy set) of the
    scaled size of a real kernel + initrd; the full-scale one is kept in the cache."""
    target = (cache_dir() if cached else where) / f"table2-{scale:g}"
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"generating the Table-2 image at scale {scale:g} in {target}", flush=True)
    generate(partial, scale=scale)
    standin.add_kernel(partial, size=int(BOOT_BYTES * scale), directory="usr/lib/standin")
    (partial / ".complete").write_text("")  # in the copy set: 0 bytes
    partial.rename(target)
    return target


def workload_of(lab: StormLab, env: str, node: NodeResult, previous: NodeResult | None = None) -> Workload:
    """The simulator's view of one solo boot: sizes from the release, CPU from the node's getrusage."""
    release = lab.builds[env].release
    cpu = node.cpu
    stages = [k for k in cpu if k not in ("start", "kernel+initrd", "plan", "done", "end")]
    boot = release.kernel.size + release.initrd.size
    dirs = []
    prev = cpu["plan"]
    for stage in stages:
        policy, path = stage.split(":", 1)
        spent = cpu[stage] - prev
        prev = cpu[stage]
        d = release.directories[path]
        if policy == "mount":
            dirs.append(Directory(path, "nfs"))
        elif policy == "sync" and previous is not None:  # compared with the copy already there
            assert d.manifest is not None
            dirs.append(Directory(path, "sync", manifest_bytes=d.manifest.size, cpu=spent))
        else:
            assert d.archive is not None  # unpacked: ram, disk, or sync into an empty place
            kind: Literal["ram", "disk"] = "disk" if policy == "disk" else "ram"
            dirs.append(Directory(path, kind, archive_bytes=d.archive.size, cpu=spent))
    return Workload(
        boot_bytes=boot,
        directories=tuple(dirs),
        start_cpu=cpu["start"] + cpu["plan"] - cpu["kernel+initrd"],
        done_cpu=cpu["end"] - prev,
        fetch_cpu_per_byte=(cpu["kernel+initrd"] - cpu["start"]) / boot,
    )


def median_workload(ws: list[Workload]) -> Workload:
    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    dirs = tuple(
        replace(d, cpu=med([w.directories[i].cpu for w in ws])) for i, d in enumerate(ws[0].directories)
    )
    return replace(
        ws[0],
        directories=dirs,
        start_cpu=med([w.start_cpu for w in ws]),
        done_cpu=med([w.done_cpu for w in ws]),
        fetch_cpu_per_byte=med([w.fetch_cpu_per_byte for w in ws]),
    )


def solo(lab: StormLab, node: str, repeat: int) -> dict[str, Workload]:
    """One node alone on an unshaped link, ``repeat`` times: full copy, then copy-if-needed."""
    got: dict[str, list[Workload]] = {"full": [], "cin": []}
    for _ in range(repeat):
        (full,) = lab.storm([node], "full", fresh=True)
        (cin,) = lab.storm([node], "cin", fresh=False)
        for r in (full, cin):
            if r.returncode != 0:
                raise RuntimeError(f"solo boot of {node} failed: {r.stderr}")
        got["full"].append(workload_of(lab, "full", full))
        got["cin"].append(workload_of(lab, "cin", cin, previous=full))
    return {k: median_workload(v) for k, v in got.items()}


# -- the node's side: run inside a node namespace ----------------------------------------


def _cpu() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _boot_files(relay: str, mac: str) -> int:
    """What iPXE does: fetch the boot script, then the kernel and initrd it names (first relay)."""
    with urllib.request.urlopen(f"{relay}/boot/{mac}.ipxe", timeout=60) as r:  # noqa: S310 - the lab's relay
        script = r.read().decode()
    m = re.search(r"^(?:goto|choose --default) (\S+)", script, re.M)
    label = m.group(1) if m else ""
    section = script.split(f"\n:{label}\n", 1)[-1]
    urls = [
        re.search(r"^kernel (\S+)", section, re.M),
        re.search(r"^initrd --name initrd (\S+)", section, re.M),
    ]
    total = 0
    for u in urls:
        if u is None:
            raise RuntimeError(f"no kernel/initrd in the boot script:\n{script}")
        with urllib.request.urlopen(u.group(1), timeout=600) as r:  # noqa: S310 - the lab's relay
            for block in iter(lambda: r.read(1 << 16), b""):
                total += len(block)
    return total


def node_main(argv: list[str] | None = None) -> int:
    """``python -m labs.stormlab --relay URL --mac MAC --node NAME --target DIR``: one node's boot
    after its firmware; prints one JSON line (boot bytes, times, CPU per stage)."""
    import argparse

    ap = argparse.ArgumentParser(prog="labs.stormlab", description=node_main.__doc__)
    ap.add_argument("--relay", required=True)
    ap.add_argument("--mac", required=True)
    ap.add_argument("--node", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--trust", required=True, help="the core's public key, which plans are checked against")
    args = ap.parse_args(argv)
    cpu: dict[str, float] = {"start": _cpu()}
    boot_bytes = _boot_files(args.relay, args.mac)
    boot_files_at = time.time()
    cpu["kernel+initrd"] = _cpu()
    import slim.agent.__main__ as agent  # imported now, as the initrd's Python starts after the kernel

    ids: list[str] = []

    def probe(stage: str, boot_id: str) -> None:  # the CPU spent up to each event
        cpu[stage] = _cpu()
        if not ids:
            ids.append(boot_id)

    argv = ["--no-reboot", "--target", args.target, "--node", args.node, "--relay", args.relay,
            "--trust", args.trust]  # fmt: skip
    code = agent.main(argv, observe=probe)
    cpu["end"] = _cpu()
    print(
        json.dumps(
            {
                "boot_bytes": boot_bytes,
                "boot_files_at": boot_files_at,
                "cpu": cpu,
                "boot_id": ids[0] if ids else None,
                "returncode": code,
            }
        )
    )
    return code


if __name__ == "__main__":
    sys.exit(node_main())
