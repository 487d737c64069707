"""The boot-storm simulator (slim.simulate) and `slim simulate`: sharing, relays, planning, input errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from slim.cli import main
from slim.errors import InvalidArgument
from slim.simulate import (
    PAPER,
    Directory,
    Topology,
    Workload,
    lower_bound,
    plan_relays,
    simulate,
    topology_from_dict,
    workload_from_dict,
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
