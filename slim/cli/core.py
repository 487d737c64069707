"""``slim core``: run the core (the registry, runtime state, redirection; gRPC)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from slim.cli.common import (
    DEFAULT_CORE,
    errors_to_exit,
    log_level_option,
    registry_option,
    setup_logging,
    store_option,
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
