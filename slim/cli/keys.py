"""``slim keys``: the core's signing key, on the core's host."""

from __future__ import annotations

import json
from pathlib import Path

import click

from slim.cli.common import (
    console,
    errors_to_exit,
    json_option,
    keys_option,
    keys_path_or_default,
    registry_option,
)


@click.group()
def keys() -> None:
    """The core's signing key: boot plans are signed with it, and every initrd trusts it.

    It lives in STATE_DIR/keys (signing.key, private, mode 0600; signing.pub) and is made
    on the core's first start, or the first build, if missing.  Back the directory up: with
    a new key, every node's initrd must be rebuilt (slim ee build) before it trusts the
    plans again (docs/security.md).
    """


@keys.command("show")
@registry_option
@keys_option
@json_option
def keys_show(registry_path: Path, keys_path: Path | None, as_json: bool) -> None:
    """Show the signing key's id and where it is (made if missing, as the core would)."""
    from slim.signing import PUBLIC_FILE, SigningKey

    directory = keys_path_or_default(keys_path, registry_path)
    with errors_to_exit():
        key = SigningKey.load_or_create(directory)
    if as_json:
        click.echo(
            json.dumps({"id": key.public.id, "directory": str(directory), "public": key.public.text()})
        )
        return
    console.print(f"signing key {key.public.id} in {directory} (public key: {directory / PUBLIC_FILE})")


@keys.command("export")
@registry_option
@keys_option
def keys_export(registry_path: Path, keys_path: Path | None) -> None:
    """Print the public key (signify's format): what agents and relays check signatures with."""
    from slim.signing import SigningKey

    directory = keys_path_or_default(keys_path, registry_path)
    with errors_to_exit():
        key = SigningKey.load_or_create(directory)
    click.echo(key.public.text(), nl=False)
