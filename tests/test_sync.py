"""Copy-if-needed (slim.agent.sync): random trees and random changes, on the server's
side and on the node's, end identical to the release after one sync; the manifest kept
from the last run, rebuilt from a delta, or fetched whole.

The files come from a real object server on loopback (slim.objects, the relays' and the
core's) through the agent's own HTTP client; the manifests and file objects are made by
the build's own code (copyset, the store)."""

from __future__ import annotations

import array
import asyncio
import errno
import hashlib
import os
import random
import re
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slim.agent import manifest as mf
from slim.agent import sync
from slim.agent.fetch import Relays
from slim.agent.plan import Directory, ManifestDelta, ObjectRef
from slim.agent.tree import FILE, scan
from slim.agent.tree import Entry as FileEntry
from slim.core.build import copyset
from slim.core.build.deltas import make_deltas, raw_digest
from slim.core.build.release import _store_files
from slim.core.store import Store
from slim.objects.server import ObjectServer
from slim.release import compress_manifest

ROOT = os.geteuid() == 0


class Origin:
    """A store served over HTTP on 127.0.0.1 by a real object server, in a thread of its own."""

    def __init__(self, root: Path) -> None:
        self.store = Store(root)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ObjectServer(self.store.objects, "127.0.0.1:0")
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.url = f"http://127.0.0.1:{self.server.port}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()

    def publish(self, tree: Path, directory: str = "/srv") -> tuple[Directory, bytes]:
        """The tree as a build makes it (manifest, file objects); its plan entry and manifest."""
        items = copyset.hash_tree(tree, scan(tree))
        _store_files(self.store, tree, items)
        raw = mf.encode(mf.make(directory, items))
        ref = self.store.put_bytes(compress_manifest(raw))
        manifest = ObjectRef(ref.digest, ref.size)
        return Directory(directory, "sync", None, manifest, None, "", 0, 0, raw_digest(raw)), raw


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    o = Origin(tmp_path_factory.mktemp("origin") / "store")
    try:
        yield o
    finally:
        o.close()


def run_sync(
    origin: Origin, d: Directory, dest: Path, records: sync.Records, later: bool = False
) -> sync.SyncResult:
    """What the agent's Builder does for one sync directory (slim.agent.ee; ``later``: as on
    a real boot)."""
    relays = Relays([origin.url], timeout=10)
    try:
        return sync.run(d, dest, [], relays, records, later=later)
    finally:
        relays.close()


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything copy-if-needed promises about a tree: types, contents, modes, owners (as
    root), mtimes, link targets, hard links, xattrs."""
    out: dict[str, tuple[Any, ...]] = {}
    for e in scan(root):
        content = (root / e.path).read_bytes() if e.kind == FILE else b""
        owner = (e.uid, e.gid) if ROOT else ()
        out[e.path] = (e.kind, e.mode, owner, e.mtime_ns, e.target, e.xattrs, content)
    return out


# -- random trees ---------------------------------------------------------------------------

NAMES = ["a", "b", "c", "dd", "é"]
Spec = dict[str, tuple[Any, ...]]
T0 = 1_700_000_000_000_000_000


@st.composite
def trees(draw: st.DrawFn) -> dict[str, tuple[Any, ...]]:
    """A tree as {path: spec}: ("dir", mode, mtime), ("file", content, mode, mtime),
    ("symlink", target, mtime), ("hardlink", earlier file path)."""
    leaves = draw(st.lists(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), max_size=12))
    paths = {"/".join(p) for p in leaves}
    dirs = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    spec: dict[str, tuple[Any, ...]] = {}
    for path in sorted(paths | dirs):
        mtime = T0 + draw(st.integers(0, 3)) * 1_000_000_007
        if path in dirs:
            spec[path] = ("dir", draw(st.sampled_from([0o755, 0o700, 0o1777])), mtime)
            continue
        files = [p for p, s in spec.items() if s[0] == "file"]
        kind = draw(st.sampled_from(["file", "file", "file", "symlink", "hardlink", "dir"]))
        if kind == "hardlink" and files:
            spec[path] = ("hardlink", draw(st.sampled_from(files)))
        elif kind == "symlink":
            spec[path] = ("symlink", draw(st.sampled_from(["a", "../b", "/etc/passwd", "dd/é"])), mtime)
        elif kind == "dir":
            spec[path] = ("dir", 0o755, mtime)
        else:
            size = draw(st.sampled_from([0, 1, 100, 5000, mf.CHUNKED_ABOVE + 3]))
            content = draw(st.binary(min_size=min(size, 3), max_size=3)) * (size // 3 + 1)
            spec[path] = ("file", content[:size], draw(st.sampled_from([0o644, 0o600, 0o4755])), mtime)
    return spec


EDITS = ["retarget", "chmod", "retime", "unlink_hardlink", "content", "remove", "add", "to_symlink"]


@st.composite
def releases(draw: st.DrawFn) -> tuple[dict[str, tuple[Any, ...]], dict[str, tuple[Any, ...]]]:
    """A release and the next one: a random tree, or the first one with a few entries
    edited (the subtle changes: a link's target or an entry's mode or time alone)."""
    before = draw(trees())
    if draw(st.booleans()):
        return before, draw(trees())
    after = dict(before)
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.sampled_from(EDITS))
        if what == "add" or not after:
            after[f"new{draw(st.integers(0, 9))}"] = ("file", b"added", 0o644, T0)
            continue
        path = draw(st.sampled_from(sorted(after)))
        s = after[path]
        if what == "retarget" and s[0] == "symlink":
            after[path] = ("symlink", s[1] + "x", s[2])
        elif what == "chmod" and s[0] in ("file", "dir"):
            after[path] = (*s[:-2], 0o640 if s[-2] != 0o640 else 0o644, s[-1])
        elif what == "retime" and s[0] != "hardlink":
            after[path] = (*s[:-1], s[-1] + 1)
        elif what == "unlink_hardlink" and s[0] == "hardlink":
            after[path] = ("file", *after[s[1]][1:])  # the same bytes, a file of its own
        elif what == "content" and s[0] == "file":
            after[path] = ("file", s[1] + b"!", s[2], s[3])
        elif (
            what == "remove"
            and s[0] != "dir"
            and not any(h[0] == "hardlink" and h[1] == path for h in after.values())
        ):
            del after[path]
        elif (
            what == "to_symlink"
            and s[0] == "file"
            and not any(h[0] == "hardlink" and h[1] == path for h in after.values())
        ):
            after[path] = ("symlink", "a", s[3])
    return before, after


def build(root: Path, spec: dict[str, tuple[Any, ...]]) -> None:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for path, s in sorted(spec.items()):
        full = root / path
        if s[0] == "dir":
            full.mkdir()
        elif s[0] == "file":
            full.write_bytes(s[1])
            os.chmod(full, s[2])
            if path.endswith("a"):
                os.setxattr(full, "user.slim", path.encode())
        elif s[0] == "symlink":
            full.symlink_to(s[1])
        else:
            os.link(root / s[1], full)
    for path, s in sorted(spec.items(), reverse=True):  # times last, deepest first
        full = root / path
        if s[0] == "dir":
            os.chmod(full, s[1])
            os.utime(full, ns=(s[2], s[2]))
        elif s[0] in ("file", "symlink"):
            os.utime(full, ns=(s[-1], s[-1]), follow_symlinks=False)


TAMPER = ["rewrite", "grow", "chmod", "touch", "to_dir", "to_symlink", "to_file", "delete", "extra"]
TAMPER += ["xattr", "hardlink"]


@st.composite
def tampering(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    """Changes made on the node: (what, which entry, a number)."""
    return draw(
        st.lists(st.tuples(st.sampled_from(TAMPER), st.integers(0, 50), st.integers(1, 9)), max_size=5)
    )


def tamper(root: Path, changes: list[tuple[str, int, int]]) -> None:
    for what, which, n in changes:
        entries = sorted(scan(root), key=lambda e: e.path)
        if what == "extra":
            extra = root / f"extra{n}"
            if not os.path.lexists(extra):  # (an extra made a directory or a link: left so)
                extra.write_bytes(b"x" * n)
            continue
        files = [e for e in entries if e.kind == "file"]
        if what == "hardlink" and len(files) > 1:  # one file's name made another's
            a, b = files[which % len(files)], files[(which + n) % len(files)]
            if a.path != b.path and a.xattrs == b.xattrs:  # (else b gets attributes not looked for)
                (root / b.path).unlink()
                os.link(root / a.path, root / b.path)
            continue
        if not entries:
            continue
        e = entries[which % len(entries)]
        full = root / e.path
        if what == "delete" or what.startswith("to_"):
            if e.kind == "dir":
                shutil.rmtree(full)
            else:
                full.unlink()
            if what == "to_dir":
                full.mkdir()
                (full / "inside").write_bytes(b"in")
            elif what == "to_symlink":
                full.symlink_to("/")  # a link out of the tree: never followed
            elif what == "to_file":
                full.write_bytes(b"y" * n)
        elif e.kind == "file" and what in ("rewrite", "grow"):
            data = full.read_bytes()
            new = bytes(b ^ 0xFF for b in data[:n]) + data[n:] if what == "rewrite" else data + b"z" * n
            # a write moves the mtime, past any the release has (a touch, then a rewrite of
            # the same size back to the release's mtime, is what rsync's quick check and ours
            # cannot see: docs/agent.md)
            mtime = max(full.stat().st_mtime_ns, T0 + 4 * 1_000_000_007) + n
            full.write_bytes(new)
            os.utime(full, ns=(mtime, mtime))
        elif what == "chmod" and e.kind != "symlink":
            os.chmod(full, 0o777 if n % 2 else 0o000)
        elif what == "touch" and e.kind != "symlink":
            os.utime(full, ns=(T0 - n, T0 - n))  # same bytes, another time: hashed
        elif what == "xattr" and e.kind == "file" and e.xattrs:
            # (an attribute the release does not give a file is not looked for: docs/agent.md)
            os.setxattr(full, "user.slim", b"tampered")


def first_sync(
    origin: Origin, tmp_path: Path, spec: Spec
) -> tuple[Path, Path, Path, sync.Records, Directory]:
    """A release made of ``spec`` (its tree under WORK/src) synced from nothing to WORK/node:
    (WORK, src, node, the node's records, the release's plan entry)."""
    work = tmp_path / f"ex{os.urandom(4).hex()}"
    src, node = work / "src", work / "node"
    records = sync.Records(work / "state")
    build(src, spec)
    d, _ = origin.publish(src)
    run_sync(origin, d, node, records)
    return work, src, node, records, d


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trees_=releases(), changes=tampering())
def test_one_sync_makes_any_tree_the_release(
    origin: Origin, tmp_path: Path, trees_: tuple[Spec, Spec], changes: list[tuple[str, int, int]]
) -> None:
    """The node had the release before (synced from nothing), was changed on the node,
    and the server changed the release: one sync makes it exactly the new release."""
    before, after = trees_
    work, src, node, records, _ = first_sync(origin, tmp_path, before)
    assert snapshot(node) == snapshot(src)
    tamper(node, changes)
    build(src, after)
    d, _ = origin.publish(src)
    run_sync(origin, d, node, records)
    assert snapshot(node) == snapshot(src)
    shutil.rmtree(work)


def between_boots(root: Path) -> None:
    """Time between two boots, as far as the record of a walk cares: past the racy margin
    after the last change, so that the next walk can be trusted (:func:`slim.agent.sync.seen_tree`)."""
    time.sleep(1.5 * sync.racy_margin(os.lstat(root).st_ctime_ns) / 1e9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees(), changes=tampering())
def test_a_change_made_on_the_node_is_found_when_the_release_did_not_change(
    origin: Origin, tmp_path: Path, tree: Spec, changes: list[tuple[str, int, int]]
) -> None:
    """The node recorded what its directory looked like; then the directory was changed on
    the node and the release was not: the next walk is not the one recorded, the directory is
    compared, and one sync makes it the release again.  Unchanged, it is left as it is."""
    work, src, node, records, d = first_sync(origin, tmp_path, tree)
    between_boots(node)
    second = run_sync(origin, d, node, records)  # compared, nothing to change: recorded
    assert "as the last boot left it" not in second.notes and records.seen(d.path, b"") is not None
    third = run_sync(origin, d, node, records)
    assert "as the last boot left it" in third.notes and "decode" not in third.seconds
    tamper(node, changes)  # (left as it was, the node would differ: the snapshot tells)
    run_sync(origin, d, node, records)
    assert snapshot(node) == snapshot(src)
    shutil.rmtree(work)


KEPT_PATH = "as the last boot left it: the manifests compared"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(trees_=releases(), changes=tampering())
def test_a_directory_left_as_its_kept_manifest_has_it_gets_the_next_release_from_the_manifests(
    origin: Origin, tmp_path: Path, trees_: tuple[Spec, Spec], changes: list[tuple[str, int, int]]
) -> None:
    """The node found its directory as the release has it and recorded its walk; then the
    server changed the release, and the node sometimes its directory.  One sync makes the
    directory exactly the new release: from the two manifests alone when a walk apart
    finds it as recorded, by comparing the directory when the node changed it."""
    before, after = trees_
    work, src, node, records, d = first_sync(origin, tmp_path, before)
    between_boots(node)
    run_sync(origin, d, node, records)  # compared, nothing to change: recorded
    assert records.seen(d.path, b"") is not None
    walk = sync.seen_tree(str(node), [], b"", trust=False)
    tamper(node, changes)
    untouched = walk is not None and walk[0] == sync.seen_tree(str(node), [], b"", trust=False)[0]  # type: ignore[index]
    build(src, after)
    d2, _ = origin.publish(src)
    result = run_sync(origin, d2, node, records)
    assert snapshot(node) == snapshot(src)
    if d2.manifest_raw != d.manifest_raw:  # (else the release did not change)
        assert (KEPT_PATH in result.notes) is untouched, (changes, result.notes)
    shutil.rmtree(work)


def test_a_kept_manifest_changed_on_the_node_is_not_taken_for_the_directory(
    origin: Origin, tmp_path: Path
) -> None:
    """The directory is as recorded, but the manifest kept with the record was changed on the
    node (here: to say a file already has the bytes the new release gives it): the walk apart
    checks the kept bytes against the digest the record was made under, and the directory is
    compared instead of taken on the kept manifest's word."""
    spec: dict[str, tuple[Any, ...]] = {f"f{i}": ("file", b"old %d" % i, 0o644, T0) for i in range(20)}
    _, src, node, records, d = first_sync(origin, tmp_path, spec)
    between_boots(node)
    run_sync(origin, d, node, records)  # recorded
    spec["f7"] = ("file", b"new 7", 0o644, T0 + 1)
    build(src, spec)
    d2, _ = origin.publish(src)
    kept = records.path(d.path)
    assert kept is not None
    old, new = (hashlib.sha256(b).hexdigest().encode() for b in (b"old 7", b"new 7"))
    kept.write_bytes(kept.read_bytes().replace(old, new))
    result = run_sync(origin, d2, node, records)
    assert KEPT_PATH not in result.notes and result.files == 1
    assert snapshot(node) == snapshot(src)
    # recorded again (nothing to change), the next release is taken from the manifests
    between_boots(node)
    assert run_sync(origin, d2, node, records).files == 0
    spec["f8"] = ("file", b"new 8", 0o600, T0 + 2)
    del spec["f9"]
    build(src, spec)
    d3, _ = origin.publish(src)
    result = run_sync(origin, d3, node, records)
    assert KEPT_PATH in result.notes and (result.files, result.deleted) == (1, 1)
    assert snapshot(node) == snapshot(src)


def test_the_manifests_compared_remake_what_goes_with_a_change_and_follow_no_link(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the way where only the manifests are compared: a hard link whose file gets new
    bytes is made again to the new file; a directory that becomes a file goes, with what
    was in it; a symlink that becomes a directory is not followed (the page read ahead of
    a file written in place is only ever looked for where a file was)."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "dir" / "f").write_bytes(b"outside " * 700)
    spec: dict[str, tuple[Any, ...]] = {
        "a": ("file", b"a" * 5000, 0o644, T0),
        "b": ("hardlink", "a"),
        "d": ("dir", 0o755, T0),
        "d/in": ("file", b"in", 0o644, T0),
        "s": ("symlink", str(outside / "dir"), T0),
        "z": ("file", b"z" * 6000, 0o644, T0),
    }
    work, src, node, records, d = first_sync(origin, tmp_path, spec)
    between_boots(node)
    run_sync(origin, d, node, records)  # recorded
    spec["a"] = ("file", b"A" * 5001, 0o644, T0 + 1)
    del spec["d/in"]
    spec["d"] = ("file", b"d, a file now", 0o644, T0)
    spec["s"] = ("dir", 0o755, T0)
    spec["s/f"] = ("file", b"inside " * 700, 0o644, T0)
    spec["z"] = ("file", b"Z" * 6000, 0o644, T0 + 1)  # (written in place: its last page read ahead)
    build(src, spec)
    d2, _ = origin.publish(src)
    advised: list[str] = []
    fadvise = os.posix_fadvise

    def looked(fd: int, *args: int) -> None:
        advised.append(os.readlink(f"/proc/self/fd/{fd}"))
        fadvise(fd, *args)

    monkeypatch.setattr(os, "posix_fadvise", looked)
    result = run_sync(origin, d2, node, records)
    assert KEPT_PATH in result.notes and (result.files, result.deleted) == (4, 1), result.notes
    assert snapshot(node) == snapshot(src)
    assert os.lstat(node / "a").st_ino == os.lstat(node / "b").st_ino
    assert advised == [str(node / "z")] and (outside / "dir" / "f").read_bytes() == b"outside " * 700
    shutil.rmtree(work)


def test_files_written_in_place_get_their_times_once_settled(origin: Origin, tmp_path: Path) -> None:
    """``later`` (a real boot): a file written in place keeps the time it was written in
    until :func:`sync.settle` (after the node's ``sync``), so that a power cut before its
    bytes reach the disk leaves it for the next comparison to hash."""
    spec: dict[str, tuple[Any, ...]] = {f"f{i}": ("file", b"%d" % i * 100, 0o644, T0) for i in range(5)}
    work, src, node, records, _ = first_sync(origin, tmp_path, spec)
    spec["f2"] = ("file", b"new" * 100, 0o644, T0 + 7)
    build(src, spec)
    d2, _ = origin.publish(src)
    result = run_sync(origin, d2, node, records, later=True)
    assert result.unsettled == [(f"{node}/f2", T0 + 7)]
    assert (node / "f2").read_bytes() == b"new" * 100 and os.lstat(node / "f2").st_mtime_ns != T0 + 7
    sync.settle(result.unsettled)
    assert snapshot(node) == snapshot(src)
    shutil.rmtree(work)


def test_a_walk_is_recorded_only_once_the_clock_has_moved_past_its_changes(tmp_path: Path) -> None:
    """The record of a walk made from the comparison's walk is the walk's own, byte for byte;
    an entry changed within RACY_NS of the walk makes it one not to trust (a later change
    in the same clock tick could leave its ctime as it was)."""
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f").write_bytes(b"x")
    (root / "l").symlink_to("sub/f")
    (root / "other").mkdir()  # another entry's directory: not entered
    (root / "other" / "g").write_bytes(b"y")
    key = sync.seen_key("sha256:" + "0" * 64, ["other"])
    have = sync.stat_tree(str(root), ["other"])
    assert "other" in have and "other/g" not in have
    newest = max(st.st_ctime_ns for st in [*have.values(), os.lstat(root)])
    walked = sync.seen_tree(str(root), ["other"], key)
    assert walked is not None
    margin = sync.racy_margin(newest)  # (2 s where the file system keeps whole seconds)
    for started, trusted in [(newest, False), (newest + margin, False), (newest + margin + 1, True)]:
        assert sync.seen_of(os.lstat(root), have, key, started) == (walked[0], trusted, started)
    assert sync.racy_margin(1_700_000_000_000_000_000) == 2_000_000_000 > sync.racy_margin(newest | 1)
    # an entry that keeps whole seconds among others that keep nanoseconds: two seconds for it
    ctimes = array.array("q", [5_000_000_123, 0, 0, 0, 0, 4_000_000_000, 0, 0, 0, 0])
    assert not sync._trusted(ctimes, 5_100_000_000) and sync._trusted(ctimes, 6_000_000_001)
    assert sync.seen_tree(str(root), [], key) != walked  # other/g is seen now
    records = sync.Records(tmp_path / "state")
    records.write_seen("/d", walked)
    assert records.seen("/d", key) == walked[0]
    records.write("/d", b"{}")  # another manifest kept: no walk vouches for the directory
    assert records.seen("/d", key) is None
    records.write_seen("/d", (walked[0], True, time.time_ns() + 3600 * 10**9))
    assert records.seen("/d", key) is None  # the clock is behind the walk's: not to be trusted
    records.write_seen("/d", walked)
    assert records.seen("/d", sync.seen_key("sha256:" + "1" * 64, ["other"])) is None  # not walked for
    assert records.seen("/e", key) is None
    assert sync.seen_tree(str(root), ["other"], sync.seen_key("sha256:" + "1" * 64, ["other"])) != walked


def test_an_unchanged_tree_fetches_nothing_and_a_changed_one_only_its_changes(
    origin: Origin, tmp_path: Path
) -> None:
    src, node = tmp_path / "src", tmp_path / "node"
    records = sync.Records(tmp_path / "state")
    spec: dict[str, tuple[Any, ...]] = {"d": ("dir", 0o755, T0)}
    spec.update({f"d/f{i}": ("file", bytes([i]) * 1000, 0o644, T0) for i in range(50)})
    build(src, spec)
    d, _ = origin.publish(src)
    first = run_sync(origin, d, node, records)
    assert (first.manifest, first.files) == ("whole", 50)
    again = run_sync(origin, d, node, records)
    assert (again.manifest, again.files, again.bytes, again.deleted) == ("kept", 0, 0, 0)
    # the release changes one file; the node changed another (its mtime moved: it is hashed,
    # found different and fetched back), and added one
    spec["d/f3"] = ("file", b"new" * 10, 0o644, T0 + 1)
    build(src, spec)
    (node / "d" / "f7").write_bytes(b"mine")
    (node / "d" / "mine").write_bytes(b"mine")
    d, _ = origin.publish(src)
    third = run_sync(origin, d, node, records)
    assert third.manifest == "whole" and third.files == 2 and third.deleted == 1
    assert snapshot(node) == snapshot(src)


def test_a_delta_from_the_kept_manifest_rebuilds_the_new_one(origin: Origin, tmp_path: Path) -> None:
    """The build's delta (zstd --patch-from) from the manifest a node kept: the node fetches
    the delta, not the manifest; a kept manifest changed on the node is not a base."""
    src, node = tmp_path / "src", tmp_path / "node"
    records = sync.Records(tmp_path / "state")
    spec: dict[str, tuple[Any, ...]] = {
        f"f{i:04d}": ("file", i.to_bytes(2, "big"), 0o644, T0) for i in range(2000)
    }
    build(src, spec)
    d1, raw1 = origin.publish(src)
    run_sync(origin, d1, node, records)
    spec["f0042"] = ("file", b"changed", 0o644, T0 + 5)
    build(src, spec)
    d2, raw2 = origin.publish(src)
    [delta] = make_deltas_from(origin.store, raw1, raw2)
    d2 = d2.replace(deltas=(delta,))
    result = run_sync(origin, d2, node, records)
    assert d2.manifest is not None and result.manifest == "delta" and result.files == 1
    assert result.bytes < d2.manifest.size // 20 + len(b"changed"), (result.bytes, d2.manifest.size)
    assert snapshot(node) == snapshot(src)
    # the kept manifest tampered with: its digest is no base, so the whole manifest comes
    spec["f0043"] = ("file", b"again", 0o644, T0 + 6)
    build(src, spec)
    d3, raw3 = origin.publish(src)
    [delta3] = make_deltas_from(origin.store, raw2, raw3)
    d3 = d3.replace(deltas=(delta3,))
    kept = records.path("/srv")
    assert kept is not None
    kept.write_bytes(kept.read_bytes().replace(b'"f0001"', b'"f000X"'))
    result = run_sync(origin, d3, node, records)
    assert result.manifest == "whole" and result.files == 1
    assert snapshot(node) == snapshot(src)
    # ... and again, while the digest noted beside it names the plan's manifest: the note is
    # only a claim, checked before the kept bytes are taken as the plan's manifest
    assert kept.with_suffix(".digest").read_text() == d3.manifest_raw
    kept.write_bytes(kept.read_bytes().replace(b'"f0001"', b'"f000X"'))
    result = run_sync(origin, d3, node, records)
    assert result.manifest == "whole" and result.files == 0
    assert kept.read_bytes() == raw3 and snapshot(node) == snapshot(src)


def test_bytes_the_release_changed_behind_the_same_size_and_mtime_are_fetched(
    origin: Origin, tmp_path: Path
) -> None:
    """rsync's quick check (size and mtime) cannot see a release that changed a file's bytes
    but neither its size nor its mtime; the kept manifest can: such a file is fetched, whether
    the new release lists the same paths (the columns line up) or not (looked up by path)."""
    src, node = tmp_path / "src", tmp_path / "node"
    records = sync.Records(tmp_path / "state")
    spec: dict[str, tuple[Any, ...]] = {f"f{i}": ("file", b"%d" % (10 + i), 0o644, T0) for i in range(5)}
    build(src, spec)
    d, _ = origin.publish(src)
    run_sync(origin, d, node, records)
    for changed, added in (("f1", None), ("f3", "g")):
        spec[changed] = ("file", b"xx", 0o644, T0)  # same size, same mtime
        if added:
            spec[added] = ("file", b"new", 0o644, T0)
        build(src, spec)
        d, _ = origin.publish(src)
        result = run_sync(origin, d, node, records)
        assert result.files == 1 + bool(added), result.notes
        assert (node / changed).read_bytes() == b"xx" and snapshot(node) == snapshot(src)


def make_deltas_from(store: Store, base: bytes, raw: bytes) -> list[ManifestDelta]:
    """The build's deltas (slim.core.build.deltas), with ``base`` as the previous release's
    manifest, as a plan names them."""
    made = make_deltas(store, [base], raw, 1 << 40)
    return [ManifestDelta(x.base, ObjectRef(x.delta.digest, x.delta.size)) for x in made]


def test_files_are_never_written_through_a_link_the_node_made(origin: Origin, tmp_path: Path) -> None:
    """A directory of the release turned into a symlink on the node (to a directory outside
    the tree): the sync replaces the link, and writes nothing where it pointed."""
    src, node, outside = tmp_path / "src", tmp_path / "node", tmp_path / "outside"
    outside.mkdir()
    records = sync.Records(tmp_path / "state")
    spec: dict[str, tuple[Any, ...]] = {"etc": ("dir", 0o755, T0), "etc/passwd": ("file", b"root", 0o644, T0)}
    build(src, spec)
    d, _ = origin.publish(src)
    run_sync(origin, d, node, records)
    shutil.rmtree(node / "etc")
    (node / "etc").symlink_to(outside)
    run_sync(origin, d, node, records)
    assert list(outside.iterdir()) == []
    assert stat.S_ISDIR(os.lstat(node / "etc").st_mode)
    assert snapshot(node) == snapshot(src)


def pieces(data: bytes) -> list[bytes]:
    """The content-defined pieces a build cuts ``data`` into (slim.core.build.copyset)."""
    return [bytes(c.data) for c in copyset.chunker().cut_buf(data)]


def test_a_big_files_unchanged_pieces_come_from_the_nodes_copy(origin: Origin, tmp_path: Path) -> None:
    """A file stored in pieces, changed in place by the release: only the new pieces are
    fetched, the others read from the node's copy — and checked: a piece changed on the
    node (its size and mtime put back) is fetched too."""
    src, node = tmp_path / "src", tmp_path / "node"
    records = sync.Records(tmp_path / "state")
    data = bytearray(random.Random(3).randbytes(mf.CHUNKED_ABOVE + 2 * mf.CHUNK_SIZE + 5))
    spec: Spec = {"big": ("file", bytes(data), 0o644, T0)}
    build(src, spec)
    d, _ = origin.publish(src)
    run_sync(origin, d, node, records)
    old = pieces(bytes(data))
    data[3 * mf.CHUNK_SIZE + 10 : 3 * mf.CHUNK_SIZE + 20] = b"R" * 10  # the release changes a piece
    spec["big"] = ("file", bytes(data), 0o644, T0 + 1)
    build(src, spec)
    d, _ = origin.publish(src)
    result = run_sync(origin, d, node, records)
    new = [p for p in pieces(bytes(data)) if p not in old]
    assert 1 <= len(new) <= 2 and sum(map(len, new)) <= 2 * copyset.CDC_MAX
    assert result.files == 1 and result.bytes - d.manifest.size == sum(map(len, new))  # type: ignore[union-attr]
    assert snapshot(node) == snapshot(src)
    # on the node, the first piece changes behind the sync's back (size and mtime as they were)
    with open(node / "big", "r+b") as f:
        f.write(b"N" * 10)
    os.utime(node / "big", ns=(T0 + 1, T0 + 1))
    old = pieces(bytes(data))
    data[5 * mf.CHUNK_SIZE : 5 * mf.CHUNK_SIZE + 3] = b"RRR"  # and the release changes another
    spec["big"] = ("file", bytes(data), 0o644, T0 + 2)
    build(src, spec)
    d, _ = origin.publish(src)
    result = run_sync(origin, d, node, records)
    now = pieces(bytes(data))
    fetched = [p for p in now if p not in old] + [now[0]]
    assert result.files == 1 and result.bytes - d.manifest.size == sum(map(len, fetched))  # type: ignore[union-attr]
    assert snapshot(node) == snapshot(src)


def test_an_insertion_into_a_big_file_moves_about_what_rsync_moves(origin: Origin, tmp_path: Path) -> None:
    """P4's big file, smaller: 1 MiB inserted into a 16 MiB file off any piece's boundary.
    The sync moves (new pieces and the manifest) at most 1.2 times what rsync's delta transfer
    moves for the same change (rsync run for real, over a pipe, its --stats)."""
    rng = random.Random(11)
    src, node, mirror = tmp_path / "src", tmp_path / "node", tmp_path / "rsync"
    records = sync.Records(tmp_path / "state")
    data = rng.randbytes(16 << 20)
    spec: Spec = {"big": ("file", data, 0o644, T0)}
    build(src, spec)
    d, raw = origin.publish(src)
    run_sync(origin, d, node, records)
    assert rsync_received(src, mirror) > len(data)
    at = len(data) // 2 + 12_345
    data = data[:at] + rng.randbytes(1 << 20) + data[at:]
    spec["big"] = ("file", data, 0o644, T0 + 1)
    build(src, spec)
    before = raw
    d, raw = origin.publish(src)
    d = d.replace(deltas=tuple(make_deltas_from(origin.store, before, raw)))
    result = run_sync(origin, d, node, records)
    assert result.manifest == "delta"
    assert snapshot(node) == snapshot(src)
    by_rsync = rsync_received(src, mirror)
    assert snapshot(mirror) == snapshot(src)
    assert (1 << 20) < result.bytes <= 1.2 * by_rsync, (result.bytes, by_rsync)


def rsync_received(src: Path, dest: Path) -> int:
    """``rsync -a`` from ``src`` to ``dest`` as a remote transfer (its delta algorithm; a
    local copy would send whole files), through a pipe: bytes the receiving side got."""
    shell = dest.parent / "rsh"
    shell.write_text('#!/bin/sh\nshift\nexec "$@"\n')  # rsync's "remote shell": drop the host
    shell.chmod(0o755)
    out = subprocess.run(
        ["rsync", "-a", "--stats", "-e", str(shell), f"pipe:{src}/", f"{dest}/"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    match = re.search(r"^Total bytes received: ([\d,]+)$", out, re.M)
    assert match, out
    return int(match.group(1).replace(",", ""))


def test_a_kept_manifest_that_is_no_regular_file_is_not_read(tmp_path: Path) -> None:
    """A fifo planted where the kept manifest goes would block the boot: it is passed over."""
    records = sync.Records(tmp_path / "state")
    path = records.path("/srv")
    assert path is not None
    path.parent.mkdir(parents=True)
    os.mkfifo(path)
    assert records.read("/srv") is None


def test_the_walk_opens_each_directory_from_its_parent_and_never_follows_a_link(tmp_path: Path) -> None:
    """A directory the walk is about to enter, swapped for a link to elsewhere, stops the walk
    (the open refuses it) instead of being followed out of the tree; no descriptor is left open, and a
    whole walk holds at most one per level."""
    root = tmp_path / "d"
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "x").mkdir()
    fds = len(os.listdir("/proc/self/fd"))
    enter: list[str] = []
    walk = sync._directories(str(root), enter)
    most = 0
    for rel, fd in walk:
        most = max(most, len(os.listdir("/proc/self/fd")) - fds)
        enter.extend(name for name in sorted(os.listdir(fd)) if (root / rel / name).is_dir())
    assert most <= 5 and len(os.listdir("/proc/self/fd")) == fds  # (listdir's own descriptor too)
    enter.clear()
    walk = sync._directories(str(root), enter)
    assert next(walk) == ("", mock.ANY)
    enter.append("x")
    os.rmdir(root / "x")
    (root / "x").symlink_to(tmp_path)  # swapped after it was listed
    with pytest.raises(OSError, match=r"Not a directory|Too many levels of symbolic links") as raised:
        next(walk)
    assert raised.value.errno in (errno.ENOTDIR, errno.ELOOP)  # (O_DIRECTORY with O_NOFOLLOW: ENOTDIR)
    assert len(os.listdir("/proc/self/fd")) == fds
    # a directory above, swapped for a link once the walk is inside it: the walk goes on in
    # the directory it opened, not through the link
    (root / "x").unlink()
    (tmp_path / "elsewhere" / "b").mkdir(parents=True)
    (tmp_path / "elsewhere" / "b" / "marker").write_bytes(b"")
    walk = sync._directories(str(root), enter)
    assert next(walk)[0] == ""
    enter.append("a")
    assert next(walk)[0] == "a"
    enter.append("b")
    (root / "a").rename(root / "a-moved")
    (root / "a").symlink_to(tmp_path / "elsewhere")
    rel, fd = next(walk)
    assert rel == "a/b" and os.listdir(fd) == ["c"]
    walk.close()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_small_files_are_fetched_in_whole_batches_all_along(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small files go in batches of PIPELINE_FILES however many are taken at a time (a batch
    waits for room for a whole one: else, once the window is full, each file taken would
    start a batch of one), and every file comes, in order."""
    datas = [b"x%d" % i for i in range(300)]
    by_hex = {hashlib.sha256(d).hexdigest(): d for d in datas}
    jobs: list[sync.Job] = [
        (mf.ManifestEntry(FileEntry(f"f{i}", FILE, 0o644, 0, 0, 0, len(d)), h), None)
        for i, (h, d) in enumerate(by_hex.items())
    ]
    batches: list[int] = []

    def pipelined(self: Relays, refs: list[ObjectRef], got: Any) -> int:
        batches.append(len(refs))
        for i, ref in enumerate(refs):
            got(i, by_hex[ref.hex])
        return len(refs)

    monkeypatch.setattr(Relays, "fetch_pipelined", pipelined)
    with sync.Fetcher(Relays(["http://127.0.0.1:9"]), jobs, tmp_path) as fetcher:
        for (m, _), data in zip(jobs, datas, strict=True):
            with fetcher.next(m) as got:
                assert got.file.read() == data
    assert sum(batches) == len(datas)
    assert batches.count(sync.PIPELINE_FILES) == len(datas) // sync.PIPELINE_FILES, batches
