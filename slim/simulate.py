"""A flow-level simulator of a boot storm: how long N nodes take to build their EE.

What it models (``slim simulate``; calibrated against real namespace-cluster
storms by ``bench/boot_storm.py``):

- **A two-level tree**, the paper's and most machine rooms': nodes on edge
  switches (``per_switch`` each, ``node_link`` per port), edge switches on one
  core switch (``switch_uplink`` each, full duplex), the server on the core
  switch (``server_link``).  Relays sit beside the server on the core switch
  (``placement: core``) or on edge switches (``placement: edge``), each
  serving a share of the switches, on ``relay_link``.  With no relays the
  server serves every node itself, as the paper's single server did.
- **Each node's boot as a sequence of steps** taken from the workload: fetch
  the kernel and initrd; start the agent (CPU); ask for the plan (the core's
  CPU and one round trip); per directory, stream its archive and unpack it
  (bytes *and* CPU at once: the slower of the two sets the pace), or for
  copy-if-needed fetch the manifest, compare (CPU) and fetch what changed
  (one round trip per file); report ``done``.
- **Sharing**: every link and CPU pool is shared max-min fairly among the
  steps using it at that moment (progressive filling on each step's fraction
  of the speed it would have alone).  Links carry payload at ``efficiency``
  of their rate (Ethernet and TCP/IP headers).  A node's CPU is its own
  (``node_cpu: dedicated``), or all nodes share a pool of cores, as the
  namespace nodes of one test machine do.

Identical nodes on one switch move in step, so they are simulated as one
*cohort* with a multiplicity: 10,000 nodes cost a few hundred cohorts, and a
run takes well under a second.

Not modelled: TCP slow start and loss, disk bandwidth (the paper found it was
not the bottleneck), NFS traffic after switch_root, firmware and kernel start
(``boot_overhead`` adds a fixed time per node if wanted), relays filling
their caches (relays are warm: the Slurm prolog and ``slim relay prefetch``
warm them before a storm; :func:`prefetch_time` says how long that takes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from slim.errors import InvalidArgument
from slim.vocabulary import Policy, parse_duration, parse_rate, parse_size

EPS = 1e-9


# -- what is simulated -------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """Rates in bits per second; ``node_cpu`` is ``"dedicated"`` or a number of shared cores."""

    nodes: int
    per_switch: int = 24
    node_link: float = 100e6
    switch_uplink: float = 1e9
    server_link: float = 1e9
    relays: int = 0
    placement: Literal["core", "edge"] = "core"
    relay_link: float = 1e9
    node_cpu: str | float = "dedicated"
    core_cpu: float = 1.0  # cores the core answers plans with
    rtt: float = 0.0002  # seconds, a LAN round trip
    efficiency: float = 0.94  # payload ÷ line rate: TCP/IP and Ethernet headers, preamble, gap
    boot_overhead: float = 0.0  # seconds per node before its first request (firmware, kernel)

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise InvalidArgument(f"nodes must be at least 1, not {self.nodes}")
        if self.per_switch < 1:
            raise InvalidArgument(f"per_switch must be at least 1, not {self.per_switch}")
        if self.relays < 0:
            raise InvalidArgument(f"relays must not be negative, not {self.relays}")
        if self.placement not in ("core", "edge"):
            raise InvalidArgument(f"placement must be core or edge, not {self.placement!r}")
        if self.placement == "edge" and self.relays > self.switches:
            raise InvalidArgument(
                f"{self.relays} relays on edge switches, but there are only {self.switches} switches"
            )
        if not 0 < self.efficiency <= 1:
            raise InvalidArgument(f"efficiency must be in (0, 1], not {self.efficiency}")
        if self.node_cpu != "dedicated" and not (
            isinstance(self.node_cpu, int | float) and self.node_cpu > 0
        ):
            raise InvalidArgument(f"node_cpu must be 'dedicated' or a number of cores, not {self.node_cpu!r}")
        for name in ("node_link", "switch_uplink", "server_link", "relay_link", "core_cpu"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"{name} must be positive")
        if self.rtt < 0 or self.boot_overhead < 0:
            raise InvalidArgument("rtt and boot_overhead must not be negative")

    @property
    def switches(self) -> int:
        return -(-self.nodes // self.per_switch)


@dataclass(frozen=True)
class Directory:
    """One directory of the plan as the simulator sees it.

    ``cpu``: seconds of one core the node spends unpacking the archive (``ram``,
    ``disk``, or ``sync`` into an empty place) or comparing the manifest with what
    is there (``sync``).  ``changed``: bytes and files copy-if-needed must fetch.
    """

    path: str
    policy: Literal["ram", "disk", "sync", "nfs"]
    archive_bytes: float = 0.0
    cpu: float = 0.0
    manifest_bytes: float = 0.0
    changed_bytes: float = 0.0
    changed_files: int = 0


@dataclass(frozen=True)
class Workload:
    """What one node does: boot files (kernel + initrd) and its plan's directories.
    ``start_cpu``: the agent's start; ``done_cpu``: its last report and exit."""

    boot_bytes: float
    directories: tuple[Directory, ...]
    start_cpu: float = 0.2
    done_cpu: float = 0.0
    fetch_cpu_per_byte: float = 0.0  # the boot files' download (the node's HTTP client)
    plan_cpu: float = 0.00028  # the core's CPU per plan (+ locate): P5's figure
    requests: int = 2  # round trips besides the directories': plan, done
    parallel_fetches: int = 4  # copy-if-needed's connections for changed files (the agent's FETCH_THREADS)

    def bytes_per_node(self) -> float:
        return self.boot_bytes + sum(
            d.archive_bytes + d.manifest_bytes + d.changed_bytes for d in self.directories
        )

    def scaled(self, factor: float) -> Workload:
        """Every directory's bytes, files and CPU times ``factor``: the same image at another scale."""
        dirs = tuple(
            replace(
                d,
                archive_bytes=d.archive_bytes * factor,
                cpu=d.cpu * factor,
                manifest_bytes=d.manifest_bytes * factor,
                changed_bytes=d.changed_bytes * factor,
                changed_files=round(d.changed_files * factor),
            )
            for d in self.directories
        )
        return replace(self, directories=dirs)


# -- the engine: tasks on shared resources ------------------------------------------------


@dataclass
class _Task:
    cohort: int
    size: float  # units of work (bytes, CPU-seconds, seconds of delay)
    uses: dict[str, float]  # resource -> amount used per unit of work
    cap: float  # most units per second, whatever the sharing (one core, one node's delay)
    label: str
    multiplicity: int = 1
    done: float = 0.0
    rate: float = 0.0
    solo: float = 0.0


@dataclass
class StageTime:
    stage: str
    start: float
    end: float


@dataclass
class CohortResult:
    switch: int
    nodes: int
    stages: list[StageTime] = field(default_factory=list)

    @property
    def finished(self) -> float:
        return self.stages[-1].end if self.stages else 0.0


@dataclass
class Result:
    topology: Topology
    workload: Workload
    cohorts: list[CohortResult]
    utilization: dict[str, float]  # resource -> busy fraction over the storm
    lower_bound: float
    lower_bound_by: str

    @property
    def makespan(self) -> float:
        return max(c.finished for c in self.cohorts)

    def node_times(self) -> list[float]:
        return sorted(t for c in self.cohorts for t in [c.finished] * c.nodes)

    @property
    def median(self) -> float:
        times = self.node_times()
        return times[len(times) // 2]

    @property
    def bottleneck(self) -> str:
        """The busiest kind of resource over the storm (see :meth:`busiest`)."""
        kinds = self.busiest()
        return max(kinds, key=lambda k: kinds[k])

    def busiest(self) -> dict[str, float]:
        """Busy fraction of the busiest resource of each kind: server link, relay links,
        switch uplinks, node links, node CPU, the core's CPU."""
        out: dict[str, float] = {}
        for r, u in self.utilization.items():
            kind = _kind(r)
            out[kind] = max(out.get(kind, 0.0), u)
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "nodes": self.topology.nodes,
            "relays": self.topology.relays,
            "placement": self.topology.placement,
            "makespan_s": round(self.makespan, 3),
            "median_s": round(self.median, 3),
            "lower_bound_s": round(self.lower_bound, 3),
            "lower_bound_by": self.lower_bound_by,
            "bottleneck": self.bottleneck,
            "utilization": {k: round(v, 3) for k, v in self.busiest().items()},
            "bytes_per_node": round(self.workload.bytes_per_node()),
        }


def _kind(resource: str) -> str:
    """What kind of resource a name is, as reports say it."""
    names = {"server": "server link", "core-cpu": "core CPU", "node-cpu": "node CPU"}
    if resource in names:
        return names[resource]
    if resource.startswith("relay"):
        return "relay links"
    if resource.endswith("-ports"):
        return "node links"
    if resource.endswith("-cpu"):
        return "node CPU"
    return "switch uplinks"


def _allocate(tasks: list[_Task], capacity: dict[str, float], members: dict[str, int]) -> None:
    """Max-min fair rates by progressive filling of each task's fraction of its solo rate:
    the rate one node would get alone.  ``members``: resources that are the sum of one per
    node of a cohort (its ports, its dedicated CPUs), so one node alone has a share of it."""
    for t in tasks:
        solo = t.cap
        for r, a in t.uses.items():
            if a > 0:
                solo = min(solo, capacity[r] / members.get(r, 1) / a)
        t.solo = solo
        t.rate = 0.0
    active = [t for t in tasks if t.solo > 0]
    used = dict.fromkeys(capacity, 0.0)
    while active:
        level = 1.0
        tight: str | None = None
        demand: dict[str, float] = {}
        for t in active:
            for r, a in t.uses.items():
                demand[r] = demand.get(r, 0.0) + t.multiplicity * a * t.solo
        for r, d in demand.items():
            if d > EPS:
                room = max(0.0, capacity[r] - used[r]) / d
                if room < level:
                    level, tight = room, r
        for t in active:
            t.rate = level * t.solo
        if tight is None:  # everyone at their solo speed
            break
        frozen = [t for t in active if t.uses.get(tight, 0.0) > 0]
        for t in frozen:
            for r, a in t.uses.items():
                used[r] += t.multiplicity * a * t.rate
        # the rest rise again from 0 against what the frozen ones left of every resource
        active = [t for t in active if t.uses.get(tight, 0.0) <= 0]


@dataclass
class _Network:
    """Resources (payload bytes/s or cores) and, per switch, its nodes, their path from the
    server or relay, and their CPU."""

    capacity: dict[str, float]
    members: dict[str, int]  # resources that are one per node of a cohort
    nodes: list[int]
    paths: list[list[str]]
    cpus: list[str]


def _network(t_: Topology) -> _Network:
    eff = t_.efficiency
    capacity: dict[str, float] = {"core-cpu": t_.core_cpu}
    members: dict[str, int] = {}
    if t_.relays == 0:
        capacity["server"] = t_.server_link * eff / 8
    elif t_.placement == "core":
        # the core redirects each node to the least loaded relay: one pool, evenly used
        capacity["relays"] = t_.relays * t_.relay_link * eff / 8
        members["relays"] = t_.relays
    else:
        for i in range(t_.relays):
            capacity[f"relay{i}"] = t_.relay_link * eff / 8
    shared_cpu = t_.node_cpu != "dedicated"
    if shared_cpu:
        capacity["node-cpu"] = float(t_.node_cpu)
    net = _Network(capacity, members, [], [], [])
    for s in range(t_.switches):
        n = min(t_.per_switch, t_.nodes - s * t_.per_switch)
        capacity[f"sw{s}-down"] = t_.switch_uplink * eff / 8
        capacity[f"sw{s}-ports"] = n * t_.node_link * eff / 8  # n identical ports, one cohort
        members[f"sw{s}-ports"] = n
        if t_.relays == 0:
            path = ["server", f"sw{s}-down", f"sw{s}-ports"]
        elif t_.placement == "core":
            path = ["relays", f"sw{s}-down", f"sw{s}-ports"]
        else:  # relay i sits on switch i and serves the switches i, i+R, i+2R, …
            home = s % t_.relays
            up = f"sw{home}-up"
            path = (
                [f"relay{home}", f"sw{s}-ports"]
                if home == s
                else [f"relay{home}", up, f"sw{s}-down", f"sw{s}-ports"]
            )
            capacity.setdefault(up, t_.switch_uplink * eff / 8)
        if not shared_cpu:
            capacity[f"sw{s}-cpu"] = float(n)
            members[f"sw{s}-cpu"] = n
        net.nodes.append(n)
        net.paths.append(path)
        net.cpus.append("node-cpu" if shared_cpu else f"sw{s}-cpu")
    return net


@dataclass(frozen=True)
class Cohort:
    """Nodes of one switch that start their boot together, ``start`` seconds into the storm
    (their first request; ``boot_overhead`` still comes first)."""

    switch: int
    nodes: int
    start: float = 0.0


def simulate(topology: Topology, workload: Workload, starts: Sequence[Cohort] | None = None) -> Result:
    """Boot every node at once; when each finishes each step, and the lower bound.

    ``starts``: instead, these cohorts, each from its own start (a staggered storm, such as
    desktops woken a few a second).  Cohorts of one switch share its ports and CPUs; a
    switch's cohorts together have at most its nodes.  Each cohort's stages then begin with
    ``waiting`` until its start."""
    t_ = topology
    network = _network(t_)
    capacity, members = network.capacity, network.members
    if starts is None:
        cohorts = [CohortResult(s, n) for s, n in enumerate(network.nodes)]
        delays = [0.0] * len(cohorts)
    else:
        cohorts, delays = _staggered(network, starts)
    paths = [network.paths[c.switch] for c in cohorts]
    cpus = [network.cpus[c.switch] for c in cohorts]

    def steps(c: int) -> list[_Task]:
        """The cohort's steps, in order."""
        m = cohorts[c].nodes
        net, cpu = paths[c], cpus[c]
        out: list[_Task] = []
        if delays[c] > 0:
            out.append(_Task(c, delays[c], {}, 1.0, "waiting", m))
        if t_.boot_overhead > 0:
            out.append(_Task(c, t_.boot_overhead, {}, 1.0, "firmware", m))
        fetch = dict.fromkeys(net, 1.0)
        if workload.fetch_cpu_per_byte > 0:
            fetch[cpu] = workload.fetch_cpu_per_byte
        fetch_cap = 1.0 / workload.fetch_cpu_per_byte if workload.fetch_cpu_per_byte > 0 else math.inf
        out.append(_Task(c, workload.boot_bytes, fetch, fetch_cap, "kernel+initrd", m))
        if workload.start_cpu > 0:
            out.append(_Task(c, workload.start_cpu, {cpu: 1.0}, 1.0, "agent start", m))
        out.append(_Task(c, workload.plan_cpu, {"core-cpu": 1.0}, 1.0, "plan", m))
        if t_.rtt > 0:
            out.append(_Task(c, t_.rtt * workload.requests, {}, 1.0, "plan", m))
        for d in workload.directories:
            stage = f"{'mount' if d.policy == 'nfs' else d.policy}:{d.path}"
            if d.policy == "nfs":
                if t_.rtt > 0:
                    out.append(_Task(c, t_.rtt * 3, {}, 1.0, stage, m))
                continue
            if d.archive_bytes > 0:  # stream and unpack: bytes and CPU at once
                uses = dict.fromkeys(net, 1.0)
                if d.cpu > 0:
                    uses[cpu] = d.cpu / d.archive_bytes
                out.append(
                    _Task(c, d.archive_bytes, uses, 1.0 / uses[cpu] if d.cpu > 0 else math.inf, stage, m)
                )
                continue
            if d.manifest_bytes > 0:
                out.append(_Task(c, d.manifest_bytes, dict.fromkeys(net, 1.0), math.inf, stage, m))
            if d.cpu > 0:
                out.append(_Task(c, d.cpu, {cpu: 1.0}, 1.0, stage, m))
            if d.changed_files > 0 and t_.rtt > 0:  # the agent overlaps them on its connections
                trips = -(-d.changed_files // workload.parallel_fetches)
                out.append(_Task(c, trips * t_.rtt, {}, 1.0, stage, m))
            if d.changed_bytes > 0:
                out.append(_Task(c, d.changed_bytes, dict.fromkeys(net, 1.0), math.inf, stage, m))
        if workload.done_cpu > 0:
            out.append(_Task(c, workload.done_cpu, {cpu: 1.0}, 1.0, "done", m))
        return [t for t in out if t.size > 0]

    queues = [steps(c) for c in range(len(cohorts))]
    running: dict[int, _Task] = {}
    started: dict[int, float] = {}
    busy = dict.fromkeys(capacity, 0.0)
    now = 0.0

    def advance(c: int) -> None:
        if queues[c]:
            running[c] = queues[c].pop(0)
            started[c] = now
        else:
            running.pop(c, None)

    for c in range(len(cohorts)):
        advance(c)
    guard = 0
    while running:
        guard += 1
        if guard > 1_000_000:  # pragma: no cover - every step ends; this is only a fuse
            raise RuntimeError("simulation did not converge")
        tasks = list(running.values())
        _allocate(tasks, capacity, members)
        stalled = [t.label for t in tasks if t.rate <= 0]
        if stalled:
            raise InvalidArgument(f"a step cannot progress: {stalled[0]} (a resource of capacity 0?)")
        dt = min((t.size - t.done) / t.rate for t in tasks)
        for t in tasks:
            t.done += t.rate * dt
            for r, a in t.uses.items():
                busy[r] += t.multiplicity * a * t.rate * dt
        now += dt
        for c, t in list(running.items()):
            if t.size - t.done <= max(EPS, t.size * 1e-9):
                cohorts[c].stages.append(StageTime(t.label, started[c], now))
                advance(c)
    utilization = {r: (busy[r] / (capacity[r] * now) if now > 0 else 0.0) for r in capacity}
    bound, by = lower_bound(topology, workload)
    return Result(topology, workload, [_merge(c) for c in cohorts], utilization, bound, by)


def _staggered(network: _Network, starts: Sequence[Cohort]) -> tuple[list[CohortResult], list[float]]:
    cohorts, delays = [], []
    on_switch: dict[int, int] = {}
    for k in starts:
        if not 0 <= k.switch < len(network.nodes):
            raise InvalidArgument(
                f"cohort on switch {k.switch}: the topology has {len(network.nodes)} switches"
            )
        if k.nodes < 1 or not (math.isfinite(k.start) and k.start >= 0):
            raise InvalidArgument(f"cohort on switch {k.switch}: nodes ≥ 1 and a start ≥ 0, not {k}")
        on_switch[k.switch] = on_switch.get(k.switch, 0) + k.nodes
        if on_switch[k.switch] > network.nodes[k.switch]:
            raise InvalidArgument(
                f"cohorts on switch {k.switch}: more than its {network.nodes[k.switch]} nodes"
            )
        cohorts.append(CohortResult(k.switch, k.nodes))
        delays.append(k.start)
    if not cohorts:
        raise InvalidArgument("no cohort to simulate")
    return cohorts, delays


def _merge(c: CohortResult) -> CohortResult:
    """Consecutive steps of one stage as one span (a plan's CPU and its round trip, …)."""
    merged: list[StageTime] = []
    for s in c.stages:
        if merged and merged[-1].stage == s.stage:
            merged[-1].end = s.end
        else:
            merged.append(StageTime(s.stage, s.start, s.end))
    return CohortResult(c.switch, c.nodes, merged)


def lower_bound(topology: Topology, workload: Workload) -> tuple[float, str]:
    """The bandwidth lower bound: the most loaded link's bytes ÷ its payload rate (plus
    ``boot_overhead``), and which kind of link that is."""
    network = _network(topology)
    per_node = workload.bytes_per_node()
    load: dict[str, float] = {}
    for n, path in zip(network.nodes, network.paths, strict=True):
        for r in path:
            load[r] = load.get(r, 0.0) + n * per_node
    bound, by = 0.0, "node link"
    for r, nbytes in load.items():
        seconds = nbytes / network.capacity[r]
        if seconds > bound:
            bound, by = seconds, _kind(r)
    return bound + topology.boot_overhead, by


def prefetch_time(topology: Topology, workload: Workload) -> float:
    """How long warming every relay takes: each fetches one copy from the server."""
    if topology.relays == 0:
        return 0.0
    return topology.relays * workload.bytes_per_node() * 8 / (topology.server_link * topology.efficiency)


def plan_relays(
    topology: Topology,
    workload: Workload,
    target: float,
    placements: Iterable[Literal["core", "edge"]] = ("core", "edge"),
    max_relays: int | None = None,
) -> list[Result]:
    """The fewest relays, per placement, that boot every node within ``target`` seconds
    (each placement's search result; a placement that cannot meet it gives its best try).
    If the server alone meets it, the answer is that, with no relay."""
    alone = simulate(replace(topology, relays=0), workload)
    if alone.makespan <= target:
        return [alone]  # no relay needed
    out = []
    for placement in placements:
        most = max_relays if max_relays is not None else (topology.switches if placement == "edge" else 64)
        most = min(most, topology.switches) if placement == "edge" else most
        best: Result | None = None
        lo, hi = 1, most
        # makespan falls (or stays level) as relays are added: binary search the first that meets the target
        top = simulate(replace(topology, relays=hi, placement=placement), workload)
        if top.makespan > target:
            out.append(top)
            continue
        best = top
        while lo < hi:
            mid = (lo + hi) // 2
            r = simulate(replace(topology, relays=mid, placement=placement), workload)
            if r.makespan <= target:
                best, hi = r, mid
            else:
                lo = mid + 1
        out.append(best)
    return out


# -- presets ------------------------------------------------------------------------------

#: The paper's Gideon cluster (section 6.1): 13 24-port Fast Ethernet switches under one
#: Gigabit switch, one server; 272 nodes booted.
PAPER = Topology(nodes=272, per_switch=24, node_link=100e6, switch_uplink=1e9, server_link=1e9)


RATE_FIELDS = ("node_link", "switch_uplink", "server_link", "relay_link")


def topology_from_dict(data: dict[str, Any], where: str = "topology") -> Topology:
    """A topology from its YAML/JSON form: :class:`Topology`'s fields, rates as ``100Mbit``."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where}: expected a mapping of Topology fields")
    known = set(Topology.__dataclass_fields__)
    unknown = set(data) - known - {"description"}
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
        )
    if "nodes" not in data:
        raise InvalidArgument(f"{where}: needs nodes")
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        if k == "description":
            continue
        try:
            if k in RATE_FIELDS:
                kwargs[k] = parse_rate(v)
            elif k in ("nodes", "per_switch", "relays"):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise InvalidArgument(f"must be a whole number, not {v!r}")
                kwargs[k] = v
            elif k == "placement":
                kwargs[k] = str(v)
            elif k == "node_cpu":
                kwargs[k] = v if v == "dedicated" else float(v)
            elif k in ("rtt", "boot_overhead"):
                kwargs[k] = parse_duration(v, zero=True)
            else:
                kwargs[k] = float(v)
        except (InvalidArgument, TypeError, ValueError) as exc:
            raise InvalidArgument(f"{where}: {k}: {getattr(exc, 'message', exc)}") from exc
    try:
        return Topology(**kwargs)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from exc


def topology_to_dict(t: Topology) -> dict[str, Any]:
    return dict(t.__dict__)


def _number(value: Any, what: str, whole: bool = False) -> float:
    """A non-negative number (``whole``: an integer) from a workload file."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (whole and not isinstance(value, int))
    ):
        raise InvalidArgument(f"{what} must be a {'whole ' if whole else ''}number, not {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgument(f"{what} must not be negative, not {value!r}")
    return float(value)


def workload_from_dict(data: dict[str, Any], where: str = "workload") -> Workload:
    """A workload from its JSON/YAML form (``bench/boot_storm.py`` writes them)."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where}: expected a mapping")
    seconds = ("start_cpu", "done_cpu", "fetch_cpu_per_byte", "plan_cpu")
    counts = ("requests", "parallel_fetches")
    known = {"boot_bytes", "directories", *seconds, *counts}
    unknown = set(data) - known - {"description"}
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})"
        )
    if "boot_bytes" not in data or not isinstance(data.get("directories"), list):
        raise InvalidArgument(f"{where}: needs boot_bytes and a list of directories")
    dirs = []
    for i, d in enumerate(data["directories"]):
        at = f"{where}: directories[{i}]"
        if not isinstance(d, dict) or "path" not in d or "policy" not in d:
            raise InvalidArgument(f"{at} needs path and policy")
        if d["policy"] not in set(Policy):
            *most, last = Policy
            raise InvalidArgument(f"{at}.policy must be {', '.join(most)} or {last}")
        extra = set(d) - set(Directory.__dataclass_fields__)
        if extra:
            raise InvalidArgument(f"{at}: unknown field(s) {', '.join(sorted(extra))}")
        try:
            dirs.append(
                Directory(
                    path=str(d["path"]),
                    policy=d["policy"],
                    archive_bytes=parse_size(d.get("archive_bytes", 0)),
                    cpu=_number(d.get("cpu", 0), "cpu"),
                    manifest_bytes=parse_size(d.get("manifest_bytes", 0)),
                    changed_bytes=parse_size(d.get("changed_bytes", 0)),
                    changed_files=int(_number(d.get("changed_files", 0), "changed_files", whole=True)),
                )
            )
        except InvalidArgument as exc:
            raise InvalidArgument(f"{at}: {exc.message}") from exc
    try:
        w = Workload(boot_bytes=parse_size(data["boot_bytes"]), directories=tuple(dirs))
        floats = {k: _number(data[k], k) for k in seconds if k in data}
        ints = {k: int(_number(data[k], k, whole=True)) for k in counts if k in data}
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from exc
    if ints.get("parallel_fetches", 1) < 1:
        raise InvalidArgument(f"{where}: parallel_fetches must be at least 1")
    given: dict[str, Any] = {**floats, **ints}
    return replace(w, **given)


def workload_to_dict(w: Workload) -> dict[str, Any]:
    return {
        "boot_bytes": w.boot_bytes,
        "start_cpu": w.start_cpu,
        "done_cpu": w.done_cpu,
        "fetch_cpu_per_byte": w.fetch_cpu_per_byte,
        "plan_cpu": w.plan_cpu,
        "requests": w.requests,
        "directories": [
            {k: v for k, v in d.__dict__.items() if v not in (0, 0.0) or k in ("path", "policy")}
            for d in w.directories
        ],
    }


#: The paper's Fedora Core 1 image as SLIM builds it (the synthetic Table-2 image,
#: ``python -m labs.table2``, at full scale): /bin /lib /sbin /usr over NFS, the rest copied
#: (24,275 files, 99.6 MB: a 32.0 MB archive at zstd -9, a 0.28 MB manifest).  Boot files:
#: Debian's kernel (7.9 MB) and SLIM's initrd (7.0 MB).  CPU: one node booting alone,
#: measured with getrusage by ``bench/wan_boot.py`` (unpacking into RAM: 2.0 s; comparing
#: 24k files with the manifest: 0.5 s; the agent's start and plan: 0.12 s).
TABLE2_FULL = Workload(
    boot_bytes=14.9e6,
    directories=(
        Directory("/", "ram", archive_bytes=31.96e6, cpu=1.96),
        *(Directory(p, "nfs") for p in ("/bin", "/lib", "/sbin", "/usr")),
    ),
    start_cpu=0.12,
)
TABLE2_UNCHANGED = Workload(
    boot_bytes=14.9e6,
    directories=(
        Directory("/", "sync", manifest_bytes=0.28e6, cpu=0.51),
        *(Directory(p, "nfs") for p in ("/bin", "/lib", "/sbin", "/usr")),
    ),
    start_cpu=0.12,
)
WORKLOADS = {"table2-full": TABLE2_FULL, "table2-unchanged": TABLE2_UNCHANGED}
