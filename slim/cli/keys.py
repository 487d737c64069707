"""``slim keys``: the core's signing key, on the core's host."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from slim.cli.common import (
    StageProgress,
    console,
    errors_to_exit,
    json_option,
    keys_option,
    keys_path_or_default,
    registry_option,
    state_dir,
    store_option,
    store_path_or_default,
)


@click.group()
def keys() -> None:
    """The core's signing key: boot plans and releases are signed with it, and every initrd
    and relay trusts its public half.

    It lives in STATE_DIR/keys: signing.key (private, mode 0600) and signing.pub, made on
    the core's first start, or the first build, if missing; during a rotation (slim keys
    rotate) also previous.pub, the public key being rotated out, still trusted.  Back up
    signing.key when it is made and after each rotation, off the core's host: with a lost
    key, every node's initrd must be rebuilt (slim ee build) before it trusts the plans
    again (docs/security.md).
    """


@keys.command("show")
@registry_option
@keys_option
@json_option
def keys_show(registry_path: Path, keys_path: Path | None, as_json: bool) -> None:
    """Show the signing key's id, where it is, and the keys trusted: during a rotation, the
    previous one too (made if missing, as the core would)."""
    from slim.signing import PUBLIC_FILE, KeyDirectory

    directory = keys_path_or_default(keys_path, registry_path)
    keydir = KeyDirectory(directory)
    with errors_to_exit():
        key = keydir.load_or_create()
        previous = keydir.previous()
    if as_json:
        doc = {
            "id": key.public.id,
            "directory": str(directory),
            "public": key.public.text(),
            "trusted": [key.public.id, *([previous.id] if previous else [])],
            "rotating": previous is not None,
            "previous": previous.id if previous else None,
        }
        click.echo(json.dumps(doc))
        return
    console.print(f"signing key {key.public.id} in {directory} (public key: {directory / PUBLIC_FILE})")
    if previous is None:
        console.print(f"trusted: {key.public.id}; no rotation under way")
    else:
        console.print(
            f"trusted: {key.public.id}, {previous.id} (previous); a rotation is under way: "
            "slim keys rotate --finish ends it"
        )


@keys.command("export")
@registry_option
@keys_option
def keys_export(registry_path: Path, keys_path: Path | None) -> None:
    """Print the public key (signify's format): what agents and relays check signatures with.
    During a rotation this is the new key; the previous one is previous.pub beside it."""
    from slim.signing import SigningKey

    directory = keys_path_or_default(keys_path, registry_path)
    with errors_to_exit():
        key = SigningKey.load_or_create(directory)
    click.echo(key.public.text(), nl=False)


@keys.command("rotate")
@click.option(
    "--finish",
    is_flag=True,
    help="End the rotation under way: rebuild the environments trusting the new key alone, then "
    "stop trusting the previous one (previous.pub goes).",
)
@registry_option
@store_option
@keys_option
@json_option
def keys_rotate(
    finish: bool, registry_path: Path, store_path: Path | None, keys_path: Path | None, as_json: bool
) -> None:
    """Replace the signing key, in two steps; run both on the core's host.

    slim keys rotate: make a new key; rebuild every built environment (as slim ee build
    does, with the agent) so its initrd trusts both the current key and the new one; then
    sign with the new key from now on, keeping the old public key trusted (previous.pub;
    its private key is deleted) and signing the current releases again.  The running core
    takes the new key up by itself at its next signature: nothing to restart or signal.

    slim keys rotate --finish: once the nodes run the new initrds and every relay trusts
    the new key, rebuild the environments trusting the new key alone and stop trusting the
    old one.

    A relay given the key directory (--trust STATE_DIR/keys, as slim serve does) follows
    both steps by itself; a relay given key files pins no re-signed release until it is
    given the new public key too (slim keys export).  If a rebuild fails, the step stops
    with the keys unchanged: fix the environment and run it again.  Back up signing.key
    once the rotation has begun: the old private key is gone, and nothing needs it.
    """
    from slim.core.build.agentrt import registry_runtime
    from slim.core.build.rotation import begin_rotation, finish_rotation
    from slim.core.registry import load_registry
    from slim.core.store import Store
    from slim.signing import KEY_FILE

    directory = keys_path_or_default(keys_path, registry_path)
    with errors_to_exit():
        reg = load_registry(registry_path)
        store = Store(store_path_or_default(store_path, registry_path))
        step = finish_rotation if finish else begin_rotation
        # the agent's, for the initrds (with ssl and the CA if a relay is https://, as slim ee build)
        runtime = registry_runtime(reg, state_dir(registry_path) / "ca") if store.environments() else None
        for warning in runtime.warnings if runtime is not None else []:  # standard error, with --json too
            click.echo(f"warning: {warning}", err=True)
        with StageProgress(enabled=not as_json) as progress:
            done = step(reg, store, directory, runtime, progress=progress)
    if as_json:
        doc: dict[str, Any] = {
            "step": "finish" if done.finished else "begin",
            "signing": done.signer.id,
            "previous": done.previous.id,
            "trusted": [k.id for k in done.trusted],
            "rebuilt": [
                {"environment": r.environment, "release": r.digest, "unchanged": r.unchanged}
                for r in done.rebuilt
            ],
            "not_in_registry": done.not_in_registry,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    trusted = ", ".join(k.id for k in done.trusted)
    for r in done.rebuilt:
        console.print(f"{r.environment}: release {r.digest} rebuilt; its initrd trusts {trusted}")
    for name in done.not_in_registry:
        console.print(f"{name}: not in the registry any more, its release is left as it was")
    if not done.rebuilt and not done.not_in_registry:
        console.print("no environment is built: no initrd to rebuild")
    if done.finished:
        console.print(
            f"rotation finished: key {done.previous.id} is no longer trusted; releases and "
            f"plans are signed with key {done.signer.id}"
        )
        console.print(
            f"relays given the key directory {directory} stop trusting the old key by themselves; "
            f"remove it from the others' --trust"
        )
        return
    console.print(
        f"rotation begun: releases and plans are signed with key {done.signer.id} from now on "
        f"(the running core takes it up at its next signature: nothing to restart); key "
        f"{done.previous.id} stays trusted until: slim keys rotate --finish"
    )
    console.print(
        f"relays given the key directory {directory} trust both keys by themselves; give the "
        f"others the new public key (slim keys export) beside the old one"
    )
    console.print(f"back up {directory / KEY_FILE} now: the old private key is gone")
