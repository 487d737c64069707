"""``slim registry``: check registry files."""

from __future__ import annotations

from pathlib import Path

import click

from slim.cli.common import console, errors_to_exit


@click.group()
def registry() -> None:
    """Check registry files."""


@registry.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def registry_check(file: Path) -> None:
    """Validate FILE as a whole; print every problem with its line and field (exit 1 if any)."""
    from slim.core.registry import load_registry

    with errors_to_exit():
        reg = load_registry(file)
    counts = ", ".join(
        f"{len(getattr(reg, k))} {k}" for k in ("sites", "relays", "profiles", "environments", "nodes")
    )
    console.print(f"{file}: ok ({counts})")
