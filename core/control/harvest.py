"""Desktop harvesting on the core: each pool's night, desktop by desktop (docs/harvest.md).

The core keeps, for every desktop of a pool (``pools`` in the registry), what SLIM did to it
this window and what its boots say, and acts at the window's edges:

- ``prefetch_lead`` seconds before a window opens, the relays of the pool's desktops warm its
  EE (the same order as ``slim ee prefetch``);
- at the start (pools without a Slurm ``partition``; with one, ``slim slurm harvest`` asks
  through Slurm's ResumeProgram), the pool's desktops are woken: a relay of each desktop's site
  sends its magic packets, at most ``wakes_per_minute``; a woken desktop that has not begun a
  boot into the EE ``wake_timeout`` seconds later is *in use* and left alone;
- ``grace`` seconds before the end, desktops that run no job go back to their own OS (with
  ``on_window_end: requeue``, all of them); at the end, every desktop still in the EE does.
  Going back is an order its EE picks up through a relay (``GetNodeOrder``): ``poweroff`` when
  SLIM's wake started the boot (it was off), else ``reboot`` — and its menu boots its own OS
  until the next window;
- an owner who picks their own OS at the menu during the window (the relay sees the ``local``
  stage) opts that desktop out until the next window: its menu boots its own OS, no wake.

What SLIM did to each desktop, and each pool's marks and node-hours, are kept in the core's
state database (written behind, after the tick that changed them): a core restarted during a
window knows whom it woke and who opted out.  The clock is injected.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from slim.core.control.service import BootStatus, CoreService
from slim.core.pools import Pool, next_opening, opening_at, openings_between
from slim.core.registry import Registry
from slim.errors import InvalidArgument, NotFound

log = logging.getLogger(__name__)

MAX_HORIZON = 31 * 86400.0
POLL_MS = 60_000  # how often a node in no pool asks (it has no order to wait for)
GONE_AFTER = 30.0  # seconds, beyond 3 order polls, of an EE's silence before it counts as gone
SAVE_EVERY = 10.0  # seconds between saves of the node-hours (a change to a desktop is saved at once)
IN_EE = ("booting", "starting", "up")
STATES = ("own-os", "waking", "booting", "idle", "job", "returning", "in-use", "failed", "opted-out")


@dataclass
class Desktop:
    """What SLIM did to one desktop (this window)."""

    woken_at: float = 0.0  # SLIM's wake (the core's clock); 0: not woken this window
    out_until: float = 0.0  # its menu boots its own OS until then (the next window's start)
    out_reason: str = ""
    opted_out: bool = False  # by its owner (or an admin), not sent back by SLIM
    order: str = ""  # "poweroff" or "reboot", for the boot order_boot
    order_boot: str = ""
    order_reason: str = ""
    order_at: float = 0.0
    order_taken: float = 0.0
    busy: bool = False  # runs a job (the Slurm side says)
    asked_at: float = 0.0  # when its EE last asked for its order (the order script)
    asked_boot: str = ""
    since: float = 0.0  # of its state as last computed
    state: str = "own-os"


@dataclass(frozen=True)
class Result:
    node: str
    ok: bool
    message: str


@dataclass(frozen=True)
class DesktopView:
    node: str
    state: str
    since: float
    reason: str
    boot_id: str
    woken_from_off: bool


@dataclass(frozen=True)
class PoolView:
    name: str
    pool: Pool
    open: bool
    window_start: float
    window_end: float
    desktops: list[DesktopView]
    node_hours_ee: float
    node_hours_jobs: float
    jobs_source: str
    upcoming: list[tuple[float, float]]


@dataclass
class _PoolMarks:
    """A pool's running record: the window (its start) its EE was last warmed for, and its
    seconds in the EE and running jobs."""

    prefetched: float = 0.0
    seconds_ee: float = 0.0
    seconds_jobs: float = 0.0


WakeSender = Callable[[str, list[tuple[str, str]], int], bool]  # relay, [(node, mac)], per minute -> sent
Prefetcher = Callable[[str, list[str]], None]  # environment, nodes


class Harvest:
    """The pools' nights (see the module's docstring).  :meth:`tick` runs on the core's event
    loop; the other methods may run on any thread (one lock)."""

    def __init__(
        self,
        service: CoreService,
        send_wake: WakeSender,
        prefetch: Prefetcher,
        connected: Callable[[], list[str]],
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.service = service
        self.clock = clock or service.clock
        self._send_wake = send_wake
        self._prefetch = prefetch
        self._connected = connected
        self._lock = threading.Lock()
        self._desktops: dict[str, Desktop] = {}
        self._marks: dict[str, _PoolMarks] = {}
        self._last_tick = 0.0
        self.jobs_source = ""
        self.dirty = False  # records changed since the last snapshot
        self._saved_at = 0.0
        service.desktop_out = self.menu_default
        service.local_picked = self.local_picked

    # -- records (kept in the state database) ---------------------------------
    def load(self, records: dict[str, str]) -> None:
        """Take back what :meth:`snapshot` saved (records of unknown shape are dropped)."""
        with self._lock:
            for key, text in records.items():
                kind, _, name = key.partition(":")
                try:
                    data = json.loads(text)
                    if kind == "desktop":
                        self._desktops[name] = Desktop(**data)
                    elif kind == "pool":
                        self._marks[name] = _PoolMarks(**data)
                except (ValueError, TypeError) as exc:
                    log.warning("harvest record %s dropped: %s", key[:80], exc)

    def snapshot(self) -> dict[str, str] | None:
        """The records to save, if they changed since the last snapshot."""
        with self._lock:
            if not self.dirty:
                return None
            self.dirty = False
            self._saved_at = self.clock()
            out = {f"desktop:{n}": json.dumps(dataclasses.asdict(d)) for n, d in self._desktops.items()}
            out.update({f"pool:{n}": json.dumps(dataclasses.asdict(m)) for n, m in self._marks.items()})
            return out

    # -- helpers ---------------------------------------------------------------
    def _desktop(self, node: str) -> Desktop:
        return self._desktops.setdefault(node, Desktop())

    @staticmethod
    def _when(seconds: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(seconds, dt.UTC)

    @staticmethod
    def _pooled(
        reg: Registry, nodes: Iterable[str], results: list[Result]
    ) -> Iterator[tuple[str, str, Pool]]:
        """(node, its pool's name, the pool) for each of ``nodes`` (once each, in order); a
        node of no pool, or none at all, gets a failed result instead."""
        for node in dict.fromkeys(nodes):
            if len(node) > 80:  # no name is this long: say so without echoing all of it
                results.append(Result(node[:80], False, f"{node[:80]!r}…: not a node name (too long)"))
                continue
            try:
                reg.node(node)
            except NotFound as exc:
                results.append(Result(node, False, str(exc)))
                continue
            pooled = reg.pool_of(node)
            if pooled is None:
                results.append(
                    Result(node, False, f"node {node!r} is in no desktop pool (the registry's pools)")
                )
                continue
            yield node, *pooled

    def menu_default(self, node: str, now: float) -> str | None:
        """Why the node's menu must boot its own OS now although its window is open (opted out
        or sent back this window); None when the window's EE may be the default."""
        with self._lock:
            d = self._desktops.get(node)
            if d is not None and d.out_until > now:
                return d.out_reason
        return None

    def _window_end(self, pool: Pool, now: float) -> float:
        """The end of the window open at ``now`` (now, if none is): a desktop sent back or
        opted out stays in its own OS until then."""
        opening = opening_at(pool, self._when(now))
        return opening.end.timestamp() if opening is not None else now

    def _woken_from_off(self, d: Desktop, boot: BootStatus | None, pool: Pool) -> bool:
        return bool(
            d.woken_at and boot is not None and d.woken_at <= boot.started <= d.woken_at + pool.wake_timeout
        )

    # -- actions -----------------------------------------------------------------
    def wake(self, nodes: Iterable[str], reason: str, boots: dict[str, BootStatus | None]) -> list[Result]:
        """Wake ``nodes`` (desktops of pools) now: one wake order per relay, at the pool's rate."""
        reg = self.service.registry
        now = self.clock()
        results: list[Result] = []
        batches: dict[tuple[str, int], list[tuple[str, str]]] = {}
        connected = set(self._connected())
        with self._lock:
            for node, pool_name, pool in self._pooled(reg, nodes, results):
                d = self._desktop(node)
                if d.opted_out and d.out_until > now:
                    results.append(Result(node, False, f"not woken: {d.out_reason}"))
                    continue
                boot = boots.get(node)
                opening = opening_at(pool, self._when(now))
                if opening is None:
                    results.append(
                        Result(node, False, f"outside pool {pool_name}'s windows: it would boot its own OS")
                    )
                    continue
                window = opening.start.timestamp()
                recent = boot is not None and boot.started >= window - pool.wake_timeout
                if recent and self._in_ee(node, boot, pool) and boot is not None:
                    said = f"already in {pool.environment} ({boot.state})"
                    if d.order and d.order_boot == boot.boot_id:  # told to go back, not yet asked: it stays
                        d.order, d.out_until, d.out_reason, self.dirty = "", 0.0, "", True
                        said += "; its order to go back is withdrawn"
                    results.append(Result(node, True, said))
                    continue
                site = reg.node(node).site
                relays = [n for n, tier in reg.relays_by_site(site) if tier == "site" and n in connected]
                if not relays:
                    results.append(
                        Result(node, False, f"no relay of site {site!r} is connected to send the packet")
                    )
                    continue
                batches.setdefault((relays[0], pool.wakes_per_minute), []).extend(
                    (node, mac) for mac in reg.node(node).macs
                )
                d.woken_at = now
                d.opted_out = False
                # sent back by SLIM (Slurm's SuspendProgram, slim harvest release), not by its owner:
                # woken again, its menu offers the EE again
                d.out_until, d.out_reason = 0.0, ""
                self.dirty = True
                results.append(Result(node, True, f"wake sent through relay {relays[0]} ({reason})"))
                log.info("pool %s: waking %s through relay %s (%s)", pool_name, node, relays[0], reason)
        for (relay, per_minute), targets in batches.items():
            if not self._send_wake(relay, targets, per_minute):
                bad = {n for n, _ in targets}
                with self._lock:
                    for n in bad:
                        self._desktop(n).woken_at = 0.0  # not woken: tried again
                results = [
                    Result(r.node, False, f"relay {relay} has no heartbeat stream") if r.node in bad else r
                    for r in results
                ]
        return results

    def release(
        self, nodes: Iterable[str], reason: str, boots: dict[str, BootStatus | None], opt_out: bool = False
    ) -> list[Result]:
        """Send ``nodes`` back to their own OS (``opt_out``: and keep them out of the pool, as
        their owner does at the menu) until the next window."""
        reg = self.service.registry
        now = self.clock()
        results: list[Result] = []
        with self._lock:
            for node, pool_name, pool in self._pooled(reg, nodes, results):
                boot = boots.get(node)
                results.append(self._release_one(node, pool_name, pool, reason, boot, now, opt_out))
        return results

    def _release_one(
        self,
        node: str,
        pool_name: str,
        pool: Pool,
        reason: str,
        boot: BootStatus | None,
        now: float,
        opt_out: bool,
    ) -> Result:
        d = self._desktop(node)
        self.dirty = True
        if not (d.opted_out and d.out_until > now):  # its owner's opt-out (and why) stands
            d.out_until = self._window_end(pool, now)
            d.out_reason = reason
            d.opted_out = opt_out
        if not self._in_ee(node, boot, pool) or boot is None:
            return Result(node, True, f"not in {pool.environment}: its own OS until the next window")
        if d.order and d.order_boot == boot.boot_id:
            return Result(node, True, f"already told to {d.order}")
        d.order = "poweroff" if self._woken_from_off(d, boot, pool) else "reboot"
        d.order_boot, d.order_reason, d.order_at, d.order_taken = boot.boot_id, reason, now, 0.0
        log.info("pool %s: %s goes back to its own OS (%s: %s)", pool_name, node, d.order, reason)
        return Result(node, True, f"told to {d.order} ({reason})")

    def local_picked(self, node: str, boot_id: str, at: float) -> None:
        """The node's menu went to its own OS (a relay saw the ``local`` stage): in a window,
        and not because SLIM sent it back, its owner picked it: out until the next window."""
        reg = self.service.registry
        pooled = reg.pool_of(node)
        if pooled is None:
            return
        pool_name, pool = pooled
        if opening_at(pool, self._when(at)) is None:
            return
        with self._lock:
            d = self._desktop(node)
            if d.out_until > at:
                return  # its menu's default was its own OS already
            clock = self._when(at).astimezone(dt.UTC).strftime("%H:%M:%S UTC")
            d.out_until = self._window_end(pool, at)
            d.out_reason = f"its owner picked their own OS at the menu at {clock}"
            d.opted_out = True
            self.dirty = True
            log.info("pool %s: %s opted out until the next window (%s)", pool_name, node, d.out_reason)

    def note_jobs(self, busy: Iterable[str], source: str) -> list[Result]:
        reg = self.service.registry
        busy = set(busy)
        unknown = sorted(n for n in busy if reg.pool_of(n) is None)
        with self._lock:
            for node in (n for n in reg.nodes if reg.pool_of(n) is not None):
                self._desktop(node).busy = node in busy
            self.jobs_source = source
        return [Result(n, False, "in no desktop pool") for n in unknown]

    def order_for(self, node: str, boot_id: str) -> tuple[str, str, float]:
        """(action, reason, seconds until it asks again) for the running boot ``boot_id`` of
        ``node``: action "" for none."""
        pooled = self.service.registry.pool_of(node)
        poll = pooled[1].order_poll if pooled is not None else POLL_MS / 1000
        with self._lock:
            d = self._desktops.get(node)
            if d is not None or pooled is not None:
                d = self._desktop(node)
                d.asked_at, d.asked_boot = self.clock(), boot_id
            if d is None or not d.order or d.order_boot != boot_id:
                return "", "", poll
            if not d.order_taken:
                d.order_taken = self.clock()
                self.dirty = True
            return d.order, d.order_reason, poll

    # -- the clock ----------------------------------------------------------------
    @property
    def last_tick(self) -> float:
        """The clock's time at the last tick (0: none yet)."""
        return self._last_tick

    def tick(self, boots: dict[str, BootStatus | None]) -> None:
        """Act on the windows' edges (see the module's docstring); ``boots``: every pooled
        desktop's latest boot."""
        reg = self.service.registry
        now = self.clock()
        elapsed = max(0.0, min(now - self._last_tick, 60.0)) if self._last_tick else 0.0
        self._last_tick = now
        if reg.pools and now - self._saved_at >= SAVE_EVERY:  # node-hours move with the clock
            self.dirty = True
        when = self._when(now)
        for name, pool in reg.pools.items():
            marks = self._marks.setdefault(name, _PoolMarks())
            members = list(reg.pool_members(name))
            with self._lock:
                for node in members:
                    boot = boots.get(node)
                    if boot is not None and boot.state == "up" and self._in_ee(node, boot, pool):
                        marks.seconds_ee += elapsed
                        if self._desktop(node).busy:
                            marks.seconds_jobs += elapsed
            opening = opening_at(pool, when)
            if opening is None:
                upcoming = next_opening(pool, when)
                start = upcoming.start.timestamp()
                if start - now <= pool.prefetch_lead and marks.prefetched != start:
                    marks.prefetched = start
                    self._try_prefetch(name, pool, members)
                # the window is over: nothing of it stays in the EE
                with self._lock:
                    late = [n for n in members if self._in_ee(n, boots.get(n), pool)]
                    late = [n for n in late if not self._ordered(n, boots)]
                if late:
                    self.release(late, "the window ended", boots)
                with self._lock:  # the night is over: whom it woke is history (the orders stand)
                    for node in members:
                        d = self._desktop(node)
                        if d.woken_at:
                            d.woken_at, self.dirty = 0.0, True
                continue
            start, end = opening.start.timestamp(), opening.end.timestamp()
            if marks.prefetched != start:  # the core started in the window, or the lead was 0
                marks.prefetched = start
                self._try_prefetch(name, pool, members)
            with self._lock:  # a new window: last one's opt-outs and wakes are history
                for node in members:
                    d = self._desktop(node)
                    if d.out_until and d.out_until <= now:
                        d.out_until, d.out_reason, d.opted_out = 0.0, "", False
                    if d.woken_at and d.woken_at < start:
                        d.woken_at = 0.0
            if not pool.partition and now < end - pool.grace:
                with self._lock:  # not woken yet this window (or the packet could not go out)
                    pending = [
                        n
                        for n in members
                        if self._desktop(n).woken_at < start
                        and not self._out(n, now)
                        and not self._in_ee(n, boots.get(n), pool)
                    ]
                if pending:
                    self.wake(pending, f"pool {name}'s window opened", boots)
            if now >= end - pool.grace and not pool.partition:  # (with a partition: Slurm's)
                with self._lock:
                    busy = {n for n in members if self._desktop(n).busy}
                    going = [
                        n
                        for n in members
                        if self._in_ee(n, boots.get(n), pool)
                        and not self._ordered(n, boots)
                        and (pool.on_window_end == "requeue" or n not in busy)
                    ]
                if going:
                    why = f"pool {name}'s window ends at {opening.end:%H:%M} ({pool.time_zone})"
                    self.release(going, why, boots)

    def _in_ee(self, node: str, boot: BootStatus | None, pool: Pool) -> bool:
        """The node's latest boot is into the pool's EE, has not taken an order to go back, and
        its EE still asks for its orders (when it ever did)."""
        if boot is None or boot.state not in IN_EE or boot.environment != pool.environment:
            return False
        d = self._desktops.get(node)
        if d is None:
            return True
        return not (d.order_boot == boot.boot_id and d.order_taken) and not self._gone(d, boot, pool)

    def _gone(self, d: Desktop, boot: BootStatus, pool: Pool) -> bool:
        """Its EE asked for its orders, then stopped: powered off or reset (by its owner)."""
        silent = self.clock() - d.asked_at
        return d.asked_boot == boot.boot_id and silent > 3 * pool.order_poll + GONE_AFTER

    def _out(self, node: str, now: float) -> bool:
        d = self._desktops.get(node)
        return d is not None and d.out_until > now

    def _ordered(self, node: str, boots: dict[str, BootStatus | None]) -> bool:
        d, boot = self._desktops.get(node), boots.get(node)
        return bool(d is not None and boot is not None and d.order and d.order_boot == boot.boot_id)

    def _try_prefetch(self, name: str, pool: Pool, members: list[str]) -> None:
        try:
            self._prefetch(pool.environment, members)
            log.info("pool %s: its relays to warm %s before its window", name, pool.environment)
        except Exception as exc:  # noqa: BLE001 - a prefetch that cannot start must not stop the night
            log.warning("pool %s: could not order the relays to warm %s: %s", name, pool.environment, exc)

    # -- status ---------------------------------------------------------------------
    def status(
        self, pool_name: str, boots: dict[str, BootStatus | None], horizon: float = 0.0
    ) -> list[PoolView]:
        reg = self.service.registry
        if pool_name and pool_name not in reg.pools:
            known = ", ".join(sorted(reg.pools)) or "none"
            raise NotFound(f"unknown pool {pool_name[:80]!r}; the registry's pools: {known}")
        if not 0 <= horizon <= MAX_HORIZON:
            raise InvalidArgument(f"horizon: 0 to {MAX_HORIZON:g} seconds, not {horizon:g}")
        now = self.clock()
        when = self._when(now)
        out = []
        for name, pool in sorted(reg.pools.items()):
            if pool_name and name != pool_name:
                continue
            opening = opening_at(pool, when) or next_opening(pool, when)
            marks = self._marks.get(name, _PoolMarks())
            with self._lock:
                desktops = [self._view(node, pool, boots.get(node), now) for node in reg.pool_members(name)]
                source = self.jobs_source
            out.append(
                PoolView(
                    name, pool, opening.start <= when < opening.end, opening.start.timestamp(),
                    opening.end.timestamp(), desktops, marks.seconds_ee / 3600, marks.seconds_jobs / 3600,
                    source,
                    [
                        (o.start.timestamp(), o.end.timestamp())
                        for o in (openings_between(pool, when, self._when(now + horizon)) if horizon else [])
                    ],
                )
            )  # fmt: skip
        return out

    def _view(self, node: str, pool: Pool, boot: BootStatus | None, now: float) -> DesktopView:
        d = self._desktops.get(node) or Desktop()
        reason = ""
        boot_id = boot.boot_id if boot is not None else ""
        from_off = self._woken_from_off(d, boot, pool)
        in_ee = self._in_ee(node, boot, pool)
        gone = boot is not None and boot.state == "up" and self._gone(d, boot, pool)
        if gone and not (d.order and d.order_taken):
            state, since = "own-os", d.asked_at
            reason = f"its EE stopped asking at {self._when(d.asked_at):%H:%M:%S} UTC: powered off or reset"
        elif d.order and boot is not None and d.order_boot == boot.boot_id:
            state, since, reason = "returning", d.order_at, f"told to {d.order}: {d.order_reason}"
            if d.order_taken:
                state, since = "own-os", d.order_taken
        elif in_ee and boot is not None:
            if boot.state == "up":
                state, since, reason = ("job" if d.busy else "idle"), boot.since, ""
            else:
                state, since, reason = "booting", boot.started, boot.state
        elif boot is not None and boot.state == "failed" and boot.environment == pool.environment:
            state, since, reason = "failed", boot.since, f"{boot.stage}: {boot.message}"
        elif d.opted_out and d.out_until > now:
            state, since, reason = "opted-out", 0.0, d.out_reason
        elif d.woken_at and d.out_until <= now and opening_at(pool, self._when(now)) is not None:
            # woken, no EE boot since (and not released since: that is its own OS, below)
            if now - d.woken_at > pool.wake_timeout:
                state, since = "in-use", d.woken_at + pool.wake_timeout
                reason = f"no boot into {pool.environment} {pool.wake_timeout:g} s after its wake: left alone"
            else:
                state, since, reason = "waking", d.woken_at, ""
        else:
            state, since = "own-os", (boot.since if boot is not None and boot.state == "local" else 0.0)
            reason = d.out_reason if d.out_until > now else ""
        if state != d.state:
            d.state, d.since = state, since or now
        return DesktopView(node, state, since or d.since, reason, boot_id, from_off)
