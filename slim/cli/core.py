"""``slim core``: run the core (the registry, runtime state, redirection; gRPC)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from slim.cli.common import (
    DEFAULT_CORE_LISTEN,
    ca_option,
    config_option,
    errors_to_exit,
    keys_option,
    keys_path_or_default,
    log_level_option,
    registry_option,
    settings,
    setup_logging,
    state_dir,
    store_option,
    store_path_or_default,
)


@click.group()
def core() -> None:
    """Run the core (the registry, runtime state and redirection service)."""


@core.command("serve")
@registry_option
@click.option(
    "--state",
    "state_path",
    envvar="SLIM_STATE",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SQLite file for runtime state (next-boot overrides, boot events, heartbeats); created if missing "
    "(default: STATE_DIR/state.db, STATE_DIR being the registry's server.state_dir, /var/lib/slim unless "
    "it says otherwise).",
)
@store_option
@click.option(
    "--listen",
    default=DEFAULT_CORE_LISTEN,
    show_default=True,
    help="host:port for gRPC with mutual TLS: relays and admins with a certificate of SLIM's CA "
    "(port 0 picks a free port, printed on start); or unix:PATH for a local socket.",
)
@click.option(
    "--admin-listen",
    metavar="HOST:PORT",
    default=None,
    help="Also take admin calls here, over TLS, authenticated by admin token (slim admin token create).",
)
@ca_option("Made on first start if missing.")
@click.option(
    "--tls-name",
    "tls_names",
    multiple=True,
    metavar="NAME",
    help="A DNS name or address to add to the core's certificate (repeatable; clients check the "
    "name slim-core, always in it).",
)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The local socket, mode 0600: root on this host may make every call without a credential "
    "(default: STATE_DIR/core.sock).",
)
@click.option("--no-socket", is_flag=True, help="Open no local socket.")
@click.option(
    "--insecure-no-tls",
    "no_tls",
    is_flag=True,
    help="Plaintext gRPC and no authentication at all: every caller of --listen may do anything. "
    "Only where everyone who can reach the port is trusted (docs/security.md).",
)
@click.option(
    "--objects-listen",
    metavar="HOST:PORT",
    default=None,
    help="Also serve the store's objects here (GET /objects/sha256/<hex>): the upstream that relays "
    "fetch from, over HTTPS with the core's certificate (relays check SLIM's CA and the name "
    "slim-core) unless --objects-http or --insecure-no-tls.  Off by default; port 0 picks a free port "
    "(printed on start).",
)
@click.option(
    "--objects-http",
    is_flag=True,
    help="Serve --objects-listen over plain HTTP even with TLS on: relays cannot tell it is the core, "
    "and anyone on the path can read the objects (the digests still catch changed bytes).",
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
@keys_option
@config_option("core")
def core_serve(
    registry_path: Path,
    state_path: Path | None,
    store_path: Path | None,
    keys_path: Path | None,
    listen: str,
    admin_listen: str | None,
    ca_path: Path | None,
    tls_names: tuple[str, ...],
    socket_path: Path | None,
    no_socket: bool,
    no_tls: bool,
    objects_listen: str | None,
    objects_http: bool,
    grace: float,
    log_level: str,
    event_loop: str,
    config_file: Path | None,
) -> None:
    """Serve the core's gRPC API until SIGTERM or SIGINT (graceful stop); SIGHUP reloads the registry.

    Boot plans are signed with the key in --keys (made there on first start if missing;
    back it up: docs/security.md).

    Callers are authenticated (docs/security.md): relays and admins by a certificate of
    SLIM's CA on --listen (slim relay enroll, slim admin enroll), admins by token on
    --admin-listen (slim admin token create), root by the local socket.  The CA is made in
    --ca on first start if missing.

    Prints "listening on HOST:PORT" on standard output once it accepts calls
    (and "objects on HOST:PORT" with --objects-listen, "admin on HOST:PORT" with
    --admin-listen).
    """
    from slim.core.control.config import CoreConfig
    from slim.core.control.server import run

    with errors_to_exit():
        if config_file is None:
            state_path = state_path or state_dir(registry_path) / "state.db"
            store_path = store_path_or_default(store_path, registry_path)
            keys_path = keys_path_or_default(keys_path, registry_path)
        config = settings(
            CoreConfig, config_file, registry=registry_path, state=state_path, store=store_path,
            keys=keys_path, listen=listen, objects_listen=objects_listen, grace=grace, log_level=log_level,
            event_loop=event_loop, admin_listen=admin_listen, ca=ca_path, tls_names=list(tls_names),
            socket=socket_path, local_socket=not no_socket, tls=not no_tls,
            objects_tls=False if objects_http else None,
        )  # fmt: skip
        setup_logging(config.log_level)
        host = config.listen.rsplit(":", 1)[0]

        def ready(port: int) -> None:
            click.echo(
                f"listening on {config.listen if config.listen.startswith('unix:') else f'{host}:{port}'}"
            )
            sys.stdout.flush()

        def objects_ready(port: int) -> None:
            click.echo(f"objects on {(config.objects_listen or '').rsplit(':', 1)[0]}:{port}")
            sys.stdout.flush()

        def admin_ready(port: int) -> None:
            click.echo(f"admin on {(config.admin_listen or '').rsplit(':', 1)[0]}:{port}")
            sys.stdout.flush()

        run(config, ready, objects_ready, admin_ready)
