"""The ``slim`` command: one module per command group.

Only the CLI exits the process; library code raises :class:`slim.errors.SlimError`,
printed here as ``error: ...`` with exit status 1.  Commands that ask a running core
reach it over gRPC (``--core``, or ``$SLIM_CORE``; default its local socket,
``unix:/var/lib/slim/core.sock``; credentials: :func:`slim.cli.common.client_credentials`).
Modules import what a command needs inside the command, so that ``slim --help``
stays quick.
"""

from __future__ import annotations

import click

from slim import __version__
from slim.cli import (
    ca,
    core,
    dhcp,
    ee,
    harvest,
    keys,
    media,
    nfs,
    node,
    registry,
    relay,
    serve,
    simulate,
    slurm,
    store,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="slim")
def main() -> None:
    """SLIM: put the right Linux execution environment (EE) on a machine when a job needs it.

    The core keeps the registry of EEs, nodes, relays and sites and decides
    which relay serves which node; relays serve kernels, initrds and archives;
    the agent in the initrd builds the EE on the node.
    """


for command in (
    core.core,
    registry.registry,
    ee.ee,
    ee.profile,
    store.store,
    keys.keys,
    ca.ca,
    ca.admin,
    node.node,
    media.media,
    harvest.harvest,
    relay.relay,
    nfs.nfs,
    dhcp.dhcp,
    serve.serve,
    slurm.slurm,
    simulate.simulate,
):
    main.add_command(command)
