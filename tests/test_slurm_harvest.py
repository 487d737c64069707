"""A desktop pool through a real Slurm (labs/harvestlab.py): d1..d3 in partition ``harvest``,
with simulated power, `slim slurm harvest` on the controller and a window of 140 s on the
wall clock (Slurm has no other clock), grace 20 s, on_window_end requeue."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from labs.harvestlab import BOOT_TIME, DESKTOPS, GRACE, POOL, HarvestLab
from slim.plugin.harvest import (
    Plan,
    Pool,
    Reservation,
    SlurmState,
    Window,
    blackout_name,
    expand_hostlist,
    parse_duration,
    parse_nodes,
    parse_reservations,
    plan,
)
from tests.support import need, need_tool


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[HarvestLab]:
    need(os.geteuid() == 0, "slurmd and munged run as root here")
    for tool in ("slurmctld", "slurmd", "sbatch"):
        need_tool(tool, "slurm-wlm")
    need_tool("munged", "munge")
    lab = HarvestLab(tmp_path)
    try:
        yield lab.start()
    finally:
        lab.close()


def lab_blackout(window_start: dt.datetime) -> str:
    seconds = f"{window_start:%S}" if window_start.second else ""  # the lab's start to the second
    return f"slim-{POOL}-{window_start:%Y%m%dT%H%M}{seconds}"


def until(when: dt.datetime) -> float:
    return (when - dt.datetime.now(dt.UTC)).total_seconds()


def running_on_desktops(lab: HarvestLab) -> str:
    return lab.slurm("squeue", "-h", "-t", "R,CG", "-w", ",".join(DESKTOPS), "-o", "%i %N").stdout.strip()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_window_of_a_desktop_pool_through_slurm(lab: HarvestLab) -> None:
    # before the window: the desktops are in their own OS, powered down as Slurm sees them,
    # and a blackout reservation keeps jobs off them until the window opens
    lab.wait(
        "the desktops powered down (idle~) before the window",
        lambda: all(
            lab.node(d)["State"].startswith("IDLE+") and "POWERED_DOWN" in lab.node(d)["State"]
            for d in DESKTOPS
        ),
        max(20.0, until(lab.window_start) - 5),
    )
    reservations = lab.reservations()
    assert f"ReservationName={lab_blackout(lab.window_start)}" in reservations, reservations
    assert "Flags=MAINT,IGNORE_JOBS" in reservations
    assert not any(lab.slurmd_running(d) for d in DESKTOPS)

    # the window opens: a job submitted now runs on the three desktops, in the pool's EE
    lab.wait("the window's start", lambda: until(lab.window_start) <= 0, until(lab.window_start) + 5, 0.2)
    roots = lab.roots
    script = f"srun sh -c 'echo $SLURMD_NODENAME $(cat {roots}/$SLURMD_NODENAME/opt/jdk14/release)'"
    fits = lab.sbatch("-p", "harvest", "-N3", "-t", "1", "--wrap", script)
    info = lab.wait_job(fits, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 110)
    # one whose time limit (and Slurm's BootTime) runs past end - grace, the blackout, is not
    # started on them
    assert (lab.window_end - lab.window_start).total_seconds() - GRACE < 2 * 60 + BOOT_TIME
    too_long = lab.sbatch("-p", "harvest", "-N1", "-t", "2", "--wrap", "true")
    assert info["JobState"] == "COMPLETED", (info, lab.describe())
    out = (lab.tmp / f"job-{fits}.out").read_text()
    assert sorted(re.findall(r"^(d\d) JAVA_VERSION=\"14.0.2\"$", out, re.M)) == list(DESKTOPS), out
    status = lab.harvest_status()
    assert all(status[d][0] in ("idle", "job") for d in DESKTOPS), status
    lab.wait("the scheduler's verdict", lambda: lab.job(too_long)["Reason"] != "None", 30)
    waiting = lab.job(too_long)
    assert waiting["JobState"] == "PENDING" and "ReqNodeNotAvail" in waiting["Reason"], waiting

    # d3's owner restarts it and picks their own OS at the menu: drained, with the core's reason
    lab.owner_picks_own_os("d3")
    lab.wait(
        "d3 drained with SLIM's reason",
        lambda: "DRAIN" in lab.node("d3")["State"] and lab.node("d3")["Reason"].startswith("slim: its owner"),
        30,
    )
    assert lab.harvest_status()["d3"][0] == "opted-out"

    # the window's end: nothing runs on the desktops, each is back in its own OS
    lab.wait("the window's end", lambda: until(lab.window_end) <= 0, until(lab.window_end) + 5)
    lab.wait(
        "every desktop back in its own OS",
        lambda: (
            not any(lab.slurmd_running(d) for d in DESKTOPS)
            and {d: s for d, (s, _) in lab.harvest_status().items()}
            == {"d1": "own-os", "d2": "own-os", "d3": "own-os"}  # d3: Slurm keeps it drained
        ),
        60,
    )
    assert running_on_desktops(lab) == ""
    assert lab.job(too_long)["JobState"] == "PENDING"
    d3 = lab.node("d3")
    assert "DRAIN" in d3["State"] and d3["Reason"].startswith("slim: its owner picked their own OS"), d3
    for d in ("d1", "d2"):
        lab.wait(f"{d} powered down", lambda d=d: "POWERED_DOWN" in lab.node(d)["State"], 30)
    # the next blackout runs from end - grace to tomorrow's window
    tomorrow = lab.window_start + dt.timedelta(days=1)
    line = next(
        (x for x in lab.reservations().splitlines()
         if lab_blackout(tomorrow) in x),
        "",
    )  # fmt: skip
    blackout = lab.window_end - dt.timedelta(seconds=GRACE)
    assert (
        f"StartTime={blackout:%Y-%m-%dT%H:%M:%S}" in line and f"EndTime={tomorrow:%Y-%m-%dT%H:%M:%S}" in line
    ), line


# -- the planner, without Slurm ------------------------------------------------------------------
T0 = dt.datetime(2026, 12, 8, 20, 0, tzinfo=dt.UTC).timestamp()  # a window 20:00-07:00 UTC
HOUR = 3600.0


def pool(now: float, states: dict[str, str] | None = None, policy: str = "requeue") -> Pool:
    windows = tuple(Window(T0 + d * 24 * HOUR, T0 + d * 24 * HOUR + 11 * HOUR) for d in range(-1, 4))
    upcoming = tuple(w for w in windows if w.end > now)
    current = upcoming[0]
    desktops = {d: ((states or {}).get(d, "own-os"), "its owner picked" if (states or {}).get(d) else "")
                for d in DESKTOPS}  # fmt: skip
    return Pool("night", "harvest", current.start <= now, current, upcoming, 900.0, policy, "UTC", desktops)


def slurm(nodes: dict[str, str], reservations: dict[str, Reservation] | None = None) -> SlurmState:
    text = "\n".join(f"NodeName={n} Arch=x State={s}" for n, s in nodes.items())
    return SlurmState(parse_nodes(text), reservations or {}, frozenset(), {"harvest": 2 * HOUR})


def commands(p: Plan) -> list[str]:
    return [" ".join(a.argv) for a in p.actions if a.argv[0] == "update" and "NodeName" in a.argv[1]]


ALL = "NodeName=d1,d2,d3"


def test_the_planner_keeps_blackouts_between_windows() -> None:
    now = T0 - HOUR  # 19:00, before the window
    p = plan([pool(now)], slurm(dict.fromkeys(DESKTOPS, "IDLE+POWERED_DOWN")), now, {})
    created = [a.argv for a in p.actions if a.argv[0] == "create"]
    # the gap before tonight's window (from now), and the one after it (07:00 - grace to 20:00)
    assert [c[2] for c in created] == [
        "ReservationName=slim-night-20261208T2000",
        "ReservationName=slim-night-20261209T2000",
    ]
    assert created[0][5:7] == ("StartTime=2026-12-08T19:00:00", "EndTime=2026-12-08T20:00:00")
    assert created[1][5:7] == ("StartTime=2026-12-09T06:45:00", "EndTime=2026-12-09T20:00:00")
    assert all(
        "Flags=MAINT,IGNORE_JOBS" in c and "Users=root" in c and "Nodes=d1,d2,d3" in c for c in created
    )
    # named by the window's local start; to the second only where it has seconds
    assert blackout_name(pool(now), T0 + 30) == "slim-night-20261208T200030"
    # existing and right: nothing to do; an active one's start is never moved
    have = {
        "slim-night-20261208T2000": Reservation("slim-night-20261208T2000", now - 60, T0, DESKTOPS),
        "slim-night-20261209T2000": Reservation(
            "slim-night-20261209T2000", T0 + 10.75 * HOUR, T0 + 24 * HOUR, DESKTOPS
        ),
        "slim-night-20261201T2000": Reservation(
            "slim-night-20261201T2000", now + 60, T0 + 99 * HOUR, DESKTOPS
        ),
        "slim-gone-20261201T2000": Reservation("slim-gone-20261201T2000", now + 60, T0 + 99 * HOUR, DESKTOPS),
        "slim-night-20261201T200030": Reservation(  # a window that started at 20:00:30, since moved
            "slim-night-20261201T200030", now + 60, T0 + 99 * HOUR, DESKTOPS
        ),
    }
    p = plan([pool(now)], slurm(dict.fromkeys(DESKTOPS, "IDLE+POWERED_DOWN"), have), now, {})
    assert sorted(" ".join(a.argv) for a in p.actions) == [
        "delete ReservationName=slim-gone-20261201T2000", "delete ReservationName=slim-night-20261201T2000",
        "delete ReservationName=slim-night-20261201T200030",
    ]  # fmt: skip


def test_the_planner_at_the_windows_edges() -> None:
    off = dict.fromkeys(DESKTOPS, "IDLE+POWERED_DOWN")
    # never registered (their own OS since slurmctld started): DOWN, power down, then RESUME
    p = plan([pool(T0 - HOUR)], slurm(dict.fromkeys(DESKTOPS, "UNKNOWN*")), T0 - HOUR, {})
    assert commands(p) == [
        f"update {ALL} State=DOWN Reason=slim: in its own OS",
        f"update {ALL} State=POWER_DOWN_FORCE",
    ]
    down = dict.fromkeys(DESKTOPS, "DOWN+POWERED_DOWN")
    p = plan([pool(T0 - HOUR)], replace_reason(slurm(down), "slim: in its own OS"), T0 - HOUR, {})
    assert commands(p) == [f"update {ALL} State=RESUME"]
    # the window opens: POWER_UP once (Slurm may send idle ones back; it wakes them itself)
    p = plan([pool(T0 + 1)], slurm(off), T0 + 1, {})
    assert commands(p) == [f"update {ALL} State=POWER_UP"] and p.woke == {"night": T0}
    assert commands(plan([pool(T0 + 60)], slurm(off), T0 + 60, p.woke)) == []
    # an owner picked their own OS: powered down (its jobs requeued), then drained until the next window
    up = {**dict.fromkeys(DESKTOPS, "IDLE"), "d3": "ALLOCATED"}
    p = plan([pool(T0 + 60, {"d3": "opted-out"})], slurm(up), T0 + 60, {"night": T0})
    assert commands(p) == [
        "update NodeName=d3 State=POWER_DOWN_FORCE",
        "update NodeName=d3 State=DRAIN Reason=slim: its owner picked",
    ]
    # end - grace: requeue powers all down now; finish lets jobs end (ASAP)
    ending = T0 + 11 * HOUR - 600
    assert commands(plan([pool(ending)], slurm(dict.fromkeys(DESKTOPS, "IDLE")), ending, {"night": T0})) == [
        f"update {ALL} State=POWER_DOWN_FORCE"
    ]
    p = plan([pool(ending, policy="finish")], slurm(dict.fromkeys(DESKTOPS, "MIXED")), ending, {"night": T0})
    assert commands(p) == [f"update {ALL} State=POWER_DOWN_ASAP"]
    # after the end, anything still up goes (finish: its job is requeued now)
    after = T0 + 11 * HOUR + 1
    p = plan([pool(after, policy="finish")], slurm({**off, "d2": "MIXED+DRAIN"}), after, {"night": T0})
    assert commands(p) == ["update NodeName=d2 State=POWER_DOWN_FORCE"]


def replace_reason(state: SlurmState, reason: str) -> SlurmState:
    return dataclasses.replace(
        state, nodes={n: dataclasses.replace(v, reason=reason) for n, v in state.nodes.items()}
    )


def test_reading_slurm() -> None:
    assert expand_hostlist("d[1-3,05],n7,x[08-10]y") == [
        "d1",
        "d2",
        "d3",
        "d05",
        "n7",
        "x08y",
        "x09y",
        "x10y",
    ]
    line = (
        "NodeName=d1 Arch=x86_64 State=IDLE+DRAIN+POWERED_DOWN Partitions=harvest "
        "Reason=slim: its owner picked their own OS [root@2026-12-04T22:20:40]"
    )
    node = parse_nodes(line)["d1"]
    assert (node.base, node.reason, node.ours) == ("IDLE", "slim: its owner picked their own OS", True)
    assert {"DRAIN", "POWERED_DOWN"} <= node.flags and node.off
    res = parse_reservations(
        "ReservationName=slim-night-20261205T2231 StartTime=2026-12-04T22:33:00 EndTime=2026-12-05T22:31:00 "
        "Duration=23:58:00 Nodes=d[1-3] NodeCnt=3 Flags=MAINT,IGNORE_JOBS,SPEC_NODES State=INACTIVE"
        + "\nReservationName=theirs StartTime=2026-12-04T22:33:00 EndTime=2026-12-05T22:31:00 "
        "Nodes=r[1-2]n[1-4] NodeCnt=8 Flags=MAINT"  # another's, any host list syntax: not ours
    )["slim-night-20261205T2231"]
    assert res.nodes == DESKTOPS and res.end - res.start == 23 * HOUR + 58 * 60
    assert [
        parse_duration(t) for t in ("00:10:00", "1-00:00:00", "UNLIMITED", "5", "5:30", "2-12", "2-12:30")
    ] == [
        600,
        86400,
        None,
        300,
        330,
        2 * 86400 + 12 * 3600,
        2 * 86400 + 12 * 3600 + 30 * 60,
    ]
