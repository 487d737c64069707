"""A relay's own NFS (docs/home.md): trees built from cached objects, exported by the relay's
nfs-ganesha, and plans that send a site's nodes there first.

The trees are written by the relay's code from real store objects; the export is checked with
NFSv4 spoken by hand to a real ganesha on 127.0.0.2; the core is the real gRPC core with a real
relay beating to it.  The agent's failover probes real sockets (the mount itself is the VM's:
tests/test_home.py).
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
from pathlib import Path

import pytest

from labs.host import free_port
from slim.agent import ee
from slim.agent import manifest as mf
from slim.agent.plan import PlanError, parse_plan
from slim.agent.tree import scan
from slim.core.build import copyset
from slim.core.build.release import _store_files
from slim.core.control.service import CoreService, NodeRef
from slim.core.store import Store
from slim.daemons.ganesha import pseudo_path
from slim.relay.nfs import TreeCorrupt, build_tree
from slim.release import ObjectRef, encode_manifest
from slim.signing import SigningKey
from tests.support import Core, need, need_tool, origin, relay, reload_registry, url
from tests.test_agent import ROOT_DIR, plan_doc
from tests.test_nfs import NFS4_OK, nfs_read
from tests.test_relay_api import core_key, wait_until

RELAY_NFS = "127.0.0.2"  # the relay's ganesha; the centre's would be 127.0.0.1


def make_usr(root: Path) -> None:
    """A small /usr: nested directories with their own modes, a chunked file, a symbolic
    link, a hard link, an empty file, and "hello" (what nfs_read reads)."""
    (root / "bin").mkdir(parents=True)
    (root / "share" / "doc").mkdir(parents=True)
    (root / "hello").write_bytes(b"hello from the relay's tree\n")
    (root / "bin" / "tool").write_bytes(b"\x7fELF" + os.urandom(20_000))
    (root / "bin" / "tool").chmod(0o755)
    (root / "share" / "big").write_bytes(os.urandom(mf.CHUNKED_ABOVE + 12345))
    (root / "share" / "empty").write_bytes(b"")
    (root / "share" / "doc").chmod(0o750)
    (root / "share" / "link").symlink_to("../hello")
    os.link(root / "hello", root / "share" / "hello-again")


def tree_objects(tmp_path: Path) -> tuple[Path, mf.Manifest, Store]:
    """A /usr, its manifest, and a store holding its file objects (as a build stores them)."""
    usr = tmp_path / "image" / "usr"
    make_usr(usr)
    items = copyset.hash_tree(usr, list(scan(usr)))
    store = Store(tmp_path / "store")
    _store_files(store, usr, items)
    return usr, mf.make("/usr", items), store


def object_paths(store: Store, manifest: mf.Manifest) -> dict[str, Path]:
    from slim.release import manifest_objects

    return {n.hex: store.object_path(f"sha256:{n.hex}") for n in manifest_objects(manifest)}


def test_a_relay_builds_a_tree_from_objects_exactly_as_its_manifest_says(tmp_path: Path) -> None:
    _, manifest, store = tree_objects(tmp_path)
    trees = tmp_path / "trees"
    trees.mkdir()
    hexdigest = hashlib.sha256(mf.encode(manifest)).hexdigest()
    built = build_tree(manifest, object_paths(store, manifest), trees, hexdigest)
    assert built == trees / hexdigest
    assert (
        tuple(copyset.hash_tree(built, list(scan(built)))) == manifest.entries
    )  # bytes, modes, times, links
    assert stat.S_IMODE(built.stat().st_mode) == 0o755  # every user of the node reads /usr
    assert (built / "share" / "hello-again").stat().st_ino == (built / "hello").stat().st_ino
    assert sorted(p.name for p in trees.iterdir()) == [hexdigest]  # no staging left


def test_an_object_whose_bytes_changed_on_the_relays_disk_stops_the_tree(tmp_path: Path) -> None:
    usr, manifest, store = tree_objects(tmp_path)
    paths = object_paths(store, manifest)
    bad = hashlib.sha256((usr / "bin" / "tool").read_bytes()).hexdigest()
    copy = tmp_path / "changed"
    data = bytearray(paths[bad].read_bytes())
    data[100] ^= 1
    copy.write_bytes(bytes(data))
    paths[bad] = copy
    trees = tmp_path / "trees"
    trees.mkdir()
    with pytest.raises(TreeCorrupt) as caught:
        build_tree(manifest, paths, trees, "ab" * 32)
    assert caught.value.hexdigest == bad and "bin/tool" in caught.value.message
    assert list(trees.iterdir()) == []  # nothing half-built is left, nothing is exported


def usr_nfs(**nfs: object) -> bytes:
    mount: dict[str, object] = {"server": "100.64.0.1", "export": "/slim/" + "c" * 64, "options": "ro", **nfs}
    usr: dict[str, object] = {"path": "/usr", "policy": "nfs", "nfs": mount}
    return plan_doc(dict(ROOT_DIR), usr)


def test_a_plan_names_every_nfs_server_to_try_and_only_hosts() -> None:
    plan = parse_plan(usr_nfs(servers=["100.64.0.1", "10.99.0.2"]))
    mount = next(d.nfs for d in plan.directories if d.nfs is not None)
    assert mount.servers == ("100.64.0.1", "10.99.0.2")
    older = next(d.nfs for d in parse_plan(usr_nfs()).directories if d.nfs is not None)
    assert older.servers == ("100.64.0.1",)  # a core from before: its one server
    for bad in (["10.0.0.1,vers=3"], [], ["x y"], "10.0.0.1", [1], ["h"] * 17):
        with pytest.raises(PlanError, match="nfs servers"):
            parse_plan(usr_nfs(servers=bad))
    with pytest.raises(PlanError, match="needs a server"):
        parse_plan(usr_nfs(server="10.0.0.1,vers=3", servers=["10.0.0.1"]))


def test_the_agent_mounts_the_first_nfs_server_that_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first server takes no connection: it is passed over within the probe's time and
    the second, which does, is mounted; the boot event says which and why."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    mounts: list[tuple[str, ...]] = []

    def mount(*argv: str, timeout: float | None = None) -> None:
        mounts.append(argv)

    monkeypatch.setattr(ee, "_run", mount)  # the NFS mount itself needs a kernel client: the VM's
    plan = parse_plan(
        usr_nfs(server="127.0.0.3", servers=["127.0.0.3", "127.0.0.1"], options=f"ro,port={port}")
    )
    d = next(d for d in plan.directories if d.nfs is not None)
    assert d.nfs is not None
    events: list[tuple[str, str]] = []

    class Report:
        def __call__(self, stage: str, *a: object, message: str = "", **k: object) -> None:
            events.append((stage, message))

    builder = ee.Builder(plan, None, tmp_path / "root", Report(), no_reboot=False)  # type: ignore[arg-type]
    with listener:
        builder._mount_nfs(d, tmp_path / "usr")
    assert mounts == [
        (
            "mount",
            "-t",
            "nfs4",
            "-o",
            f"ro,port={port},addr=127.0.0.1",
            f"127.0.0.1:{d.nfs.export}",
            str(tmp_path / "usr"),
        )
    ]
    server, passed = builder.mounted[d.path]
    assert server == "127.0.0.1" and passed and passed[0].startswith("127.0.0.3: no answer")
    # none answers: the error names each
    alone = parse_plan(usr_nfs(server="127.0.0.3", servers=["127.0.0.3"], options=f"ro,port={port}"))
    with pytest.raises(OSError, match=r"no NFS server mounted.*127\.0\.0\.3: no answer"):
        builder._mount_nfs(next(x for x in alone.directories if x.nfs), tmp_path / "usr")


async def room_relay_exports_nfs(
    service: CoreService, store: Store, registry_file: Path, tmp_path: Path
) -> tuple[Path, str]:
    """The registry says room-1 exports NFS at RELAY_NFS; base's /usr a real manifest whose
    files are objects (what a build stores for such relays).  (the /usr, its tree's digest)."""
    need(os.geteuid() == 0, "nfs-ganesha runs as root")
    need_tool("ganesha.nfsd", "nfs-ganesha")
    registry_file.write_text(
        registry_file.read_text().replace(
            "  room-1:\n    urls: [http://10.1.0.2:8080/]\n",
            f"  room-1:\n    urls: [http://10.1.0.2:8080/]\n    nfs: {RELAY_NFS}\n",
        )
    )
    registry = await reload_registry(service)
    assert registry.relays_export_nfs
    usr, manifest, _ = tree_objects(tmp_path / "src")
    _store_files(store, usr, copyset.hash_tree(usr, list(scan(usr))))
    with store.writer() as w:
        w.write(encode_manifest(manifest))
    assert w.ref is not None
    found = store.release("base")
    assert found is not None
    old = found[1]
    dirs = dict(old.directories)
    dirs["/usr"] = dirs["/usr"].model_copy(
        update={"manifest": ObjectRef(digest=w.ref.digest, size=w.ref.size)}
    )
    signer = SigningKey.load_or_create(tmp_path / "keys")
    store.publish_release(old.model_copy(update={"directories": dirs}), signer)
    return usr, w.ref.digest


async def test_a_relay_exports_the_current_trees_and_plans_send_its_sites_nodes_there_first(
    core: Core, service: CoreService, store: Store, registry_file: Path, tmp_path: Path
) -> None:
    usr, tree = await room_relay_exports_nfs(service, store, registry_file, tmp_path)
    port = free_port()
    async with (
        origin(store) as o,
        relay(
            tmp_path / "r", [url(o)], name="room-1", core=core.address, trust=core_key(tmp_path),
            nfs_listen=f"{RELAY_NFS}:{port}", nfs_dir=tmp_path / "relay-nfs",
        ) as r,
    ):  # fmt: skip
        assert r.nfs is not None
        await wait_until(lambda: tree in r.nfs.exported(), 60)
        pseudo = pseudo_path("/slim", tree)
        status, data = nfs_read(port, f"{pseudo}/hello", host=RELAY_NFS)
        assert status == NFS4_OK and data == (usr / "hello").read_bytes()

        def servers(node: str, address: str) -> tuple[str, ...]:
            plan = service.boot_plan(NodeRef(name=node), address, peek=True)
            d = next(a for a in plan.directories if a.path == "/usr")
            assert d.nfs is not None and d.nfs.export == pseudo
            return d.nfs.servers

        # room's nodes: the relay first (once its beat lists the tree), then room's own server
        await wait_until(lambda: servers("n1", "10.1.0.5") == (RELAY_NFS, "10.1.0.1"), 30)
        plan = service.boot_plan(NodeRef(name="n1"), "10.1.0.5", peek=True)
        assert "nfs.nfs4_unique_id=n1" in plan.kernel_args.split()
        # lab's: lab's relay exports nothing, so the registry's NFS server only
        assert servers("n2", "10.2.0.5") == ("10.9.0.1",)
    # the relay stopped: its trees stay on disk for its next start, ganesha is gone
    assert (tmp_path / "relay-nfs" / "trees" / tree[7:]).is_dir()
    with pytest.raises(ConnectionRefusedError):
        nfs_read(port, f"{pseudo}/hello", host=RELAY_NFS)
    # and once its beats are stale, plans no longer name it
    assert servers("n1", "10.1.0.5") == (RELAY_NFS, "10.1.0.1")
    clock = service.clock
    service.clock = lambda: clock() + service.registry.settings.stale_after + 1
    assert servers("n1", "10.1.0.5") == ("10.1.0.1",)


async def test_a_tree_that_cannot_be_built_is_not_exported_and_holds_nothing(
    core: Core, service: CoreService, store: Store, registry_file: Path, tmp_path: Path
) -> None:
    """A cache budget smaller than the tree: the build stops saying why, no object stays held
    (they can be evicted again), nothing is exported, and plans keep the site's server."""
    _, tree = await room_relay_exports_nfs(service, store, registry_file, tmp_path)
    async with (
        origin(store) as o,
        relay(
            tmp_path / "r", [url(o)], max_bytes=3 << 20, name="room-1", core=core.address,
            trust=core_key(tmp_path), nfs_listen=f"{RELAY_NFS}:{free_port()}", nfs_dir=tmp_path / "relay-nfs",
        ) as r,
    ):  # fmt: skip
        assert r.nfs is not None
        await wait_until(lambda: tree[7:] in r.nfs.failed, 60)
        assert "cache" in r.nfs.failed[tree[7:]], r.nfs.failed
        await wait_until(lambda: r.cache.stats().in_use == 0, 30)  # nothing left held
        assert r.nfs.exported() == [] and not (tmp_path / "relay-nfs" / "trees" / tree[7:]).exists()
        plan = service.boot_plan(NodeRef(name="n1"), "10.1.0.5", peek=True)
        usr = next(a for a in plan.directories if a.path == "/usr")
        assert usr.nfs is not None and usr.nfs.servers == ("10.1.0.1",)
