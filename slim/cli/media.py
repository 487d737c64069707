"""``slim media``: boot media for home PCs (docs/home.md)."""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

import click

from slim.cli.common import (
    ca_option,
    ca_path_or_default,
    errors_to_exit,
    fail,
    json_option,
    keys_option,
    keys_path_or_default,
    registry_option,
)


@click.group()
def media() -> None:
    """Boot media for home PCs: a USB stick or CD that boots a PC with no PXE into SLIM."""


def default_relays(registry_path: Path, node: str) -> list[str]:
    """The https:// URLs of the relays a node's medium names when none is given: its site's
    relays, then their parents, then every other relay with one."""
    from slim.core.registry import load_registry

    reg = load_registry(registry_path)
    site = reg.node(node).site if node else None
    ordered = [r for r in reg.relays.values() if r.site == site]
    parents = [reg.relays[r.parent] for r in ordered if r.parent and r.parent in reg.relays]
    rest = [r for r in reg.relays.values() if r not in ordered and r not in parents]
    urls = [u for r in [*ordered, *parents, *rest] for u in r.urls if u.startswith("https://")]
    return list(dict.fromkeys(u.rstrip("/") for u in urls))


@media.command("build")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--node", default=None, help="The node (in the registry) the medium boots; its token goes in.")
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The node's token (slim node enroll NODE --out FILE): the medium sends it to the relays, over "
    "HTTPS only.  Revoke it (slim node revoke) and the medium stops working.",
)
@click.option(
    "--generic",
    is_flag=True,
    help="A medium of no node, holding no token: at its first boot it asks for a one-time code (slim "
    "node code NODE), trades it for the node's token over HTTPS and keeps that on the stick.  Give "
    "--environment (its kernel); instead of --node and --token-file.",
)
@click.option(
    "--relay",
    "relays",
    multiple=True,
    metavar="URL",
    help="A relay the medium asks, in order (repeatable; https://HOST:PORT).  Default: the https URLs of "
    "the node's site's relays, then their parents', then the other relays'.",
)
@click.option(
    "--environment",
    default=None,
    help="The environment whose image gives the medium its kernel and modules (default: the node's).  "
    "The medium boots whatever release the core plans; this is only the kernel that fetches it.",
)
@click.option(
    "--module",
    "modules",
    multiple=True,
    help="A kernel module the medium loads (repeatable; default: common PC network drivers, USB storage "
    "and ext4 for its cache).",
)
@click.option(
    "--console",
    type=click.Choice(["both", "screen", "serial"]),
    default="both",
    show_default=True,
    help="Where the medium's kernel and messages go: the screen, the first serial port, or both.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the Debian packages a medium needs (shim, signed GRUB, kexec-tools) are kept "
    "(default: $SLIM_CACHE_DIR, /var/cache/slim as root, else ~/.cache/slim).",
)
@registry_option
@keys_option
@ca_option("The medium carries its certificate, which relays' certificates must chain to.")
@json_option
def media_build(
    out: Path,
    node: str | None,
    token_file: Path | None,
    generic: bool,
    relays: tuple[str, ...],
    environment: str | None,
    modules: tuple[str, ...],
    console: str,
    cache_dir: Path | None,
    registry_path: Path,
    keys_path: Path | None,
    ca_path: Path | None,
    as_json: bool,
) -> None:
    """Write a boot medium to OUT, for --node NODE (with its token) or --generic (a one-time code
    at its first boot): a hybrid image for a USB stick or a CD, BIOS or UEFI (Secure Boot:
    Debian's signed shim, GRUB and kernel).

    Write it to a stick with `dd if=OUT of=/dev/sdX bs=4M conv=fsync` (or any image writer).
    It holds a kernel and an initrd that reach the relays, check the node's plan with the
    core's public keys (and the keys later rotations endorsed: a new key, like a new
    release, needs no new medium), fetch the release's kernel and initrd by the plan's
    digests and start them (kexec).  Nothing it did not carry runs unverified.
    """
    from slim.agent.plan import read_token
    from slim.core.build.agentrt import collect
    from slim.core.build.image import default_cache_dir
    from slim.core.build.initrd import kernel_release, resolve_in_image
    from slim.core.build.medium import (
        CACHE_MODULES,
        NIC_MODULES,
        MediumSpec,
        fetch_parts,
        write_initrd,
        write_iso,
    )
    from slim.core.registry import load_registry
    from slim.pki import CertificateAuthority
    from slim.signing import KeyDirectory

    with errors_to_exit():
        reg = load_registry(registry_path)
        if generic:
            if node or token_file:
                fail("--generic: a generic medium has no node and no token (they come with a one-time code)")
            if not environment:
                fail("--generic: give --environment, whose image gives the medium its kernel")
        elif not node or token_file is None:
            fail("give --node and --token-file (a node's medium), or --generic (a one-time code)")
        node = "" if generic else node or ""
        env_name = environment or reg.node(node).environment
        env = reg.environment(env_name)
        urls = [u.rstrip("/") for u in relays] or default_relays(registry_path, node)
        if not urls:
            fail("no relay of the registry has an https:// URL; give --relay https://HOST:PORT")
        for u in urls:
            if not u.startswith("https://"):
                fail(f"--relay {u}: a medium's relays are https:// (its token never goes in clear)")
        token = read_token(token_file, default=False) if token_file is not None else ""
        keys = KeyDirectory(keys_path_or_default(keys_path, registry_path))
        trusted = keys.public_keys()  # the public files only: nothing is read or written beside them
        ca_dir = ca_path_or_default(ca_path, registry_path)
        args = {"both": "console=ttyS0,115200 console=tty0", "screen": "console=tty0",
                "serial": "console=ttyS0,115200"}[console]  # fmt: skip
        spec = MediumSpec(secrets.token_hex(8), node, urls, token=token, kernel_args=args)
        image = Path(env.image)
        kver = kernel_release(image, env.kernel)
        parts = fetch_parts(cache_dir or default_cache_dir())
        runtime = collect(https=True, build_cache=cache_dir or default_cache_dir())
        for warning in runtime.warnings:
            click.echo(f"warning: {warning}", err=True)
        runtime.trust(trusted)
        runtime.trust_ca(CertificateAuthority.load(ca_dir).cert_pem)  # the relays' CA: never a new one
        out.parent.mkdir(parents=True, exist_ok=True)
        umask = os.umask(0o077)  # the initrd and the image hold the node's token: ours only
        try:
            with tempfile.TemporaryDirectory(prefix="slim-media-") as tmp:
                initrd_path = Path(tmp) / "initrd"
                initrd = write_initrd(
                    initrd_path, spec, runtime, parts, image, kver,
                    modules or NIC_MODULES + CACHE_MODULES, strict=bool(modules),
                )  # fmt: skip
                size = write_iso(out, spec, resolve_in_image(image, env.kernel), initrd_path, parts)
        finally:
            os.umask(umask)
        out.chmod(0o600)
    key_ids = [k.id for k in trusted]
    result = {
        "medium": str(out),
        "id": spec.medium_id,
        "node": node,
        "relays": urls,
        "kernel": kver,
        "bytes": size,
        "initrd_bytes": initrd.info.compressed_size,
        "modules": list(initrd.modules),
        "skipped_modules": list(initrd.skipped),
        "keys": key_ids,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    whom = f"node {node}" if node else "any node (generic: a one-time code at its first boot)"
    click.echo(f"wrote {out} ({size / 1e6:.1f} MB): medium {spec.medium_id} for {whom}, kernel {kver}")
    click.echo(f"  relays: {', '.join(urls)}")
    click.echo(f"  trusts: {', '.join(key_ids)} (and the keys their rotations endorse)")
    if initrd.skipped:
        click.echo(f"  modules the kernel lacks, left out: {', '.join(initrd.skipped)}")
    if node:
        click.echo("  it holds the node's token: keep it like a key (mode 0600)")
    else:
        click.echo("  at its first boot it asks for a one-time code: slim node code NODE")


@media.command("grub-entry")
@click.argument("medium", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--path",
    "path",
    required=True,
    metavar="PATH",
    help="Where the PC keeps the image: its absolute path on its own file system (for "
    "/boot/slim/home1.iso with a separate /boot partition: /slim/home1.iso).",
)
def media_grub_entry(medium: Path, path: str) -> None:
    """Print a GRUB menu entry that boots MEDIUM (an image slim media build wrote) from a file on
    a PC that already runs Linux, beside its own system.

    Copy the image to the PC (for example /boot/slim/home1.iso), add the entry to
    /etc/grub.d/40_custom and run update-grub; the PC then offers SLIM in its own boot menu
    (grub-reboot slim-ID picks it for the next boot only).  GRUB reads the image with
    loopback; the kernel arguments are the medium's own.  It boots from RAM: no cache
    partition.  Under Secure Boot the PC's GRUB must be Debian's (its shim trusts Debian's
    kernel): see docs/home.md."""
    from slim.core.build.medium import grub_entry

    with errors_to_exit():
        click.echo(grub_entry(medium, path), nl=False)
