"""A simulated night of desktop harvesting: wake, boot, Slurm's jobs, back by morning.

What it models (``slim simulate night``; guide: docs/simulate.md, the night's rules:
docs/harvest.md and :mod:`slim.core.control.harvest`):

- **The window** is a pool's (:class:`slim.core.pools.Pool`): its start and end on a given
  date, in the pool's time zone (daylight-saving nights are an hour shorter or longer), its
  ``wakes_per_minute``, ``wake_timeout``, ``grace``, ``menu_timeout`` and ``on_window_end``.
- **Sites and relays.**  Desktops sit on edge switches (``per_switch`` each); each relay is
  on its site's segment (the edge placement of :mod:`slim.simulate`: relay *i* on switch *i*,
  serving switches *i*, *i+R*, …).  At the window's start the core orders each relay to wake
  its desktops: one magic packet per desktop, one queue per relay, a packet every
  60 / ``wakes_per_minute`` seconds, in the desktops' order.
- **In use.**  A stated share of the desktops (chosen at random) is on, asleep in S3 or
  Modern Standby, or not armed for Wake-on-LAN: the packet goes out, no boot follows, and
  after ``wake_timeout`` the core leaves them alone.  They never fetch anything and never
  count.
- **A woken desktop's boot** is ``firmware`` (POST, PXE's DHCP, iPXE: wake to first request)
  + the menu's ``menu_timeout`` + the EE's build (kernel and initrd, the agent, the copy set
  into RAM: the flow-level storm model of :mod:`slim.simulate`) + ``ee_start`` (kernel start,
  the EE's init to ``up``, slurmd registering).  The build part is simulated once for the
  whole night: the desktops of one switch woken in the same ``cohort_seconds`` slot are one
  cohort starting at their mean first request, all cohorts in one staggered storm against
  the relays' links, the uplinks and the ports.  Each desktop then takes its cohort's build
  time from its own wake.
- **Owners coming back.**  While harvestable, a desktop's owner returns at a stated rate per
  hour (exponential): they pick their own OS at the menu; the desktop leaves the EE (its job
  is requeued) and stays out until the next window.  Before it is up, it simply never comes
  up.
- **Slurm** (docs/slurm.md, the research note's sections 1-3): a backlog of single-desktop jobs
  (the :class:`JobMix`: time limits by share, actual run time a uniform fraction of the
  limit), in a random priority order.  At each scheduler pass (every ``sched_interval``,
  backfill's ``bf_interval``; 0: at once) each idle desktop gets the first pending job whose
  limit ends by the window's end - ``grace`` (the blackout reservation: ``reservation``), or
  with no reservation the first pending job.  A job that reaches its limit ends there.
- **The end.**  At end - ``grace`` idle desktops go back (with ``on_window_end: requeue``,
  all of them: their jobs are requeued); at the end, every desktop still in the EE does and
  its job is requeued.  A desktop takes its order at its EE's next poll (every 10 s).

Node-hours come from two named sources: *in the EE* from the desktops' boot states (``up``
until the order to go back was taken, or the owner's own boot), as the core counts
``slim_harvest_node_hours_total{kind="ee"}``; *running jobs* from the scheduler's allocations
(job start to its end or its requeue), as ``sacct`` would sum them.

Not modelled: TCP and the storm model's other omissions (docs/simulate.md); the relays'
warming before the window (``prefetch_lead``: they are warm); jobs that need more than one
desktop, or arrive during the night; Slurm's priorities beyond a fixed order; power failures
and failed boots; SlurmdTimeout before Slurm notices an owner's reboot (the allocation ends at
the owner's reboot); idle desktops going back mid-window (SuspendTime).
"""

from __future__ import annotations

import datetime as dt
import heapq
import math
import random
import re
import statistics
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from slim.core.pools import Pool, Window, next_opening
from slim.errors import InvalidArgument
from slim.simulate import TABLE2_FULL, Cohort, Topology, Workload, simulate
from slim.vocabulary import parse_duration

POLL_S = 10.0  # how often a desktop's EE asks for its order (the pool's order_poll default)
EE_SOURCE = (
    "the desktops' boot states: up until the order to go back was taken (the core's node-hours in the EE)"
)
JOBS_SOURCE = "the scheduler's allocations: each job's start to its end or requeue (sacct's elapsed)"


# -- the job mix ---------------------------------------------------------------------------


@dataclass(frozen=True)
class JobClass:
    limit: float  # seconds: the job's time limit (-t)
    share: float  # of the jobs


@dataclass(frozen=True)
class JobMix:
    """A backlog of ``jobs`` single-desktop jobs waiting at the window's start: time limits by
    share, each job's run time a uniform fraction of its limit in ``run_fraction``."""

    name: str
    jobs: int
    classes: tuple[JobClass, ...]
    run_fraction: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self) -> None:
        if self.jobs < 0:
            raise InvalidArgument(f"job mix {self.name}: jobs must not be negative, not {self.jobs}")
        if not self.classes:
            raise InvalidArgument(f"job mix {self.name}: needs at least one class")
        if any(c.limit <= 0 or c.share < 0 for c in self.classes) or sum(c.share for c in self.classes) <= 0:
            raise InvalidArgument(f"job mix {self.name}: limits must be positive, shares not negative")
        lo, hi = self.run_fraction
        if not 0 < lo <= hi <= 1:
            raise InvalidArgument(f"job mix {self.name}: run_fraction must be 0 < low ≤ high ≤ 1")

    def describe(self) -> str:
        total = sum(c.share for c in self.classes)
        parts = ", ".join(f"{c.share / total:.0%} {_hours(c.limit)}" for c in self.classes)
        lo, hi = self.run_fraction
        return f"{self.jobs:,} jobs: {parts} time limits; each runs {lo:.0%} to {hi:.0%} of its limit"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


#: 60 % of the jobs ask for 1 h, 30 % for 4 h, 10 % for 12 h (those never fit a weekday night).
MIXES = {
    "night": JobMix("night", 5000, (JobClass(3600, 0.6), JobClass(4 * 3600, 0.3), JobClass(12 * 3600, 0.1))),
    "short": JobMix("short", 8000, (JobClass(3600, 1.0),)),
}


def mix_from_dict(data: Any, where: str = "job mix") -> JobMix:
    """``{jobs: 5000, classes: [{limit: 1h, share: 0.6}, …], run_fraction: [0.3, 1.0]}``."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where}: expected a mapping with jobs and classes")
    unknown = set(data) - {"jobs", "classes", "run_fraction", "description"}
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: jobs, classes, run_fraction)"
        )
    jobs = data.get("jobs")
    if isinstance(jobs, bool) or not isinstance(jobs, int):
        raise InvalidArgument(f"{where}: jobs must be a whole number, not {jobs!r}")
    raw = data.get("classes")
    if not isinstance(raw, list) or not raw:
        raise InvalidArgument(f"{where}: classes must be a list of {{limit, share}}")
    classes = []
    for i, c in enumerate(raw):
        at = f"{where}: classes[{i}]"
        if not isinstance(c, dict) or set(c) != {"limit", "share"}:
            raise InvalidArgument(f"{at}: needs limit and share, nothing else")
        share = c["share"]
        if isinstance(share, bool) or not isinstance(share, int | float) or not share >= 0:
            raise InvalidArgument(f"{at}: share must be a number ≥ 0, not {share!r}")
        try:
            classes.append(JobClass(parse_duration(c["limit"], what="limit"), float(share)))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{at}: {exc.message}") from exc
    fraction = data.get("run_fraction", [0.3, 1.0])
    if (
        not isinstance(fraction, list)
        or len(fraction) != 2
        or not all(isinstance(f, int | float) and not isinstance(f, bool) for f in fraction)
    ):
        raise InvalidArgument(f"{where}: run_fraction must be [low, high], fractions of the limit")
    try:
        return JobMix(where, jobs, tuple(classes), (float(fraction[0]), float(fraction[1])))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message.removeprefix(f'job mix {where}: ')}") from exc


# -- the night's parameters ----------------------------------------------------------------


@dataclass(frozen=True)
class Night:
    """One night of one pool (see the module's docstring).  Rates in bits per second, times in
    seconds; ``window`` as ``HH:MM-HH:MM`` in ``time_zone``, on ``date`` (ISO)."""

    desktops: int = 500
    relays: int = 4
    window: str = "20:00-07:00"
    time_zone: str = "UTC"
    date: str = "2026-03-02"  # a Monday
    wakes_per_minute: int = 60
    wake_timeout: float = 600.0
    grace: float = 900.0
    menu_timeout: float = 5.0
    on_window_end: Literal["requeue", "finish"] = "requeue"
    in_use: float = 0.2  # share of the desktops that never boot the EE
    opt_out_per_hour: float = 0.01  # an owner's return, per harvestable desktop and hour
    firmware: float = 30.0  # wake to the first request: POST, PXE's DHCP, iPXE over TFTP
    ee_start: float = 20.0  # kernel start, the EE's init to up, slurmd registering
    per_switch: int = 48
    node_link: float = 1e9
    switch_uplink: float = 10e9
    relay_link: float = 1e9
    rtt: float = 0.0002
    sched_interval: float = 30.0  # Slurm's backfill pass (bf_interval); 0: at once
    reservation: bool = True  # the blackout from end - grace: no job runs into it
    cohort_seconds: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.desktops < 1:
            raise InvalidArgument(f"desktops must be at least 1, not {self.desktops}")
        if not 1 <= self.relays <= self.desktops:
            raise InvalidArgument(f"relays must be 1 to the number of desktops, not {self.relays}")
        if not 0 <= self.in_use <= 1:
            raise InvalidArgument(f"in_use is a share of the desktops, 0 to 1, not {self.in_use}")
        if self.opt_out_per_hour < 0:
            raise InvalidArgument(f"opt_out_per_hour must not be negative, not {self.opt_out_per_hour}")
        for name in ("firmware", "ee_start", "sched_interval"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise InvalidArgument(f"{name} must be zero or more")
        if self.cohort_seconds <= 0:
            raise InvalidArgument("cohort_seconds must be positive")
        if self.per_switch < 1:
            raise InvalidArgument(f"per_switch must be at least 1, not {self.per_switch}")
        self.pool()  # the window and the pool's fields are valid

    def pool(self) -> Pool:
        """The pool these desktops are (its fields validated as the registry's)."""
        m = re.fullmatch(r"(\d\d:\d\d)-(\d\d:\d\d)", self.window)
        if not m:
            raise InvalidArgument(f"window {self.window!r}: write it as HH:MM-HH:MM, e.g. 20:00-07:00")
        if m.group(1) == m.group(2):
            raise InvalidArgument(f"window {self.window!r}: its start and end must differ")
        try:
            return Pool(
                environment="night",
                time_zone=self.time_zone,
                windows=[Window(days=["daily"], start=m.group(1), end=m.group(2))],
                wakes_per_minute=self.wakes_per_minute,
                wake_timeout=self.wake_timeout,
                grace=self.grace,
                menu_timeout=self.menu_timeout,
                on_window_end=self.on_window_end,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "pool"
            raise InvalidArgument(f"{where}: {first['msg']}") from None

    def opening(self) -> tuple[dt.datetime, dt.datetime]:
        """The window that opens on ``date`` (the pool's zone)."""
        try:
            day = dt.date.fromisoformat(self.date)
        except ValueError:
            raise InvalidArgument(f"date {self.date!r}: write it as YYYY-MM-DD") from None
        pool = self.pool()
        zone = ZoneInfo(pool.time_zone)
        midnight = dt.datetime(day.year, day.month, day.day, tzinfo=zone)
        o = next_opening(pool, midnight - dt.timedelta(seconds=1))
        return o.start, o.end

    def topology(self) -> Topology:
        """The desktops' network: at most ``per_switch`` a switch, and at least one switch per
        relay (each relay sits on its site's switch)."""
        per_switch = min(self.per_switch, max(1, self.desktops // self.relays))
        return Topology(
            nodes=self.desktops,
            per_switch=per_switch,
            node_link=self.node_link,
            switch_uplink=self.switch_uplink,
            server_link=self.relay_link,
            relays=self.relays,
            placement="edge",
            relay_link=self.relay_link,
            rtt=self.rtt,
        )


# -- results -------------------------------------------------------------------------------


@dataclass
class Desktop:
    name: str
    switch: int
    relay: int
    wake: float = 0.0  # its packet, seconds from the window's start
    in_use: bool = False
    build: float = 0.0  # its cohort's EE build (the storm model)
    up: float = math.inf
    opt_out: float = math.inf  # its owner's return
    state: str = "waking"  # waking, idle, job, out (owner), back (sent back), in-use
    ee_end: float = math.inf
    job: int = -1


@dataclass(frozen=True)
class Allocation:
    job: int
    desktop: int
    start: float
    end: float
    outcome: Literal["completed", "requeued"]


@dataclass
class NightResult:
    night: Night
    mix: JobMix
    workload: Workload
    window_start: dt.datetime
    window_end: dt.datetime
    desktops: list[Desktop]
    allocations: list[Allocation]
    pending: list[int]  # jobs not done at the end (never started, or requeued)
    limits: list[float]
    bottleneck: str
    cohorts: int

    @property
    def length(self) -> float:
        return _seconds_between(self.window_start, self.window_end)

    @property
    def drain(self) -> float:
        return self.length - self.night.grace

    def node_hours_ee(self) -> float:
        return sum(d.ee_end - d.up for d in self.desktops if d.up < math.inf) / 3600

    def node_hours_jobs(self) -> float:
        return sum(a.end - a.start for a in self.allocations) / 3600

    def node_hours_requeued(self) -> float:
        return sum(a.end - a.start for a in self.allocations if a.outcome == "requeued") / 3600

    def profile(self, step: float = 300.0) -> list[dict[str, float]]:
        """Desktops in the EE and jobs running, every ``step`` seconds of the window."""
        ups = sorted(d.up for d in self.desktops if d.up < math.inf)
        downs = sorted(d.ee_end for d in self.desktops if d.up < math.inf)
        starts = sorted(a.start for a in self.allocations)
        ends = sorted(a.end for a in self.allocations)
        out = []
        t = 0.0
        while t <= self.length:
            out.append(
                {
                    "t_s": t,
                    "in_ee": bisect_right(ups, t) - bisect_right(downs, t),
                    "jobs": bisect_right(starts, t) - bisect_right(ends, t),
                }
            )
            t += step
        return out

    def summary(self) -> dict[str, Any]:
        n = self.night
        harvestable = [d for d in self.desktops if not d.in_use]
        came_up = [d for d in harvestable if d.up < math.inf]
        per_relay = [sum(1 for d in self.desktops if d.relay == r) for r in range(n.relays)]
        gap = 60.0 / n.wakes_per_minute
        in_use = [d for d in self.desktops if d.in_use]
        wake_to_up = [d.up - d.wake for d in came_up]
        builds = [d.build for d in came_up]
        completed = sum(1 for a in self.allocations if a.outcome == "completed")
        requeues = sum(1 for a in self.allocations if a.outcome == "requeued")
        started = {a.job for a in self.allocations}
        never = [j for j in self.pending if j not in started]
        usable = self.drain if n.reservation else self.length
        ee, jobs = self.node_hours_ee(), self.node_hours_jobs()
        first_job = min((a.start for a in self.allocations), default=None)
        return {
            "window": {
                "start": self.window_start.isoformat(),
                "end": self.window_end.isoformat(),
                "time_zone": n.time_zone,
                "hours": round(self.length / 3600, 3),
                "grace_s": n.grace,
                "on_window_end": n.on_window_end,
                "reservation": n.reservation,
            },
            "desktops": {
                "total": n.desktops,
                "in_use": len(in_use),
                "harvestable": len(harvestable),
                "came_up": len(came_up),
                "owner_back_before_up": sum(1 for d in harvestable if d.up == math.inf),
                "owner_back_in_ee": sum(1 for d in came_up if d.state == "out"),
            },
            "wake": {
                "relays": n.relays,
                "desktops_per_relay": per_relay,
                "wakes_per_minute_per_relay": n.wakes_per_minute,
                "wakes_per_minute_total": n.wakes_per_minute * n.relays,
                "last_packet_s": round((max(per_relay) - 1) * gap, 3),
                "in_use_given_up_s": round(max((d.wake for d in in_use), default=0.0) + n.wake_timeout, 3)
                if in_use
                else None,
            },
            "boot": {
                "model": "firmware + menu + EE build (flow-level storm of each switch's desktops woken in "
                f"the same {n.cohort_seconds:g} s, all against the relays' links) + EE start",
                "firmware_s": n.firmware,
                "menu_s": n.menu_timeout,
                "ee_start_s": n.ee_start,
                "build_median_s": _r(statistics.median(builds)) if builds else None,
                "build_max_s": _r(max(builds)) if builds else None,
                "wake_to_up_median_s": _r(statistics.median(wake_to_up)) if wake_to_up else None,
                "wake_to_up_max_s": _r(max(wake_to_up)) if wake_to_up else None,
                "cohorts": self.cohorts,
                "bottleneck": self.bottleneck,
                "bytes_per_desktop": round(self.workload.bytes_per_node()),
            },
            "times": {
                "first_up_s": _r(min((d.up for d in came_up), default=None)),
                "first_job_s": _r(first_job),
                "all_up_s": _r(max((d.up for d in came_up), default=None)),
            },
            "node_hours": {
                "ee": {"value": round(ee, 2), "source": EE_SOURCE},
                "jobs": {"value": round(jobs, 2), "source": JOBS_SOURCE},
                "jobs_share_of_ee": round(jobs / ee, 4) if ee else 0.0,
                "requeued_work": round(self.node_hours_requeued(), 2),
                "window_capacity": round(len(harvestable) * self.length / 3600, 2),
            },
            "jobs": {
                "mix": self.mix.describe(),
                "submitted": self.mix.jobs,
                "completed": completed,
                "requeues": requeues,
                "started_not_completed": len([j for j in self.pending if j in started]),
                "never_started": len(never),
                "never_started_limit_too_long": sum(1 for j in never if self.limits[j] > usable),
            },
            "seed": n.seed,
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _seconds_between(a: dt.datetime, b: dt.datetime) -> float:
    """Elapsed seconds (aware datetimes of one zone subtract as wall clocks: not across DST)."""
    return (b.astimezone(dt.UTC) - a.astimezone(dt.UTC)).total_seconds()


# -- the simulation ------------------------------------------------------------------------


def _jobs(mix: JobMix, rng: random.Random) -> tuple[list[float], list[float]]:
    """(limit, run time) per job, in priority order (job 0 first)."""
    total = sum(c.share for c in mix.classes)
    counts = [math.floor(mix.jobs * c.share / total) for c in mix.classes]
    for i in sorted(range(len(counts)), key=lambda i: -(mix.jobs * mix.classes[i].share / total - counts[i])):
        if sum(counts) >= mix.jobs:
            break
        counts[i] += 1
    limits = [c.limit for c, k in zip(mix.classes, counts, strict=True) for _ in range(k)]
    rng.shuffle(limits)
    lo, hi = mix.run_fraction
    return limits, [limit * rng.uniform(lo, hi) for limit in limits]


def simulate_night(night: Night, mix: JobMix, workload: Workload = TABLE2_FULL) -> NightResult:
    """One window of the pool (see the module's docstring); deterministic for ``night.seed``."""
    rng = random.Random(night.seed)  # noqa: S311 - a simulation's draws, not secrets
    start, end = night.opening()
    length = _seconds_between(start, end)
    drain = length - night.grace
    topology = night.topology()
    per_switch = topology.per_switch
    desktops = [
        Desktop(f"d{j + 1:04d}", j // per_switch, (j // per_switch) % night.relays)
        for j in range(night.desktops)
    ]
    for j in rng.sample(range(night.desktops), round(night.desktops * night.in_use)):
        desktops[j].in_use = True
    # each relay's queue: its desktops in order, one packet every 60 / wakes_per_minute seconds
    gap = 60.0 / night.wakes_per_minute
    sent = [0] * night.relays
    for d in desktops:
        d.wake = sent[d.relay] * gap
        sent[d.relay] += 1
        if night.firmware >= night.wake_timeout:  # no boot begins in time: left alone
            d.in_use = True
    if night.opt_out_per_hour > 0:
        for d in desktops:
            if not d.in_use:
                d.opt_out = d.wake + rng.expovariate(night.opt_out_per_hour / 3600)
    limits, runs = _jobs(mix, rng)

    # the EE's build: one staggered storm of (switch, wake slot) cohorts
    before = night.firmware + night.menu_timeout
    groups: dict[tuple[int, int], list[Desktop]] = {}
    for d in desktops:
        if not d.in_use:
            groups.setdefault((d.switch, int(d.wake // night.cohort_seconds)), []).append(d)
    bottleneck = "none"
    if groups:
        keys = sorted(groups)
        cohorts = [
            Cohort(s, len(groups[(s, k)]), statistics.fmean(d.wake for d in groups[(s, k)]) + before)
            for s, k in keys
        ]
        storm = simulate(topology, workload, cohorts)
        bottleneck = storm.bottleneck
        for key, c, r in zip(keys, cohorts, storm.cohorts, strict=True):
            for d in groups[key]:
                d.build = r.finished - c.start
                d.up = d.wake + before + d.build + night.ee_start

    allocations: list[Allocation] = []
    pending: list[list[tuple[int, int]]] = []  # per distinct limit: a heap of (priority, job)
    by_limit = sorted(set(limits))
    for _ in by_limit:
        pending.append([])
    for job, limit in enumerate(limits):
        pending[by_limit.index(limit)].append((job, job))
    for h in pending:
        heapq.heapify(h)
    running: dict[int, tuple[int, float]] = {}  # desktop -> (job, start)

    events: list[tuple[float, int, str, int]] = []
    seq = 0

    def at(t: float, kind: str, who: int = -1) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, who))

    passes: set[float] = set()

    def want_pass(t: float) -> None:
        when = t if night.sched_interval == 0 else math.ceil(t / night.sched_interval) * night.sched_interval
        if when not in passes:
            passes.add(when)
            at(when, "pass")

    def stop_job(j: int, t: float, outcome: Literal["completed", "requeued"]) -> None:
        job, began = running.pop(j)
        allocations.append(Allocation(job, j, began, t, outcome))
        desktops[j].job = -1
        if outcome == "requeued":
            heapq.heappush(pending[by_limit.index(limits[job])], (job, job))

    def send_back(j: int, t: float) -> None:
        d = desktops[j]
        taken = t + rng.uniform(0.0, POLL_S)  # its EE's next poll
        if d.state == "job":
            stop_job(j, taken, "requeued")
        d.state, d.ee_end = "back", taken

    for j, d in enumerate(desktops):
        if d.in_use:
            d.state = "in-use"
            continue
        if d.opt_out < math.inf:
            at(d.opt_out, "owner", j)
        if d.up < math.inf:
            at(d.up, "up", j)
    at(drain, "drain")
    at(length, "end")

    def now_idle(j: int, t: float) -> None:
        """Desktop ``j`` is up with no job: back it goes after the drain, else the scheduler looks."""
        desktops[j].state = "idle"
        if t >= drain:
            send_back(j, t)
        else:
            want_pass(t)

    while events:
        t, _, kind, j = heapq.heappop(events)
        if kind == "up":
            d = desktops[j]
            if d.state != "waking":
                continue  # its owner came back first
            now_idle(j, t)
        elif kind == "owner":
            d = desktops[j]
            if d.state == "waking":
                d.state, d.up = "out", math.inf  # never comes up tonight
            elif d.state in ("idle", "job"):
                if d.state == "job":
                    stop_job(j, t, "requeued")
                d.state, d.ee_end = "out", t
        elif kind == "done":
            d = desktops[j]
            if d.state != "job" or j not in running or running[j][0] != d.job:
                continue
            stop_job(j, t, "completed")
            now_idle(j, t)
        elif kind == "pass":
            if t >= drain:
                continue
            for j2, d in enumerate(desktops):
                if d.state != "idle":
                    continue
                best: tuple[int, int] | None = None
                for i, limit in enumerate(by_limit):
                    fits = pending[i] and (not night.reservation or t + limit <= drain)
                    if fits and (best is None or pending[i][0][0] < best[0]):
                        best = (pending[i][0][0], i)
                if best is None:
                    break
                job, _ = heapq.heappop(pending[best[1]])
                d.state, d.job = "job", job
                running[j2] = (job, t)
                at(t + min(runs[job], limits[job]), "done", j2)
        elif kind == "drain":
            for j2, d in enumerate(desktops):
                if d.state == "idle" or (d.state == "job" and night.on_window_end == "requeue"):
                    send_back(j2, t)
        elif kind == "end":
            for j2, d in enumerate(desktops):
                if d.state in ("idle", "job"):
                    send_back(j2, t)
    for d in desktops:  # a desktop sent back at the end takes its order just after it
        if d.state in ("idle", "job"):  # pragma: no cover - every desktop in the EE went back
            raise AssertionError(f"{d.name} still in the EE after the window")
    left = sorted(job for h in pending for _, job in h)
    return NightResult(
        night, mix, workload, start, end, desktops, allocations, left, limits, bottleneck,
        len(groups),
    )  # fmt: skip
