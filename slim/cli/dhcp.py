"""``slim dhcp``: the network configuration service, dnsmasq from the registry."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from slim.cli.common import config_option, errors_to_exit, registry_option, settings, setup_logging

site_option = click.option(
    "--site",
    "sites",
    multiple=True,
    metavar="SITE",
    help="Only this site's network (repeatable; default: every site with a dhcp section).",
)


@click.group()
def dhcp() -> None:
    """The network configuration service: dnsmasq, proxy-DHCP by default (docs/dhcp.md)."""


@dhcp.command("config")
@registry_option
@site_option
def dhcp_config(registry_path: Path, sites: tuple[str, ...]) -> None:
    """Print the dnsmasq configuration for the registry's sites.

    Proxy-DHCP (boot information only; the site's DHCP server keeps handing
    out addresses) unless a site says mode: full.  Plain PXE ROMs get
    undionly.kpxe (BIOS) or ipxe.efi (UEFI, by DHCP option 93) from the
    site's relay over TFTP; iPXE (user class "iPXE") gets the relay's
    /boot/${mac}.ipxe; nodes whose profile has loader: pxelinux get
    lpxelinux.0.  Only registered MACs are answered, unless the site has
    open_enrollment.
    """
    from slim.core.daemons.dhcp import render
    from slim.core.registry import load_registry

    with errors_to_exit():
        config = render(load_registry(registry_path), str(registry_path), list(sites) or None)
    click.echo(config.text, nl=False)


@dhcp.command("serve")
@registry_option
@site_option
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/var/lib/slim/dhcp"),
    show_default=True,
    help="dnsmasq's directory: dnsmasq.conf, dnsmasq.log, dnsmasq.leases, dnsmasq.pid.",
)
@click.option("--log-dhcp", is_flag=True, help="Have dnsmasq log every DHCP exchange in detail.")
@config_option("dhcp")
def dhcp_serve(
    registry_path: Path, sites: tuple[str, ...], workdir: Path, log_dhcp: bool, config_file: Path | None
) -> None:
    """Run dnsmasq with the rendered configuration and supervise it until SIGTERM/SIGINT.

    Restarts dnsmasq if it dies (with backoff) and when the registry file
    changes in a way that changes the configuration (or at SIGHUP).  An invalid
    registry is reported and the running configuration kept.  Prints
    "answering SITE (MODE on SUBNET), ..." once dnsmasq runs.
    """
    from slim.core.daemons.dnsmasq import DhcpConfig, DhcpServer, run

    setup_logging("info")

    def ready(server: DhcpServer) -> None:
        config = server.config
        assert config is not None
        nets = ", ".join(f"{n.site} ({n.spec.mode} on {n.subnet})" for n in config.networks)
        click.echo(f"answering {nets}")
        sys.stdout.flush()

    with errors_to_exit():
        config = settings(
            DhcpConfig, config_file, registry=registry_path, workdir=workdir, sites=list(sites) or None,
            log_dhcp=log_dhcp,
        )  # fmt: skip
        run(config, ready)
