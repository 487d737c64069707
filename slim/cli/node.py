"""``slim node``: nodes from the core: list, show, set the next boot, and what the core
would answer a node (relays, plan, boot menu)."""

from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from slim.cli.common import (
    console,
    core_client,
    core_option,
    errors_to_exit,
    json_option,
    origin_option,
    print_json,
    timestamp,
)
from slim.rpc import policy_name, tier_name
from slim.v1 import core_pb2 as pb
from slim.vocabulary import names_a_mac


@click.group()
def node() -> None:
    """Nodes: list, show, set the next boot, and ask what the core would answer."""


def _node_ref(name_or_mac: str) -> pb.NodeRef:
    """A MAC written with ':' or '-' names a node by MAC; anything else is a node name
    (so a node may be named like a bare 12-digit hex MAC)."""
    if names_a_mac(name_or_mac):
        return pb.NodeRef(mac=name_or_mac)
    return pb.NodeRef(name=name_or_mac)


def _event_text(e: pb.BootEvent) -> str:
    status = "ok" if e.ok else f"FAILED {e.message}"
    return f"{e.stage} {status} {timestamp(e.time)}"


@node.command("list")
@click.option("--group", default="", help="Only nodes in this group.")
@core_option
@json_option
def node_list(group: str, core_address: str, as_json: bool) -> None:
    """List nodes with their default and next environment and last boot event."""
    client = core_client(core_address)
    with errors_to_exit():
        resp = client.call(client.admin.ListNodes, pb.ListNodesRequest(group=group))
    if as_json:
        print_json(resp)
        return
    table = Table("node", "MACs", "profile", "site", "default EE", "next boot", "running", "last event")
    for n in resp.nodes:
        nxt = n.next_environment + (f" (set by {n.next_boot.set_by})" if n.HasField("next_boot") else "")
        last = _event_text(n.last_event) if n.HasField("last_event") else "-"
        running = f"{n.boot.environment}: {n.boot.state}" if n.HasField("boot") else "-"
        table.add_row(
            n.name, " ".join(n.macs), n.profile, n.site or "-", n.default_environment, nxt, running, last
        )
    console.print(table)


@node.command("show")
@click.argument("node_name", metavar="NODE")
@core_option
@json_option
def node_show(node_name: str, core_address: str, as_json: bool) -> None:
    """Show NODE (a name, or a MAC written with ":" or "-")."""
    client = core_client(core_address)
    with errors_to_exit():
        n = client.call(client.admin.GetNode, pb.GetNodeRequest(node=_node_ref(node_name)))
    if as_json:
        print_json(n)
        return
    console.print(f"[bold]{n.name}[/]")
    console.print(f"  MACs         {' '.join(n.macs)}")
    console.print(f"  profile      {n.profile}")
    console.print(f"  site         {n.site or '-'}")
    console.print(f"  disk         {n.disk or '-'}")
    console.print(f"  groups       {' '.join(n.groups) or '-'}")
    console.print(f"  default EE   {n.default_environment}")
    if n.HasField("next_boot"):
        nb = n.next_boot
        console.print(f"  next boot    {nb.environment} (set by {nb.set_by} at {timestamp(nb.set_at)})")
    else:
        console.print(f"  next boot    {n.next_environment} (default)")
    console.print(f"  last boot    {_boot_text(n.boot) if n.HasField('boot') else '-'}", markup=False)
    console.print(f"  last event   {_event_text(n.last_event) if n.HasField('last_event') else '-'}")


def _boot_text(b: pb.BootStatus) -> str:
    """e.g. "jdk14: up (boot 3f2a..., 2026-11-25 02:30:01)" or "jdk14: failed at disk:/var: ..."."""
    where = f" at {b.stage}: {b.message}" if b.state == "failed" else ""
    return f"{b.environment or '?'}: {b.state}{where} (boot {b.boot_id}, {timestamp(b.time)})"


@node.command("set-ee")
@click.argument("node_name", metavar="NODE")
@click.argument("environment", metavar="EE")
@click.option("--by", "set_by", default=None, help="Who sets it, for the record (default: your user name).")
@core_option
def node_set_ee(node_name: str, environment: str, set_by: str | None, core_address: str) -> None:
    """Make EE (a name, or a feature such as ee:jdk14) NODE's next boot; EE "default" clears it."""
    import getpass

    client = core_client(core_address)
    env = "" if environment == "default" else environment
    req = pb.SetNextBootRequest(node=node_name, environment=env, set_by=set_by or f"cli:{getpass.getuser()}")
    with errors_to_exit():
        n = client.call(client.admin.SetNextBoot, req)
    console.print(f"{n.name}: next boot {n.next_environment}")


@node.command("locate")
@click.argument("node_name", metavar="NODE")
@origin_option
@core_option
@json_option
def node_locate(node_name: str, origin: str, core_address: str, as_json: bool) -> None:
    """Which relays the core would send NODE (name or MAC) to, best first.

    Asks as a tool ("peek"): the answer does not count toward any relay's load.
    """
    client = core_client(core_address)
    with errors_to_exit():
        resp = client.call(
            client.core.Locate, pb.LocateRequest(node=_node_ref(node_name), origin=origin, peek=True)
        )
    if as_json:
        print_json(resp)
        return
    console.print(f"node {resp.node} from {origin}: site {resp.site or '(no prefix matched)'}")
    _relay_table(resp.relays)


def _relay_table(relays: Any) -> None:
    table = Table("#", "relay", "tier", "site", "score", "URL")
    for i, r in enumerate(relays, 1):
        seen = "" if r.heartbeat_seen else " (no heartbeat yet)"
        table.add_row(str(i), r.name + seen, tier_name(r.tier), r.site, f"{r.score:.2f}", r.urls[0])
    console.print(table)


@node.command("plan")
@click.argument("node_name", metavar="NODE")
@origin_option
@core_option
@json_option
def node_plan(node_name: str, origin: str, core_address: str, as_json: bool) -> None:
    """The boot plan the agent on NODE would get: environment, objects, directory actions, relays.

    Asks as a tool ("peek"): the answer does not count toward any relay's load.
    """
    client = core_client(core_address)
    with errors_to_exit():
        p = client.call(
            client.core.GetBootPlan,
            pb.GetBootPlanRequest(node=_node_ref(node_name), origin=origin, peek=True),
        )
    if as_json:
        print_json(p)
        return
    console.print(
        f"[bold]{p.node}[/] boots [bold]{p.environment}[/] ({p.reason}), release {p.release_digest}"
    )
    console.print(f"  kernel   {p.kernel.digest} ({p.kernel.size} bytes)")
    console.print(f"  initrd   {p.initrd.digest} ({p.initrd.size} bytes)")
    console.print(f"  args     {p.kernel_args}")
    console.print(f"  modules  {' '.join(p.modules) or '-'}")
    table = Table("directory", "policy", "source")
    for d in p.directories:
        if d.policy == pb.POLICY_NFS:
            src = f"{d.nfs.server}:{d.nfs.export} ({d.nfs.options})"
        elif d.policy == pb.POLICY_SYNC:
            src = f"manifest {d.manifest.digest[:19]} onto {p.disk}"
        else:
            src = f"archive {d.archive.digest[:19]}" + (
                f" onto {p.disk}" if d.policy == pb.POLICY_DISK else ""
            )
        table.add_row(d.path, policy_name(d.policy), src)
    console.print(table)
    _relay_table(p.relays)


@node.command("boot-script")
@click.argument("mac")
@origin_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ipxe", "pxelinux"]),
    default="ipxe",
    show_default=True,
    help="iPXE script, or pxelinux.cfg/01-<mac> file.",
)
@core_option
def node_boot_script(mac: str, origin: str, fmt: str, core_address: str) -> None:
    """Print the boot menu the node with MAC would get."""
    client = core_client(core_address)
    fmt_pb = pb.SCRIPT_FORMAT_IPXE if fmt == "ipxe" else pb.SCRIPT_FORMAT_PXELINUX
    with errors_to_exit():
        s = client.call(
            client.core.GetBootScript,
            pb.GetBootScriptRequest(mac=mac, origin=origin, format=fmt_pb, peek=True),
        )
    click.echo(s.script, nl=False)


@node.command("events")
@click.argument("node_name", metavar="[NODE]", required=False, default="")
@click.option(
    "--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="How many events."
)
@core_option
@json_option
def node_events(node_name: str, limit: int, core_address: str, as_json: bool) -> None:
    """Recent boot events, newest first (of NODE, or of every node)."""
    client = core_client(core_address)
    with errors_to_exit():
        resp = client.call(client.admin.ListBootEvents, pb.ListBootEventsRequest(node=node_name, limit=limit))
    if as_json:
        print_json(resp)
        return
    table = Table("time", "node", "boot", "stage", "ok", "relay", "bytes", "message")
    for e in resp.events:
        table.add_row(
            timestamp(e.time),
            e.node,
            e.boot_id[:8],
            e.stage,
            "yes" if e.ok else "NO",
            e.relay,
            str(e.bytes),
            e.message,
        )
    console.print(table)
