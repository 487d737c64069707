"""Desktop pools through Slurm: ``slim slurm harvest`` and ``slim slurm power`` (docs/slurm.md).

For a pool with a ``partition`` (the registry's ``pools``), Slurm decides which desktop runs
what, and SLIM keeps it inside the pool's windows:

* **blackout reservations** keep jobs off the desktops outside the windows: one one-shot
  reservation per gap between two windows, ``slim-POOL-YYYYMMDDTHHMM[SS]`` (the next window's start
  on the pool's wall clock), from ``grace`` seconds before a window ends to the next window's
  start, ``Flags=MAINT,IGNORE_JOBS Users=root``, in absolute UTC times (scontrol reads times in
  its own zone: it runs with ``TZ=UTC``), kept over a rolling horizon of the partition's
  MaxTime plus a day.  Slurm starts a job on the desktops only if its time limit ends before
  the next blackout;
* **power saving** gives the state model and the hooks: a desktop in its own OS is
  POWERED_DOWN (``idle~``), Slurm's ResumeProgram is SLIM's wake (:class:`PowerHook` ``resume``,
  ``WakeDesktops``), its SuspendProgram the way back (``suspend``, ``ReleaseDesktops``, which does
  nothing to a desktop not in the pool's EE);
* **the window's edges**, which :func:`plan` turns into ``scontrol update`` commands from the
  core's status (``HarvestStatus``) and Slurm's (``scontrol show node|reservation|partition``,
  ``squeue``): at the start ``POWER_UP`` (not desktops whose owner opted out); at end - grace
  ``POWER_DOWN_FORCE`` (``on_window_end: requeue``: running jobs are requeued) or
  ``POWER_DOWN_ASAP`` (``finish``: running jobs finish, idle desktops go now); outside the
  windows ``POWER_DOWN_FORCE`` for anything still up; an owner's opt-out (own OS picked at the
  menu) ``POWER_DOWN_FORCE`` then ``DRAIN`` with the core's reason until the next window, then
  ``RESUME``.

The behaviours this relies on were measured on Slurm 22.05 (docs/slurm.md, "Desktop pools").
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from google.protobuf.timestamp_pb2 import Timestamp

from slim.errors import InvalidArgument, Unavailable
from slim.plugin.access import SlurmCli
from slim.v1 import core_pb2 as pb

if TYPE_CHECKING:
    from slim.rpc import CoreClient

log = logging.getLogger(__name__)

REASON = "slim:"  # the reasons SLIM gives nodes begin so; only those SLIM clears itself
# Slurm's own reasons a desktop gets when it goes away (its owner, a failed wake), cleared
# outside the windows so that the desktop is idle~ for the next one
SLURM_REASONS = ("Not responding", "ResumeTimeout reached")
DAY = 86400.0
HORIZON_MAX = 31 * DAY  # the core's limit
JOBS_SOURCE = "slurm (squeue)"


# -- what the planner reads ---------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    start: float
    end: float


@dataclass(frozen=True)
class Pool:
    """A pool as the core reports it (HarvestStatus)."""

    name: str
    partition: str
    open: bool
    window: Window  # the open one, or the next
    upcoming: tuple[Window, ...]  # in the horizon asked for, in order (the open one first)
    grace: float
    on_window_end: str  # "requeue" or "finish"
    time_zone: str
    desktops: Mapping[str, tuple[str, str]]  # node -> (state, reason)


@dataclass(frozen=True)
class Node:
    """A node as ``scontrol show node -o`` says."""

    name: str
    base: str  # IDLE, ALLOCATED, MIXED, DOWN, UNKNOWN, ...
    flags: frozenset[str]  # DRAIN, POWERED_DOWN, POWERING_DOWN, POWER_DOWN, POWERING_UP, ...
    reason: str = ""  # without Slurm's " [user@time]" suffix

    @property
    def off(self) -> bool:
        """Powered down, on its way there, or asked to."""
        return bool(self.flags & {"POWERED_DOWN", "POWERING_DOWN", "POWER_DOWN"})

    @property
    def ours(self) -> bool:
        return self.reason.startswith(REASON)


@dataclass(frozen=True)
class Reservation:
    name: str
    start: float
    end: float
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class SlurmState:
    nodes: Mapping[str, Node]
    reservations: Mapping[str, Reservation]
    busy: frozenset[str]  # nodes running (or completing) a job
    max_time: Mapping[str, float | None]  # partition -> MaxTime in seconds (None: INFINITE)


# -- what it answers ------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    """One scontrol command (without ``scontrol``), and why."""

    argv: tuple[str, ...]
    why: str

    def __str__(self) -> str:
        return f"scontrol {' '.join(self.argv)}  # {self.why}"


@dataclass
class Plan:
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be done, for the log
    woke: dict[str, float] = field(default_factory=dict)  # pool -> the window its POWER_UP was for
    failed: list[str] = field(default_factory=list)  # actions that failed, with Slurm's error


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(round(seconds), dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()[:200]


def node_action(nodes: Iterable[str], state: str, why: str, reason: str = "") -> Action:
    argv = ["update", f"NodeName={','.join(nodes)}", f"State={state}"]
    if reason:
        argv.append(f"Reason={_one_line(reason)}")
    return Action(tuple(argv), why)


BLACKOUT_STAMP = r"\d{8}T\d{4}(?:\d{2})?"  # what blackout_name puts after slim-POOL-


def blackout_name(pool: Pool, next_start: float) -> str:
    local = dt.datetime.fromtimestamp(next_start, ZoneInfo(pool.time_zone))
    return f"slim-{pool.name}-{local:%Y%m%dT%H%M}" + (f"{local:%S}" if local.second else "")


def blackouts(pool: Pool, now: float, ahead: float) -> dict[str, tuple[float, float]]:
    """The blackouts ``pool`` needs now: name -> (start, end), for every gap between its windows
    that has not ended and begins within ``ahead`` seconds (the gap before the first window
    begins now, if no window is open)."""
    out: dict[str, tuple[float, float]] = {}
    windows = list(pool.upcoming)
    for i, w in enumerate(windows):
        if i == 0:
            if pool.open and w.start <= now:
                continue  # the gap before the open window is over
            start = now
        else:
            start = windows[i - 1].end - pool.grace
        if start < now + ahead and w.start > max(start, now):
            out[blackout_name(pool, w.start)] = (start, w.start)
    return out


def horizon(max_time: float | None) -> tuple[float, float]:
    """(ahead, asked): blackouts are kept for gaps beginning within ``ahead`` seconds (the
    partition's MaxTime, at most a week — INFINITE counts as a week — plus a day); the core is
    asked for the windows of ``asked`` seconds, enough to know where each such gap ends (a
    pool has a window every week)."""
    ahead = min(max_time if max_time is not None else 7 * DAY, 7 * DAY) + DAY
    return ahead, min(ahead + 8 * DAY, HORIZON_MAX)


def plan(pools: Sequence[Pool], slurm: SlurmState, now: float, woke: Mapping[str, float]) -> Plan:
    """The scontrol commands that bring Slurm to what the pools' windows want now (see the
    module's docstring).  ``woke``: for each pool, the window whose start was already acted on
    (Slurm may power idle desktops down mid-window; they are not woken again but on demand)."""
    out = Plan(woke=dict(woke))
    known = {p.name for p in pools}
    for pool in pools:
        if not pool.partition:
            continue
        _plan_reservations(pool, slurm, now, out)
        _plan_nodes(pool, slurm, now, out)
    for name in sorted(slurm.reservations):  # blackouts of pools gone from the registry
        m = re.fullmatch(rf"slim-(.+)-{BLACKOUT_STAMP}", name)
        if m and m.group(1) not in known:
            out.actions.append(Action(("delete", f"ReservationName={name}"), "its pool is gone"))
    return out


def _plan_reservations(pool: Pool, slurm: SlurmState, now: float, out: Plan) -> None:
    ahead, _ = horizon(slurm.max_time.get(pool.partition))
    wanted = blackouts(pool, now, ahead)
    nodes = tuple(sorted(n for n in pool.desktops if n in slurm.nodes))
    if not nodes:
        return
    why = f"pool {pool.name}: no jobs on its desktops outside its windows"
    for name, (start, end) in sorted(wanted.items()):
        have = slurm.reservations.get(name)
        if have is None:
            out.actions.append(Action(
                ("create", "reservation", f"ReservationName={name}", "Users=root", f"Nodes={','.join(nodes)}",
                 f"StartTime={_utc(start)}", f"EndTime={_utc(end)}", "Flags=MAINT,IGNORE_JOBS"),
                why,
            ))  # fmt: skip
            continue
        change = []
        if have.start > now and abs(have.start - start) > 1:  # an active one's start is fixed
            change.append(f"StartTime={_utc(start)}")
        if abs(have.end - end) > 1:
            change.append(f"EndTime={_utc(end)}")
        if tuple(sorted(have.nodes)) != nodes:
            change.append(f"Nodes={','.join(nodes)}")
        if change:
            out.actions.append(Action(("update", f"ReservationName={name}", *change), why))
    prefix = f"slim-{pool.name}-"
    for name in sorted(slurm.reservations):
        if (
            name.startswith(prefix)
            and re.fullmatch(BLACKOUT_STAMP, name[len(prefix) :])
            and name not in wanted
        ) and slurm.reservations[name].end > now:
            out.actions.append(
                Action(("delete", f"ReservationName={name}"), f"pool {pool.name}'s windows changed")
            )


def _plan_nodes(pool: Pool, slurm: SlurmState, now: float, out: Plan) -> None:
    w = pool.window
    phase = "closed"
    if pool.open and w.start <= now < w.end:
        phase = "open" if now < w.end - pool.grace else "ending"
    nodes = {n: slurm.nodes[n] for n in sorted(pool.desktops) if n in slurm.nodes}
    missing = sorted(set(pool.desktops) - set(nodes))
    if missing:
        out.notes.append(f"pool {pool.name}: not Slurm nodes: {', '.join(missing)}")
    acts: dict[tuple[str, str, str], list[str]] = {}  # (state, reason, why) -> nodes, in order

    def do(node: str, state: str, why: str, reason: str = "") -> None:
        acts.setdefault((state, reason, why), []).append(node)

    where = f"pool {pool.name}"
    wake = phase == "open" and out.woke.get(pool.name) != w.start
    for name, n in nodes.items():
        desk_state, desk_reason = pool.desktops[name]
        opted_out = desk_state == "opted-out" and phase != "closed"
        if n.base in ("UNKNOWN", "FUTURE") or (n.base == "DOWN" and not n.off and not n.reason):
            # never registered (its own OS since slurmctld started): Slurm powers only a
            # registered or DOWN node down (measured), so DOWN it, power it down, then RESUME
            if n.base != "DOWN":
                do(name, "DOWN", f"{where}: not registered, in its own OS", f"{REASON} in its own OS")
            do(name, "POWER_DOWN_FORCE", f"{where}: in its own OS")
            continue
        if opted_out:
            if not n.off:
                do(name, "POWER_DOWN_FORCE", f"{where}: its owner took it back (jobs requeued)")
            if not n.flags & {"DRAIN"} or not n.ours or n.base == "DOWN":
                if n.base == "DOWN":
                    do(name, "RESUME", f"{where}: to drain it instead")
                do(
                    name,
                    "DRAIN",
                    f"{where}: out until the next window",
                    f"{REASON} {desk_reason or 'opted out'}",
                )
            continue
        resumed = False
        down = "POWERED_DOWN" in n.flags  # (RESUME would cancel a POWERING_DOWN)
        if n.ours and (n.base == "DOWN" or ("DRAIN" in n.flags and phase == "open")) and down:
            # our DOWN of a never-registered node (now powered down), or last window's opt-out
            do(name, "RESUME", f"{where}: in its own OS, ready for its window")
            resumed = True
        elif n.base == "DOWN" and down and phase == "closed" and n.reason.startswith(SLURM_REASONS):
            do(name, "RESUME", f"{where}: back in its own OS ({n.reason})")
            resumed = True
        if phase == "open":
            if wake and down and (resumed or ("DRAIN" not in n.flags and n.base != "DOWN")):
                do(name, "POWER_UP", f"{where}: its window opened")
        elif phase == "ending":
            if not n.off:
                if pool.on_window_end == "requeue":
                    do(name, "POWER_DOWN_FORCE", f"{where}: its window ends (on_window_end: requeue)")
                elif not (n.reason == "POWER_DOWN_ASAP" and "DRAIN" in n.flags):
                    do(name, "POWER_DOWN_ASAP", f"{where}: its window ends (on_window_end: finish)")
        elif not n.off:
            do(name, "POWER_DOWN_FORCE", f"{where}: outside its windows")
    if wake:
        out.woke[pool.name] = w.start
    # RESUME and DOWN before the power changes, DRAIN after POWER_DOWN_FORCE (which clears it)
    order = {"DOWN": 0, "RESUME": 1, "POWER_DOWN_FORCE": 2, "POWER_DOWN_ASAP": 2, "POWER_UP": 3, "DRAIN": 4}
    for (state, reason, why), names in sorted(acts.items(), key=lambda kv: order.get(kv[0][0], 9)):
        out.actions.append(node_action(names, state, why, reason))


# -- reading Slurm --------------------------------------------------------------------------
_HOST = re.compile(r"([^\[\],]*)(?:\[([^\]]*)\])?([^\[\],]*)")


def expand_hostlist(expr: str) -> list[str]:
    """``d[1-3,05],n7`` -> d1 d2 d3 d05 n7 (Slurm's one-bracket hostlists; zero padding kept)."""
    out: list[str] = []
    pos = 0
    expr = expr.strip()
    while pos < len(expr):
        m = _HOST.match(expr, pos)
        if m is None or m.end() == pos:
            raise InvalidArgument(f"not a host list: {expr!r}")
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if ranges is None:
            if prefix:
                out.append(prefix + suffix)
        else:
            for part in ranges.split(","):
                lo, _, hi = part.partition("-")
                if not lo.isdigit() or (hi and not hi.isdigit()):
                    raise InvalidArgument(f"not a host list: {expr!r}")
                width = len(lo) if lo.startswith("0") else 0
                for i in range(int(lo), int(hi or lo) + 1):
                    out.append(f"{prefix}{i:0{width}d}{suffix}")
        pos = m.end()
        if pos < len(expr):
            if expr[pos] != ",":
                raise InvalidArgument(f"not a host list: {expr!r}")
            pos += 1
    return out


def _fields(line: str) -> dict[str, str]:
    """``scontrol show X -o``: KEY=VALUE words; a Reason (free text) comes last."""
    line, _, reason = line.partition(" Reason=")
    out = dict(re.findall(r"(\w+)=(\S*)", line))
    if reason:
        out["Reason"] = re.sub(r" \[[^\]]*@[^\]]*\]$", "", reason.strip())
    return out


def parse_nodes(text: str) -> dict[str, Node]:
    out = {}
    for line in text.splitlines():
        f = _fields(line)
        if "NodeName" not in f:
            continue
        base, *flags = f.get("State", "UNKNOWN").rstrip("*").split("+")
        out[f["NodeName"]] = Node(f["NodeName"], base.rstrip("*~#%!"), frozenset(flags), f.get("Reason", ""))
    return out


def _epoch_utc(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC).timestamp()


def parse_reservations(text: str) -> dict[str, Reservation]:
    """``TZ=UTC scontrol show reservation -o`` (times in UTC)."""
    out = {}
    for line in text.splitlines():
        f = _fields(line)
        if "ReservationName" not in f:
            continue
        name = f["ReservationName"]
        if not name.startswith("slim-"):
            continue  # not one of ours: its nodes (any host list syntax) do not matter here
        nodes = tuple(expand_hostlist(f["Nodes"])) if f.get("Nodes", "(null)") != "(null)" else ()
        out[name] = Reservation(name, _epoch_utc(f["StartTime"]), _epoch_utc(f["EndTime"]), nodes)
    return out


def parse_duration(text: str) -> float | None:
    """A Slurm time in seconds (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``, as sbatch -t reads them); None for UNLIMITED/INFINITE."""
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE"):
        return None
    days, dash, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if dash:  # after days the clock starts at hours
        parts = parts + [0] * (3 - len(parts))
    scale = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}.get(len(parts))
    if scale is None:
        raise ValueError(f"{text!r} is not a Slurm time ([D-]HH:MM:SS)")
    return sum(p * s for p, s in zip(parts, scale, strict=True)) + int(days or 0) * DAY


def parse_partitions(text: str) -> dict[str, float | None]:
    out = {}
    for line in text.splitlines():
        f = _fields(line)
        if "PartitionName" in f:
            out[f["PartitionName"]] = parse_duration(f.get("MaxTime", "UNLIMITED"))
    return out


class Scontrol(SlurmCli):
    """Slurm's commands (:class:`slim.plugin.access.SlurmCli`: each bounded), with ``TZ=UTC``
    (scontrol reads and prints reservation times in its own zone)."""

    def __init__(self, env: Mapping[str, str] | None = None, timeout: float = 30.0) -> None:
        super().__init__({**(env if env is not None else os.environ), "TZ": "UTC"}, timeout)

    def state(self) -> SlurmState:
        nodes = parse_nodes(self._run("scontrol", "show", "node", "-o"))
        reservations = self._run("scontrol", "show", "reservation", "-o")
        listed = [x for x in self._run("squeue", "-h", "-t", "R,CG", "-o", "%N").split() if x]
        # Slurm's own expansion: any job's host list, whatever its syntax (r[1-2]n[1-4])
        busy = frozenset(self.hostnames(",".join(listed))) if listed else frozenset()
        return SlurmState(
            nodes,
            parse_reservations("" if reservations.startswith("No reservations") else reservations),
            busy,
            parse_partitions(self._run("scontrol", "show", "partition", "-o")),
        )

    def apply(self, actions: Iterable[Action]) -> list[tuple[Action, str]]:
        """Run each action; (action, error) for those that failed (the others ran)."""
        failed = []
        for a in actions:
            try:
                self._run("scontrol", *a.argv)
                log.info("%s", a)
            except Unavailable as exc:
                log.warning("%s: %s", a, exc.message)
                failed.append((a, exc.message))
        return failed


# -- the power hook ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    node: str
    ok: bool
    message: str


class PowerHook(Protocol):
    """What Slurm's power saving asks of SLIM (22.05: ResumeProgram/SuspendProgram with a host
    list; a later Slurm's PowerAction would map onto the same two calls)."""

    def resume(self, nodes: Sequence[str], reason: str) -> list[Outcome]:
        """Wake the desktops (into the pool's EE); returns at once (Slurm waits for slurmd)."""
        ...

    def suspend(self, nodes: Sequence[str], reason: str) -> list[Outcome]:
        """Send the desktops back to their own OS (nothing for one not in SLIM's EE)."""
        ...


class CorePower:
    """:class:`PowerHook` through the core's Admin service (WakeDesktops, ReleaseDesktops)."""

    def __init__(self, client: CoreClient) -> None:
        self.client = client

    @staticmethod
    def _outcomes(reply: pb.DesktopsReply) -> list[Outcome]:
        return [Outcome(r.node, r.ok, r.message) for r in reply.results]

    def resume(self, nodes: Sequence[str], reason: str) -> list[Outcome]:
        request = pb.DesktopsRequest(nodes=list(nodes), reason=reason)
        return self._outcomes(self.client.call(self.client.admin.WakeDesktops, request))

    def suspend(self, nodes: Sequence[str], reason: str) -> list[Outcome]:
        request = pb.DesktopsRequest(nodes=list(nodes), reason=reason)
        return self._outcomes(self.client.call(self.client.admin.ReleaseDesktops, request))


# -- the core's side -----------------------------------------------------------------------------
def pools_from_status(reply: pb.HarvestStatusReply) -> list[Pool]:
    """HarvestStatusReply -> :class:`Pool` s."""

    def ts(t: Timestamp) -> float:
        return t.seconds + t.nanos / 1e9

    out = []
    for p in reply.pools:
        out.append(
            Pool(
                p.name, p.partition, p.open, Window(ts(p.window_start), ts(p.window_end)),
                tuple(Window(ts(w.start), ts(w.end)) for w in p.upcoming), p.grace,
                p.on_window_end or "requeue", p.time_zone or "UTC",
                {d.node: (d.state, d.reason) for d in p.desktops},
            )
        )  # fmt: skip
    return out


@dataclass
class Harvester:
    """One pass of ``slim slurm harvest``: ask the core and Slurm, plan, act, report the busy
    desktops.  ``woke`` is the memory between passes (a restarted daemon wakes an open
    window's desktops again, which is harmless)."""

    client: CoreClient
    slurm: Scontrol
    woke: dict[str, float] = field(default_factory=dict)

    def once(self, now: float, dry_run: bool = False) -> Plan:
        client = self.client
        state = self.slurm.state()
        asked = max((horizon(t)[1] for t in state.max_time.values()), default=horizon(None)[1])
        reply = client.call(client.admin.HarvestStatus, pb.HarvestStatusRequest(horizon_seconds=asked))
        pools = pools_from_status(reply)
        result = plan(pools, state, now, self.woke)
        for note in result.notes:
            log.warning("%s", note)
        if dry_run:
            return result
        failed = self.slurm.apply(result.actions)
        if not any("State=POWER_UP" in a.argv for a, _ in failed):  # else: wake again next pass
            self.woke = result.woke
        pooled = {n for p in pools if p.partition for n in p.desktops}
        if pooled:
            busy = sorted(state.busy & pooled)
            client.call(client.admin.ReportDesktopJobs, pb.DesktopJobs(busy=busy, source=JOBS_SOURCE))
        return dataclasses.replace(result, failed=[f"{a}: {e}" for a, e in failed])
