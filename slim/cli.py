"""The ``slim`` command.

Only this module exits the process; library code raises
:class:`slim.errors.SlimError`, which is printed here as ``error: ...`` with
exit status 1.  Admin commands talk to a running core over gRPC
(``--core``, or ``$SLIM_CORE``, default 127.0.0.1:50051).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.table import Table

from slim import __version__, cli_ee, cli_net, cli_simulate, cli_slurm
from slim.cli_common import (
    DEFAULT_CORE,
    console,
    core_option,
    errors_to_exit,
    json_option,
    log_level_option,
    registry_option,
    setup_logging,
    store_option,
)
from slim.v1 import core_pb2 as pb
from slim.v1 import core_pb2_grpc as pb_grpc

T = TypeVar("T")
CALL_TIMEOUT = 15.0
POLICY_NAMES = {pb.POLICY_RAM: "ram", pb.POLICY_DISK: "disk", pb.POLICY_SYNC: "sync", pb.POLICY_NFS: "nfs"}
TIER_NAMES = {pb.RELAY_TIER_SITE: "site", pb.RELAY_TIER_PARENT: "parent", pb.RELAY_TIER_OTHER: "other"}


class CoreClient:
    """Blocking gRPC stubs for the CLI."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address)
        self.core = pb_grpc.CoreStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def call(self, method: Callable[..., T], request: Any) -> T:
        return method(request, timeout=CALL_TIMEOUT, wait_for_ready=False)


def _ts(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_json(msg: Message) -> None:
    click.echo(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2, sort_keys=True))


origin_option = click.option(
    "--from",
    "origin",
    required=True,
    metavar="ADDRESS",
    help="The node's address as a relay would see it (IPv4 or IPv6); picks the site.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="slim")
def main() -> None:
    """SLIM: put the right Linux execution environment (EE) on a machine when a job needs it.

    The core keeps the registry of EEs, nodes, relays and sites and decides
    which relay serves which node; relays serve kernels, initrds and archives;
    the agent in the initrd builds the EE on the node.
    """


# -- core ---------------------------------------------------------------------
@main.group()
def core() -> None:
    """Run the core (the registry, runtime state and redirection service)."""


@core.command("serve")
@registry_option
@click.option(
    "--state",
    "state_path",
    envvar="SLIM_STATE",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("/var/lib/slim/state.db"),
    show_default=True,
    help="SQLite file for runtime state (next-boot overrides, boot events, heartbeats); created if missing.",
)
@store_option
@click.option(
    "--listen",
    default=DEFAULT_CORE,
    show_default=True,
    help="host:port for gRPC (port 0 picks a free port, printed on start), or unix:PATH for a local socket.",
)
@click.option(
    "--objects-listen",
    metavar="HOST:PORT",
    default=None,
    help="Also serve the store's objects over HTTP here (GET /objects/sha256/<hex>): the upstream "
    "that relays fetch from.  Off by default; port 0 picks a free port (printed on start).",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="On SIGTERM/SIGINT: seconds in-flight calls may take to finish before they are cancelled.",
)
@log_level_option()
@click.option(
    "--event-loop",
    type=click.Choice(["uvloop", "asyncio"]),
    default="uvloop",
    show_default=True,
    help="Event loop implementation (asyncio's own is there for comparison and debugging).",
)
def core_serve(
    registry_path: Path,
    state_path: Path,
    store_path: Path,
    listen: str,
    objects_listen: str | None,
    grace: float,
    log_level: str,
    event_loop: str,
) -> None:
    """Serve the core's gRPC API until SIGTERM or SIGINT (graceful stop); SIGHUP reloads the registry.

    Prints "listening on HOST:PORT" on standard output once it accepts calls.
    """
    import uvloop

    from slim.core.control.server import serve
    from slim.core.control.service import CoreService
    from slim.core.control.state import State
    from slim.core.registry import load_registry
    from slim.core.store import Store

    setup_logging(log_level)
    with errors_to_exit():
        registry = load_registry(registry_path)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        state = State(state_path)
        service = CoreService(registry, state, Store(store_path), registry_path=registry_path)
        host = listen.rsplit(":", 1)[0]

        def ready(port: int) -> None:
            click.echo(f"listening on {listen if listen.startswith('unix:') else f'{host}:{port}'}")
            sys.stdout.flush()

        def objects_ready(port: int) -> None:
            click.echo(f"objects on {(objects_listen or '').rsplit(':', 1)[0]}:{port}")
            sys.stdout.flush()

        run = serve(service, listen, grace, ready, objects_listen, objects_ready)
        try:
            if event_loop == "uvloop":
                uvloop.run(run)
            else:
                asyncio.run(run)
        finally:
            state.close()


# -- registry -----------------------------------------------------------------
@main.group()
def registry() -> None:
    """Check registry files."""


@registry.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def registry_check(file: Path) -> None:
    """Validate FILE as a whole; print every problem with its line and field (exit 1 if any)."""
    from slim.core.registry import load_registry

    with errors_to_exit():
        reg = load_registry(file)
    counts = ", ".join(
        f"{len(getattr(reg, k))} {k}" for k in ("sites", "relays", "profiles", "environments", "nodes")
    )
    console.print(f"{file}: ok ({counts})")


# -- environments ---------------------------------------------------------------
@main.group()
def ee() -> None:
    """Execution environments: import images, build releases, verify; list and show (from the core)."""


@ee.command("list")
@core_option
@json_option
def ee_list(core_address: str, as_json: bool) -> None:
    """List the environments, their Slurm feature and their current release."""
    client = CoreClient(core_address)
    with errors_to_exit():
        resp = client.call(client.admin.ListEnvironments, pb.ListEnvironmentsRequest())
    if as_json:
        _print_json(resp)
        return
    table = Table("environment", "feature", "release", "directories", "description")
    for e in resp.environments:
        dirs = " ".join(f"{d.path}={POLICY_NAMES.get(d.policy, '?')}" for d in e.directories)
        table.add_row(e.name, e.feature, e.release_digest[:19] or "(not built)", dirs, e.description)
    console.print(table)


@ee.command("show")
@click.argument("name")
@core_option
@json_option
def ee_show(name: str, core_address: str, as_json: bool) -> None:
    """Show environment NAME: image, kernel, per-directory policies, release."""
    client = CoreClient(core_address)
    with errors_to_exit():
        e = client.call(client.admin.GetEnvironment, pb.GetEnvironmentRequest(name=name))
    if as_json:
        _print_json(e)
        return
    console.print(f"[bold]{e.name}[/]  {e.description}")
    console.print(f"  feature      {e.feature}")
    console.print(f"  image        {e.image}")
    console.print(f"  kernel       {e.kernel}  {e.kernel_args}")
    console.print(f"  release      {e.release_digest or '(not built)'}")
    table = Table("directory", "policy", "mount options")
    for d in e.directories:
        table.add_row(d.path, POLICY_NAMES.get(d.policy, "?"), d.options)
    console.print(table)


# -- nodes ----------------------------------------------------------------------
@main.group()
def node() -> None:
    """Nodes: list, show, set the next boot, and ask what the core would answer."""


SEPARATED_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")


def _node_ref(name_or_mac: str) -> pb.NodeRef:
    """A MAC written with ':' or '-' names a node by MAC; anything else is a node name
    (so a node may be named like a bare 12-digit hex MAC)."""
    if SEPARATED_MAC_RE.match(name_or_mac.lower()):
        return pb.NodeRef(mac=name_or_mac)
    return pb.NodeRef(name=name_or_mac)


def _event_text(e: pb.BootEvent) -> str:
    status = "ok" if e.ok else f"FAILED {e.message}"
    return f"{e.stage} {status} {_ts(e.time)}"


@node.command("list")
@click.option("--group", default="", help="Only nodes in this group.")
@core_option
@json_option
def node_list(group: str, core_address: str, as_json: bool) -> None:
    """List nodes with their default and next environment and last boot event."""
    client = CoreClient(core_address)
    with errors_to_exit():
        resp = client.call(client.admin.ListNodes, pb.ListNodesRequest(group=group))
    if as_json:
        _print_json(resp)
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
    client = CoreClient(core_address)
    with errors_to_exit():
        n = client.call(client.admin.GetNode, pb.GetNodeRequest(node=_node_ref(node_name)))
    if as_json:
        _print_json(n)
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
        console.print(f"  next boot    {nb.environment} (set by {nb.set_by} at {_ts(nb.set_at)})")
    else:
        console.print(f"  next boot    {n.next_environment} (default)")
    console.print(f"  last boot    {_boot_text(n.boot) if n.HasField('boot') else '-'}", markup=False)
    console.print(f"  last event   {_event_text(n.last_event) if n.HasField('last_event') else '-'}")


def _boot_text(b: pb.BootStatus) -> str:
    """e.g. "jdk14: up (boot 3f2a..., 2026-11-25 02:30:01)" or "jdk14: failed at disk:/var: ..."."""
    where = f" at {b.stage}: {b.message}" if b.state == "failed" else ""
    return f"{b.environment or '?'}: {b.state}{where} (boot {b.boot_id}, {_ts(b.time)})"


@node.command("set-ee")
@click.argument("node_name", metavar="NODE")
@click.argument("environment", metavar="EE")
@click.option("--by", "set_by", default=None, help="Who sets it, for the record (default: your user name).")
@core_option
def node_set_ee(node_name: str, environment: str, set_by: str | None, core_address: str) -> None:
    """Make EE (a name, or a feature such as ee:jdk14) NODE's next boot; EE "default" clears it."""
    import getpass

    client = CoreClient(core_address)
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
    client = CoreClient(core_address)
    with errors_to_exit():
        resp = client.call(
            client.core.Locate, pb.LocateRequest(node=_node_ref(node_name), origin=origin, peek=True)
        )
    if as_json:
        _print_json(resp)
        return
    console.print(f"node {resp.node} from {origin}: site {resp.site or '(no prefix matched)'}")
    _relay_table(resp.relays)


def _relay_table(relays: Any) -> None:
    table = Table("#", "relay", "tier", "site", "score", "URL")
    for i, r in enumerate(relays, 1):
        seen = "" if r.heartbeat_seen else " (no heartbeat yet)"
        table.add_row(str(i), r.name + seen, TIER_NAMES.get(r.tier, "?"), r.site, f"{r.score:.2f}", r.urls[0])
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
    client = CoreClient(core_address)
    with errors_to_exit():
        p = client.call(
            client.core.GetBootPlan,
            pb.GetBootPlanRequest(node=_node_ref(node_name), origin=origin, peek=True),
        )
    if as_json:
        _print_json(p)
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
        table.add_row(d.path, POLICY_NAMES.get(d.policy, "?"), src)
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
    client = CoreClient(core_address)
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
    client = CoreClient(core_address)
    with errors_to_exit():
        resp = client.call(client.admin.ListBootEvents, pb.ListBootEventsRequest(node=node_name, limit=limit))
    if as_json:
        _print_json(resp)
        return
    table = Table("time", "node", "boot", "stage", "ok", "relay", "bytes", "message")
    for e in resp.events:
        table.add_row(
            _ts(e.time),
            e.node,
            e.boot_id[:8],
            e.stage,
            "yes" if e.ok else "NO",
            e.relay,
            str(e.bytes),
            e.message,
        )
    console.print(table)


# -- relays -----------------------------------------------------------------------
@main.group()
def relay() -> None:
    """Relays: run one, list them with their live status, warm them for an environment."""


@relay.command("list")
@core_option
@json_option
def relay_list(core_address: str, as_json: bool) -> None:
    """List relays with status (live, stale, unhealthy, unknown) and their last heartbeat."""
    client = CoreClient(core_address)
    with errors_to_exit():
        resp = client.call(client.admin.ListRelays, pb.ListRelaysRequest())
    if as_json:
        _print_json(resp)
        return
    table = Table(
        "relay", "site", "parent", "capacity", "status", "load", "active", "egress B/s", "last seen"
    )
    for r in resp.relays:
        hb = r.last_heartbeat
        seen = r.HasField("last_heartbeat")
        table.add_row(
            r.name,
            r.site,
            r.parent or "-",
            f"{r.capacity:g}",
            r.status,
            f"{hb.load:g}" if seen else "-",
            str(hb.active_transfers) if seen else "-",
            f"{hb.egress_bytes_per_second:.0f}" if seen else "-",
            _ts(r.last_seen),
        )
    console.print(table)


@relay.command("serve")
@click.option(
    "--name",
    envvar="SLIM_RELAY_NAME",
    default="",
    help="This relay's name in the registry (required with --core); also $SLIM_RELAY_NAME.",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    required=True,
    metavar="URL",
    help="Where missing objects come from: a parent relay or the core's object server "
    "(slim core serve --objects-listen), as http://HOST:PORT.  Repeat for fallbacks, tried in order.",
)
@click.option(
    "--core",
    "core_address",
    envvar="SLIM_CORE",
    default="",
    help="The core's gRPC address (host:port): answers the node API, receives heartbeats, sends "
    "prefetch orders.  Without it the relay only serves objects.  Also $SLIM_CORE.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/cache/slim/relay"),
    show_default=True,
    help="Where cached objects live (created if missing).",
)
@click.option(
    "--max-bytes",
    default="20G",
    show_default=True,
    help="Cache budget (K, M, G, T are powers of 1024).  Least recently used objects are evicted; "
    "objects of current releases and objects being sent never are.",
)
@click.option(
    "--memory-cache",
    default="512M",
    show_default=True,
    help="Memory for the bytes of small cached objects (up to 128 KiB each), so that hits on them "
    "cost no file system calls; 0 turns it off.",
)
@click.option(
    "--listen",
    default="0.0.0.0:8080",
    show_default=True,
    help="HOST:PORT for HTTP (objects, node API, /metrics, /healthz); port 0 picks a free port.",
)
@click.option(
    "--tftp-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve stage 1 over TFTP on this UDP port (69 for real PXE; 0 picks a free port).  "
    "Off when not given.",
)
@click.option(
    "--tftp-listen",
    default="0.0.0.0",  # noqa: S104 - PXE clients broadcast-discover; every address is the default
    show_default=True,
    help="Address for TFTP.",
)
@click.option(
    "--ipxe-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/usr/lib/ipxe"),
    show_default=True,
    help="Where the iPXE binaries served over TFTP are (Debian's ipxe package: undionly.kpxe, ipxe.efi).",
)
@click.option(
    "--max-transfers",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Object responses at once; more get 503 with Retry-After.",
)
@click.option(
    "--max-fetches",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Upstream fetches at once (more wait their turn).",
)
@click.option(
    "--access-log", is_flag=True, help="Log every HTTP request (off by default: it costs throughput)."
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="On SIGTERM/SIGINT: seconds running transfers may take to finish.",
)
@log_level_option()
def relay_serve(
    name: str,
    upstreams: tuple[str, ...],
    core_address: str,
    cache_dir: Path,
    max_bytes: str,
    memory_cache: str,
    listen: str,
    tftp_port: int | None,
    tftp_listen: str,
    ipxe_dir: Path,
    max_transfers: int,
    max_fetches: int,
    access_log: bool,
    grace: float,
    log_level: str,
) -> None:
    """Run a relay: an edge cache of objects, the node API, and TFTP for stage 1.

    Objects (GET/HEAD /objects/sha256/<hex>) come from the cache or, once per
    object however many nodes ask, from the first upstream that has them,
    verified while they stream.  Nodes ask the relay for their boot script,
    plan and relays, and report boot events; the relay asks the core.

    Prints "listening on HOST:PORT" (and "tftp on HOST:PORT") on standard output
    once it serves.  SIGTERM or SIGINT stops it gracefully.
    """
    import uvloop

    from slim.relay.server import RelayConfig, RelayServer, serve
    from slim.vocabulary import parse_size

    setup_logging(log_level)
    with errors_to_exit():
        config = RelayConfig(
            upstreams=list(upstreams),
            cache_dir=cache_dir,
            max_bytes=parse_size(max_bytes),
            memory_bytes=0 if memory_cache.strip() in ("0", "") else parse_size(memory_cache),
            name=name,
            core=core_address,
            listen=listen,
            tftp_listen=f"{tftp_listen}:{tftp_port}" if tftp_port is not None else "",
            ipxe_dir=ipxe_dir,
            max_transfers=max_transfers,
            max_fetches=max_fetches,
            access_log=access_log,
        )

        def ready(r: RelayServer) -> None:
            click.echo(f"listening on {r.host}:{r.port}")
            if r.tftp_port:
                click.echo(f"tftp on {tftp_listen}:{r.tftp_port}")
            sys.stdout.flush()

        uvloop.run(serve(config, grace, ready))


@relay.command("prefetch")
@click.argument("environment")
@click.option("--relay", "relays", multiple=True, metavar="NAME", help="Warm this relay (repeatable).")
@click.option(
    "--node",
    "nodes",
    multiple=True,
    metavar="NODE",
    help="Warm the relays that serve this node: its site's relays (repeatable).",
)
@click.option("--no-wait", is_flag=True, help="Send the orders and return without following progress.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=3600.0,
    show_default=True,
    help="Give up following progress after this many seconds (the relays carry on).",
)
@core_option
def relay_prefetch(
    environment: str,
    relays: tuple[str, ...],
    nodes: tuple[str, ...],
    no_wait: bool,
    timeout: float,
    core_address: str,
) -> None:
    """Warm relays with every object of ENVIRONMENT's current release.

    The core sends the order down each relay's heartbeat stream; progress
    comes back the same way.  Without --relay or --node, every relay of the
    registry is asked.  Exits non-zero if any relay fails (or is not connected).
    """
    import getpass

    from slim.cli_common import StageProgress

    client = CoreClient(core_address)
    request = pb.PrefetchRequest(
        environment=environment,
        relays=relays,
        nodes=nodes,
        requested_by=f"slim relay prefetch ({getpass.getuser()})",
    )
    failed: dict[str, str] = {}
    final: dict[str, pb.PrefetchStatus] = {}
    with errors_to_exit():
        stream = client.admin.Prefetch(request, timeout=timeout)
        try:
            with StageProgress() as progress:
                for p in stream:
                    s = p.status
                    final[p.relay] = s
                    if s.bytes_total or s.done:
                        progress(f"{p.relay}: {environment}", s.bytes_done, s.bytes_total)
                    if s.done and s.error:
                        failed[p.relay] = s.error
                    if no_wait and len(final) >= 1:
                        stream.cancel()
                        break
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and no_wait:
                pass
            else:
                raise
    if no_wait:
        click.echo(f"prefetch of {environment} sent to {', '.join(sorted(final)) or 'no relay'}")
        return
    for relay_name, s in sorted(final.items()):
        state = f"failed: {s.error}" if s.error else "warm"
        click.echo(
            f"{relay_name}: {state} ({s.objects_done}/{s.objects_total} objects, {s.bytes_done} bytes, "
            f"{s.bytes_fetched} fetched)"
        )
    if failed:
        raise SystemExit(1)


# -- demo ---------------------------------------------------------------------------
@main.command("demo")
@click.option(
    "--control-plane",
    is_flag=True,
    help="Instead of booting a VM: start a core with the example registry and show what it answers "
    "(redirection, a boot storm's spread, a plan, a menu); needs no root and takes seconds.",
)
@click.option(
    "--registry",
    "registry_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --control-plane: the registry to demonstrate with (default: docs/registry.example.yaml).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the demo's temporary directory goes (default: the system's temporary directory).",
)
@click.option("--keep", is_flag=True, help="Keep the demo's directory (EE, store, logs, console) afterwards.")
def demo(control_plane: bool, registry_path: Path | None, workdir: Path | None, keep: bool) -> None:
    """Build a demo EE, start `slim serve`, network-boot a QEMU VM into it, show the timeline.

    Everything runs on this machine: `slim serve` (core, relay with TFTP,
    nfs-ganesha, dnsmasq as proxy-DHCP) in a network namespace beside a plain
    DHCP server playing the site's; the VM's UEFI firmware PXE-boots on a tap
    device on that network: ipxe.efi over TFTP, the menu over HTTP, kernel and
    initrd, the agent, switch_root into the EE.  Needs root; `./run demo`
    installs what it needs first.  A few minutes on the first run (Debian is
    downloaded with debootstrap and cached), about a minute after that.
    """
    if control_plane:
        from labs.controlplane import run_demo

        with errors_to_exit():
            asyncio.run(run_demo(registry_path))
        return
    import os

    from labs import bootdemo
    from slim.cli_common import fail

    if os.geteuid() != 0:
        fail("the boot demo needs root (network namespaces, a tap device); try: sudo ./run demo")
    with errors_to_exit():
        bootdemo.run(workdir, keep, say=lambda line: click.echo(line))


# Commands that work on images and the store directly (slim/cli_ee.py).
ee.add_command(cli_ee.ee_import)
ee.add_command(cli_ee.ee_build)
ee.add_command(cli_ee.ee_verify)
ee.add_command(cli_ee.ee_table2)
main.add_command(cli_ee.profile)
main.add_command(cli_ee.nfs)
main.add_command(cli_net.dhcp)
main.add_command(cli_net.serve)
main.add_command(cli_slurm.slurm)
main.add_command(cli_simulate.simulate)


if __name__ == "__main__":
    main()
