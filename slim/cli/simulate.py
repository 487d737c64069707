"""``slim simulate``: how long a boot storm takes, and how many relays it needs
(the flow-level simulator of :mod:`slim.simulate`; guide: docs/simulate.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from rich.table import Table

from slim.cli.common import console, errors_to_exit, json_option

F = TypeVar("F", bound=Callable[..., Any])


def _topology_options(f: F) -> F:
    options = [
        click.option(
            "--topology",
            "topology_file",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            help="YAML/JSON file of topology fields (docs/simulate.md); options below override it. "
            "Default: the paper's cluster (24 nodes per 100 Mb/s switch, 1 Gb/s uplinks and server).",
        ),
        click.option(
            "--nodes", type=click.IntRange(1, 1_000_000), help="Nodes booting at once [default: 272]."
        ),
        click.option("--per-switch", type=click.IntRange(1), help="Nodes per edge switch [default: 24]."),
        click.option(
            "--node-link", metavar="RATE", help="Each node's port, e.g. 100Mbit [default: 100Mbit]."
        ),
        click.option("--switch-uplink", metavar="RATE", help="Each edge switch's uplink [default: 1Gbit]."),
        click.option("--server-link", metavar="RATE", help="The server's link [default: 1Gbit]."),
        click.option(
            "--relay-link",
            metavar="RATE",
            help="Each relay's link [default: 1Gbit]; a relay on a Fast Ethernet edge switch has 100Mbit.",
        ),
        click.option(
            "--node-cpu",
            metavar="dedicated|CORES",
            help="Each node has its own CPU (dedicated, the default), or all nodes share CORES cores "
            "(a namespace cluster on one machine).",
        ),
        click.option(
            "--rtt", metavar="DURATION", help="Round trip node to relay, e.g. 0.2ms or 40ms [default: 0.2ms]."
        ),
        click.option(
            "--boot-overhead",
            metavar="DURATION",
            help="Fixed time per node before its first request: firmware, PXE, kernel start [default: 0].",
        ),
        click.option(
            "--workload",
            default="table2-full",
            show_default=True,
            metavar="NAME|FILE",
            help="What each node fetches and unpacks: table2-full (the paper's Fedora Core 1 image, copy "
            "set to RAM), table2-unchanged (copy-if-needed, nothing changed), or a JSON/YAML file.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _build(params: dict[str, Any]) -> tuple[Any, Any]:
    """(Topology, Workload) from the command's options."""
    from slim.simulate import PAPER, topology_from_dict

    data: dict[str, Any] = dict(PAPER.__dict__)
    if params.get("topology_file") is not None:
        loaded = _load(params["topology_file"])
        data = {**data, **loaded} if isinstance(loaded, dict) else loaded
    for key in ("nodes", "per_switch", "node_link", "switch_uplink", "server_link", "relay_link", "node_cpu",
                "rtt", "boot_overhead", "relays", "placement"):  # fmt: skip
        if params.get(key) is not None:
            data[key] = params[key]
    topology = topology_from_dict(data, str(params.get("topology_file") or "topology"))
    return topology, _workload(params["workload"])


def _workload(name: str) -> Any:
    """A built-in workload by name, or one from a JSON/YAML file."""
    from slim.errors import InvalidArgument
    from slim.simulate import WORKLOADS, workload_from_dict

    if name in WORKLOADS:
        return WORKLOADS[name]
    wpath = Path(name)
    if not wpath.is_file():
        raise InvalidArgument(f"workload {name!r}: not one of {', '.join(WORKLOADS)} and not a file")
    return workload_from_dict(_load(wpath), str(wpath))


def _load(path: Path) -> Any:
    """A YAML (``.yaml``, ``.yml``) or JSON file; a syntax error names the file."""
    from slim.core.yamlsource import load_yaml_file
    from slim.errors import InvalidArgument

    if path.suffix in (".yaml", ".yml"):
        return load_yaml_file(path).data
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidArgument(f"{path}: not a JSON file ({exc}); YAML files end in .yaml") from None


def _seconds(s: float) -> str:
    return f"{s:,.1f} s" if s < 120 else f"{s:,.0f} s ({s / 60:.1f} min)"


@click.group()
def simulate() -> None:
    """Simulate boot storms: time to boot N nodes, relays needed, a night of desktops.

    A flow-level model of the network (node ports, edge switches, uplinks, the
    server and relays) and of each node's CPU, calibrated against real
    namespace-cluster storms (bench/boot_storm.py: within 15 %); `night` adds
    Wake-on-LAN, owners and Slurm's jobs around it (docs/simulate.md).
    """


@simulate.command("storm")
@_topology_options
@click.option(
    "--relays", type=click.IntRange(0), help="Relays serving the nodes (0: the server itself) [default: 0]."
)
@click.option(
    "--placement",
    type=click.Choice(["core", "edge"]),
    help="Relays beside the server (core, the default) or on edge switches.",
)
@click.option(
    "--timeline",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write each node group's stage times here (JSON).",
)
@json_option
def simulate_storm(timeline: Path | None, as_json: bool, **params: Any) -> None:
    """Boot every node at once: when all have switched root, and what held them up."""
    from slim.simulate import prefetch_time
    from slim.simulate import simulate as run

    with errors_to_exit():
        topology, workload = _build(params)
        result = run(topology, workload)
    summary = result.summary()
    summary["relay_prefetch_s"] = round(prefetch_time(topology, workload), 3)
    if timeline is not None:
        timeline.write_text(json.dumps(_timeline(result), indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(show_header=False, box=None)
    table.add_row("nodes", f"{topology.nodes:,} ({topology.switches} switches of {topology.per_switch})")
    table.add_row(
        "served by", f"{topology.relays} relays ({topology.placement})" if topology.relays else "the server"
    )
    table.add_row("bytes per node", f"{workload.bytes_per_node() / 1e6:,.1f} MB")
    table.add_row("all switched root", f"[bold]{_seconds(result.makespan)}[/]")
    table.add_row("median node", _seconds(result.median))
    table.add_row("lower bound", f"{_seconds(result.lower_bound)} ({result.lower_bound_by})")
    busy = ", ".join(f"{k} {v:.0%}" for k, v in sorted(result.busiest().items(), key=lambda kv: -kv[1]))
    table.add_row("busiest", busy)
    if topology.relays:
        table.add_row("warming the relays", _seconds(summary["relay_prefetch_s"]) + " before the storm")
    console.print(table)


def _timeline(result: Any) -> list[dict[str, Any]]:
    return [
        {
            "switch": c.switch,
            "nodes": c.nodes,
            "stages": [
                {"stage": s.stage, "start": round(s.start, 4), "end": round(s.end, 4)} for s in c.stages
            ],
        }
        for c in result.cohorts
    ]


@simulate.command("plan")
@_topology_options
@click.option(
    "--target", required=True, metavar="DURATION", help="Every node switched root within this, e.g. 5min."
)
@click.option(
    "--placement",
    "placements",
    type=click.Choice(["core", "edge"]),
    multiple=True,
    help="Where relays may go (repeatable) [default: both].",
)
@click.option(
    "--max-relays",
    type=click.IntRange(1),
    help="Try at most this many relays per placement [default: 64 at the core, one per switch at the edge].",
)
@json_option
def simulate_plan(
    target: str, placements: tuple[str, ...], max_relays: int | None, as_json: bool, **params: Any
) -> None:
    """Capacity planning: the fewest relays, and where, to boot every node within --target."""
    from slim.simulate import plan_relays, prefetch_time
    from slim.vocabulary import parse_duration

    with errors_to_exit():
        seconds = parse_duration(target)
        topology, workload = _build(params)
        single = _run_single(topology, workload)
        both: tuple[Literal["core", "edge"], ...] = ("core", "edge")
        where = [p for p in both if not placements or p in placements]
        results = plan_relays(topology, workload, seconds, where, max_relays)
    rows: list[dict[str, Any]] = []
    for r in results:
        rows.append(
            {
                "placement": r.topology.placement,
                "relays": r.topology.relays,
                "makespan_s": round(r.makespan, 3),
                "meets_target": r.makespan <= seconds,
                "bottleneck": r.bottleneck,
                "relay_prefetch_s": round(prefetch_time(r.topology, workload), 3),
            }
        )
    if as_json:
        click.echo(
            json.dumps({"target_s": seconds, "server_alone_s": round(single, 3), "options": rows}, indent=2)
        )
        return
    console.print(
        f"{topology.nodes:,} nodes, target {_seconds(seconds)}; the server alone: {_seconds(single)}"
    )
    table = Table(
        "relays at", "relays", "all switched root", "meets target", "then the bottleneck", "warming"
    )
    for row in rows:
        table.add_row(
            row["placement"],
            str(row["relays"]),
            _seconds(row["makespan_s"]),
            "yes" if row["meets_target"] else "[red]no[/] (the most tried)",
            row["bottleneck"],
            _seconds(row["relay_prefetch_s"]),
        )
    console.print(table)


def _run_single(topology: Any, workload: Any) -> float:
    from slim.simulate import simulate as run

    return run(replace(topology, relays=0), workload).makespan


@simulate.command("night")
@click.option(
    "--desktops",
    type=click.IntRange(1, 100_000),
    default=500,
    show_default=True,
    help="Desktops in the pool.",
)
@click.option(
    "--relays",
    type=click.IntRange(1),
    default=4,
    show_default=True,
    help="Relays, one per site: each wakes and serves its site's desktops.",
)
@click.option(
    "--wakes-per-minute",
    type=click.IntRange(1, 100_000),
    default=60,
    show_default=True,
    help="Magic packets each relay sends at most a minute (the pool's wakes_per_minute).",
)
@click.option(
    "--window",
    default="20:00-07:00",
    show_default=True,
    metavar="HH:MM-HH:MM",
    help="The pool's window in its time zone; an end before the start is the next morning.",
)
@click.option(
    "--time-zone",
    default="UTC",
    show_default=True,
    metavar="ZONE",
    help="The pool's IANA time zone (a daylight-saving night is an hour shorter or longer).",
)
@click.option(
    "--date", default="2026-03-02", show_default=True, metavar="YYYY-MM-DD", help="The day the window opens."
)
@click.option(
    "--grace",
    default="15min",
    show_default=True,
    metavar="DURATION",
    help="Before the end: no job may run past end - grace (the blackout), idle desktops go back.",
)
@click.option(
    "--wake-timeout",
    default="10min",
    show_default=True,
    metavar="DURATION",
    help="A woken desktop that begins no boot by then is in use and left alone.",
)
@click.option(
    "--menu-timeout",
    default="5s",
    show_default=True,
    metavar="DURATION",
    help="How long the desktop's menu waits before booting the EE.",
)
@click.option(
    "--on-window-end",
    type=click.Choice(["requeue", "finish"]),
    default="requeue",
    show_default=True,
    help="At end - grace, send back every desktop and requeue their jobs (requeue), or only "
    "the idle ones, the rest at the end (finish).",
)
@click.option(
    "--reservation/--no-reservation",
    default=True,
    show_default=True,
    help="Slurm starts a job only if its time limit ends by end - grace (the blackout "
    "reservation); without it, jobs that run into the blackout are requeued.",
)
@click.option(
    "--in-use",
    type=click.FloatRange(0, 1),
    default=0.2,
    show_default=True,
    metavar="SHARE",
    help="Share of desktops that never boot the EE (on, asleep in S3, WoL not armed).",
)
@click.option(
    "--opt-out",
    type=click.FloatRange(0),
    default=0.01,
    show_default=True,
    metavar="RATE",
    help="Owners coming back: per harvestable desktop and hour; the desktop leaves the EE "
    "(its job requeued) until the next window.",
)
@click.option(
    "--firmware",
    default="30s",
    show_default=True,
    metavar="DURATION",
    help="Wake to the desktop's first request: POST, PXE's DHCP, iPXE over TFTP.",
)
@click.option(
    "--ee-start",
    default="20s",
    show_default=True,
    metavar="DURATION",
    help="After the EE is built: kernel start, the EE's init to up, slurmd registering.",
)
@click.option(
    "--per-switch",
    type=click.IntRange(1),
    default=48,
    show_default=True,
    help="Desktops per edge switch (fewer if needed for one switch per relay).",
)
@click.option("--node-link", default="1Gbit", show_default=True, metavar="RATE", help="Each desktop's port.")
@click.option(
    "--switch-uplink", default="10Gbit", show_default=True, metavar="RATE", help="Each edge switch's uplink."
)
@click.option("--relay-link", default="1Gbit", show_default=True, metavar="RATE", help="Each relay's link.")
@click.option(
    "--workload",
    default="table2-full",
    show_default=True,
    metavar="NAME|FILE",
    help="The EE each desktop builds in RAM: table2-full or a JSON/YAML file (as for storm).",
)
@click.option(
    "--jobs",
    "jobs",
    default="night",
    show_default=True,
    metavar="NAME|FILE",
    help="The job mix: night (60 % 1 h, 30 % 4 h, 10 % 12 h limits, 5,000 jobs), short "
    "(8,000 jobs of 1 h), or a JSON/YAML file (docs/simulate.md).",
)
@click.option("--job-count", type=click.IntRange(0), help="Jobs in the backlog [default: the mix's].")
@click.option(
    "--sched-interval",
    default="30s",
    show_default=True,
    metavar="DURATION",
    help="Slurm's scheduler pass (backfill's bf_interval); 0: a job starts at once.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the draws (in-use desktops, owners, jobs): the same seed, the same night.",
)
@click.option(
    "--timeline",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write desktops in the EE and jobs running every 5 minutes here (JSON).",
)
@json_option
def simulate_night(
    jobs: str, job_count: int | None, workload: str, timeline: Path | None, as_json: bool, **params: Any
) -> None:
    """A night of desktop harvesting: wake, boot the EE, run Slurm's jobs, back by morning.

    Each relay wakes its site's desktops at --wakes-per-minute; a desktop that is not in use
    boots the EE (its build from the flow-level storm model, cohort by cohort as they wake);
    Slurm starts jobs of the mix on idle desktops when they end before the blackout; owners
    come back at --opt-out; at end - grace the desktops go back.  Prints the times to the first
    job and to all desktops up, the wake rate, and node-hours in the EE and running jobs, each
    with its source.  Deterministic for a --seed.
    """
    from slim.simulate_night import MIXES, Night, mix_from_dict
    from slim.simulate_night import simulate_night as run
    from slim.vocabulary import parse_duration, parse_rate

    with errors_to_exit():
        mix = _mix(jobs, MIXES, mix_from_dict)
        if job_count is not None:
            mix = replace(mix, jobs=job_count)
        durations = {k: parse_duration(params[k], zero=k in ("firmware", "ee_start", "sched_interval",
                                                             "grace"), what=k.replace("_", "-"))
                     for k in ("grace", "wake_timeout", "menu_timeout", "firmware", "ee_start",
                               "sched_interval")}  # fmt: skip
        rates = {k: parse_rate(params[k]) for k in ("node_link", "switch_uplink", "relay_link")}
        night = Night(
            desktops=params["desktops"], relays=params["relays"], window=params["window"],
            time_zone=params["time_zone"], date=params["date"],
            wakes_per_minute=params["wakes_per_minute"], on_window_end=params["on_window_end"],
            reservation=params["reservation"], in_use=params["in_use"],
            opt_out_per_hour=params["opt_out"], per_switch=params["per_switch"], seed=params["seed"],
            **durations, **rates,
        )  # fmt: skip
        result = run(night, mix, _workload(workload))
    summary = result.summary()
    if timeline is not None:
        timeline.write_text(json.dumps(result.profile(), indent=1) + "\n")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    _print_night(summary)


def _mix(name: str, mixes: dict[str, Any], from_dict: Callable[[Any, str], Any]) -> Any:
    from slim.errors import InvalidArgument

    if name in mixes:
        return mixes[name]
    path = Path(name)
    if not path.is_file():
        raise InvalidArgument(f"job mix {name!r}: not one of {', '.join(mixes)} and not a file")
    return from_dict(_load(path), str(path))


def _print_night(s: dict[str, Any]) -> None:
    w, d, wake, boot = s["window"], s["desktops"], s["wake"], s["boot"]
    t, nh, jobs = s["times"], s["node_hours"], s["jobs"]
    rows: list[tuple[str, str]] = []
    blackout = "" if w["reservation"] else ", [red]no blackout reservation[/]"
    rows.append(
        (
            "window",
            f"{w['start']} to {w['end']} ({w['hours']:g} h, {w['time_zone']}), grace {w['grace_s']:g} s, "
            f"on end: {w['on_window_end']}{blackout}",
        )
    )
    rows.append(
        (
            "desktops",
            f"{d['total']:,}: {d['in_use']} in use (never boot), {d['harvestable']} harvestable, "
            f"{d['came_up']} came up; owners back: {d['owner_back_before_up']} before up, "
            f"{d['owner_back_in_ee']} in the EE",
        )
    )
    per, total = wake["wakes_per_minute_per_relay"], wake["wakes_per_minute_total"]
    last = _seconds(wake["last_packet_s"])
    rows.append(("wake", f"{wake['relays']} relays x {per}/min = {total}/min; last packet at {last}"))
    if wake["in_use_given_up_s"] is not None:
        rows.append(("", f"in-use desktops left alone by {_seconds(wake['in_use_given_up_s'])}"))
    if boot["wake_to_up_median_s"] is not None:
        parts = (
            f"firmware {boot['firmware_s']:g} s + menu {boot['menu_s']:g} s + EE build "
            f"{boot['build_median_s']:g} to {boot['build_max_s']:g} s + EE start {boot['ee_start_s']:g} s"
        )
        median, most = _seconds(boot["wake_to_up_median_s"]), _seconds(boot["wake_to_up_max_s"])
        rows.append(("wake to up", f"median {median}, max {most} ({parts})"))
        rows.append(("", f"the build bound by {boot['bottleneck']}"))
        rows.append(("first desktop up", _seconds(t["first_up_s"])))
        rows.append(("all desktops up", f"[bold]{_seconds(t['all_up_s'])}[/] after the window opened"))
    first_job = t["first_job_s"]
    rows.append(("first job running", f"[bold]{_seconds(first_job)}[/]" if first_job is not None else "none"))
    rows.append(("node-hours in the EE", f"[bold]{nh['ee']['value']:,.1f}[/]"))
    rows.append(("", f"from {nh['ee']['source']}"))
    rows.append(
        (
            "node-hours running jobs",
            f"[bold]{nh['jobs']['value']:,.1f}[/] ({nh['jobs_share_of_ee']:.1%} of the EE's; "
            f"{nh['requeued_work']:,.1f} of it lost to requeues)",
        )
    )
    rows.append(("", f"from {nh['jobs']['source']}"))
    rows.append(
        ("window capacity", f"{nh['window_capacity']:,.1f} node-hours (harvestable desktops x window)")
    )
    rows.append(("jobs", jobs["mix"]))
    rows.append(
        (
            "",
            f"{jobs['completed']:,} completed, {jobs['requeues']:,} requeues "
            f"({jobs['started_not_completed']:,} pending again at the end), {jobs['never_started']:,} "
            f"never started ({jobs['never_started_limit_too_long']:,} could never fit the window)",
        )
    )
    table = Table(show_header=False, box=None)
    for row in rows:
        table.add_row(*row)
    console.print(table)
