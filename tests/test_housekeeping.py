"""slim.core.housekeeping and ``slim store gc``: the store's garbage collection over real
builds (three releases of one environment), the release history, the store's lock, the
boots of record from a real state database, and the pruning of old boot events."""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from slim.agent.ee import run_dir
from slim.cli import main
from slim.core.build.release import build_environment, verify_release
from slim.core.control.state import BootEvent, State, booted_releases
from slim.core.housekeeping import Collection, collect_garbage
from slim.core.registry import Registry, load_registry
from slim.core.store import Store
from slim.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from slim.release import Release, decode_manifest, manifest_objects
from slim.vocabulary import Policy, parse_digest, parse_duration
from tests.support import make_image

REGISTRY = """\
profiles:
  ns: {{}}
environments:
  base:
    image: {image}
    default_policy: ram
    directories: {{/usr: nfs, /srv: sync}}
server:
  state_dir: {state_dir}
"""


@dataclass
class Releases:
    """A store holding three releases of ``base`` (oldest first), each build changing /usr,
    /srv and the kernel a little."""

    registry: Registry
    registry_path: Path
    store: Store
    image: Path
    digests: list[str]


def rebuild(registry: Registry, store: Store, image: Path, version: int) -> str:
    (image / "usr" / "share" / "doc" / "VERSION").write_text(f"version {version}\n")
    (image / "srv" / "data" / f"v{version}").write_text(f"only in version {version}\n")
    (image / "boot" / "vmlinuz-6.1.0-99-test").write_bytes(b"KERNEL" + os.urandom(1000))
    return build_environment(registry, store, "base").digest


@pytest.fixture
def releases(tmp_path: Path) -> Releases:
    image = tmp_path / "image"
    image.mkdir()
    make_image(image)
    registry_path = tmp_path / "registry.yaml"
    registry_path.write_text(REGISTRY.format(image=image, state_dir=tmp_path / "state"))
    registry = load_registry(registry_path)
    store = Store(tmp_path / "state" / "store")
    digests = [rebuild(registry, store, image, v) for v in (1, 2, 3)]
    assert len(set(digests)) == 3
    return Releases(registry, registry_path, store, image, digests)


def uses(store: Store, digest: str) -> tuple[set[str], set[str]]:
    """(objects, trees) a release uses, as hex digests: computed here from the document,
    independently of the collector."""
    release = Release.model_validate_json(store.read_object(digest))
    objects = {parse_digest(digest), *(parse_digest(r.digest) for r in release.objects())}
    trees = set()
    for built in release.directories.values():
        assert built.manifest is not None
        if built.policy is Policy.NFS:
            trees.add(parse_digest(built.manifest.digest))
        if built.policy is Policy.SYNC:
            manifest = decode_manifest(store.read_object(built.manifest.digest))
            objects |= {n.hex for n in manifest_objects(manifest)}
    return objects, trees


def on_disk(store: Store) -> tuple[set[str], set[str]]:
    return set(os.listdir(store.objects)), {n for n in os.listdir(store.trees) if not n.startswith(".")}


def removed(result: Collection, kind: str) -> set[str]:
    return {parse_digest(g.digest) for g in result.removed if g.kind == kind}


def test_keeping_one_previous_removes_exactly_the_oldest_releases_unshared_parts(releases: Releases) -> None:
    store = releases.store
    old, kept = releases.digests[0], releases.digests[1:]
    old_objects, old_trees = uses(store, old)
    kept_objects: set[str] = set()
    kept_trees: set[str] = set()
    for d in kept:
        o, t = uses(store, d)
        kept_objects |= o
        kept_trees |= t
    shared = old_objects & kept_objects
    assert shared  # the initrd, the unchanged files of /srv: they must stay
    objects_before, trees_before = on_disk(store)
    assert objects_before == old_objects | kept_objects and trees_before == old_trees | kept_trees

    result = collect_garbage(store, keep_previous=1, booted={}, min_age=0)

    assert result.kept_releases == {"base": [kept[1], kept[0]]}
    assert removed(result, "object") == old_objects - kept_objects
    assert removed(result, "tree") == old_trees - kept_trees != set()
    assert on_disk(store) == (kept_objects, kept_trees)
    for d in kept:  # what is kept is whole
        report = verify_release(store, Release.model_validate_json(store.read_object(d)))
        assert report.problems == []
    assert not any(n.startswith(".gc.") for n in os.listdir(store.trees))
    # a second run finds nothing more
    again = collect_garbage(store, keep_previous=1, booted={}, min_age=0)
    assert again.removed == []


def test_bytes_freed_are_counted(releases: Releases) -> None:
    store = releases.store
    sizes = {h: (store.objects / h).stat().st_size for h in os.listdir(store.objects)}
    tree_sizes = {
        h: sum(p.stat().st_size for p in (store.trees / h).rglob("*") if p.is_file() and not p.is_symlink())
        for h in os.listdir(store.trees)
    }
    result = collect_garbage(store, keep_previous=0, booted={}, min_age=0)
    assert result.count("object") > 0 and result.count("tree") == 2
    assert result.bytes == sum(sizes[h] for h in removed(result, "object")) + sum(
        tree_sizes[h] for h in removed(result, "tree")
    )


def test_dry_run_removes_nothing_and_lists_the_same(releases: Releases) -> None:
    store = releases.store
    before = on_disk(store)
    dry = collect_garbage(store, keep_previous=1, booted={}, min_age=0, dry_run=True)
    assert dry.removed and on_disk(store) == before
    real = collect_garbage(store, keep_previous=1, booted={}, min_age=0)
    assert real.removed == dry.removed and real.bytes == dry.bytes


def test_the_release_of_a_nodes_last_boot_is_kept_even_if_old(releases: Releases) -> None:
    store = releases.store
    old, middle, current = releases.digests
    old_objects, old_trees = uses(store, old)
    middle_trees, current_trees = uses(store, middle)[1], uses(store, current)[1]
    result = collect_garbage(store, keep_previous=0, booted={"n7": old}, min_age=0)
    objects, trees = on_disk(store)
    assert old_objects <= objects and old_trees <= trees
    assert removed(result, "tree") == middle_trees - old_trees - current_trees != set()


def test_booted_releases_read_from_the_state_database_beside_a_writer(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    state = State(db)  # stays open: a running core
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    try:
        state.add_boot_events(
            [
                BootEvent("n1", "boot1", "plan", 1.0, message=f"base {a}"),
                BootEvent("n1", "boot1", "done", 2.0),
                BootEvent("n1", "boot2", "plan", 3.0, message=f"base {b}"),
                BootEvent("n2", "boot3", "plan", 4.0, message=f"jdk {a}"),
                BootEvent("n2", "boot4", "dhcp", 5.0),  # a newer boot without its plan yet
                BootEvent("n3", "boot5", "booting", 6.0),
            ]
        )
        assert booted_releases(db) == {"n1": b, "n2": a}
    finally:
        state.close()
    assert booted_releases(db) == {"n1": b, "n2": a}  # and with the core stopped
    with pytest.raises(FailedPrecondition, match=r"state database .*nope.db does not exist"):
        booted_releases(tmp_path / "nope.db")


def test_a_build_holding_the_lock_makes_gc_refuse_or_wait(releases: Releases) -> None:
    store = releases.store
    release_lock = threading.Event()
    held = threading.Event()

    def build() -> None:
        with store.locked(exclusive=False):
            held.set()
            release_lock.wait(60)

    builder = threading.Thread(target=build)
    builder.start()
    try:
        assert held.wait(30)
        with pytest.raises(Unavailable, match=r"in use by a build \(slim ee build\): its lock .*lock"):
            collect_garbage(store, keep_previous=0, booted={}, min_age=0, wait=0)
        done: list[Collection] = []
        gc = threading.Thread(
            target=lambda: done.append(collect_garbage(store, keep_previous=0, min_age=0, wait=60))
        )
        gc.start()
        gc.join(0.5)  # half a second in, it still waits: the build holds the lock
        assert gc.is_alive() and not done
        release_lock.set()
        gc.join(60)
        assert done and done[0].removed
    finally:
        release_lock.set()
        builder.join(60)


def test_build_waits_for_gc(releases: Releases) -> None:
    """A build takes the lock shared: while gc holds it, the build cannot start writing."""
    store = releases.store
    built: list[str] = []
    with store.locked(exclusive=True):
        t = threading.Thread(
            target=lambda: built.append(rebuild(releases.registry, store, releases.image, 4))
        )
        t.start()
        t.join(0.5)  # half a second in, it still waits: gc holds the lock
        assert t.is_alive() and not built
    t.join(120)
    assert built and store.release_digest("base") == built[0]


def test_young_objects_are_left(releases: Releases) -> None:
    result = collect_garbage(releases.store, keep_previous=0, booted={}, min_age=parse_duration("1h"))
    assert result.removed == [] and result.young > 0


def test_history_and_kept_releases(tmp_path: Path, releases: Releases) -> None:
    store = releases.store
    d1, d2, d3 = releases.digests
    assert store.release_history("base") == [d1, d2, d3]
    assert store.kept_releases("base", 0) == [d3]
    assert store.kept_releases("base", 5) == [d3, d2, d1]
    # publishing the current release again adds nothing
    found = store.release("base")
    assert found is not None
    assert store.publish_release(found[1]) == d3 and store.release_history("base") == [d1, d2, d3]
    with pytest.raises(InvalidArgument, match="0 or more"):
        store.kept_releases("base", -1)
    # a store from before the history: its current release is recorded first
    (store.history / "base").unlink()
    current = store.release_digest("base")
    assert current is not None
    assert store.kept_releases("base", 2) == [current]
    new = rebuild(releases.registry, store, releases.image, 5)
    assert store.release_history("base") == [current, new]


def test_a_torn_or_phantom_history_line_costs_no_kept_release(releases: Releases) -> None:
    """A crash mid-append leaves a line without its end; a crash between the history's
    append and the ref's write leaves a release that was never current."""
    store = releases.store
    d1, d2, d3 = releases.digests
    history = store.history / "base"
    history.write_text(f"{d1} t\n{d2} t\n{d3} 2026-12-")  # torn: no newline
    phantom = "sha256:" + "e" * 64
    store._record("base", phantom)  # the append a publish makes; then "the crash": no ref write
    assert store.release_history("base") == [d1, d2, d3, phantom]
    assert history.read_text().count("\n") == 4  # the torn line was closed first
    assert store.kept_releases("base", 1) == [d3, d2]  # the phantom took no slot


def test_gc_removes_a_crashed_runs_leftovers_and_never_follows_a_link(
    tmp_path: Path, releases: Releases
) -> None:
    store = releases.store
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o500)
    (outside / "keep").write_text("not the store's\n")
    link = store.trees / ("f" * 64)
    link.symlink_to(outside)
    leftover = store.trees / ".gc.abc.123"
    (leftover / "tree" / "sub").mkdir(parents=True)
    (leftover / "tree" / "sub" / "file").write_text("x")
    (leftover / "tree" / "sub").chmod(0o500)
    result = collect_garbage(store, keep_previous=5, min_age=0)
    assert not link.is_symlink() and not leftover.exists()
    assert (outside / "keep").read_text() == "not the store's\n"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o500  # untouched
    assert ("tree", "sha256:" + "f" * 64) in {(g.kind, g.digest) for g in result.removed}
    assert any(".gc.abc.123" in note for note in result.notes)
    outside.chmod(0o700)


def test_missing_store_and_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"the store .*nowhere does not exist"):
        collect_garbage(Store(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FailedPrecondition, match="is not a SLIM store"):
        collect_garbage(Store(tmp_path / "empty"))


def test_a_missing_current_release_refuses_the_collection(releases: Releases) -> None:
    store = releases.store
    current = parse_digest(releases.digests[2])
    os.unlink(store.objects / current)
    with pytest.raises(FailedPrecondition, match=r"missing from the store .*nothing collected"):
        collect_garbage(store, keep_previous=0, min_age=0)


def test_prune_boot_events_keeps_each_nodes_newest_boot(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    try:
        old = [
            BootEvent("n1", "a", "plan", 1.0),
            BootEvent("n1", "a", "done", 2.0),
            BootEvent("n2", "c", "plan", 1.0),  # n2's only (so newest) boot: kept however old
        ]
        state.add_boot_events(old, now=100.0)
        state.add_boot_events([BootEvent("n1", "b", "plan", 3.0)], now=100.0)
        state.add_boot_events([BootEvent("n1", "d", "plan", 4.0)], now=500.0)
        assert state.prune_boot_events(200.0, dry_run=True) == 3
        assert len(state.boot_events(limit=100)) == 5
        assert state.prune_boot_events(200.0) == 3
        left = {(e.node, e.boot_id) for e in state.boot_events(limit=100)}
        assert left == {("n1", "d"), ("n2", "c")}
    finally:
        state.close()


def test_prune_keeps_the_boot_whose_plan_names_the_release_a_node_runs(tmp_path: Path) -> None:
    """A node's newest boot may have no plan yet (a script fetched, a boot that failed
    early): the boot of its newest plan, which says what it runs, is kept too."""
    digest = "sha256:" + "a" * 64
    state = State(tmp_path / "state.db")
    try:
        state.add_boot_events([BootEvent("n1", "a", "plan", 1.0, message=f"base {digest}")], now=100.0)
        state.add_boot_events([BootEvent("n1", "b", "script", 2.0)], now=150.0)
        assert state.prune_boot_events(200.0) == 0
        assert booted_releases(tmp_path / "state.db") == {"n1": digest}
    finally:
        state.close()


# -- the command -------------------------------------------------------------------------------------


def slim(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_cli_gc_dry_run_then_real_with_the_registrys_state_dir(releases: Releases) -> None:
    state_db = releases.registry_path.parent / "state" / "state.db"
    State(state_db).close()
    reg = ["--registry", str(releases.registry_path)]
    code, out = slim("store", "gc", *reg, "--keep-previous", "1", "--min-age", "0", "--dry-run")
    assert code == 0, out
    before = on_disk(releases.store)
    old_objects = uses(releases.store, releases.digests[0])[0] - uses(releases.store, releases.digests[1])[0]
    assert "would remove tree sha256:" in out and "would remove object sha256:" in out
    assert all(f"sha256:{h}" in out for h in old_objects - uses(releases.store, releases.digests[2])[0])
    assert on_disk(releases.store) == before
    code, out = slim(
        "store", "gc", *reg, "--keep-previous", "1", "--min-age", "0", "--events-older-than", "90d"
    )
    assert code == 0, out
    assert " objects and 1 trees, " in out.replace("\n", " ") and "pruned 0 boot events" in out
    code, out = slim("store", "gc", *reg, "--min-age", "0", "--json")
    assert code == 0 and '"objects": ' in out


def test_cli_gc_errors(tmp_path: Path, releases: Releases) -> None:
    reg = ["--registry", str(releases.registry_path)]
    code, out = slim("store", "gc", *reg)
    assert code == 1 and "state database" in out and "does not exist" in out
    State(tmp_path / "s.db").close()
    code, out = slim("store", "gc", *reg, "--state", str(tmp_path / "s.db"), "--min-age", "soon")
    assert code == 1 and "--min-age 'soon'" in out
    code, out = slim("store", "gc", "--store", str(tmp_path / "none"), "--state", str(tmp_path / "s.db"))
    assert code == 1 and "does not exist" in out


def test_ee_build_puts_the_store_in_the_registrys_state_dir(releases: Releases) -> None:
    """One default: `slim ee build` without --store writes where `slim serve` reads."""
    code, out = slim("ee", "build", "base", "--registry", str(releases.registry_path), "--no-agent", "--json")
    assert code == 0, out
    assert releases.store.release_history("base")[-1] in out


# -- a running `slim nfs serve` drops the trees gc removed ---------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_nfs_serve_stops_exporting_the_trees_gc_removed(tmp_path: Path) -> None:
    from labs.host import free_port
    from slim.core.daemons import ganesha as nfs
    from slim.daemons.ganesha import GANESHA, pseudo_path
    from tests.support import need, need_tool, wait_for
    from tests.test_nfs import NFS4_OK, NFS4ERR_NOENT, nfs_read

    need_tool(GANESHA, "nfs-ganesha nfs-ganesha-vfs")
    need(os.geteuid() == 0, "ganesha.nfsd's VFS backend needs root")
    image = tmp_path / "image"
    image.mkdir()
    make_image(image)
    registry_path = tmp_path / "registry.yaml"
    registry_path.write_text(REGISTRY.format(image=image, state_dir=tmp_path / "state"))
    registry = load_registry(registry_path)
    store = Store(tmp_path / "state" / "store")
    digests = [rebuild(registry, store, image, 1)]

    def usr_tree(digest: str) -> str:
        built = Release.model_validate_json(store.read_object(digest)).directories["/usr"]
        assert built.manifest is not None
        return pseudo_path("/slim", built.manifest.digest)

    port = free_port()
    stop_serving = threading.Event()
    started: list[nfs.NfsServer] = []
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            nfs.serve(
                registry_path, store.root, tmp_path / "nfs", bind="127.0.0.1", port=port,
                stop_event=stop_serving, interval=0.05, ready=started.append,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - handed to the test thread, which reports it
            failure.append(exc)

    thread = threading.Thread(target=serve, name="nfs-serve")
    thread.start()
    try:
        wait_for(lambda: started or failure, 30, "ganesha to start")
        assert not failure, failure
        for version in (2, 3):  # each new release's tree is exported, the older ones stay
            digests.append(rebuild(registry, store, image, version))
            wait_for(lambda: nfs_read(port, usr_tree(digests[-1]))[0] == NFS4_OK, 30, "the new tree")
        trees = [usr_tree(d) for d in digests]
        assert all(nfs_read(port, t)[0] == NFS4_OK for t in trees)
        pid = started[0].pid

        result = collect_garbage(store, keep_previous=1, booted={}, min_age=0)
        assert result.count("tree") == 1

        wait_for(lambda: nfs_read(port, trees[0])[0] == NFS4ERR_NOENT, 30, "the removed tree's export to go")
        assert all(nfs_read(port, t)[0] == NFS4_OK for t in trees[1:])
        assert started[0].pid == pid  # by SIGHUP, not a restart
        exports = started[0].exports
        assert exports is not None and {e.pseudo for e in exports.exports} == set(trees[1:])
    finally:
        stop_serving.set()
        thread.join(60)
    assert not thread.is_alive() and not failure


# -- acceptance: gc on a namespace cluster -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gc_keeping_one_previous_and_a_node_still_boots(tmp_path: Path) -> None:
    """Three releases of `base` published while `slim serve` runs; a node boots the current
    one (agent, no-reboot mode, in its own namespace); `slim store gc --keep-previous 1`
    removes exactly the oldest release's unshared objects and its tree; the node boots again."""
    import subprocess
    import sys

    import grpc

    from labs.netlab import NetLab
    from slim.allinone import await_ready
    from slim.v1 import core_pb2 as pb
    from slim.v1 import core_pb2_grpc as pb_grpc
    from tests.support import need_netns
    from tests.test_cluster import MAC, agent
    from tests.test_cluster import REGISTRY as CLUSTER

    need_netns()
    image = tmp_path / "image"
    image.mkdir()
    make_image(image)
    node = f'  n1: {{macs: ["{MAC.format(1)}"], profile: ns, environment: base, site: lab, disk: /dev/sda1}}'
    registry_path = tmp_path / "registry.yaml"
    registry_path.write_text(CLUSTER.format(image=image, nodes=node, tmp=tmp_path))
    registry = load_registry(registry_path)
    state = tmp_path / "state"
    store = Store(state / "store")
    digests = [rebuild(registry, store, image, v) for v in (1, 2, 3)]
    old_objects, old_trees = uses(store, digests[0])
    kept = [uses(store, d) for d in digests[1:]]
    gone_objects = old_objects - kept[0][0] - kept[1][0]
    assert old_objects - gone_objects  # shared objects, which must stay
    with NetLab(tmp_path) as lab:
        lab.add_node("n1", MAC.format(1))
        serve = lab.popen(
            lab.server, sys.executable, "-m", "slim.cli", "serve", "--registry", str(registry_path),
            "--state-dir", str(state), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        assert serve.stdout is not None
        await_ready(serve.stdout, state / "logs")
        with grpc.insecure_channel(f"unix:{tmp_path}/core.sock") as channel:
            admin = pb_grpc.AdminStub(channel)
            assert lab.dhcp("n1") is not None
            first = agent(lab, "n1", tmp_path / "roots" / "a", tmp_path / "state")
            assert first.returncode == 0, first.stderr[-2000:]

            code, out = slim(
                "store",
                "gc",
                "--store",
                str(store.root),
                "--state",
                str(state / "state.db"),
                "--keep-previous",
                "1",
                "--min-age",
                "0",
                "--json",
            )
            assert code == 0, out

            doc = json.loads(out)
            assert doc["booted"] == {"n1": digests[2]}
            assert {g["digest"][7:] for g in doc["removed"] if g["kind"] == "object"} == gone_objects
            assert {g["digest"][7:] for g in doc["removed"] if g["kind"] == "tree"} == old_trees - kept[0][
                1
            ] - kept[1][1]
            assert doc["objects"] == len(gone_objects) and doc["trees"] == 1
            objects, trees = on_disk(store)
            assert objects == kept[0][0] | kept[1][0] and trees == kept[0][1] | kept[1][1]

            again = agent(lab, "n1", tmp_path / "roots" / "b", tmp_path / "state")
            assert again.returncode == 0, again.stderr[-2000:]
            active = json.loads((run_dir(tmp_path / "roots" / "b", no_reboot=True) / "ee").read_text())
            events = admin.ListBootEvents(pb.ListBootEventsRequest(node="n1"), timeout=10).events
            stages = {e.stage for e in events if e.boot_id == active["boot_id"]}
            assert {"plan", "done"} <= stages and all(e.ok for e in events)
        serve.terminate()
        serve.wait(60)
        serve.stdout.close()
