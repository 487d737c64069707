"""The boot-storm simulator (slim.simulate) and `slim simulate`: sharing, relays, planning, input errors."""

from __future__ import annotations

import itertools
import json
import math
import random
from bisect import bisect_left
from dataclasses import replace
from pathlib import Path
from typing import Literal

import pytest
from click.testing import CliRunner

from slim.cli import main
from slim.errors import InvalidArgument
from slim.simulate import (
    PAPER,
    Cohort,
    Directory,
    Topology,
    Workload,
    lower_bound,
    plan_relays,
    simulate,
    topology_from_dict,
    workload_from_dict,
)
from slim.simulate_night import (
    MIXES,
    POLL_S,
    Allocation,
    Night,
    NightResult,
    _jobs,
    mix_from_dict,
    simulate_night,
)
from slim.vocabulary import parse_duration, parse_rate, parse_size

MB = 1e6
# a workload with nothing but network: 10 MB of boot files and a 30 MB archive, no CPU
NET_ONLY = Workload(
    boot_bytes=10 * MB,
    directories=(Directory("/", "ram", archive_bytes=30 * MB), Directory("/usr", "nfs")),
    start_cpu=0.0,
    plan_cpu=0.0,
)
LAN = Topology(nodes=1, rtt=0.0, efficiency=1.0)


def test_one_node_takes_its_bytes_over_its_link() -> None:
    r = simulate(LAN, NET_ONLY)
    assert r.makespan == pytest.approx(40 * MB * 8 / 100e6)  # 3.2 s at 100 Mb/s
    assert r.lower_bound == pytest.approx(r.makespan)
    assert r.lower_bound_by == "node links"
    assert [s.stage for s in r.cohorts[0].stages] == ["kernel+initrd", "ram:/"]


def test_efficiency_is_the_payload_share_of_the_line_rate() -> None:
    r = simulate(replace(LAN, efficiency=0.5), NET_ONLY)
    assert r.makespan == pytest.approx(2 * 40 * MB * 8 / 100e6)


def test_nodes_share_the_server_link_fairly() -> None:
    # 100 nodes x 40 MB through 1 Gb/s: 32 s; each node's own link alone would take 3.2 s
    r = simulate(replace(LAN, nodes=100), NET_ONLY)
    assert r.makespan == pytest.approx(100 * 40 * MB * 8 / 1e9, rel=1e-6)
    assert r.lower_bound_by == "server link"
    assert r.bottleneck == "server link"
    assert r.median == pytest.approx(r.makespan)  # fair: everyone ends together


def test_cohorts_are_the_same_as_single_nodes() -> None:
    """Nodes of one switch are simulated as one cohort; one node per switch must agree."""
    w = replace(NET_ONLY, start_cpu=0.5)
    grouped = simulate(replace(LAN, nodes=48, per_switch=24, switch_uplink=1e12), w)
    single = simulate(replace(LAN, nodes=48, per_switch=1, switch_uplink=1e12), w)
    assert len(single.cohorts) == 48 and len(grouped.cohorts) == 2
    assert grouped.makespan == pytest.approx(single.makespan, rel=1e-6)


def test_streaming_is_the_slower_of_network_and_cpu_not_the_sum() -> None:
    slow_cpu = Workload(
        0.0, (Directory("/", "ram", archive_bytes=10 * MB, cpu=5.0),), start_cpu=0, plan_cpu=0
    )
    r = simulate(LAN, slow_cpu)
    assert r.makespan == pytest.approx(5.0)  # the network alone: 0.8 s
    assert r.bottleneck == "node CPU"
    fast_cpu = replace(slow_cpu, directories=(Directory("/", "ram", archive_bytes=10 * MB, cpu=0.1),))
    assert simulate(LAN, fast_cpu).makespan == pytest.approx(0.8)


def test_a_shared_cpu_pool_is_divided_among_the_nodes() -> None:
    w = Workload(0.0, (), start_cpu=1.0, plan_cpu=0.0)
    assert simulate(replace(LAN, nodes=8, node_cpu=2), w).makespan == pytest.approx(4.0)
    assert simulate(replace(LAN, nodes=8), w).makespan == pytest.approx(1.0)  # dedicated
    assert simulate(replace(LAN, nodes=1, node_cpu=2), w).makespan == pytest.approx(1.0)  # one core each


def test_round_trips_count_for_copy_if_needed_changes() -> None:
    w = Workload(0.0, (Directory("/", "sync", changed_files=1000, changed_bytes=0),), start_cpu=0, plan_cpu=0)
    r = simulate(replace(LAN, rtt=0.04), w)
    # plan and done, then one round trip per changed file, 4 at a time (the agent's connections)
    assert r.makespan == pytest.approx(0.04 * 2 + 250 * 0.04)
    one = simulate(replace(LAN, rtt=0.04), replace(w, parallel_fetches=1))
    assert one.makespan == pytest.approx(0.04 * 2 + 1000 * 0.04)


def test_relays_at_the_core_divide_the_server_load() -> None:
    t = replace(PAPER, rtt=0.0, efficiency=1.0)
    alone = simulate(t, NET_ONLY)
    two = simulate(replace(t, relays=2), NET_ONLY)
    assert alone.bottleneck == "server link" and two.bottleneck == "relay links"
    assert two.makespan == pytest.approx(alone.makespan / 2, rel=0.01)
    assert lower_bound(replace(t, relays=2), NET_ONLY)[1] == "relay links"


def test_edge_relays_keep_traffic_off_the_uplinks_they_serve() -> None:
    t = replace(PAPER, nodes=48, rtt=0.0, efficiency=1.0, relay_link=100e6)
    edge = simulate(replace(t, relays=2, placement="edge"), NET_ONLY)
    # each relay serves its own switch's 24 nodes over its 100 Mb/s link: 24 x 40 MB / 12.5 MB/s
    assert edge.makespan == pytest.approx(24 * 40 * MB * 8 / 100e6, rel=1e-6)
    assert edge.busiest()["switch uplinks"] == 0.0


def test_plan_finds_the_fewest_relays_that_meet_the_target() -> None:
    t = replace(PAPER, nodes=2000, rtt=0.0)
    (best,) = plan_relays(t, NET_ONLY, 120.0, placements=("core",))
    assert best.makespan <= 120.0
    fewer = simulate(replace(t, relays=best.topology.relays - 1), NET_ONLY)
    assert fewer.makespan > 120.0
    (hopeless,) = plan_relays(t, NET_ONLY, 1.0, placements=("core",), max_relays=4)
    assert hopeless.makespan > 1.0 and hopeless.topology.relays == 4  # the best it could do


@pytest.mark.parametrize(
    "topology",
    [
        *(replace(PAPER, nodes=n) for n in (1, 7, 24, 272, 1000)),
        replace(PAPER, relays=3),
        replace(PAPER, relays=11, placement="edge", relay_link=10e9),  # the last switch is part-full
        Topology(nodes=10_000, relays=14, placement="edge", server_link=10e9, relay_link=10e9),
    ],
)
def test_never_below_the_lower_bound_and_close_when_bandwidth_bound(topology: Topology) -> None:
    r = simulate(topology, NET_ONLY)
    assert r.makespan >= r.lower_bound * (1 - 1e-9)
    # nothing but bytes: the storm is as long as the busiest link makes it, within the
    # slack of links that are shared unevenly over time
    assert r.makespan <= r.lower_bound * 1.5, (r.makespan, r.lower_bound, r.lower_bound_by)
    assert simulate(topology, replace(NET_ONLY, start_cpu=0.3)).makespan >= r.lower_bound


def test_edge_relays_bound_names_the_uplink_they_share() -> None:
    t = Topology(nodes=10_000, relays=14, placement="edge", server_link=10e9, relay_link=10e9)
    bound, by = lower_bound(t, NET_ONLY)
    assert by == "switch uplinks"  # each relay's own switch uplink carries the switches it serves
    r = simulate(t, NET_ONLY)
    assert r.bottleneck == "switch uplinks" and bound <= r.makespan <= bound * 1.5


def test_a_nodes_download_uses_at_most_one_core() -> None:
    w = Workload(1e6, (), start_cpu=0, plan_cpu=0, fetch_cpu_per_byte=1e-6)  # 1 s of CPU
    fast = Topology(nodes=1, node_link=1e12, rtt=0.0, efficiency=1.0, node_cpu=8)
    assert simulate(fast, w).makespan == pytest.approx(1.0, rel=1e-3)


def test_plan_says_when_no_relay_is_needed() -> None:
    (alone,) = plan_relays(replace(PAPER, nodes=24), NET_ONLY, 300.0)
    assert alone.topology.relays == 0 and alone.makespan <= 300.0


def test_units() -> None:
    assert parse_rate("100Mbit") == 100e6 and parse_rate("3mbit") == 3e6 and parse_rate(1e9) == 1e9
    assert parse_size("28.5MB") == 28.5e6 and parse_size("1MiB") == 1 << 20
    assert parse_duration("5min") == 300 and parse_duration("250ms") == 0.25
    for bad in ("fast", "-3Mbit", "0bit"):
        with pytest.raises(InvalidArgument, match="rate"):
            parse_rate(bad)
    with pytest.raises(InvalidArgument, match="duration"):
        parse_duration("soon")
    for bad_number in ("1.2.3", "."):
        with pytest.raises(InvalidArgument):
            parse_rate(bad_number + "Mbit")
        with pytest.raises(InvalidArgument):
            parse_duration(bad_number + "ms")
    assert parse_duration("0ms", zero=True) == 0 and parse_duration(".5s") == 0.5
    with pytest.raises(InvalidArgument, match="positive"):
        parse_duration("0s")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nodes": 10, "node_speed": "1Gbit"}, "unknown field.*node_speed"),
        ({"per_switch": 24}, "needs nodes"),
        ({"nodes": 10, "node_link": "fast"}, "node_link: rate 'fast'"),
        ({"nodes": 48, "relays": 3, "placement": "edge"}, "3 relays on edge switches, but there are only 2"),
        ({"nodes": 10, "placement": "roof"}, "placement must be core or edge"),
        ({"nodes": "ten"}, "nodes: must be a whole number"),
        ({"nodes": 10, "node_cpu": "lots"}, "node_cpu"),
    ],
)
def test_topology_errors_name_the_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        topology_from_dict(data, "t.yaml")


def test_workload_errors_name_the_field() -> None:
    with pytest.raises(InvalidArgument, match=r"w.json: directories\[0\].policy"):
        workload_from_dict({"boot_bytes": 1, "directories": [{"path": "/", "policy": "tape"}]}, "w.json")
    with pytest.raises(InvalidArgument, match=r"w.json: directories\[0\]: cpu must be a number, not 'x'"):
        workload_from_dict(
            {"boot_bytes": 1, "directories": [{"path": "/", "policy": "ram", "cpu": "x"}]}, "w.json"
        )
    with pytest.raises(InvalidArgument, match=r"w.json: start_cpu must not be negative"):
        workload_from_dict({"boot_bytes": 1, "directories": [], "start_cpu": -1}, "w.json")
    with pytest.raises(InvalidArgument, match=r"unknown field.*speed"):
        workload_from_dict({"boot_bytes": 1, "directories": [], "speed": 3}, "w.json")
    w = workload_from_dict(
        {
            "boot_bytes": "15MB",
            "directories": [{"path": "/", "policy": "ram", "archive_bytes": "28.5MB", "cpu": 2}],
        }
    )
    assert w.bytes_per_node() == pytest.approx(43.5e6)


def test_cli_storm_and_plan(tmp_path: Path) -> None:
    runner = CliRunner()
    got = runner.invoke(main, ["simulate", "storm", "--json"])
    assert got.exit_code == 0, got.output
    paper = json.loads(got.output)
    assert paper["nodes"] == 272 and paper["bottleneck"] == "server link"
    assert paper["makespan_s"] >= paper["lower_bound_s"] > 0
    got = runner.invoke(
        main, ["simulate", "storm", "--json", "--relays", "4", "--timeline", str(tmp_path / "t.json")]
    )
    relayed = json.loads(got.output)
    assert relayed["makespan_s"] < paper["makespan_s"] / 3
    timeline = json.loads((tmp_path / "t.json").read_text())
    assert sum(c["nodes"] for c in timeline) == 272 and timeline[0]["stages"][0]["stage"] == "kernel+initrd"
    got = runner.invoke(main, ["simulate", "plan", "--nodes", "10000", "--target", "5min", "--json"])
    assert got.exit_code == 0, got.output
    plan = json.loads(got.output)
    assert plan["server_alone_s"] > 300 and all(o["meets_target"] for o in plan["options"])
    assert {o["placement"] for o in plan["options"]} == {"core", "edge"}
    # a topology file, overridden by an option; a workload file
    (tmp_path / "site.yaml").write_text("nodes: 100\nper_switch: 50\nnode_link: 1Gbit\nserver_link: 10Gbit\n")
    (tmp_path / "w.json").write_text(json.dumps({"boot_bytes": "10MB", "directories": []}))
    got = runner.invoke(
        main,
        [
            "simulate",
            "storm",
            "--json",
            "--topology",
            str(tmp_path / "site.yaml"),
            "--nodes",
            "200",
            "--workload",
            str(tmp_path / "w.json"),
            "--rtt",
            "0",
        ],
    )
    assert got.exit_code == 0, got.output
    site = json.loads(got.output)
    assert site["nodes"] == 200 and site["bytes_per_node"] == 10_000_000


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    got = runner.invoke(main, ["simulate", "storm", "--node-link", "fast"])
    assert got.exit_code == 1 and "node_link: rate 'fast'" in got.output
    got = runner.invoke(main, ["simulate", "storm", "--workload", "nosuch"])
    assert got.exit_code == 1 and "not one of table2-full, table2-unchanged" in got.output
    got = runner.invoke(main, ["simulate", "plan", "--target", "soon"])
    assert got.exit_code == 1 and "duration 'soon'" in got.output
    got = runner.invoke(main, ["simulate", "storm", "--rtt", "1.2.3"])
    assert got.exit_code == 1 and "rtt: duration '1.2.3'" in got.output
    assert runner.invoke(main, ["simulate", "storm", "--rtt", "0ms"]).exit_code == 0
    (tmp_path / "broken.json").write_text("{not json")
    got = runner.invoke(main, ["simulate", "storm", "--workload", str(tmp_path / "broken.json")])
    assert got.exit_code == 1 and "broken.json: not a JSON file" in got.output


# -- staggered storms and `slim simulate night` ----------------------------------------------


def test_staggered_cohorts_share_only_while_they_overlap() -> None:
    t = replace(LAN, nodes=2, per_switch=2, server_link=100e6)
    together = simulate(t, NET_ONLY, [Cohort(0, 1, 0.0), Cohort(0, 1, 0.0)])
    assert [c.finished for c in together.cohorts] == pytest.approx([6.4, 6.4])  # one 100 Mb/s server
    apart = simulate(t, NET_ONLY, [Cohort(0, 1, 0.0), Cohort(0, 1, 10.0)])
    assert [c.finished for c in apart.cohorts] == pytest.approx([3.2, 13.2])
    assert apart.cohorts[1].stages[0].stage == "waiting"
    with pytest.raises(InvalidArgument, match="more than its 2 nodes"):
        simulate(t, NET_ONLY, [Cohort(0, 2, 0.0), Cohort(0, 1, 5.0)])
    with pytest.raises(InvalidArgument, match="switch 3"):
        simulate(t, NET_ONLY, [Cohort(3, 1, 0.0)])


SMALL = Night(desktops=60, relays=2, wakes_per_minute=6, seed=3)


def _allocations_by_desktop(r: NightResult) -> dict[int, list[Allocation]]:
    out: dict[int, list[Allocation]] = {}
    for a in r.allocations:
        out.setdefault(a.desktop, []).append(a)
    return out


@pytest.mark.parametrize("night", [SMALL, replace(SMALL, relays=3, wakes_per_minute=25), Night()])
def test_each_relay_sends_at_most_its_rate(night: Night) -> None:
    r = simulate_night(night, MIXES["night"])
    for relay in range(night.relays):
        wakes = sorted(d.wake for d in r.desktops if d.relay == relay)
        assert wakes and wakes[0] == 0.0
        # no 60 s span holds more packets than the rate
        for i, w in enumerate(wakes):
            assert bisect_left(wakes, w + 60.0) - i <= night.wakes_per_minute
    s = r.summary()
    assert s["wake"]["wakes_per_minute_total"] == night.wakes_per_minute * night.relays
    assert sum(s["wake"]["desktops_per_relay"]) == night.desktops
    assert {d.relay for d in r.desktops} == set(range(night.relays))
    # a desktop is up its firmware, menu, EE build and EE start after its packet
    for d in r.desktops:
        if d.up < math.inf:
            fixed = night.firmware + night.menu_timeout + night.ee_start
            assert d.up == pytest.approx(d.wake + fixed + d.build)
            assert d.build > 0


def test_a_slower_wake_rate_brings_the_desktops_up_later() -> None:
    fast = simulate_night(replace(SMALL, wakes_per_minute=60), MIXES["night"]).summary()
    slow = simulate_night(replace(SMALL, wakes_per_minute=2), MIXES["night"]).summary()
    # 30 desktops a relay, one packet every 30 s: the last about 14.5 min after the start
    assert slow["wake"]["last_packet_s"] == pytest.approx(29 * 30.0)
    assert slow["times"]["all_up_s"] > slow["wake"]["last_packet_s"] > fast["times"]["all_up_s"]


@pytest.mark.parametrize("on_end", ["requeue", "finish"])
def test_jobs_fit_the_window_and_the_ee_holds_every_job(on_end: Literal["requeue", "finish"]) -> None:
    night = replace(Night(), on_window_end=on_end)
    r = simulate_night(night, MIXES["night"])
    drain = r.length - night.grace
    assert r.allocations
    by_desktop = _allocations_by_desktop(r)
    for j, allocs in by_desktop.items():
        d = r.desktops[j]
        assert not d.in_use
        allocs.sort(key=lambda a: a.start)
        for a, b in itertools.pairwise(allocs):
            assert a.end <= b.start  # one job at a time on a desktop
        for a in allocs:
            assert d.up <= a.start and a.end <= d.ee_end
            assert a.start + r.limits[a.job] <= drain  # the reservation rule: the limit ends in time
            assert a.end - a.start <= r.limits[a.job] + 1e-6
    assert max(a.end for a in r.allocations) <= drain
    ee, jobs = r.node_hours_ee(), r.node_hours_jobs()
    assert 0 < jobs <= ee <= r.summary()["node_hours"]["window_capacity"]
    # every desktop in the EE went back by the end (and its EE's next poll)
    assert all(d.ee_end <= r.length + POLL_S for d in r.desktops if d.up < math.inf)
    s = r.summary()
    assert s["jobs"]["never_started_limit_too_long"] == 500  # the 12 h jobs: 10 % of 5,000
    assert s["jobs"]["completed"] + s["jobs"]["never_started"] + s["jobs"]["started_not_completed"] == 5000


def test_in_use_desktops_never_boot_never_count() -> None:
    night = replace(SMALL, in_use=0.25)
    r = simulate_night(night, MIXES["night"])
    in_use = [j for j, d in enumerate(r.desktops) if d.in_use]
    assert len(in_use) == 15
    assert all(r.desktops[j].up == math.inf for j in in_use)
    assert not set(in_use) & {a.desktop for a in r.allocations}
    s = r.summary()
    assert s["desktops"]["harvestable"] == 45
    assert s["wake"]["in_use_given_up_s"] == max(r.desktops[j].wake for j in in_use) + night.wake_timeout
    # the in-use desktops still take their turn in the relays' queues
    assert s["wake"]["last_packet_s"] == pytest.approx(29 * 10.0)
    nobody = simulate_night(replace(SMALL, in_use=1.0), MIXES["night"]).summary()
    assert nobody["node_hours"]["ee"]["value"] == 0 and nobody["times"]["first_job_s"] is None


def test_owners_coming_back_take_their_desktop_and_requeue_its_job() -> None:
    calm = simulate_night(replace(Night(), opt_out_per_hour=0.0), MIXES["night"]).summary()
    assert calm["jobs"]["requeues"] == 0 and calm["node_hours"]["requeued_work"] == 0
    r = simulate_night(replace(SMALL, opt_out_per_hour=0.2), MIXES["night"])
    out = [j for j, d in enumerate(r.desktops) if d.state == "out" and d.up < math.inf]
    assert out
    by_desktop = _allocations_by_desktop(r)
    for j in out:
        d = r.desktops[j]
        assert d.ee_end == pytest.approx(d.opt_out)
        assert all(a.end <= d.opt_out for a in by_desktop.get(j, []))
    requeued = [a for a in r.allocations if a.outcome == "requeued"]
    assert requeued and all(r.desktops[a.desktop].state == "out" for a in requeued)
    s = r.summary()
    assert s["jobs"]["requeues"] == len(requeued)
    assert s["desktops"]["owner_back_in_ee"] == len(out)


def test_without_the_reservation_jobs_run_into_the_blackout_and_are_requeued() -> None:
    night = replace(Night(), reservation=False, opt_out_per_hour=0.0)
    r = simulate_night(night, MIXES["night"])
    drain = r.length - night.grace
    requeued = [a for a in r.allocations if a.outcome == "requeued"]
    assert requeued and all(a.end >= drain for a in requeued)
    assert r.node_hours_requeued() > 0
    assert all(d.ee_end <= drain + POLL_S for d in r.desktops if d.up < math.inf)  # requeue: all go back
    finish = simulate_night(replace(night, on_window_end="finish"), MIXES["night"])
    assert max(a.end for a in finish.allocations) > drain  # busy desktops stay until the end
    assert all(a.end <= finish.length + POLL_S for a in finish.allocations)


def test_a_seed_gives_the_same_night() -> None:
    one = simulate_night(replace(Night(), seed=7), MIXES["night"]).summary()
    assert simulate_night(replace(Night(), seed=7), MIXES["night"]).summary() == one
    other = simulate_night(replace(Night(), seed=8), MIXES["night"]).summary()
    assert other != one


def test_the_window_follows_the_pools_clock() -> None:
    spring = Night(time_zone="Europe/Paris", date="2026-03-28")  # clocks go forward that night
    r = simulate_night(replace(spring, desktops=10, relays=1), MIXES["short"])
    assert r.length == 10 * 3600
    assert r.window_start.isoformat() == "2026-03-28T20:00:00+01:00"
    with pytest.raises(InvalidArgument, match="HH:MM-HH:MM"):
        Night(window="8pm-7am")
    with pytest.raises(InvalidArgument, match="time_zone"):
        Night(time_zone="Mars/Olympus")
    with pytest.raises(InvalidArgument, match="relays"):
        Night(desktops=3, relays=4)


def test_job_mix_files() -> None:
    mix = mix_from_dict(
        {"jobs": 10, "classes": [{"limit": "2h", "share": 3}, {"limit": "30min", "share": 1}]}, "m.yaml"
    )
    assert mix.classes[0].limit == 7200 and mix.run_fraction == (0.3, 1.0)
    limits, runs = _jobs(mix, random.Random(0))
    assert sorted(limits).count(7200) == 8 and len(limits) == 10  # 7.5 rounds up, 2.5 down
    assert all(0.3 * lim <= run <= lim for lim, run in zip(limits, runs, strict=True))
    for bad, message in [
        ({"jobs": 1, "classes": [{"limit": "soon", "share": 1}]}, r"m.yaml: classes\[0\]: limit 'soon'"),
        ({"jobs": "many", "classes": []}, "jobs must be a whole number"),
        ({"jobs": 1, "classes": [{"limit": "1h"}]}, "needs limit and share"),
        ({"jobs": 1, "classes": [{"limit": "1h", "share": 1}], "run_fraction": [0.9, 0.1]}, "run_fraction"),
        ({"jobs": 1, "classes": [{"limit": "1h", "share": 1}], "queue": 3}, "unknown field"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            mix_from_dict(bad, "m.yaml")


def test_cli_night(tmp_path: Path) -> None:
    runner = CliRunner()
    got = runner.invoke(main, ["simulate", "night", "--json", "--seed", "2"])
    assert got.exit_code == 0, got.output
    s = json.loads(got.output)
    assert s["desktops"]["total"] == 500 and s["desktops"]["in_use"] == 100
    assert s["node_hours"]["ee"]["source"] and s["node_hours"]["jobs"]["source"]
    assert 0 < s["node_hours"]["jobs"]["value"] <= s["node_hours"]["ee"]["value"]
    assert s["times"]["first_job_s"] <= s["times"]["all_up_s"] < 3600
    (tmp_path / "mix.yaml").write_text("jobs: 100\nclasses:\n  - {limit: 2h, share: 1}\n")
    got = runner.invoke(
        main,
        ["simulate", "night", "--desktops", "40", "--relays", "2", "--jobs", str(tmp_path / "mix.yaml"),
         "--timeline", str(tmp_path / "t.json"), "--no-reservation", "--sched-interval", "0"],
    )  # fmt: skip
    assert got.exit_code == 0, got.output
    assert "node-hours running jobs" in got.output and "100 jobs: 100% 2 h" in got.output
    profile = json.loads((tmp_path / "t.json").read_text())
    assert profile[0]["t_s"] == 0 and max(p["jobs"] for p in profile) <= 40
    got = runner.invoke(main, ["simulate", "night", "--window", "evening"])
    assert got.exit_code == 1 and "HH:MM-HH:MM" in got.output
    got = runner.invoke(main, ["simulate", "night", "--jobs", "nosuch"])
    assert got.exit_code == 1 and "not one of night, short" in got.output
    got = runner.invoke(main, ["simulate", "night", "--grace", "soon"])
    assert got.exit_code == 1 and "grace 'soon'" in got.output
