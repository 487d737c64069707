"""The network configuration service: dnsmasq's configuration, rendered from the registry.

Every site with a ``dhcp`` section is one network dnsmasq answers on
(docs/dhcp.md).  What a PXE client is told depends on three things:

* **iPXE or not** (DHCP user class ``iPXE``): a plain PXE ROM gets a TFTP
  file from the site's relay; iPXE gets the relay's ``/boot/${mac}.ipxe``
  over HTTP.  That check is what breaks the chainload loop (iPXE would
  otherwise load iPXE again, forever).
* **Firmware** (DHCP option 93, client architecture): BIOS (0) gets
  ``undionly.kpxe``, x86-64 UEFI (7, 9) gets ``ipxe.efi`` — both from
  Debian's ``ipxe`` package, served by the relay's TFTP.
* **Boot loader of the node's hardware profile**: ``loader: pxelinux`` sends
  ``lpxelinux.0``, which reads ``pxelinux.cfg/01-<mac>`` from the relay (the
  legacy path for firmware that cannot run iPXE).

In **proxy** mode (the default) dnsmasq sends only boot information and the
site's own DHCP server keeps handing out addresses; in **full** mode it hands
out addresses from the site's range too (isolated networks).  Only the MACs
of registered nodes are answered, unless the site has ``open_enrollment``.

:func:`render` is pure; :class:`~slim.core.daemons.dnsmasq.DhcpServer` runs
and supervises dnsmasq with it (``slim dhcp serve``).
"""

from __future__ import annotations

from dataclasses import dataclass

from slim.core.registry import DhcpNetwork, Registry
from slim.errors import FailedPrecondition

BIOS_LOADER = "undionly.kpxe"
UEFI_LOADER = "ipxe.efi"
PXELINUX_LOADER = "lpxelinux.0"
# DHCP option 93 values (RFC 4578 and IANA "Processor Architecture Types")
EFI_ARCHES = (7, 9)  # x86-64 UEFI (9 is what some firmware sends for the same)
KNOWN, LEGACY = "known", "legacy"


@dataclass(frozen=True)
class DnsmasqConfig:
    text: str
    networks: tuple[DhcpNetwork, ...]
    hosts: int  # MACs answered by name


def _tag(site: str) -> str:
    return f"site-{site}"


def boot_url(net: DhcpNetwork) -> str:
    """What iPXE is told to chain to (iPXE expands ``${mac}`` itself)."""
    return f"{net.relay_url}boot/${{mac}}.ipxe"


def render(registry: Registry, source: str = "the registry", sites: list[str] | None = None) -> DnsmasqConfig:
    """The dnsmasq configuration for the registry's DHCP sites (or only ``sites``)."""
    nets = [n for n in registry.dhcp_networks if sites is None or n.site in sites]
    if sites is not None:
        missing = sorted(set(sites) - {n.site for n in nets})
        if missing:
            with_dhcp = ", ".join(n.site for n in registry.dhcp_networks) or "none"
            raise FailedPrecondition(
                f"site(s) {', '.join(missing)} have no dhcp section (sites with one: {with_dhcp})"
            )
    if not nets:
        raise FailedPrecondition(
            f"no site in {source} has a dhcp section: nothing for dnsmasq to answer (see docs/dhcp.md)"
        )
    out = [
        f"# dnsmasq configuration for SLIM, rendered from {source} by `slim dhcp config`.",
        "# Do not edit: change the registry (sites.<name>.dhcp) and re-render; docs/dhcp.md.",
        "port=0  # no DNS: DHCP and PXE only",
        "no-resolv",
        "no-hosts",
    ]
    interfaces = sorted({n.spec.interface for n in nets if n.spec.interface})
    if interfaces and all(n.spec.interface for n in nets):
        out += [f"interface={i}" for i in interfaces] + ["bind-interfaces"]
    else:
        out.append("# a site names no interface: answer on every interface")
    if any(n.spec.mode == "full" for n in nets):
        out += [
            "# full mode: the range is ours (authoritative); no ping before each offer, which",
            "# blocks dnsmasq ~3 s per new client and serializes a boot storm",
            "dhcp-authoritative",
            "no-ping",
        ]
    if any(n.spec.router_advertisements for n in nets):
        out.append("enable-ra  # IPv6 router advertisements on the interfaces that ask for them")
    out += [
        "",
        "# firmware by DHCP option 93 (client architecture); iPXE by its user class",
        *(f"dhcp-match=set:efi64,option:client-arch,{a}" for a in EFI_ARCHES),
        "dhcp-userclass=set:ipxe,iPXE",
        "",
        "# registered nodes (tag 'legacy': the hardware profile boots pxelinux)",
    ]
    any_open = any(n.spec.open_enrollment for n in nets)
    if not any_open:
        out.append(f"dhcp-ignore=tag:!{KNOWN},tag:!{LEGACY}  # nobody else")
    else:
        closed = [n.site for n in nets if not n.spec.open_enrollment and not n.spec.interface]
        if closed:
            raise FailedPrecondition(
                f"site(s) {', '.join(closed)} answer only registered MACs while another site has "
                "open_enrollment: give them an 'interface' so that dnsmasq can tell the networks apart"
            )
    hosts = 0
    for name, node in registry.nodes.items():
        profile = registry.profiles.get(node.profile)
        tag = LEGACY if profile is not None and profile.loader == "pxelinux" else KNOWN
        for mac in node.macs:
            out.append(f"dhcp-host={mac},set:{tag}  # {name}")
            hosts += 1
    for n in nets:
        t, tftp = _tag(n.site), n.tftp_server
        mask = str(n.subnet.netmask)
        out += ["", f"# site {n.site}: {n.spec.mode} DHCP on {n.subnet}, relay {n.relay} ({n.relay_url})"]
        if n.spec.mode == "proxy":
            out.append(f"dhcp-range=set:{t},{n.subnet.network_address},proxy,{mask}")
        else:
            assert n.spec.range is not None
            first, last = n.spec.range
            out.append(f"dhcp-range=set:{t},{first},{last},{mask},{n.spec.lease_time}")
            out.append(f"dhcp-option=tag:{t},option:router" + (f",{n.spec.router}" if n.spec.router else ""))
            out.append(f"dhcp-option=tag:{t},option:dns-server" + "".join(f",{d}" for d in n.spec.dns))
        if n.spec.router_advertisements:
            # iPXE configures IPv4 and IPv6 together and, with no IPv6 router, waits ~13 s
            out.append(f"dhcp-range=set:{t},::,constructor:{n.spec.interface},ra-only")
        if n.spec.open_enrollment:
            out.append("# open enrollment: unknown MACs are answered too")
        elif not any_open:
            out.append("# only registered MACs (dhcp-ignore above)")
        else:  # dnsmasq applies dhcp-ignore before it picks the range: tell sites by interface
            out.append(f"dhcp-ignore=tag:{n.spec.interface},tag:!{KNOWN},tag:!{LEGACY}")
        plain = f"tag:{t},tag:!{LEGACY},tag:!ipxe"
        ipxe_bios = f"tag:{t},tag:!{LEGACY},tag:ipxe"
        if n.spec.mode == "proxy":
            # a PXE boot server menu of one item per architecture boots at once
            out += [
                f'pxe-service={plain},x86PC,"SLIM: chain to iPXE",{BIOS_LOADER},{tftp}',
                f'pxe-service={plain},X86-64_EFI,"SLIM: chain to iPXE",{UEFI_LOADER},{tftp}',
                f'pxe-service={plain},BC_EFI,"SLIM: chain to iPXE",{UEFI_LOADER},{tftp}',
                f'pxe-service=tag:{t},tag:{LEGACY},x86PC,"SLIM: pxelinux",{PXELINUX_LOADER},{tftp}',
                # iPXE as a BIOS PXE ROM (or undionly.kpxe) takes a proxy's boot file only through
                # PXE boot server discovery: a service whose "file" is the menu's URL (measured
                # with Debian's iPXE 1.0.0+git-20190125; UEFI iPXE takes dhcp-boot below)
                f'pxe-service={ipxe_bios},x86PC,"SLIM: boot menu",{boot_url(n)},{tftp}',
            ]
        else:
            out += [
                f"dhcp-boot={plain},tag:!efi64,{BIOS_LOADER},,{tftp}",
                f"dhcp-boot={plain},tag:efi64,{UEFI_LOADER},,{tftp}",
                f"dhcp-boot=tag:{t},tag:{LEGACY},{PXELINUX_LOADER},,{tftp}",
            ]
        out.append(f"dhcp-boot=tag:{t},tag:!{LEGACY},tag:ipxe,{boot_url(n)}")
    return DnsmasqConfig("\n".join(out) + "\n", tuple(nets), hosts)
