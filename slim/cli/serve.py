"""``slim serve``: everything one machine needs, from one registry file."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from slim.cli.common import errors_to_exit, log_level_option, registry_option, setup_logging


@click.command("serve")
@registry_option
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where state, store, cache and logs live (default: the registry's server.state_dir).",
)
@log_level_option("Logging threshold of the core and the relay (their logs: STATE_DIR/logs/).")
def serve(registry_path: Path, state_dir: Path | None, log_level: str) -> None:
    """Run everything one machine needs: core, relay (HTTP + TFTP), NFS and DHCP.

    One registry file configures it all; its 'server' section says where each
    part listens (docs/registry.md).  nfs-ganesha runs when an environment
    shares a directory over NFS; dnsmasq when a site has a dhcp section.
    Prints where each part listens, then "ready".  SIGHUP re-reads the
    registry; SIGTERM/SIGINT stops everything.  Exits non-zero if a part
    exits on its own.
    """
    from slim import allinone

    setup_logging("info")
    with errors_to_exit():
        code = allinone.serve(registry_path, state_dir, log_level)
    sys.exit(code)
