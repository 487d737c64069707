"""Desktop pools (the registry's ``pools``): which desktops are harvested, when, into what.

A pool's windows are in its own time zone (IANA name, explicit): ``{days: weekdays, start:
"20:00", end: "07:00"}`` opens every Monday to Friday at 20:00 and closes at 07:00 the next
morning (an ``end`` at or before its ``start`` is on the next day; ``24:00`` is midnight at the
end of the day; ``HH:MM:SS`` where a minute is too coarse, as in a test's windows).
:func:`opening_at` and :func:`next_opening` answer from the wall clock of the pool's zone,
daylight-saving changes included: a window is as long as the clock on the wall says, not a
fixed number of hours.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_SETS = {"daily": frozenset(range(7)), "weekdays": frozenset(range(5)), "weekend": frozenset({5, 6})}
_CLOCK = re.compile(r"([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?|24:00(:00)?")


def _check_clock(value: str) -> str:
    if not _CLOCK.fullmatch(value):
        raise ValueError(f"{value!r} is not a time of day as HH:MM or HH:MM:SS (00:00 to 24:00)")
    return value


def clock_seconds(clock: str) -> int:
    """Seconds since midnight of a valid ``HH:MM[:SS]`` (``24:00`` is 86400)."""
    parts = [int(p) for p in clock.split(":")] + [0]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def _check_days(value: str) -> str:
    if value not in DAY_SETS and value not in DAY_NAMES:
        raise ValueError(f"{value!r} is not daily, weekdays, weekend or a day ({', '.join(DAY_NAMES)})")
    return value


def _check_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not a time zone (an IANA name such as Europe/Paris or UTC)") from None
    return value


Clock = Annotated[str, AfterValidator(_check_clock)]
Days = Annotated[str, AfterValidator(_check_days)]
Zone = Annotated[str, AfterValidator(_check_zone)]


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    days: list[Days] = Field(default_factory=lambda: ["daily"], min_length=1)
    start: Clock
    end: Clock

    @property
    def weekdays(self) -> frozenset[int]:
        out: set[int] = set()
        for d in self.days:
            out |= DAY_SETS[d] if d in DAY_SETS else {DAY_NAMES.index(d)}
        return frozenset(out)


class Pool(BaseModel):
    """A pool of desktops harvested in windows (see the module's docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nodes: list[str] = Field(default_factory=list, description="desktops by name")
    groups: list[str] = Field(default_factory=list, description="and every node of these groups")
    environment: str = Field(description="the EE they run at night (policies ram or nfs only)")
    partition: str = Field(
        "",
        description="the Slurm partition they serve: `slim slurm harvest` then runs the window's edges "
        "through Slurm; empty: the core wakes them at the window's start and sends them back at its end",
    )
    time_zone: Zone = Field(description="the IANA time zone the windows are in")
    windows: list[Window] = Field(min_length=1)
    wakes_per_minute: int = Field(60, ge=1, le=100_000, description="Wake-on-LAN packets sent at most")
    wake_timeout: float = Field(
        600.0, gt=0, le=7200, description="seconds a woken desktop has to boot the EE, else it is in use"
    )
    order_poll: float = Field(
        10.0, ge=1, le=600, description="seconds between a desktop EE's questions whether to go back"
    )
    prefetch_lead: float = Field(
        900.0, ge=0, le=86400, description="seconds before a window opens when the relays warm its EE"
    )
    grace: float = Field(900.0, ge=0, le=86400, description="seconds before a window ends when it drains")
    menu_timeout: float = Field(
        5.0, gt=0, le=600, description="seconds the menu waits in a window (the owner may pick their OS)"
    )
    on_window_end: Literal["requeue", "finish"] = Field(
        "requeue", description="a job still running at the end: requeued, or let finish within the grace"
    )


@dataclass(frozen=True)
class Opening:
    """One window of a pool, as instants (aware datetimes in the pool's zone)."""

    start: dt.datetime
    end: dt.datetime

    @property
    def drain_at(self) -> dt.datetime:
        return self.end


def _at(day: dt.date, clock: str, zone: ZoneInfo) -> dt.datetime:
    seconds = clock_seconds(clock)
    if seconds == 86400:
        return _at(day + dt.timedelta(days=1), "00:00", zone)
    hour, minute, second = seconds // 3600, seconds // 60 % 60, seconds % 60
    local = dt.datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=zone)
    # a wall time that does not exist (the spring-forward gap) is moved past the gap
    return local.astimezone(dt.UTC).astimezone(zone)


def _openings(pool: Pool, around: dt.datetime, days_back: int, days_ahead: int) -> list[Opening]:
    zone = ZoneInfo(pool.time_zone)
    today = around.astimezone(zone).date()
    found = []
    for offset in range(-days_back, days_ahead + 1):
        day = today + dt.timedelta(days=offset)
        for w in pool.windows:
            if day.weekday() not in w.weekdays:
                continue
            start = _at(day, w.start, zone)
            end_day = day if clock_seconds(w.end) > clock_seconds(w.start) else day + dt.timedelta(days=1)
            end = _at(end_day, w.end, zone)
            if end > start:
                found.append(Opening(start, end))
    return sorted(found, key=lambda o: (o.start, o.end))


def _merged(openings: list[Opening]) -> list[Opening]:
    merged: list[Opening] = []
    for o in openings:
        if merged and o.start <= merged[-1].end:
            merged[-1] = Opening(merged[-1].start, max(merged[-1].end, o.end))
        else:
            merged.append(o)
    return merged


def openings_between(pool: Pool, start: dt.datetime, end: dt.datetime) -> list[Opening]:
    """The pool's windows (those that touch or overlap as one) that are open at some time in
    ``[start, end)``, in order: the one open at ``start`` first, if any."""
    days = max(0, (end - start).days) + 2
    return [o for o in _merged(_openings(pool, start, 2, days)) if o.end > start and o.start < end]


def opening_at(pool: Pool, when: dt.datetime) -> Opening | None:
    """The window of ``pool`` open at ``when`` (timezone-aware), or None.  Windows that
    overlap or touch count as one, from the first start to the last end."""
    return next((o for o in _merged(_openings(pool, when, 2, 2)) if o.start <= when < o.end), None)


def next_opening(pool: Pool, after: dt.datetime) -> Opening:
    """The first window of ``pool`` that opens after ``after``."""
    for o in _openings(pool, after, 0, 8):
        if o.start > after:
            current = opening_at(pool, o.start) or o  # with any window it touches
            if current.start > after:  # not the one open now, running on into this one
                return current
    raise AssertionError("a pool has at least one window a week")  # min_length=1, days non-empty
