"""``slim relay``: run a relay, list the relays with their live status, warm them."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from slim.cli.common import (
    StageProgress,
    ca_option,
    config_option,
    console,
    core_client,
    core_option,
    days_option,
    errors_to_exit,
    identity_out_option,
    json_option,
    log_level_option,
    print_json,
    registry_option,
    settings,
    setup_logging,
    timestamp,
)
from slim.errors import InvalidArgument
from slim.v1 import core_pb2 as pb


@click.group()
def relay() -> None:
    """Relays: run one, list them with their live status, warm them for an environment."""


@relay.command("list")
@core_option
@json_option
def relay_list(core_address: str, as_json: bool) -> None:
    """List relays with status (live, stale, unhealthy, unknown) and their last heartbeat: load,
    transfers, egress, and the NFS trees a relay's own ganesha exports (--nfs-listen)."""
    client = core_client(core_address)
    with errors_to_exit():
        resp = client.call(client.admin.ListRelays, pb.ListRelaysRequest())
    if as_json:
        print_json(resp)
        return
    table = Table(
        "relay",
        "site",
        "parent",
        "capacity",
        "status",
        "load",
        "active",
        "egress B/s",
        "nfs trees",
        "last seen",
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
            str(len(hb.nfs_trees)) if seen and r.nfs else "-",
            timestamp(r.last_seen),
        )
    console.print(table)


@relay.command("serve")
@click.option(
    "--name",
    envvar="SLIM_RELAY_NAME",
    default="",
    help="This relay's name in the registry (default: the name in its --identity); also $SLIM_RELAY_NAME.",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="URL",
    help="Where missing objects come from: a parent relay or the core's object server "
    "(slim core serve --objects-listen).  https://HOST:PORT: its certificate must be from SLIM's CA "
    "and name slim-core (the core's), or NAME with https://HOST:PORT#NAME (a parent relay: "
    "PARENT.relay.slim); http://HOST:PORT: not authenticated.  Repeat for fallbacks, tried in order.  "
    "With --registry: tried after the parent's URLs (as slim serve does).",
)
@click.option(
    "--registry",
    "registry_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Take the upstream from this registry file: the URLs of the parent its relay --name names, "
    "then any --upstream (a relay without a parent needs --upstream: the core's object server).  "
    "Not with --config.",
)
@click.option(
    "--core",
    "core_address",
    envvar="SLIM_CORE",
    default="",
    help="The core's gRPC address (HOST:PORT or unix:PATH): answers the node API, receives heartbeats, sends "
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
    help="Cache budget: 20G or 20GiB (powers of 1024), 500GB (powers of 1000).  Least recently used "
    "objects are evicted; objects of current releases and objects being sent never are.",
)
@click.option(
    "--memory-cache",
    "memory_bytes",
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
    "--https-listen",
    metavar="HOST:PORT",
    default=None,
    help="Also serve HTTPS here (the same objects, node API, /metrics, /healthz), with the "
    "certificate of --identity; port 0 picks a free port.  Off when not given.",
)
@click.option(
    "--upstream-ca",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="The CA certificate https upstreams must chain to (a PEM file, or a directory with ca.pem "
    "or ca.crt); default: the ca.pem of --identity.",
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
    "--wake-to",
    default="255.255.255.255:9",
    show_default=True,
    help="Where Wake-on-LAN magic packets go (UDP HOST:PORT): the desktops' segment's broadcast "
    "(a relay sits on the segment it wakes; magic packets do not cross routers unless directed).",
)
@click.option(
    "--wake-from",
    default=None,
    help="Send magic packets from this address of the relay's (the desktops' segment's).",
)
@click.option(
    "--nfs-listen",
    metavar="HOST:PORT",
    default=None,
    help="Export the current releases' NFS trees with the relay's own nfs-ganesha here (an IP address; "
    "port 2049 by default): the relay builds each tree from objects it caches and checks, and its "
    "heartbeats tell the core, which sends nodes of the registry's relays.NAME.nfs there first.  Needs "
    "--core and --trust.  Off when not given (docs/home.md).",
)
@click.option(
    "--nfs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/lib/slim/relay-nfs"),
    show_default=True,
    help="With --nfs-listen: where the trees (trees/<hex>) and ganesha's work directory (ganesha/) are.",
)
@click.option(
    "--nfs-clients",
    metavar="LIST",
    default=None,
    help="With --nfs-listen: who may mount, comma-separated addresses, CIDR networks, host names or "
    "@netgroups (an ISP: its customers' ranges); default: everyone who reaches the port.",
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
@click.option(
    "--trust",
    "trust",
    multiple=True,
    type=click.Path(path_type=Path),
    help="The core's public key (slim keys export), or a directory of .pub files: on the core's "
    "host, STATE_DIR/keys, which holds both keys during a rotation.  Repeatable; read again when "
    "they change.  Only releases they signed are pinned or prefetched; without it, none is.",
)
@click.option(
    "--identity",
    "identity",
    envvar="SLIM_RELAY_IDENTITY",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The relay's identity directory (key.pem, cert.pem, ca.pem; slim relay enroll NAME on the "
    "core's host): its certificate for mutual TLS with the core, whose name is the relay's.  "
    "Needed with a --core HOST:PORT.  Also $SLIM_RELAY_IDENTITY.",
)
@click.option(
    "--core-insecure",
    is_flag=True,
    help="Plaintext gRPC to a core run with --insecure-no-tls (no identity).",
)
@log_level_option()
@config_option("relay")
def relay_serve(
    name: str,
    upstreams: tuple[str, ...],
    registry_path: Path | None,
    core_address: str,
    cache_dir: Path,
    max_bytes: str,
    memory_bytes: str,
    listen: str,
    https_listen: str | None,
    upstream_ca: Path | None,
    tftp_port: int | None,
    tftp_listen: str,
    wake_to: str,
    wake_from: str | None,
    nfs_listen: str | None,
    nfs_dir: Path,
    nfs_clients: str | None,
    ipxe_dir: Path,
    max_transfers: int,
    max_fetches: int,
    access_log: bool,
    grace: float,
    trust: tuple[Path, ...],
    identity: Path | None,
    core_insecure: bool,
    log_level: str,
    config_file: Path | None,
) -> None:
    """Run a relay: an edge cache of objects, the node API, and TFTP for stage 1.

    Objects (GET/HEAD /objects/sha256/<hex>) come from the cache or, once per
    object however many nodes ask, from the first upstream that has them,
    verified while they stream.  Nodes ask the relay for their boot script,
    plan and relays, and report boot events; the relay asks the core.

    With --nfs-listen the relay also exports the current releases' NFS
    trees with its own nfs-ganesha (an ISP's or a remote site's relay).

    With --https-listen the relay also serves HTTPS, with the certificate of
    --identity, for nodes whose site asks for it (PXE and iPXE on a LAN speak
    plain HTTP to --listen).

    Prints "listening on HOST:PORT" (then "https on HOST:PORT", "tftp on
    HOST:PORT", "nfs on HOST:PORT") on standard output once it serves.  SIGTERM or SIGINT stops it
    gracefully.
    """
    from slim.listen import parse_listen
    from slim.relay.config import RelayConfig
    from slim.relay.server import RelayServer, run

    with errors_to_exit():
        if identity is not None and not name and config_file is None:
            from slim.pki import CERT_PEM, identity_of_pem

            try:
                name = identity_of_pem((identity / CERT_PEM).read_bytes()).name
            except OSError as exc:
                raise InvalidArgument(f"--identity {identity}: {exc.strerror}: {exc.filename}") from None
        if registry_path is not None:
            if config_file is not None:
                raise InvalidArgument("--registry and --config: give the upstreams in the --config file")
            upstreams = (*registry_upstreams(registry_path, name, bool(upstreams)), *upstreams)
        bracketed = f"[{tftp_listen}]" if ":" in tftp_listen else tftp_listen
        config = settings(
            RelayConfig, config_file, upstreams=list(upstreams), cache_dir=cache_dir, max_bytes=max_bytes,
            memory_bytes=memory_bytes.strip() or "0", name=name, core=core_address or None, listen=listen,
            https_listen=https_listen, upstream_ca=upstream_ca,
            tftp_listen=f"{bracketed}:{tftp_port}" if tftp_port is not None else None, ipxe_dir=ipxe_dir,
            max_transfers=max_transfers, max_fetches=max_fetches, access_log=access_log, grace=grace,
            trust=list(trust), identity=identity, core_insecure=core_insecure,
            log_level=log_level, wake_to=wake_to, wake_from=wake_from, nfs_listen=nfs_listen, nfs_dir=nfs_dir,
            nfs_clients=nfs_clients.split(",") if nfs_clients is not None else None,
        )  # fmt: skip
        setup_logging(config.log_level)

        def ready(r: RelayServer) -> None:
            click.echo(f"listening on {r.host}:{r.port}")
            if r.https is not None:
                click.echo(f"https on {r.https[0]}:{r.https_port}")
            if r.tftp_port and config.tftp_listen is not None:
                host = parse_listen(config.tftp_listen, 69, allow_ephemeral=True)[0]
                click.echo(f"tftp on {host}:{r.tftp_port}")
            if r.nfs is not None:
                click.echo(f"nfs on {r.nfs.server.bind}:{r.nfs.server.port}")
            sys.stdout.flush()

        run(config, ready)


def registry_upstreams(registry_path: Path, name: str, fallback: bool = False) -> list[str]:
    """Relay ``name``'s upstreams from the registry: its parent's URLs (InvalidArgument
    for a relay without a name, or without a parent and no ``fallback`` upstream)."""
    from slim.core.registry import load_registry

    if not name:
        raise InvalidArgument("--registry needs --name: which relay of the registry this is")
    found = load_registry(registry_path).relay_upstreams(name)
    if not found and not fallback:
        raise InvalidArgument(
            f"relay {name!r} has no parent in {registry_path}: its upstream is the core's object server; "
            "give it with --upstream https://HOST:PORT (slim core serve --objects-listen)"
        )
    return found


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

    request = pb.PrefetchRequest(
        environment=environment,
        relays=relays,
        nodes=nodes,
        requested_by=f"slim relay prefetch ({getpass.getuser()})",
    )
    failed: dict[str, str] = {}
    final: dict[str, pb.PrefetchStatus] = {}
    with errors_to_exit(), core_client(core_address) as client, StageProgress() as progress:
        for p in client.stream(client.admin.Prefetch, request, timeout):
            s = p.status
            final[p.relay] = s
            if s.bytes_total or s.done:
                progress(f"{p.relay}: {environment}", s.bytes_done, s.bytes_total)
            if s.done and s.error:
                failed[p.relay] = s.error
            if no_wait and len(final) >= 1:
                break  # ends (cancels) the call: the orders are out
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


@relay.command("enroll")
@click.argument("name")
@identity_out_option("Write the identity here (default: ./NAME); copy it to the relay's host.")
@days_option
@registry_option
@ca_option()
def relay_enroll(name: str, out: Path | None, days: int, registry_path: Path, ca_path: Path | None) -> None:
    """Issue relay NAME its certificate (on the core's host): key.pem, cert.pem and ca.pem
    in one directory, which the relay takes with --identity.  The core knows the relay by
    the name in it, whatever the relay says."""
    from slim.cli.ca import enroll

    with errors_to_exit():
        from slim.core.registry import load_registry

        if registry_path.exists() and name not in load_registry(registry_path).relays:
            raise InvalidArgument(f"the registry {registry_path} has no relay {name!r}")
    enroll(registry_path, ca_path, name, "relay", out, days)


@relay.command("revoke")
@click.argument("name")
@registry_option
@ca_option()
def relay_revoke(name: str, registry_path: Path, ca_path: Path | None) -> None:
    """Revoke relay NAME's certificates: the core refuses its next call, and ends its
    heartbeat stream at its next beat."""
    from slim.cli.ca import revoke

    revoke(registry_path, ca_path, name, "relay")
