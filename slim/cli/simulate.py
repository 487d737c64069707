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
    from slim.errors import InvalidArgument
    from slim.simulate import PAPER, WORKLOADS, topology_from_dict, workload_from_dict

    data: dict[str, Any] = dict(PAPER.__dict__)
    if params.get("topology_file") is not None:
        loaded = _load(params["topology_file"])
        data = {**data, **loaded} if isinstance(loaded, dict) else loaded
    for key in ("nodes", "per_switch", "node_link", "switch_uplink", "server_link", "relay_link", "node_cpu",
                "rtt", "boot_overhead", "relays", "placement"):  # fmt: skip
        if params.get(key) is not None:
            data[key] = params[key]
    topology = topology_from_dict(data, str(params.get("topology_file") or "topology"))
    name = params["workload"]
    if name in WORKLOADS:
        workload = WORKLOADS[name]
    else:
        wpath = Path(name)
        if not wpath.is_file():
            raise InvalidArgument(f"workload {name!r}: not one of {', '.join(WORKLOADS)} and not a file")
        workload = workload_from_dict(_load(wpath), str(wpath))
    return topology, workload


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
    """Simulate boot storms: time to boot N nodes, and relays needed (docs/simulate.md).

    A flow-level model of the network (node ports, edge switches, uplinks, the
    server and relays) and of each node's CPU, calibrated against real
    namespace-cluster storms (bench/boot_storm.py: within 15 %).
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
