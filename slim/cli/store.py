"""``slim store``: housekeeping of the content-addressed store, on the core's host."""

from __future__ import annotations

import json
from pathlib import Path

import click

from slim.cli.common import (
    console,
    errors_to_exit,
    json_option,
    registry_option,
    state_dir,
    store_option,
    store_path_or_default,
)


@click.group()
def store() -> None:
    """The content-addressed store: garbage collection."""


@store.command("gc")
@registry_option
@store_option
@click.option(
    "--state",
    "state_path",
    envvar="SLIM_STATE",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The core's state database, read for each node's last boot of record (and written only to "
    "prune events); also $SLIM_STATE (default: STATE_DIR/state.db, as the core).",
)
@click.option(
    "--keep-previous",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Keep each environment's current release and this many releases its ref pointed at before.",
)
@click.option(
    "--min-age",
    metavar="DURATION",
    default="1h",
    show_default=True,
    help="Leave unreferenced objects and trees younger than this (writers that do not take the "
    "store's lock; builds do, and gc waits for them).",
)
@click.option(
    "--wait",
    metavar="DURATION",
    default="60s",
    show_default=True,
    help="How long to wait for builds holding the store's lock before giving up (0: refuse at once).",
)
@click.option(
    "--events-older-than",
    metavar="DURATION",
    default=None,
    help="Also prune boot events received longer ago than this (e.g. 90d); each node's newest "
    "boot is kept whatever its age.  Default: keep every event.",
)
@click.option("--dry-run", is_flag=True, help="List what would go and the bytes freed; remove nothing.")
@json_option
def store_gc(
    registry_path: Path,
    store_path: Path | None,
    state_path: Path | None,
    keep_previous: int,
    min_age: str,
    wait: str,
    events_older_than: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Remove the objects and NFS trees that no kept release uses.

    Kept: each environment's current release and its --keep-previous releases
    before (from the store's release history; a store from before the history
    keeps only the current one), and the release every node fetched in its last
    boot of record (the core's state database).  gc holds the store's lock, so
    it never runs beside `slim ee build`; a running `slim nfs serve` stops
    exporting the trees that went at its next poll.
    """
    import time

    from slim.core.control.state import State, booted_releases
    from slim.core.housekeeping import collect_garbage
    from slim.core.store import Store
    from slim.vocabulary import parse_duration

    with errors_to_exit():
        min_age_s = parse_duration(min_age, zero=True, what="--min-age")
        wait_s = parse_duration(wait, zero=True, what="--wait")
        prune_s = (
            None
            if events_older_than is None
            else parse_duration(events_older_than, what="--events-older-than")
        )
        root = store_path_or_default(store_path, registry_path)
        db = state_path if state_path is not None else state_dir(registry_path) / "state.db"
        booted = booted_releases(db)
        result = collect_garbage(
            Store(root),
            keep_previous=keep_previous,
            booted=booted,
            min_age=min_age_s,
            dry_run=dry_run,
            wait=wait_s,
        )
        events = None
        if prune_s is not None:
            state = State(db)
            try:
                events = state.prune_boot_events(time.time() - prune_s, dry_run=dry_run)
            finally:
                state.close()
    verb = "would remove" if dry_run else "removed"
    if as_json:
        doc = {
            "store": str(root),
            "dry_run": dry_run,
            "kept_releases": result.kept_releases,
            "booted": result.booted,
            "kept_objects": result.kept_objects,
            "kept_trees": result.kept_trees,
            "young": result.young,
            "removed": [{"kind": g.kind, "digest": g.digest, "bytes": g.bytes} for g in result.removed],
            "objects": result.count("object"),
            "trees": result.count("tree"),
            "bytes": result.bytes,
            "events": events,
            "notes": result.notes,
        }
        click.echo(json.dumps(doc, indent=2))
        return
    for g in result.removed:
        console.print(f"{verb} {g.kind} {g.digest}  {g.bytes} bytes")
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(
        f"{root}: {verb} {result.count('object')} objects and {result.count('tree')} trees, "
        f"{result.bytes} bytes ({result.bytes / 1e6:.1f} MB); kept {result.kept_objects} objects and "
        f"{result.kept_trees} trees of {sum(len(v) for v in result.kept_releases.values())} releases of "
        f"{len(result.kept_releases)} environments and {len(result.booted)} nodes' last boots; "
        f"{result.young} younger than --min-age left"
    )
    if events is not None:
        console.print(f"{db}: {'would prune' if dry_run else 'pruned'} {events} boot events")
