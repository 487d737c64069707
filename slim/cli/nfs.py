"""``slim nfs``: read-only NFSv4 exports of the environments' nfs directories (nfs-ganesha)."""

from __future__ import annotations

from pathlib import Path

import click

from slim.cli.common import (
    config_option,
    errors_to_exit,
    registry_option,
    settings,
    store_option,
    store_path_or_default,
)


@click.group()
def nfs() -> None:
    """Read-only NFSv4 exports of the environments' nfs directories (nfs-ganesha)."""


listen_option = click.option(
    "--listen",
    default="0.0.0.0:2049",
    show_default=True,
    help="Address and TCP port ganesha listens on (HOST:PORT, [V6]:PORT).",
)
clients_option = click.option(
    "--clients",
    default=None,
    metavar="CIDR|HOST,...",
    help="Only these clients may mount (default: every client).",
)
workdir_option = click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/lib/slim/nfs"),
    show_default=True,
    help="The server's own directory: ganesha.conf, log, pid file, recovery data, export ids.",
)


@nfs.command("config")
@registry_option
@store_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["ganesha", "exports"]),
    default="ganesha",
    show_default=True,
    help="ganesha: nfs-ganesha configuration; exports: kernel nfsd /etc/exports lines.",
)
@listen_option
@clients_option
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="A 'slim nfs serve' work directory: include the trees that server still exports, with their ids.",
)
def nfs_config(
    registry_path: Path,
    store_path: Path | None,
    fmt: str,
    listen: str,
    clients: str | None,
    workdir: Path | None,
) -> None:
    """Print the NFS configuration for every environment's current nfs trees (NFSv4, TCP, read-only)."""
    from slim.core.daemons.exports import render_config
    from slim.daemons.ganesha import parse_clients, parse_listen

    with errors_to_exit():
        bind, port = parse_listen(listen)
        text = render_config(
            registry_path,
            store_path_or_default(store_path, registry_path),
            fmt="exports" if fmt == "exports" else "ganesha",
            workdir=workdir,
            bind=bind,
            port=port,
            clients=parse_clients(clients),
        )
    click.echo(text, nl=False)


@nfs.command("serve")
@registry_option
@store_option
@listen_option
@clients_option
@workdir_option
@config_option("nfs")
def nfs_serve(
    registry_path: Path,
    store_path: Path | None,
    listen: str,
    clients: str | None,
    workdir: Path,
    config_file: Path | None,
) -> None:
    """Run nfs-ganesha with the rendered configuration and supervise it until SIGTERM/SIGINT.

    Restarts ganesha if it dies; re-renders when the registry or an environment's
    release changes (and at SIGHUP) and makes ganesha pick the change up.  Prints
    "listening on HOST:PORT" once ganesha accepts connections.
    """
    from slim.core.daemons.ganesha import NfsConfig, NfsServer, run

    with errors_to_exit():
        config = settings(
            NfsConfig, config_file, registry=registry_path, listen=listen,
            store=store_path if config_file else store_path_or_default(store_path, registry_path),
            clients=None if clients is None else clients.split(","), workdir=workdir,
        )  # fmt: skip
        bind, port = config.address

        def ready(server: NfsServer) -> None:
            click.echo(f"listening on {bind}:{port}")

        run(config, ready)
