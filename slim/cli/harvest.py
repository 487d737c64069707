"""``slim harvest``: desktop pools at night (docs/harvest.md) — each desktop as its owner would
care, the night's node-hours, and waking or sending back desktops by hand."""

from __future__ import annotations

import datetime as dt
import json
import time

import click
from google.protobuf.json_format import MessageToDict
from rich.table import Table

from slim.cli.common import console, core_client, core_option, errors_to_exit, json_option
from slim.cli.node import _ago, _epoch
from slim.v1 import core_pb2 as pb

WHAT_THE_OWNER_SEES = {
    "own-os": "in their own OS (or off, as they left it)",
    "waking": "woken by SLIM; not yet booting the EE",
    "booting": "booting the night's EE",
    "idle": "in the EE, no job",
    "job": "in the EE, running a job",
    "returning": "told to go back to their own OS",
    "in-use": "did not come up after the wake: in use, left alone",
    "failed": "the EE's boot failed",
    "opted-out": "out of the pool until the next window",
}


@click.group()
def harvest() -> None:
    """Desktop harvesting: pools of desktops run an in-RAM EE at night (docs/harvest.md)."""


@harvest.command("status")
@click.argument("pool", default="")
@core_option
@json_option
def harvest_status(pool: str, core_address: str, as_json: bool) -> None:
    """Each pool's window and desktops, and the node-hours harvested (kept in the core's state).

    A desktop's state: own-os, waking, booting, idle (in the EE, no job), job, returning,
    in-use (did not come up after its wake: left alone), failed, opted-out (its owner picked
    their own OS at the menu in the window: out until the next one)."""
    client = core_client(core_address)
    with errors_to_exit():
        resp = client.call(client.admin.HarvestStatus, pb.HarvestStatusRequest(pool=pool))
    if as_json:
        click.echo(
            json.dumps(MessageToDict(resp, preserving_proto_field_name=True), indent=2, sort_keys=True)
        )
        return
    now = time.time()
    for p in resp.pools:
        start = dt.datetime.fromtimestamp(_epoch(p.window_start)).astimezone()
        end = dt.datetime.fromtimestamp(_epoch(p.window_end)).astimezone()
        window = (
            f"open until {end:%a %H:%M %Z}"
            if p.open
            else f"next window {start:%a %H:%M} to {end:%a %H:%M %Z}"
        )
        scheduler = (
            f"Slurm partition {p.partition}" if p.partition else "no Slurm partition: the core wakes it"
        )
        console.print(f"[bold]pool {p.name}[/bold]: {p.environment}, {window}; {scheduler}")
        table = Table("desktop", "state", "since", "why")
        for d in p.desktops:
            since = _ago(now - _epoch(d.since)) if d.HasField("since") else "-"
            why = d.reason or WHAT_THE_OWNER_SEES.get(d.state, "")
            table.add_row(d.node, d.state + (" (woken from off)" if d.woken_from_off else ""), since, why)
        console.print(table)
        source = f" (jobs: {p.jobs_source})" if p.jobs_source else ""
        console.print(
            f"node-hours harvested: {p.node_hours_ee:.2f} in the EE, "
            f"{p.node_hours_jobs:.2f} running jobs{source}"
        )


def _act(method_name: str, nodes: tuple[str, ...], reason: str, core_address: str) -> None:
    client = core_client(core_address)
    with errors_to_exit():
        method = getattr(client.admin, method_name)
        resp = client.call(method, pb.DesktopsRequest(nodes=list(nodes), reason=reason))
    failed = False
    for r in resp.results:
        click.echo(f"{r.node}: {r.message}")
        failed = failed or not r.ok
    if failed:
        raise SystemExit(1)


@harvest.command("wake")
@click.argument("nodes", nargs=-1, required=True)
@click.option("--reason", default="slim harvest wake", help="Said in the core's log and the status.")
@core_option
def harvest_wake(nodes: tuple[str, ...], reason: str, core_address: str) -> None:
    """Wake desktops of pools now: a relay of each desktop's site sends the magic packets, at
    most the pool's rate.  A desktop opted out of this window is not woken."""
    _act("WakeDesktops", nodes, reason, core_address)


@harvest.command("release")
@click.argument("nodes", nargs=-1, required=True)
@click.option("--reason", default="slim harvest release", help="Said in the core's log and the status.")
@core_option
def harvest_release(nodes: tuple[str, ...], reason: str, core_address: str) -> None:
    """Send desktops back to their own OS: powered off if SLIM woke them from off, else
    rebooted; their menu boots their own OS until the next window."""
    _act("ReleaseDesktops", nodes, reason, core_address)
