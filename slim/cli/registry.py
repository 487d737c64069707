"""``slim registry``: check registry files."""

from __future__ import annotations

from pathlib import Path

import click

from slim.cli.common import console, errors_to_exit
from slim.errors import ConfigError


@click.group()
def registry() -> None:
    """Check registry files."""


@registry.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--images/--no-images",
    default=True,
    show_default=True,
    help="Also check the hardware profiles' module names against the kernel of every environment "
    "whose image has one (as a build would); --no-images checks the file alone.",
)
def registry_check(file: Path, images: bool) -> None:
    """Validate FILE as a whole; print every problem with its line and field (exit 1 if any).

    With images (the default), every hardware profile's modules are looked up in the kernel of
    every environment whose image has been imported with one, as modprobe reads names ('-' and
    '_' alike, built-in modules and aliases count); a name no kernel has is a problem naming
    the closest names.  An environment without an image or kernel yet is noted and skipped.
    """
    from slim.core.registry import load_registry

    checked: dict[str, str] = {}  # environment → kernel release
    with errors_to_exit():
        reg = load_registry(file)
        if images:
            from slim.core.build.release import check_profile_modules

            found = check_profile_modules(reg)
            for env, why in found.skipped.items():
                click.echo(f"note: environment {env}: kernel not checked: {why}", err=True)
            if found.problems:
                raise ConfigError(found.problems)
            checked = found.checked
    counts = ", ".join(
        f"{len(getattr(reg, k))} {k}" for k in ("sites", "relays", "profiles", "environments", "nodes")
    )
    console.print(f"{file}: ok ({counts})")
    if checked:
        kernels = ", ".join(f"{env} ({kver})" for env, kver in checked.items())
        console.print(f"profiles' modules found in the kernels of {kernels}")
