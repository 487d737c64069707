"""``slim ee import|build|verify|table2``, ``slim profile`` and ``slim nfs``: the
commands that work on images and the store directly, on the core's host."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from slim.cli_common import (
    StageProgress,
    console,
    errors_to_exit,
    fail,
    json_option,
    registry_option,
    store_option,
)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _short(digest: str | None) -> str:
    return "-" if not digest else digest[:19]


# -- slim ee import ---------------------------------------------------------------
@click.command("import")
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
        "seconds": round(res.seconds, 3),
    }


@click.command("build")
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
@json_option
def ee_build(
    names: tuple[str, ...],
    build_all: bool,
    registry_path: Path,
    store_path: Path,
    level: int | None,
    agent: bool,
    as_json: bool,
) -> None:
    """Build environments into content-addressed objects and publish their releases.

    Per directory of the environment: ram/disk/sync get a deterministic tar+zstd
    archive and a manifest (sync also one object per file, so nodes fetch only
    what changed); nfs gets a manifest and a read-only tree for export.  Plus the
    image's kernel and an initrd with its modules for every hardware profile,
    the agent and its runtime.
    Rebuilding an unchanged image adds no object and keeps the release.
    """
    from slim.core.build.agentrt import collect
    from slim.core.build.copyset import DEFAULT_LEVEL
    from slim.core.build.release import build_environment
    from slim.core.registry import load_registry
    from slim.core.store import Store

    with errors_to_exit():
        reg = load_registry(registry_path)
        targets = sorted(reg.environments) if build_all else list(names)
        if not targets:
            fail("name at least one environment, or --all")
        for n in targets:
            reg.environment(n)  # unknown names fail before any work
        store = Store(store_path)
        runtime = collect() if agent else None
        results = []
        with StageProgress(enabled=not as_json) as progress:
            for n in targets:
                results.append(
                    build_environment(
                        reg, store, n, level=level or DEFAULT_LEVEL, progress=progress, runtime=runtime
                    )
                )
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
@click.command("verify")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@registry_option
@store_option
def ee_verify(names: tuple[str, ...], registry_path: Path, store_path: Path) -> None:
    """Re-hash every object of the environments' current releases (all built ones by default)
    and check each NFS tree against its manifest; exit 1 if anything is missing or corrupt."""
    from slim.core.build.release import verify_release
    from slim.core.registry import load_registry
    from slim.core.store import Store

    failed = False
    with errors_to_exit():
        reg = load_registry(registry_path)
        store = Store(store_path)
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


# -- slim ee table2 -------------------------------------------------------------------
@click.command("table2")
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Fraction of the paper's file counts and sizes (1.0: 173k files, about 2.4 GB).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed: same seed and scale, same tree.")
def ee_table2(target: Path, scale: float, seed: int) -> None:
    """Write a synthetic image into TARGET (empty or missing) with the file counts and sizes
    per directory of the paper's Table 2 (Fedora Core 1), for benchmarks and tests."""
    from labs.table2 import generate

    with errors_to_exit(), StageProgress() as progress:
        rows = generate(target, scale, seed, lambda done, total: progress("files", done, total))
    table = Table(title=f"Table-2 image at {target} (scale {scale:g}, seed {seed})", title_justify="left")
    for col in ("directory", "files", "MB (2^20 bytes)"):
        table.add_column(col, justify="left" if col == "directory" else "right")
    for row in rows:
        table.add_row(row.path, str(row.files), f"{row.bytes / 2**20:.1f}")
    console.print(table)


# -- slim nfs -------------------------------------------------------------------------
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
    store_path: Path,
    fmt: str,
    listen: str,
    clients: str | None,
    workdir: Path | None,
) -> None:
    """Print the NFS configuration for every environment's current nfs trees (NFSv4, TCP, read-only)."""
    from slim.core.daemons.nfs import parse_clients, parse_listen, render_config

    with errors_to_exit():
        bind, port = parse_listen(listen)
        text = render_config(
            registry_path,
            store_path,
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
def nfs_serve(registry_path: Path, store_path: Path, listen: str, clients: str | None, workdir: Path) -> None:
    """Run nfs-ganesha with the rendered configuration and supervise it until SIGTERM/SIGINT.

    Restarts ganesha if it dies; re-renders when the registry or an environment's
    release changes (and at SIGHUP) and makes ganesha pick the change up.  Prints
    "listening on HOST:PORT" once ganesha accepts connections.
    """
    from slim.core.daemons.nfs import parse_clients, parse_listen, serve

    with errors_to_exit():
        bind, port = parse_listen(listen)

        def ready(server: Any) -> None:
            click.echo(f"listening on {bind}:{port}")

        serve(registry_path, store_path, workdir, bind, port, parse_clients(clients), ready=ready)
