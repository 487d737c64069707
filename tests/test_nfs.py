"""slim.core.daemons.exports and .ganesha: exports of content-addressed trees, ganesha/exports
rendering, and a real ganesha.nfsd under the supervisor (loopback only, free ports, NFSv4 spoken
by hand)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from labs.host import free_port
from slim.core.daemons import ganesha as nfs
from slim.core.daemons.exports import collect_exports, render_config, render_exports
from slim.core.daemons.ganesha import NfsServer
from slim.core.registry import Registry, load_registry
from slim.core.store import Store
from slim.daemons import ganesha as gan
from slim.daemons.ganesha import (
    EXPORT_ID_SLOTS,
    FIRST_EXPORT_ID,
    GANESHA,
    ExportSet,
    assign_export_ids,
    export_id_for,
    normalize_clients,
    parse_clients,
    parse_listen,
    pseudo_path,
    render_ganesha,
)
from slim.errors import FailedPrecondition, InvalidArgument, Unavailable
from slim.release import ObjectRef, Release, ReleaseDirectory
from slim.vocabulary import Policy
from tests.support import AUTH_SYS, need, need_tool, rpc_call, rpc_null, wait_for, xdr_opaque

REGISTRY = """\
settings:
  nfs_export_root: {root}
environments:
  base:
    image: /srv/images/base
    directories:
      /usr: nfs
      /tmp: ram
  jdk14:
    image: /srv/images/jdk14
    directories:
      /usr: nfs
      /opt: {{policy: nfs, options: "ro,nolock,actimeo=900,proto=tcp"}}
  unbuilt:
    image: /srv/images/unbuilt
    directories:
      /usr: nfs
  ramonly:
    image: /srv/images/ramonly
"""

NFS4_OK = 0
NFS4ERR_NOENT = 2


def digest_of(prefix: str) -> str:
    """A synthetic tree digest whose hex starts with ``prefix`` (to steer export ids)."""
    return "sha256:" + (prefix + hashlib.sha256(prefix.encode()).hexdigest())[:64]


def hex_for_id(export_id: int, salt: int = 0) -> str:
    """An 8-hex prefix whose derived export id is ``export_id``."""
    return f"{export_id - FIRST_EXPORT_ID + salt * EXPORT_ID_SLOTS:08x}"


# -- a store with trees and releases -----------------------------------------------------------------


class World:
    """A registry file and a store whose releases use real trees."""

    def __init__(self, tmp: Path, root: str = "/slim") -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.registry_path = tmp / "registry.yaml"
        self.store = Store(tmp / "store")
        self.set_root(root)

    def set_root(self, root: str) -> None:
        self.registry_path.write_text(REGISTRY.format(root=root))

    @property
    def registry(self) -> Registry:
        return load_registry(self.registry_path)

    def tree(self, content: str, files: dict[str, str] | None = None) -> ObjectRef:
        """A manifest object and its materialized tree."""
        ref = self.store.put_bytes(f"manifest: {content}\n".encode())
        path = self.store.tree_path(ref.digest)
        path.mkdir(parents=True, exist_ok=True)
        for name, text in (files or {"hello": f"hello from {content}\n"}).items():
            (path / name).write_text(text)
        return ref

    def publish(self, env: str, nfs_dirs: dict[str, ObjectRef | None], version: str = "1") -> str:
        dirs = {path: ReleaseDirectory(policy=Policy.NFS, manifest=ref) for path, ref in nfs_dirs.items()}
        dirs["/"] = ReleaseDirectory(policy=Policy.RAM, archive=self.store.put_bytes(f"root {env}".encode()))
        return self.store.publish_release(
            Release(
                environment=env,
                kernel=self.store.put_bytes(f"kernel {env} {version}".encode()),
                initrd=self.store.put_bytes(f"initrd {env} {version}".encode()),
                directories=dirs,
                created=version,
            )
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    usr = w.tree("usr v1")
    w.publish("base", {"/usr": usr})
    w.publish("jdk14", {"/usr": usr, "/opt": w.tree("opt v1")})
    w.publish("ramonly", {})
    return w


# -- names and ids -----------------------------------------------------------------------------------


def test_pseudo_path_is_root_plus_full_hex() -> None:
    hexpart = hashlib.sha256(b"t").hexdigest()
    assert pseudo_path("/slim", f"sha256:{hexpart}") == f"/slim/{hexpart}"
    assert pseudo_path("/slim/", hexpart) == f"/slim/{hexpart}"
    assert pseudo_path("/", hexpart) == f"/{hexpart}"
    # kernel nfsd: the export root is the trees directory, so the pseudo path is the real path
    store = Store("/var/lib/slim/store")
    assert pseudo_path(str(store.trees), hexpart) == str(store.tree_path(hexpart))
    with pytest.raises(InvalidArgument, match="not a sha256 digest"):
        pseudo_path("/slim", "sha256:abc")
    with pytest.raises(InvalidArgument, match="not an absolute path"):
        pseudo_path("slim", hexpart)


def test_export_id_is_derived_from_the_digest() -> None:
    tree = digest_of("0000abcd")
    assert export_id_for(tree) == FIRST_EXPORT_ID + 0xABCD
    assert export_id_for(digest_of(hex_for_id(2))) == 2
    assert export_id_for(digest_of("ffffffff")) == FIRST_EXPORT_ID + 0xFFFFFFFF % EXPORT_ID_SLOTS
    ids = [export_id_for(digest_of(f"{i:08x}")) for i in range(0, 2**32, 2**32 // 997)]
    assert all(FIRST_EXPORT_ID <= i < FIRST_EXPORT_ID + EXPORT_ID_SLOTS for i in ids)


def test_colliding_ids_are_probed_in_sorted_digest_order() -> None:
    a = digest_of(hex_for_id(10))
    b = digest_of(hex_for_id(10, salt=1))  # same derived id as a, sorts after it
    c = digest_of(hex_for_id(11))
    assert export_id_for(a) == export_id_for(b) == 10
    expected = {a: 10, c: 11, b: 12}
    for _ in range(5):
        trees = [a, b, c]
        random.shuffle(trees)
        assert assign_export_ids(trees) == expected  # order of discovery does not matter
    assert assign_export_ids([b]) == {b: 10}  # alone, b gets its own id


def test_probing_wraps_around_the_id_space() -> None:
    last = FIRST_EXPORT_ID + EXPORT_ID_SLOTS - 1
    a = digest_of(hex_for_id(last))
    b = digest_of(hex_for_id(last, salt=1))
    assert assign_export_ids([a, b]) == {a: last, b: FIRST_EXPORT_ID}


def test_kept_ids_win_and_bad_ones_are_ignored() -> None:
    a = digest_of(hex_for_id(10))
    b = digest_of(hex_for_id(10, salt=1))
    c = digest_of(hex_for_id(40))
    # a running server exported b first (as 10); a arrives later and must not take it
    assert assign_export_ids([a, b], keep={b: 10}) == {b: 10, a: 11}
    # out of range, reserved or duplicate kept ids fall back to derivation
    assert assign_export_ids([a, c], keep={a: 0, c: 1}) == {a: 10, c: 40}
    assert assign_export_ids([a, c], keep={a: 70000}) == {a: 10, c: 40}
    assert assign_export_ids([a, c], keep={a: 77, c: 77}) == {a: 77, c: 40}


# -- collecting exports ------------------------------------------------------------------------------


def test_collect_exports_one_per_distinct_tree(world: World) -> None:
    exports = collect_exports(world.registry, world.store)
    base = world.store.release("base")
    jdk = world.store.release("jdk14")
    assert base is not None and jdk is not None
    usr = base[1].directories["/usr"].manifest
    opt = jdk[1].directories["/opt"].manifest
    assert usr is not None and opt is not None
    assert jdk[1].directories["/usr"].manifest == usr  # the shared tree

    assert sorted(e.tree for e in exports.exports) == sorted([usr.digest, opt.digest])  # one each
    ids = [e.export_id for e in exports.exports]
    assert ids == sorted(ids)
    shared = exports.get(usr.digest)
    assert shared is not None
    assert [str(u) for u in shared.used_by] == ["base:/usr", "jdk14:/usr"]
    assert {u.release for u in shared.used_by} == {base[0], jdk[0]}
    assert shared.pseudo == pseudo_path("/slim", usr.digest)
    assert shared.path == world.store.tree_path(usr.digest).resolve()
    assert shared.path.is_absolute()
    assert shared.export_id == export_id_for(usr.digest)
    only_opt = exports.get(opt.digest)
    assert only_opt is not None and [str(u) for u in only_opt.used_by] == ["jdk14:/opt"]
    assert exports.export_root == "/slim"
    assert exports.trees_dir == world.store.trees.resolve()
    assert exports.notes == ("environment 'unbuilt' has never been built; nothing of it is exported",)


def test_ids_stable_across_runs_and_unrelated_changes(world: World) -> None:
    first = collect_exports(world.registry, world.store).ids()
    assert collect_exports(world.registry, Store(world.store.root)).ids() == first
    world.publish("unbuilt", {"/usr": world.tree("unbuilt usr")})
    after = collect_exports(world.registry, world.store).ids()
    assert len(after) == 3
    assert {t: after[t] for t in first} == first


def test_collision_through_collect_exports(tmp_path: Path) -> None:
    w = World(tmp_path)
    a, b = digest_of(hex_for_id(500)), digest_of(hex_for_id(500, salt=3))
    for tree in (a, b):
        w.store.tree_path(tree).mkdir(parents=True)
    w.publish("base", {"/usr": ObjectRef(digest=b, size=0)})
    w.publish("jdk14", {"/usr": ObjectRef(digest=a, size=0)})
    assert collect_exports(w.registry, w.store).ids() == {a: 500, b: 501}


def test_missing_tree_is_an_error_naming_environment_directory_and_path(world: World) -> None:
    gone = world.tree("opt v2")
    world.publish("jdk14", {"/usr": world.tree("usr v1"), "/opt": gone}, version="2")
    shutil.rmtree(world.store.tree_path(gone.digest))
    with pytest.raises(FailedPrecondition) as err:
        collect_exports(world.registry, world.store)
    msg = str(err.value)
    assert "'jdk14'" in msg and "/opt" in msg and str(world.store.tree_path(gone.digest)) in msg
    assert "missing from the store" in msg and "slim ee build jdk14" in msg


def test_tree_that_is_a_file_is_an_error(world: World) -> None:
    ref = world.store.put_bytes(b"manifest: not a dir")
    world.store.tree_path(ref.digest).write_text("oops")
    world.publish("base", {"/usr": ref}, version="2")
    with pytest.raises(FailedPrecondition, match="is not a directory"):
        collect_exports(world.registry, world.store)


def test_nfs_directory_without_tree_is_noted(world: World) -> None:
    world.publish("base", {"/usr": None}, version="2")
    exports = collect_exports(world.registry, world.store)
    assert any("'base'" in n and "/usr" in n and "names no tree" in n for n in exports.notes)
    assert all("base:/usr" not in [str(u) for u in e.used_by] for e in exports.exports)


def test_retained_trees_stay_exported_while_in_the_store(world: World) -> None:
    before = collect_exports(world.registry, world.store)
    old_usr = next(e for e in before.exports if len(e.used_by) == 2)
    new_usr = world.tree("usr v2")
    world.publish("base", {"/usr": new_usr}, version="2")
    world.publish("jdk14", {"/usr": new_usr, "/opt": world.tree("opt v1")}, version="2")

    plain = collect_exports(world.registry, world.store)
    assert plain.get(old_usr.tree) is None
    kept = collect_exports(world.registry, world.store, keep_ids=before.ids(), retain=before.ids())
    again = kept.get(old_usr.tree)
    assert again is not None and again.used_by == () and again.export_id == old_usr.export_id
    assert any(old_usr.tree[:19] in n and "booted earlier" in n for n in kept.notes)

    shutil.rmtree(old_usr.path)  # garbage-collected: no longer exported
    assert collect_exports(world.registry, world.store, retain=before.ids()).get(old_usr.tree) is None


# -- clients and addresses ---------------------------------------------------------------------------


def test_normalize_clients() -> None:
    assert normalize_clients(None) is None
    assert normalize_clients([]) is None
    assert normalize_clients(["10.1.0.0/16", " node7.lab ", "*.lab.example", "@ops", "fd00::1"]) == (
        "10.1.0.0/16",
        "node7.lab",
        "*.lab.example",
        "@ops",
        "fd00::1",
    )
    assert normalize_clients(["10.1.0.1", "10.1.0.1", ""]) == ("10.1.0.1",)
    assert normalize_clients(["10.1.0.0/16", "*"]) is None  # everyone
    assert parse_clients("10.1.0.0/16,fd00:1::/64") == ("10.1.0.0/16", "fd00:1::/64")
    assert parse_clients(None) is None


@pytest.mark.parametrize("bad", ["10.1.0.1/16", "10.1.0.0/33", "bad host", 'x"y', "a;b", "@", "-x-"])
def test_normalize_clients_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="client"):
        normalize_clients([bad])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:2050", ("127.0.0.1", 2050)),
        ("0.0.0.0", ("0.0.0.0", 2049)),
        (":3049", ("0.0.0.0", 3049)),
        ("[::]:2049", ("::", 2049)),
        ("[fd00::1]", ("fd00::1", 2049)),
        ("::1", ("::1", 2049)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("bad", ["host.example:2049", "1.2.3.4:x", "1.2.3.4:0", "1.2.3.4:70000", "[::1"])
def test_parse_listen_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_listen(bad)


# -- rendering ---------------------------------------------------------------------------------------


def blocks_balanced(text: str) -> bool:
    depth = 0
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        depth += line.count("{") - line.count("}")
        if depth < 0:
            return False
    return depth == 0


def test_render_ganesha_essentials(world: World, tmp_path: Path) -> None:
    exports = collect_exports(world.registry, world.store)
    workdir = tmp_path / "w1"
    text = render_ganesha(exports, bind="127.0.0.1", port=12049, workdir=workdir)
    assert blocks_balanced(text)
    lines = [ln.strip() for ln in text.splitlines()]
    for expected in [
        "Bind_Addr = 127.0.0.1;",
        "NFS_Port = 12049;",
        "Protocols = 4;",
        "Enable_NLM = false;",
        "Enable_RQUOTA = false;",
        "Enable_UDP = false;",
        "Graceless = true;",
        "Allow_Numeric_Owners = true;",
        "Only_Numeric_Owners = true;",
        "Active_krb5 = false;",
        "RecoveryBackend = fs;",
        f'RecoveryRoot = "{workdir / "recovery"}";',
        f'CCacheDir = "{workdir / "krb5"}";',
    ]:
        assert expected in lines, expected
    assert sum(ln.startswith("Dbus_Name_Prefix = slim_") for ln in lines) == 1
    assert lines.count("EXPORT {") == 2
    for e in exports.exports:
        assert f"Export_Id = {e.export_id};" in lines
        assert f'Path = "{e.path}";' in lines
        assert f'Pseudo = "{e.pseudo}";' in lines
    for per_export in [
        "Access_Type = RO;",
        "Squash = No_Root_Squash;",
        "Transports = TCP;",
        "SecType = sys;",
        "Name = VFS;",
    ]:
        assert lines.count(per_export) == 2, per_export
    assert "CLIENT {" not in lines
    assert "# note: environment 'unbuilt' has never been built; nothing of it is exported" in lines
    assert any(ln.startswith("# sha256:") and "base:/usr, jdk14:/usr" in ln for ln in lines)


def test_render_ganesha_instances_do_not_share_paths(world: World, tmp_path: Path) -> None:
    exports = collect_exports(world.registry, world.store)
    one = render_ganesha(exports, workdir=tmp_path / "a")
    two = render_ganesha(exports, workdir=tmp_path / "b")
    per_instance = ("RecoveryRoot", "CCacheDir", "Dbus_Name_Prefix")
    for key in per_instance:
        assert next(ln for ln in one.splitlines() if key in ln) != next(
            ln for ln in two.splitlines() if key in ln
        )
    system = render_ganesha(exports)  # no workdir: ganesha's own system paths
    assert not any(key in system for key in per_instance)
    assert "Bind_Addr = 0.0.0.0;" in system and "NFS_Port = 2049;" in system


def test_render_ganesha_clients(world: World) -> None:
    exports = collect_exports(world.registry, world.store)
    text = render_ganesha(exports, clients=["10.1.0.0/16", "fd00:1::/64", "node7.lab"])
    assert blocks_balanced(text)
    lines = [ln.strip() for ln in text.splitlines()]
    assert lines.count("Access_Type = None;") == 2  # nobody but the listed clients ...
    assert lines.count("Clients = 10.1.0.0/16, fd00:1::/64, node7.lab;") == 2
    assert lines.count("Access_Type = RO;") == 2  # ... who may read
    assert render_ganesha(exports, clients=["*"]) == render_ganesha(exports)


def test_render_ganesha_rejects_bad_input(world: World, tmp_path: Path) -> None:
    exports = collect_exports(world.registry, world.store)
    with pytest.raises(InvalidArgument, match="not an IP address"):
        render_ganesha(exports, bind="nfs.example")
    with pytest.raises(InvalidArgument, match="port"):
        render_ganesha(exports, port=0)
    with pytest.raises(InvalidArgument, match="client"):
        render_ganesha(exports, clients=["10.0.0.1/8"])
    with pytest.raises(InvalidArgument, match="quote"):
        render_ganesha(exports, workdir=tmp_path / 'we"ird')


def test_render_exports(world: World) -> None:
    exports = collect_exports(world.registry, world.store)
    text = render_exports(exports)
    body = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert len(body) == 2
    fsids = set()
    for e, line in zip(exports.exports, body, strict=True):
        path, spec = line.split(" ")
        assert path == str(e.path)
        assert spec.startswith("*(") and spec.endswith(")")
        options = spec[2:-1].split(",")
        for opt in ("ro", "no_root_squash", "no_subtree_check", "insecure", "sec=sys"):
            assert opt in options
        fsid = next(o for o in options if o.startswith("fsid="))[5:]
        assert fsid.replace("-", "") == e.hex[:32] and len(fsid) == 36
        fsids.add(fsid)
    assert len(fsids) == 2
    assert render_exports(exports) == text  # stable
    assert f"nfs_export_root: {exports.trees_dir}" in text
    assert "WARNING: nfs_export_root is /slim" in text  # nodes would ask for /slim/<hex>
    assert "# note: environment 'unbuilt' has never been built" in text

    restricted = render_exports(exports, clients=["10.1.0.0/16", "node7"])
    line = next(ln for ln in restricted.splitlines() if not ln.startswith("#"))
    assert " 10.1.0.0/16(ro," in line and " node7(ro," in line and "*(" not in line


def test_render_exports_kernel_layout_has_no_warning(tmp_path: Path) -> None:
    w = World(tmp_path / "with space")
    w.set_root(str(w.store.trees.resolve()))
    ref = w.tree("usr")
    w.publish("base", {"/usr": ref})
    exports = collect_exports(w.registry, w.store)
    (e,) = exports.exports
    assert e.pseudo == str(e.path)  # the path a node mounts is the real path
    text = render_exports(exports)
    assert "WARNING" not in text
    assert "with\\040space" in text and "with space" not in text.split("\n")[-2]


def test_render_config(world: World, tmp_path: Path) -> None:
    ganesha = render_config(world.registry_path, world.store.root, bind="127.0.0.1", port=3049)
    assert "NFS_Port = 3049;" in ganesha and "RecoveryRoot" not in ganesha
    with_workdir = render_config(world.registry_path, world.store.root, workdir=tmp_path / "w")
    assert f'RecoveryRoot = "{tmp_path / "w" / "recovery"}";' in with_workdir
    exports = render_config(world.registry_path, world.store.root, fmt="exports", clients=["10.0.0.0/8"])
    assert "10.0.0.0/8(ro," in exports
    with pytest.raises(InvalidArgument, match="unknown format"):
        render_config(world.registry_path, world.store.root, fmt="yaml")  # type: ignore[arg-type]


def test_missing_ganesha_binary(world: World, tmp_path: Path) -> None:
    server = NfsServer(
        world.registry_path,
        world.store.root,
        tmp_path / "w",
        bind="127.0.0.1",
        port=free_port(),
        ganesha=str(tmp_path / "no-such-ganesha"),
    )
    with pytest.raises(FailedPrecondition, match="not found: install nfs-ganesha"):
        server.start()
    assert server.pid is None
    server.stop()


# -- talking NFS by hand -----------------------------------------------------------------------------


def nfs_read(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes | None]:
    """NFSv4.0 COMPOUND: PUTROOTFH, LOOKUP each component and, if the last names a file
    (``.../hello``), READ it with the anonymous stateid.  (status, data or None)."""
    parts = [p for p in path.split("/") if p]
    read = parts[-1] == "hello"
    ops = struct.pack(">I", 24) + b"".join(struct.pack(">I", 15) + xdr_opaque(p.encode()) for p in parts)
    if read:
        ops += struct.pack(">I", 25) + struct.pack(">I", 0) + b"\0" * 12 + struct.pack(">QI", 0, 4096)
    args = xdr_opaque(b"") + struct.pack(">2I", 0, 1 + len(parts) + read) + ops
    res = rpc_call(port, random.getrandbits(32), 1, AUTH_SYS, args, host)
    (status,) = struct.unpack(">I", res[:4])
    if status != NFS4_OK or not read:
        return status, None
    # walk the results: (op, status) for PUTROOTFH and each LOOKUP, then READ's
    tag_len = struct.unpack(">I", res[4:8])[0]
    off = 8 + tag_len + (-tag_len % 4) + 4 + 8 * (1 + len(parts))
    op, rstatus, _eof, length = struct.unpack(">4I", res[off : off + 16])
    assert (op, rstatus) == (25, NFS4_OK)
    return status, res[off + 16 : off + 16 + length]


def ours(pid: int, config: Path) -> bool:
    """Whether ``pid`` is (still) a live ganesha running ``config`` (zombies are not)."""
    try:
        return str(config).encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def ganeshas_of(workdir: Path) -> list[int]:
    """Every live process running a configuration in ``workdir`` (a scan of /proc)."""
    config = str(workdir / "ganesha.conf").encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if config in (entry / "cmdline").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# -- the real ganesha --------------------------------------------------------------------------------


@pytest.fixture
def ganesha() -> None:
    """Real-ganesha tests need ganesha.nfsd and root (FSAL VFS opens files by handle);
    skipped locally without them, failed in CI (CI=true)."""
    need_tool(GANESHA, "nfs-ganesha nfs-ganesha-vfs")
    need(os.geteuid() == 0, "ganesha.nfsd's VFS backend needs root")


@pytest.fixture
def server_factory(world: World, tmp_path: Path) -> Iterator[Callable[..., NfsServer]]:
    made: list[NfsServer] = []

    def make(name: str = "w", **kw: object) -> NfsServer:
        kw.setdefault("bind", "127.0.0.1")
        kw.setdefault("port", free_port())
        kw.setdefault("stop_grace", 5.0)
        server = NfsServer(world.registry_path, world.store.root, tmp_path / name, **kw)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def exports_of(server: NfsServer) -> ExportSet:
    exports = server.exports
    assert exports is not None
    return exports


@pytest.mark.usefixtures("ganesha")
def test_ganesha_serves_the_trees(world: World, server_factory: Callable[..., NfsServer]) -> None:
    server = server_factory()
    server.start()
    pid = server.pid
    assert pid is not None and ours(pid, server.config_path)
    assert server.pid_path.read_text().split()[0] == str(pid)
    host, port = server.address
    with socket.create_connection((host, port), timeout=5):
        pass
    assert rpc_null(port)  # it speaks ONC RPC for NFS version 4
    for e in exports_of(server).exports:
        status, data = nfs_read(port, f"{e.pseudo}/hello")
        assert status == NFS4_OK
        assert data is not None and data.startswith(b"hello from ")
    assert nfs_read(port, "/slim")[0] == NFS4_OK  # the pseudo file system's directory
    assert nfs_read(port, pseudo_path("/slim", "0" * 64))[0] == NFS4ERR_NOENT
    assert (server.workdir / "recovery").is_dir()  # per-instance recovery directory

    server.stop()
    assert server.pid is None
    assert not ours(pid, server.config_path)
    assert ganeshas_of(server.workdir) == []
    assert not server.pid_path.exists()
    assert not gan._accepts(host, port)


@pytest.mark.usefixtures("ganesha")
def test_client_restriction_is_enforced(server_factory: Callable[..., NfsServer]) -> None:
    allowed = server_factory("allowed", clients=["127.0.0.0/8"])
    denied = server_factory("denied", clients=["10.1.0.0/16", "fd00::/64"])
    allowed.start()
    denied.start()
    tree = exports_of(allowed).exports[0].pseudo
    assert nfs_read(allowed.port, tree)[0] == NFS4_OK
    assert nfs_read(denied.port, tree)[0] != NFS4_OK  # 127.0.0.1 is not listed: not visible


@pytest.mark.usefixtures("ganesha")
def test_several_instances_at_once(server_factory: Callable[..., NfsServer]) -> None:
    servers = [server_factory(f"w{i}") for i in range(3)]
    for server in servers:
        server.start()
    pids = {server.pid for server in servers}
    assert len(pids) == 3 and None not in pids
    for server in servers:
        assert rpc_null(server.port)
        assert server.pid is not None and ours(server.pid, server.config_path)
    assert len({s.workdir / "recovery" for s in servers}) == 3


@pytest.mark.usefixtures("ganesha")
def test_reload(world: World, server_factory: Callable[..., NfsServer]) -> None:
    server = server_factory()
    server.start()
    pid = server.pid
    port = server.port
    old = {e.tree: e for e in exports_of(server).exports}
    assert server.reload() == "unchanged"

    # a rebuilt environment: a new tree is added by SIGHUP, the old one stays for booted nodes
    new_usr = world.tree("usr v2")
    world.publish("base", {"/usr": new_usr}, version="2")
    world.publish("jdk14", {"/usr": new_usr, "/opt": world.tree("opt v1")}, version="2")
    assert server.reload() == "sighup"
    assert server.pid == pid
    assert nfs_read(port, f"{pseudo_path('/slim', new_usr.digest)}/hello") == (
        NFS4_OK,
        b"hello from usr v2\n",
    )
    for e in old.values():
        assert nfs_read(port, e.pseudo)[0] == NFS4_OK
        kept = exports_of(server).get(e.tree)
        assert kept is not None and (kept.export_id, kept.path, kept.pseudo) == (
            e.export_id,
            e.path,
            e.pseudo,
        )
    assert server.reload() == "unchanged"

    # the old tree is garbage-collected from the store: unexported, again without a restart
    gone = next(e for e in old.values() if len(e.used_by) == 2)
    shutil.rmtree(gone.path)
    assert server.reload() == "sighup"
    assert server.pid == pid
    assert nfs_read(port, gone.pseudo)[0] == NFS4ERR_NOENT

    # a new export root changes every pseudo path: ganesha cannot take that by SIGHUP
    world.set_root("/ee")
    assert server.reload() == "restarted"
    assert server.pid not in (None, pid)
    assert nfs_read(port, f"{pseudo_path('/ee', new_usr.digest)}/hello")[0] == NFS4_OK
    assert nfs_read(port, pseudo_path("/slim", new_usr.digest))[0] == NFS4ERR_NOENT
    assert not ours(pid, server.config_path)  # type: ignore[arg-type]

    # an invalid registry: the error is raised and ganesha keeps serving what it had
    world.registry_path.write_text("environments: [")
    pid = server.pid
    with pytest.raises(InvalidArgument):
        server.reload()
    assert server.pid == pid and rpc_null(port)


@pytest.mark.usefixtures("ganesha")
def test_ids_and_retained_trees_survive_a_restart_of_the_supervisor(
    world: World, server_factory: Callable[..., NfsServer]
) -> None:
    first = server_factory("w")
    first.start()
    old = exports_of(first)
    first.stop()
    new_usr = world.tree("usr v2")
    world.publish("base", {"/usr": new_usr}, version="2")
    world.publish("jdk14", {"/usr": new_usr}, version="2")
    second = server_factory("w")
    second.start()
    now = exports_of(second)
    for e in old.exports:  # still exported, with the same id, though no release uses them now
        kept = now.get(e.tree)
        assert kept is not None and kept.export_id == e.export_id and kept.used_by == ()
        assert nfs_read(second.port, e.pseudo)[0] == NFS4_OK


@pytest.mark.usefixtures("ganesha")
def test_start_failures_quote_the_log(world: World, server_factory: Callable[..., NfsServer]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = server_factory("busy", port=listener.getsockname()[1])
        with pytest.raises(Unavailable, match="already listens"):
            busy.start()
    with socket.socket() as bound:  # bound, not listening: ganesha itself fails to bind
        bound.bind(("127.0.0.1", 0))
        taken = server_factory("taken", port=bound.getsockname()[1])
        with pytest.raises(
            Unavailable, match=r"(?s)exited with status \d+ while starting.*Address already in use"
        ):
            taken.start()
    assert taken.pid is None
    taken.stop()


@pytest.mark.usefixtures("ganesha")
def test_rejected_configuration_fails_the_start(
    monkeypatch: pytest.MonkeyPatch, server_factory: Callable[..., NfsServer]
) -> None:
    real = render_ganesha

    def broken(*args: object, **kw: object) -> str:
        return real(*args, **kw).replace("Squash = No_Root_Squash;", "Squash = Sometimes;")  # type: ignore[arg-type]

    monkeypatch.setattr(gan, "render_ganesha", broken)
    server = server_factory()
    with pytest.raises(Unavailable, match="rejected part of"):
        server.start()
    assert server.pid is None


@pytest.mark.usefixtures("ganesha")
def test_one_supervisor_per_workdir(server_factory: Callable[..., NfsServer]) -> None:
    first = server_factory("w")
    first.start()
    with pytest.raises(FailedPrecondition, match="in use by another"):
        server_factory("w").start()
    assert first.pid is not None and rpc_null(first.port)


@pytest.mark.usefixtures("ganesha")
def test_stale_ganesha_of_a_killed_supervisor_is_reported_not_killed(
    server_factory: Callable[..., NfsServer],
) -> None:
    first = server_factory("w")
    first.start()
    pid = first.pid
    assert pid is not None
    first._release_workdir()  # as if the supervisor had been SIGKILLed: ganesha runs on
    second = server_factory("w", port=free_port())
    with pytest.raises(FailedPrecondition, match=rf"pid {pid}\) from an earlier run"):
        second.start()
    assert ours(pid, first.config_path)  # left alone
    first.stop()


@pytest.mark.usefixtures("ganesha")
def test_serve_restarts_a_killed_ganesha_and_follows_releases(world: World, tmp_path: Path) -> None:
    port = free_port()
    stop = threading.Event()
    started: list[NfsServer] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            nfs.serve(
                world.registry_path,
                world.store.root,
                tmp_path / "w",
                bind="127.0.0.1",
                port=port,
                stop_event=stop,
                interval=0.05,
                ready=started.append,
            )
        except Exception as exc:  # noqa: BLE001 - handed to the test thread, which reports it
            failure.append(exc)

    thread = threading.Thread(target=run, name="nfs-serve")
    thread.start()
    try:
        wait_for(lambda: started or failure, 30, "ganesha to start")
        assert not failure, failure
        server = started[0]
        first = server.pid
        assert first is not None and rpc_null(port)

        os.kill(first, signal.SIGKILL)  # the PID the supervisor started
        wait_for(lambda: server.pid not in (None, first) and gan._accepts("127.0.0.1", port), 30, "restart")
        assert rpc_null(port)
        second = server.pid
        assert second is not None and not ours(first, server.config_path)

        new_usr = world.tree("usr v2")
        world.publish("base", {"/usr": new_usr}, version="2")  # a ref changes: re-rendered
        target = f"{pseudo_path('/slim', new_usr.digest)}/hello"
        wait_for(lambda: nfs_read(port, target)[0] == NFS4_OK, 30, "the new tree to be exported")
        assert nfs_read(port, target) == (NFS4_OK, b"hello from usr v2\n")
        assert server.pid == second  # by SIGHUP
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive() and not failure
    assert not ours(second, server.config_path)
    assert ganeshas_of(tmp_path / "w") == []
    assert not gan._accepts("127.0.0.1", port)


@pytest.mark.usefixtures("ganesha")
def test_serve_stops_ganesha_on_sigterm(world: World, tmp_path: Path) -> None:
    port = free_port()
    workdir = tmp_path / "w"
    code = (
        "import sys; from slim.core.daemons.ganesha import serve; "
        "serve(sys.argv[1], sys.argv[2], sys.argv[3], bind='127.0.0.1', port=int(sys.argv[4]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(world.registry_path), str(world.store.root), str(workdir), str(port)]
    )
    try:
        config = workdir / "ganesha.conf"
        wait_for(lambda: (workdir / "ganesha.pid").exists() and gan._accepts("127.0.0.1", port), 30, "start")
        pid = int((workdir / "ganesha.pid").read_text().split()[0])
        assert ours(pid, config) and rpc_null(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not ours(pid, config)
        assert ganeshas_of(workdir) == []
        assert not (workdir / "ganesha.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.usefixtures("ganesha")
def test_supervisor_retries_a_failing_restart(
    world: World, server_factory: Callable[..., NfsServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="slim.core.daemons.ganesha")
    server = server_factory(interval=0.05, backoff=(0.05, 0.2))
    port = server.port
    stop = threading.Event()
    thread = threading.Thread(target=server.run, args=(stop,), name="nfs-run")
    thread.start()
    try:
        wait_for(lambda: server.pid is not None, 30, "ganesha to start")
        first = server.pid
        assert first is not None
        # ganesha dies and cannot be started again (here: a server binary that fails at
        # once, swapped in before the kill so no restart can race the test): restarts
        # fail, with backoff ...
        real = server.ganesha
        server.ganesha = "/bin/false"
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not ours(first, server.config_path), 30, "ganesha to die")
        wait_for(lambda: caplog.text.count("restart failed") >= 2, 30, "failed restarts")
        assert server.pid is None
        # ... until it can start again; an invalid registry by then does not stop it
        server.ganesha = real
        world.registry_path.write_text("environments: [")
        wait_for(lambda: server.pid is not None, 30, "ganesha to be restarted")
        assert rpc_null(port) and server.pid != first
        assert "restarting with the last good configuration" in caplog.text
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert ganeshas_of(server.workdir) == []


@pytest.mark.usefixtures("ganesha")
def test_reload_restarts_when_ganesha_rejects_the_sighup(
    world: World, server_factory: Callable[..., NfsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = server_factory()
    server.start()
    pid = server.pid
    before = exports_of(server)
    opt = next(e for e in before.exports if len(e.used_by) == 1)
    usr = next(e for e in before.exports if len(e.used_by) == 2)
    # /opt is dropped and a new tree takes over its Export_Id (as a kept id): ganesha 4.3
    # refuses to change an export's Path on SIGHUP, and logs it
    new = world.tree("opt replacement")
    world.publish("jdk14", {"/usr": world.tree("usr v1"), "/new": new}, version="2")
    state = {"exports": {usr.tree: usr.export_id, new.digest: opt.export_id}}
    server.state_path.write_text(json.dumps(state))
    monkeypatch.setattr(gan, "_sighup_safe", lambda *a: True)  # pretend it were safe
    assert server.reload() == "restarted"
    assert server.pid not in (None, pid)
    replaced = exports_of(server).get(new.digest)
    assert replaced is not None and replaced.export_id == opt.export_id
    assert nfs_read(server.port, f"{replaced.pseudo}/hello") == (NFS4_OK, b"hello from opt replacement\n")
    assert nfs_read(server.port, opt.pseudo)[0] == NFS4ERR_NOENT
    assert "doesn't match" in server._read_log() or "doesn't match" in (
        server.log_path.with_name("ganesha.log.1").read_text()
    )
