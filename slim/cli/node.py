"""``slim node``: nodes from the core: list, show, set the next boot, what the core
would answer a node (relays, plan, boot menu), and a boot's timeline."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from google.protobuf.json_format import MessageToDict
from google.protobuf.timestamp_pb2 import Timestamp
from rich.table import Table

from slim import timeline
from slim.cli.common import (
    console,
    core_client,
    core_option,
    err_console,
    errors_to_exit,
    json_option,
    origin_option,
    print_json,
    timestamp,
    token_out_option,
)
from slim.errors import NotFound
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
    """List nodes: default and next EE, latest boot's state and since when, last event.

    The state is the core's: booting, starting (after switch_root), up (the environment
    reported in) or failed (where and why), with how long ago the boot entered it.
    """
    client = core_client(core_address)
    with errors_to_exit():
        resp = client.call(client.admin.ListNodes, pb.ListNodesRequest(group=group))
    if as_json:
        doc = MessageToDict(resp, preserving_proto_field_name=True)
        for n, d in zip(resp.nodes, doc.get("nodes", []), strict=True):
            _add_since_epoch(n, d)
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    now = time.time()
    table = Table("node", "MACs", "profile", "site", "default EE", "next boot", "latest boot", "last event")
    for n in resp.nodes:
        nxt = n.next_environment + (f" (set by {n.next_boot.set_by})" if n.HasField("next_boot") else "")
        last = _event_text(n.last_event) if n.HasField("last_event") else "-"
        running = f"{n.boot.environment or '?'}: {_state_text(n.boot, now)}" if n.HasField("boot") else "-"
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
        doc = MessageToDict(n, preserving_proto_field_name=True)
        _add_since_epoch(n, doc)
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
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
    """e.g. "jdk14: up 3 min ago (boot 3f2a..., latest event 2026-11-25 02:30:01)" or
    "jdk14: failed 1 h ago at up: no report from the environment 300 s after switch_root (...)"."""
    return (
        f"{b.environment or '?'}: {_state_text(b, time.time())}"
        f" (boot {b.boot_id}, latest event {timestamp(b.time)})"
    )


def _state_text(b: pb.BootStatus, now: float) -> str:
    """The state, how long ago the boot entered it, and where and why it failed:
    "up 3 min ago", "starting 12 s ago", "failed 1 h ago at disk:/var: ..."."""
    since = f" {_ago(now - _epoch(b.since))}" if b.HasField("since") else ""
    where = f" at {b.stage}: {b.message}" if b.state == "failed" else ""
    return f"{b.state}{since}{where}"


def _epoch(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _ago(seconds: float) -> str:
    """``12 s ago``, ``3 min ago``, ``5 h ago``, ``2 d ago`` (a clock behind the core's: 0 s)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s ago"
    if s < 3600:
        return f"{s // 60} min ago"
    if s < 48 * 3600:
        return f"{s // 3600} h ago"
    return f"{s // 86400} d ago"


def _add_since_epoch(n: pb.NodeInfo, doc: dict[str, Any]) -> None:
    """--json: the boot's ``since`` as epoch seconds too (``since_epoch``), beside the
    protobuf JSON's RFC 3339 text."""
    if n.HasField("boot") and n.boot.HasField("since") and "boot" in doc:
        doc["boot"]["since_epoch"] = _epoch(n.boot.since)


@node.command("set-ee")
@click.argument("node_name", metavar="NODE")
@click.argument("environment", metavar="EE")
@core_option
def node_set_ee(node_name: str, environment: str, core_address: str) -> None:
    """Make EE (a name, or a feature such as ee:jdk14) NODE's next boot; EE "default" clears it.

    The core records who set it from the credential the call was made with (admin:NAME,
    token:NAME, local:root)."""
    with errors_to_exit():
        client = core_client(core_address)
    env = "" if environment == "default" else environment
    req = pb.SetNextBootRequest(node=node_name, environment=env)
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
    table = Table("time", "node", "boot", "stage", "took", "ok", "relay", "bytes", "message")
    for e in resp.events:
        table.add_row(
            timestamp(e.time),
            e.node,
            e.boot_id[:8],
            e.stage,
            f"{e.duration:.2f} s" if e.duration else "-",
            "yes" if e.ok else "NO",
            e.relay,
            str(e.bytes),
            e.message,
        )
    console.print(table)


@node.command("timeline")
@click.argument("node_name", metavar="NODE")
@click.option(
    "--boot",
    "boot_id",
    default="latest",
    show_default=True,
    help="Which boot: its id (boot_id in `slim node events NODE --json`), or latest.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE.png",
    help="Also draw the timeline as a PNG (needs matplotlib: pip install 'slim[plot]').",
)
@core_option
@json_option
def node_timeline(
    node_name: str, boot_id: str, plot_path: Path | None, core_address: str, as_json: bool
) -> None:
    """NODE's boot (name or MAC), stage by stage, from power-on to up.

    Seconds are counted from the first request the relays saw (stage 1 over TFTP, or the
    boot script): each row is a stage's start and how long it took, what it loaded and
    who recorded it (a relay, the agent, the environment).  The last line says how long
    power-on to up took, or to the failure, or to the latest stage so far.
    """
    client = core_client(core_address)
    with errors_to_exit():
        n = client.call(client.admin.GetNode, pb.GetNodeRequest(node=_node_ref(node_name)))
        resp = client.call(
            client.admin.ListBootEvents, pb.ListBootEventsRequest(node=n.name, boot_id=boot_id)
        )
        if not resp.events:
            if boot_id == "latest":
                raise NotFound(f"no boot recorded for node {n.name} yet")
            raise NotFound(f"node {n.name} has no boot {boot_id} (see: slim node events {n.name})")
        t = timeline.build(n.name, resp.events, n.boot if n.HasField("boot") else None)
        if as_json:
            click.echo(json.dumps(t.to_json(), indent=2, sort_keys=True))
        else:
            for line in timeline.render(t):
                click.echo(line)
        if plot_path is not None:
            timeline.plot(t, plot_path)
            (err_console if as_json else console).print(f"wrote {plot_path}", markup=False)


@node.command("enroll")
@click.argument("name")
@click.option(
    "--ttl", default=None, metavar="DURATION", help="How long the token is valid (default: 10 years)."
)
@click.option(
    "--rotate", is_flag=True, help="The node's older tokens expire in an hour (a new one for its boot media)."
)
@token_out_option
@core_option
def node_enroll(name: str, ttl: str | None, rotate: bool, out: Path | None, core_address: str) -> None:
    """Issue node NAME a token (printed once; the core keeps its hash).

    A node that sends its token (Authorization: Bearer) may fetch its own boot script and
    plan and report its own events, nothing of another node's; at sites with
    node_identity: token (and from addresses of no site, by default) it must."""
    from slim.cli.ca import _issue, _ttl

    _issue("node", name, _ttl(ttl), 3600.0 if rotate else 0.0, out, core_address)


@node.command("code")
@click.argument("name")
@click.option(
    "--ttl",
    default="1d",
    show_default=True,
    metavar="DURATION",
    help="How long the code may wait to be typed (at most 30d).",
)
@core_option
def node_code(name: str, ttl: str, core_address: str) -> None:
    """Issue node NAME a one-time code for a generic boot medium (printed once).

    Someone at the PC types it at the medium's first boot; the medium trades it, over
    HTTPS, for the node's own token and keeps that on its stick: the code is then used up.
    An unused code expires after --ttl; slim node revoke withdraws it.  See docs/home.md."""
    from slim.cli.ca import _issue, _ttl

    _issue("code", name, _ttl(ttl), 0.0, None, core_address)


@node.command("revoke")
@click.argument("id_or_name")
@core_option
def node_revoke(id_or_name: str, core_address: str) -> None:
    """Revoke a node token by id, or every token of node NAME (effective on its next call);
    one-time codes too."""
    from slim.cli.ca import revoke_tokens

    revoke_tokens("node", id_or_name, core_address)


@node.command("tokens")
@click.argument("name", required=False, default="")
@core_option
@json_option
def node_tokens(name: str, core_address: str, as_json: bool) -> None:
    """The node tokens issued (of NAME, or every node's): id, expiry, revoked; never the secret."""
    from slim.cli.ca import list_tokens

    list_tokens("node", name, core_address, as_json)
