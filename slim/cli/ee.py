"""``slim ee``: environments: what the core knows of them (list, show), and the commands
that work on images and the store directly, on the core's host (import, build, verify);
``slim profile``: the paper's Table 2 for an image."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from slim.cli.common import (
    StageProgress,
    ca_option,
    console,
    core_client,
    core_option,
    errors_to_exit,
    fail,
    json_option,
    keys_option,
    print_json,
    registry_option,
    store_option,
    store_path_or_default,
)
from slim.rpc import policy_name
from slim.v1 import core_pb2 as pb


@click.group()
def ee() -> None:
    """Execution environments: import images, build releases, verify; list and show (from the core)."""


@ee.command("list")
@core_option
@json_option
def ee_list(core_address: str, as_json: bool) -> None:
    """List the environments, their Slurm feature and their current release."""
    client = core_client(core_address)
    with errors_to_exit():
        resp = client.call(client.admin.ListEnvironments, pb.ListEnvironmentsRequest())
    if as_json:
        print_json(resp)
        return
    table = Table("environment", "feature", "release", "directories", "description")
    for e in resp.environments:
        dirs = " ".join(f"{d.path}={policy_name(d.policy)}" for d in e.directories)
        table.add_row(e.name, e.feature, e.release_digest[:19] or "(not built)", dirs, e.description)
    console.print(table)


@ee.command("show")
@click.argument("name")
@core_option
@json_option
def ee_show(name: str, core_address: str, as_json: bool) -> None:
    """Show environment NAME: image, kernel, per-directory policies, release."""
    client = core_client(core_address)
    with errors_to_exit():
        e = client.call(client.admin.GetEnvironment, pb.GetEnvironmentRequest(name=name))
    if as_json:
        print_json(e)
        return
    console.print(f"[bold]{e.name}[/]  {e.description}")
    console.print(f"  feature      {e.feature}")
    console.print(f"  image        {e.image}")
    console.print(f"  kernel       {e.kernel}  {e.kernel_args}")
    console.print(f"  release      {e.release_digest or '(not built)'}")
    table = Table("directory", "policy", "mount options")
    for d in e.directories:
        table.add_row(d.path, policy_name(d.policy), d.options)
    console.print(table)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _short(digest: str | None) -> str:
    return "-" if not digest else digest[:19]


# -- slim ee import ---------------------------------------------------------------
@ee.command("import")
@click.argument("name")
@click.option(
    "--from",
    "source",
    required=True,
    metavar="DIR|TARBALL|debootstrap:SUITE",
    help="A root file system directory; a .tar (optionally .gz, .bz2, .xz, .zst); or debootstrap:SUITE.",
)
@registry_option
@click.option(
    "--image",
    "image_path",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to put the image (default: the environment's 'image' in the registry).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache for debootstrap trees and kernel packages "
    "(default: $SLIM_CACHE_DIR, /var/cache/slim as root, else ~/.cache/slim).",
)
@click.option(
    "--variant",
    default="minbase",
    show_default=True,
    help="debootstrap variant (minbase, buildd, fakechroot or - for debootstrap's default).",
)
@click.option(
    "--include",
    default="",
    metavar="PKG,...",
    help="debootstrap: extra Debian packages to install (comma-separated).",
)
@click.option(
    "--init/--no-init",
    default=True,
    show_default=True,
    help="debootstrap: install an init system (systemd-sysv and udev) so that the environment boots "
    "to its multi-user target; --no-init for a tree whose init you add yourself (slim ee build "
    "refuses an image without /sbin/init or the slim.init= its environment names).",
)
@click.option(
    "--add-kernel",
    is_flag=True,
    help="Unpack the machine's Debian kernel package (apt-get download linux-image-<arch>) into the image, "
    "with modules.dep, so that it can be built and booted.",
)
@json_option
def ee_import(
    name: str,
    source: str,
    registry_path: Path,
    image_path: Path | None,
    cache_dir: Path | None,
    variant: str,
    include: str,
    init: bool,
    add_kernel: bool,
    as_json: bool,
) -> None:
    """Bring a root file system into environment NAME's image directory.

    Owners, modes, symlinks, hard links, device nodes, times and extended
    attributes are kept.  The new image is assembled beside the old one and
    swapped in when complete.  Archives are unpacked safely: members with '..',
    absolute names, paths through symlinks, or (when not root) device nodes are
    refused.
    """
    from slim.core.build.image import import_image
    from slim.core.registry import load_registry

    with errors_to_exit():
        if image_path is None:
            reg = load_registry(registry_path)
            image_path = Path(reg.environment(name).image)
        packages = tuple(p for p in include.split(",") if p)
        with StageProgress(enabled=not as_json) as progress:
            result = import_image(
                source,
                image_path,
                cache_dir=cache_dir,
                variant=variant,
                include=packages,
                init=init,
                add_kernel=add_kernel,
                progress=progress,
            )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "environment": name,
                    "image": str(result.target),
                    "source": result.source,
                    "entries": result.entries,
                    "files": result.files,
                    "bytes": result.bytes,
                    "cached": result.cached,
                    "kernel_release": result.kernel_release,
                    "notes": result.notes,
                    "seconds": round(result.seconds, 3),
                },
                indent=2,
            )
        )
        return
    cached = " (from the cache)" if result.cached else ""
    console.print(
        f"imported {source}{cached} into {result.target}: {result.files} files, "
        f"{_mb(result.bytes)} MB in {result.seconds:.1f} s"
    )
    if result.kernel_release:
        console.print(f"kernel {result.kernel_release} added")
    for note in result.notes:
        console.print(f"note: {note}")


# -- slim ee build ------------------------------------------------------------------
def _build_json(res: Any) -> dict[str, Any]:
    return {
        "environment": res.environment,
        "release": res.digest,
        "unchanged": res.unchanged,
        "new_objects": res.new_objects,
        "kernel": {"release": res.kernel_release, **res.release.kernel.model_dump()},
        "initrd": {
            **res.release.initrd.model_dump(),
            "uncompressed": res.initrd.uncompressed_size,
            "modules": list(res.initrd.modules),
        },
        "directories": [
            {
                "path": d.path,
                "policy": str(d.policy),
                "files": d.files,
                "bytes": d.bytes,
                "archive": d.archive.model_dump() if d.archive else None,
                "manifest": d.manifest.model_dump() if d.manifest else None,
                "file_objects": d.file_objects,
                "tree": d.tree,
                "seconds": round(d.seconds, 3),
            }
            for d in res.directories
        ],
        "notes": res.notes,
        "warnings": res.warnings,
        "seconds": round(res.seconds, 3),
    }


@ee.command("build")
@click.argument("names", nargs=-1, metavar="NAME...")
@click.option("--all", "build_all", is_flag=True, help="Build every environment of the registry.")
@registry_option
@store_option
@click.option(
    "--level",
    type=click.IntRange(1, 22),
    default=None,
    help="zstd level of the copy-set archives (default 9; see docs/benchmarks for the trade-off).",
)
@click.option(
    "--agent/--no-agent",
    default=True,
    show_default=True,
    help="Put the agent and its runtime (busybox, zstd, a minimal python3, from this machine) into "
    "the initrd; --no-agent leaves only the kernel modules.",
)
@keys_option
@ca_option(
    "Made if missing.  When the registry names a relay by an https:// URL, initrds carry "
    "Python's ssl and this CA's certificate, which the agent checks relays against."
)
@json_option
def ee_build(
    names: tuple[str, ...],
    build_all: bool,
    registry_path: Path,
    store_path: Path | None,
    level: int | None,
    agent: bool,
    keys_path: Path | None,
    ca_path: Path | None,
    as_json: bool,
) -> None:
    """Build environments into content-addressed objects and publish their releases.

    Per directory of the environment: ram/disk/sync get a deterministic tar+zstd
    archive and a manifest (sync also one object per file, so nodes fetch only
    what changed); nfs gets a manifest and a read-only tree for export.  Plus the
    image's kernel and an initrd with its modules for every hardware profile,
    the agent and its runtime, and the core's public keys (from --keys, the key made
    there if missing; both keys during a rotation, slim keys rotate): the agent refuses
    any plan they did not sign.  If a relay of the registry has an https:// URL, the
    runtime also has Python's ssl and SLIM's CA certificate (from --ca).
    Rebuilding an unchanged image adds no object and keeps the release.
    """
    from slim.core.build.agentrt import registry_runtime
    from slim.core.build.copyset import DEFAULT_LEVEL
    from slim.core.build.release import build_environment
    from slim.core.registry import load_registry
    from slim.core.store import Store
    from slim.signing import KeyDirectory, SigningKey

    with errors_to_exit(), ExitStack() as held:
        reg = load_registry(registry_path)
        targets = sorted(reg.environments) if build_all else list(names)
        if not targets:
            fail("name at least one environment, or --all")
        for n in targets:
            reg.environment(n)  # unknown names fail before any work
        store = Store(store_path if store_path is not None else Path(reg.server.state_dir) / "store")
        keys = Path(keys_path) if keys_path is not None else Path(reg.server.state_dir) / "keys"
        SigningKey.load_or_create(keys)  # made if missing
        # held (shared) to the end: a key rotation waits for this build, or it for the rotation
        keydir = held.enter_context(KeyDirectory(keys).held(exclusive=False))
        signer = keydir.signer()  # signs the releases
        ca_dir = ca_path if ca_path is not None else Path(reg.server.state_dir) / "ca"
        runtime = registry_runtime(reg, ca_dir) if agent else None
        if runtime is not None:
            runtime.trust(keydir.trusted())  # the signer's key; during a rotation the previous one too
        results = []
        with StageProgress(enabled=not as_json) as progress:
            for n in targets:
                results.append(
                    build_environment(
                        reg,
                        store,
                        n,
                        level=level or DEFAULT_LEVEL,
                        progress=progress,
                        runtime=runtime,
                        signer=signer,
                    )
                )
                for warning in results[-1].warnings:  # standard error, with --json too
                    click.echo(f"warning: {n}: {warning}", err=True)
    if as_json:
        click.echo(json.dumps([_build_json(r) for r in results], indent=2))
        return
    for res in results:
        table = Table(title=f"{res.environment}: release {_short(res.digest)}", title_justify="left")
        for col in ("directory", "policy", "files", "MB", "archive MB", "objects", "seconds"):
            table.add_column(col, justify="left" if col in ("directory", "policy") else "right")
        for d in res.directories:
            objects = str(d.file_objects) if d.file_objects else "-"
            archive = _mb(d.archive.size) if d.archive else ("tree" if d.tree else "-")
            table.add_row(
                d.path, str(d.policy), str(d.files), _mb(d.bytes), archive, objects, f"{d.seconds:.1f}"
            )
        console.print(table)
        console.print(
            f"kernel {res.kernel_release}: {_mb(res.release.kernel.size)} MB; initrd: "
            f"{_mb(res.release.initrd.size)} MB ({len(res.initrd.modules)} modules, "
            f"{_mb(res.initrd.uncompressed_size)} MB unpacked)"
        )
        state = "unchanged, nothing published" if res.unchanged else "published"
        console.print(
            f"{res.environment}: {res.digest} {state}; {res.new_objects} new objects; {res.seconds:.1f} s"
        )
        for note in res.notes:
            console.print(f"note: {note}")


# -- slim ee verify -----------------------------------------------------------------
@ee.command("verify")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@registry_option
@store_option
def ee_verify(names: tuple[str, ...], registry_path: Path, store_path: Path | None) -> None:
    """Re-hash every object of the environments' current releases (all built ones by default)
    and check each NFS tree against its manifest; exit 1 if anything is missing or corrupt."""
    from slim.core.build.release import verify_release
    from slim.core.registry import load_registry
    from slim.core.store import Store

    failed = False
    with errors_to_exit():
        reg = load_registry(registry_path)
        store = Store(store_path_or_default(store_path, registry_path))
        targets = list(names) or sorted(reg.environments)
        for n in targets:
            reg.environment(n)
            current = store.release(n)
            if current is None:
                if names:
                    fail(f"environment {n!r} has never been built (slim ee build {n})")
                continue
            digest, release = current
            report = verify_release(store, release)
            status = "ok" if not report.problems else "FAILED"
            console.print(
                f"{n} {_short(digest)}: {status}: {report.objects} objects ({_mb(report.bytes)} MB), "
                f"{report.trees} NFS trees"
            )
            for problem in report.problems:
                console.print(f"  {problem}")
            failed = failed or bool(report.problems)
    if failed:
        fail("some objects did not verify")


# -- slim profile ---------------------------------------------------------------------
@click.command("profile")
@click.argument("image")
@registry_option
@click.option(
    "--copy-policy",
    type=click.Choice(["ram", "disk", "sync"]),
    default="ram",
    show_default=True,
    help="What directories modified at run time should get (and the suggested default_policy).",
)
@click.option(
    "--snippet", is_flag=True, help="Print only the registry snippet (default_policy and directories)."
)
@json_option
def profile(image: str, registry_path: Path, copy_policy: str, snippet: bool, as_json: bool) -> None:
    """The paper's Table 2 for IMAGE: per top-level directory, files, size, read-only or
    read/write, and the recommended policy (see docs/profile.md for the rules).

    IMAGE is a directory, or the name of an environment of the registry (its image).
    """
    from slim.core.build.profile import profile_image, render_table

    with errors_to_exit():
        root = Path(image)
        if not root.is_dir() and "/" not in image:
            from slim.core.registry import load_registry

            root = Path(load_registry(registry_path).environment(image).image)
        if not root.is_dir():
            fail(f"{root} is not a directory (give an image directory or an environment name)")
        result = profile_image(root, copy_policy=copy_policy)
    if as_json:
        click.echo(json.dumps(result.as_json(), indent=2))
    elif snippet:
        click.echo(result.registry_snippet(), nl=False)
    else:
        console.print(render_table(result))
        console.print("\nRegistry snippet (paste under environments.<name>):\n")
        console.print(result.registry_snippet(indent=2), markup=False, highlight=False)
