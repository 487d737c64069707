"""Desktop pools in the registry: validation, and windows on the pool's wall clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from labs.placeholders import publish_placeholder_releases
from slim.agent.plan import PlanError, parse_plan
from slim.core.control.bootscript import LOCAL
from slim.core.control.service import CoreService, NodeRef
from slim.core.control.state import State
from slim.core.pools import next_opening, opening_at
from slim.core.registry import load_registry_text
from slim.core.store import Store
from slim.errors import ConfigError, FailedPrecondition

REGISTRY = """\
sites:
  lab: {{prefixes: [10.3.0.0/16], nfs_server: 10.3.0.1}}
relays:
  r1: {{urls: ["http://10.3.0.1:8080/"], site: lab}}
profiles:
  pc: {{modules: [e1000]}}
environments:
  night:
    image: /srv/images/night
    default_policy: ram
    directories: {{/usr: nfs}}
  {second_env}
nodes:
  pc01: {{macs: ["52:54:00:00:03:01"], profile: pc, environment: night, groups: [room101], site: lab}}
  pc02: {{macs: ["52:54:00:00:03:02"], profile: pc, environment: night, groups: [room101], site: lab}}
pools:
  room101:
{pool}
"""
POOL = """\
    groups: [room101]
    environment: night
    partition: desktops
    time_zone: Europe/Paris
    windows:
      - {days: [weekdays], start: "20:00", end: "07:00"}
      - {days: [weekend], start: "00:00", end: "24:00"}
"""
PARIS = ZoneInfo("Europe/Paris")


def reg(pool: str = POOL, second_env: str = "") -> str:
    return REGISTRY.format(pool=pool, second_env=second_env or "plain: {image: /srv/images/plain}")


def paris(year: int, month: int, day: int, hour: int, minute: int) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, tzinfo=PARIS)


def test_a_pool_loads_and_its_windows_follow_the_wall_clock() -> None:
    pool = load_registry_text(reg()).pools["room101"]
    # Tuesday 2026-12-08 21:00: inside Tuesday's window, which ends Wednesday 07:00
    o = opening_at(pool, paris(2026, 12, 8, 21, 0))
    assert o is not None and (o.start, o.end) == (paris(2026, 12, 8, 20, 0), paris(2026, 12, 9, 7, 0))
    assert opening_at(pool, paris(2026, 12, 9, 7, 0)) is None  # closed at 07:00 sharp
    assert opening_at(pool, paris(2026, 12, 9, 12, 0)) is None
    # Friday night runs into the weekend, and the weekend into Monday 00:00... then Monday 20:00
    friday = opening_at(pool, paris(2026, 12, 11, 23, 0))
    assert friday is not None and friday.start == paris(2026, 12, 11, 20, 0)
    assert friday.end == paris(2026, 12, 14, 0, 0)  # Saturday and Sunday all day: one night
    assert next_opening(pool, paris(2026, 12, 14, 9, 0)).start == paris(2026, 12, 14, 20, 0)
    # daylight saving: on 2027-03-28 Paris skips 02:00-03:00, so Friday 20:00 to Monday 00:00
    # on the wall (52 h) is 51 h of real time
    sunday = opening_at(pool, paris(2027, 3, 28, 12, 0))
    assert sunday is not None and (sunday.start, sunday.end) == (
        paris(2027, 3, 26, 20, 0),
        paris(2027, 3, 29, 0, 0),
    )
    assert sunday.end.astimezone(dt.UTC) - sunday.start.astimezone(dt.UTC) == dt.timedelta(hours=51)
    # to the second, where a minute is too coarse (a test's windows): 20:00:30 to 20:02:00
    short = load_registry_text(
        reg(POOL.replace('start: "20:00", end: "07:00"', 'start: "20:00:30", end: "20:02"'))
    )
    half = paris(2026, 12, 8, 20, 0) + dt.timedelta(seconds=30)
    assert opening_at(short.pools["room101"], half - dt.timedelta(seconds=1)) is None
    o = opening_at(short.pools["room101"], half)
    assert o is not None and (o.start, o.end) == (half, paris(2026, 12, 8, 20, 2))


@pytest.mark.parametrize(
    ("pool", "says"),
    [
        (POOL.replace("Europe/Paris", "Mars/Olympus"), "is not a time zone"),
        (POOL.replace('"20:00"', '"8pm"'), "is not a time of day"),
        (POOL.replace('"20:00"', '"20:00:60"'), "'20:00:60' is not a time of day as HH:MM or HH:MM:SS"),
        (POOL.replace("[weekdays]", "[someday]"), "is not daily, weekdays, weekend or a day"),
        (POOL.replace("groups: [room101]", "groups: [room999]"), "no node is in group 'room999'"),
        (POOL.replace("groups: [room101]", "nodes: [pc09]"), "unknown node 'pc09'"),
        (POOL.replace("environment: night", "environment: dusk"), "unknown environment 'dusk'"),
        (POOL.replace("partition: desktops", "partition: 'a b'"), "is not a Slurm partition name"),
        (POOL.replace("    windows:\n", "    windows: []\n    old_windows:\n"), "windows"),
    ],
)
def test_bad_pools_are_named(pool: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_registry_text(reg(pool))
    assert says in str(caught.value) and "pools.room101" in str(caught.value), str(caught.value)


def test_a_harvested_desktop_never_gets_a_disk_policy() -> None:
    text = reg(POOL.replace("environment: night", "environment: plain"),
               "plain: {image: /srv/images/plain, directories: {/var: sync}}")  # fmt: skip
    with pytest.raises(ConfigError, match=r"puts /var on the node's disk \(sync\).*use ram or nfs"):
        load_registry_text(text)


def test_a_desktop_is_in_one_pool() -> None:
    two = reg(POOL) + "  other:\n" + POOL.replace("groups: [room101]", "nodes: [pc01]")
    with pytest.raises(ConfigError, match="node 'pc01' is also in pool 'room101'"):
        load_registry_text(two)


async def test_a_desktops_menu_follows_its_pools_clock(tmp_path: Path) -> None:
    """Outside its window a pooled desktop's menu boots its own OS by default; inside, the
    pool's EE with the pool's short timeout (the owner can still pick their own OS); never
    an EE that would touch its disk."""
    text = reg(POOL, "plain: {image: /srv/images/plain, directories: {/var: disk}}")
    registry = load_registry_text(text)
    store = Store(tmp_path / "store")
    publish_placeholder_releases(registry, store)
    state = await asyncio.to_thread(State, tmp_path / "state.db")
    now = [paris(2026, 12, 8, 12, 0).timestamp()]  # a Tuesday noon: the owners' time
    service = CoreService(registry, state, store, clock=lambda: now[0])
    try:
        day = service.boot_script("52:54:00:00:03:01", "10.3.0.9", peek=True)
        assert day.default_environment == LOCAL
        assert "choose --default local" in day.script or "goto local" in day.script
        assert "ee-plain" not in day.script  # a disk EE is never offered to a desktop
        now[0] = paris(2026, 12, 8, 21, 0).timestamp()  # the window
        night = service.boot_script("52:54:00:00:03:01", "10.3.0.9", peek=True)
        assert night.default_environment == "night"
        assert "choose --default ee-night --timeout 5000" in night.script
        assert "item --key l local Boot from local disk (key L)" in night.script
    finally:
        await asyncio.to_thread(state.close)


def test_a_desktops_plan_never_puts_anything_on_its_disk() -> None:
    """The agent's own check: a desktop's plan with a disk or sync directory is refused (the
    core never sends one: its boot plan refuses a disk EE for a pooled node)."""
    arch = {"digest": "sha256:" + "b" * 64, "size": 10}
    root: dict[str, object] = {"path": "/", "policy": "ram", "archive": arch}
    var: dict[str, object] = {"path": "/var", "policy": "disk", "archive": arch}

    def plan(desktop: object, *dirs: dict[str, object]) -> bytes:
        return json.dumps(
            {"node": "pc01", "environment": "e", "desktop": desktop, "directories": list(dirs)}
        ).encode()

    assert parse_plan(plan(True, root)).desktop
    assert not parse_plan(plan(False, root, var)).desktop
    with pytest.raises(PlanError, match=r"harvested desktop.*puts /var on its disk"):
        parse_plan(plan(True, root, var))
    with pytest.raises(PlanError, match="desktop must be true or false"):
        parse_plan(plan("yes", root))


async def test_the_core_never_plans_a_disk_ee_for_a_desktop(tmp_path: Path) -> None:
    text = reg(POOL, "plain: {image: /srv/images/plain, directories: {/var: disk}}")
    registry = load_registry_text(text)
    store = Store(tmp_path / "store")
    publish_placeholder_releases(registry, store)
    state = await asyncio.to_thread(State, tmp_path / "state.db")
    service = CoreService(registry, state, store)
    try:
        with pytest.raises(FailedPrecondition, match="desktop of pool 'room101': its disks are never"):
            await asyncio.to_thread(service.set_next_boot, "pc01", "plain", "test")
        assert service.boot_plan(NodeRef(name="pc01"), "10.3.0.9", peek=True).desktop
    finally:
        await asyncio.to_thread(state.close)


async def test_in_its_window_a_desktops_plan_is_its_pools_ee(tmp_path: Path) -> None:
    """The plan follows the menu's default: a desktop whose own default EE is another boots the
    pool's EE in the window (the agent builds what the menu's kernel and initrd were for)."""
    text = reg(POOL).replace("environment: night, groups", "environment: plain, groups")
    registry = load_registry_text(text)
    store = Store(tmp_path / "store")
    publish_placeholder_releases(registry, store)
    state = await asyncio.to_thread(State, tmp_path / "state.db")
    now = [paris(2026, 12, 8, 12, 0).timestamp()]
    service = CoreService(registry, state, store, clock=lambda: now[0])
    try:
        assert service.boot_plan(NodeRef(name="pc01"), "10.3.0.9", peek=True).environment == "plain"
        now[0] = paris(2026, 12, 8, 21, 0).timestamp()
        plan = service.boot_plan(NodeRef(name="pc01"), "10.3.0.9", peek=True)
        assert (plan.environment, plan.reason) == ("night", "pool room101's window")
        # its menu offers the pool's EE and its own OS, nothing else; its kernel's (slim.env) must be
        # the pool's: another's would leave an owner's PC in an EE the night does not send back
        menu = service.boot_script("52:54:00:00:03:01", "10.3.0.9", peek=True).script
        assert "item ee-night" in menu and "ee-plain" not in menu
        picked = service.boot_plan(NodeRef(name="pc01"), "10.3.0.9", peek=True, environment="night")
        assert picked.environment == "night"
        with pytest.raises(FailedPrecondition, match="harvested desktop: it boots night now, not 'plain'"):
            service.boot_plan(NodeRef(name="pc01"), "10.3.0.9", peek=True, environment="plain")
        service.desktop_out = lambda node, at: "its owner picked their own OS"  # as the harvest says
        assert service.boot_plan(NodeRef(name="pc01"), "10.3.0.9", peek=True).environment == "plain"
    finally:
        await asyncio.to_thread(state.close)
