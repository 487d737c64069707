"""``slim ee build``: objects, releases, NFS trees, copy-if-needed objects, rebuilds,
verification, and the errors an administrator meets."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from slim.agent.tree import scan
from slim.core.build.release import build_environment, verify_release
from slim.core.build.tarimport import extract_tar
from slim.core.registry import Registry, load_registry_text
from slim.core.store import Store
from slim.errors import FailedPrecondition, NotFound
from slim.release import decode_manifest
from slim.vocabulary import Policy
from tests.support import KVER, make_image


def registry_for(image: Path) -> Registry:
    return load_registry_text(
        f"""
settings: {{nfs_server: 10.0.0.1}}
profiles:
  vm: {{modules: [virtio_pci, virtio_net]}}
environments:
  base:
    image: {image}
    default_policy: ram
    directories:
      /usr: nfs
      /srv: sync
      /var: disk
nodes:
  n1: {{macs: ["52:54:00:00:00:01"], profile: vm, environment: base, disk: /dev/vda2}}
"""
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "image"
    root.mkdir()
    make_image(root)
    return root


def _unpack(store: Store, digest: str, into: Path) -> list[str]:
    into.mkdir()
    data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(store.read_object(digest)))
    extract_tar(data, into)
    return [e.path for e in scan(into)]


def test_build_publishes_every_kind_of_object(tmp_path: Path, image: Path) -> None:
    store = Store(tmp_path / "store")
    res = build_environment(registry_for(image), store, "base")
    assert not res.unchanged
    rel = res.release
    assert store.release("base") == (res.digest, rel)
    assert set(rel.directories) == {"/", "/usr", "/srv", "/var"}
    assert store.read_object(rel.kernel.digest) == (image / "boot" / f"vmlinuz-{KVER}").read_bytes()
    assert rel.kernel_release == KVER
    # the initrd holds the profile's modules with their dependencies, dependencies first
    names = list(res.initrd.modules)
    assert set(names) == {
        "virtio",
        "virtio_ring",
        "virtio_pci",
        "virtio_net",
        "failover",
        "net_failover",
        "overlay",
    }
    assert names.index("failover") < names.index("net_failover") < names.index("virtio_net")

    # "/" holds everything but the other directories' contents, which are mount points
    root_paths = _unpack(store, rel.directories["/"].archive.digest, tmp_path / "root")  # type: ignore[union-attr]
    assert "etc/motd" in root_paths and "usr" in root_paths and "srv" in root_paths
    assert not any(p.startswith(("usr/", "srv/", "var/")) for p in root_paths)
    var_paths = _unpack(store, rel.directories["/var"].archive.digest, tmp_path / "var")  # type: ignore[union-attr]
    assert var_paths == ["lib", "lib/state"]

    # nfs: a manifest and the read-only tree, identical to the image's /usr
    usr = rel.directories["/usr"]
    assert usr.policy is Policy.NFS and usr.archive is None and usr.manifest is not None
    tree = store.tree_path(usr.manifest.digest)
    assert list(scan(tree)) == list(scan(image / "usr"))
    assert usr.files == 2 and usr.bytes == (image / "usr" / "bin" / "tool").stat().st_size + 8000

    # sync: archive, manifest, and every file (the big one in chunks) as objects
    srv = rel.directories["/srv"]
    assert srv.archive is not None and srv.manifest is not None
    manifest = decode_manifest(store.read_object(srv.manifest.digest))
    big = next(i for i in manifest.entries if i.entry.path == "data/big")
    assert len(big.chunks) == len(set(big.chunks)) > 4 and all(store.has(f"sha256:{c}") for c in big.chunks)
    small = next(i for i in manifest.entries if i.entry.path == "data/small")
    assert store.read_object(f"sha256:{small.sha256}") == b"small file\n"

    report = verify_release(store, rel)
    assert report.problems == [] and report.trees == 1
    # kernel, initrd, 3 archives, 4 manifests, 1 file, the big file's pieces
    assert report.objects == 2 + 4 + 3 + 1 + len(big.chunks)


def test_rebuilding_an_unchanged_image_adds_no_object(tmp_path: Path, image: Path) -> None:
    store = Store(tmp_path / "store")
    reg = registry_for(image)
    first = build_environment(reg, store, "base")
    count = store.count_objects()
    trees = sorted(os.listdir(store.trees))
    second = build_environment(reg, store, "base")
    assert second.unchanged and second.new_objects == 0 and second.digest == first.digest
    assert store.count_objects() == count and sorted(os.listdir(store.trees)) == trees

    (image / "etc" / "motd").write_text("changed\n")
    third = build_environment(reg, store, "base")
    assert not third.unchanged and third.digest != first.digest
    assert third.release.directories["/usr"] == first.release.directories["/usr"]  # /usr untouched
    # a new "/" archive, its manifest and the release document; nothing else
    assert third.new_objects == 3
    assert sorted(os.listdir(store.trees)) == trees


def test_verify_reports_a_corrupt_object_and_a_damaged_tree(tmp_path: Path, image: Path) -> None:
    store = Store(tmp_path / "store")
    rel = build_environment(registry_for(image), store, "base").release
    archive = store.object_path(rel.directories["/var"].archive.digest)  # type: ignore[union-attr]
    os.chmod(archive, 0o644)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 1
    archive.write_bytes(bytes(data))
    tree = store.tree_path(rel.directories["/usr"].manifest.digest)  # type: ignore[union-attr]
    (tree / "share" / "doc" / "README").write_text("tampered\n")
    problems = verify_release(store, rel).problems
    assert any("/var archive" in p and "corrupt" in p for p in problems)
    assert any("/usr" in p and "differs from its manifest" in p for p in problems)


def test_build_errors_say_what_to_do(tmp_path: Path, image: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(FailedPrecondition, match="slim ee import base"):
        build_environment(registry_for(tmp_path / "missing"), store, "base")
    (image / "srv").rename(image / "srv.real")
    (image / "srv").symlink_to("srv.real")
    with pytest.raises(FailedPrecondition, match=r"/srv in the image .* is a symlink to srv\.real"):
        build_environment(registry_for(image), store, "base")
    (image / "srv").unlink()
    (image / "srv.real").rename(image / "srv")
    (image / "vmlinuz").unlink()
    with pytest.raises(FailedPrecondition, match="kernel"):
        build_environment(registry_for(image), store, "base")
    assert store.release("base") is None


def test_a_module_typo_fails_before_any_object_is_written(tmp_path: Path, image: Path) -> None:
    store = Store(tmp_path / "store")
    reg = load_registry_text(f"""
profiles: {{vm: {{modules: [virtio-netx]}}}}
environments: {{base: {{image: {image}}}}}
""")
    with pytest.raises(NotFound, match=f"kernel {KVER} has no module 'virtio-netx'; closest: virtio_net"):
        build_environment(reg, store, "base")
    assert store.count_objects() == 0


def test_a_stand_in_kernel_and_no_modules_are_warned_about(tmp_path: Path, image: Path) -> None:
    reg = load_registry_text(f"environments: {{base: {{image: {image}}}}}")
    res = build_environment(reg, Store(tmp_path / "store"), "base")
    assert len(res.warnings) == 1 and "does not look like a Linux kernel image" in res.warnings[0]
    # a bzImage header and a modules.dep that lists nothing
    kernel = image / "boot" / f"vmlinuz-{KVER}"
    kernel.write_bytes(bytes(0x202) + b"HdrS" + bytes(100))
    (image / "lib" / "modules" / KVER / "modules.dep").write_text("")
    res = build_environment(reg, Store(tmp_path / "store"), "base")
    assert len(res.warnings) == 1 and f"/lib/modules/{KVER}/modules.dep lists no modules" in res.warnings[0]
    (image / "lib" / "modules" / KVER / "modules.dep").write_text("kernel/overlay.ko:\n")
    assert build_environment(reg, Store(tmp_path / "store"), "base").warnings == []


def test_an_environment_without_its_init_cannot_be_built(tmp_path: Path, image: Path) -> None:
    """Without the init a node would reach switch_root and the kernel would panic."""
    store = Store(tmp_path / "store")
    init = image / "sbin" / "init"
    init.unlink()
    reg = load_registry_text(f"environments: {{base: {{image: {image}}}}}")
    with pytest.raises(FailedPrecondition, match=r"its init is missing in image .*systemd-sysv.*slim\.init="):
        build_environment(reg, store, "base")
    # a link into the image (absolute, as /sbin/init -> /lib/systemd/systemd is) that leads nowhere
    init.symlink_to("/lib/systemd/systemd")
    with pytest.raises(FailedPrecondition, match="its init is missing"):
        build_environment(reg, store, "base")
    (image / "lib" / "systemd").mkdir(parents=True)
    (image / "lib" / "systemd" / "systemd").write_text("#!/bin/sh\n")
    with pytest.raises(FailedPrecondition, match=r"is not executable \(chmod \+x"):
        build_environment(reg, store, "base")
    assert store.count_objects() == 0
    (image / "lib" / "systemd" / "systemd").chmod(0o755)
    build_environment(reg, store, "base")
    # the init the environment names is the one that must be there
    named = load_registry_text(
        f"environments: {{base: {{image: {image}, kernel_args: 'quiet slim.init=/usr/local/sbin/go'}}}}"
    )
    with pytest.raises(FailedPrecondition, match=r"its init \(slim\.init=/usr/local/sbin/go\) is missing"):
        build_environment(named, store, "base")


def _slim(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slim.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_cli_build_and_verify(tmp_path: Path, image: Path) -> None:
    reg = tmp_path / "registry.yaml"
    reg.write_text(
        f"""
profiles: {{vm: {{modules: [virtio_net]}}}}
environments:
  base: {{image: {image}, directories: {{/usr: nfs, /srv: sync}}}}
"""
    )
    env = {**os.environ, "SLIM_REGISTRY": str(reg), "SLIM_STORE": str(tmp_path / "store")}
    built = _slim("ee", "build", "base", "--json", env=env)
    assert built.returncode == 0, built.stderr
    doc = json.loads(built.stdout)[0]
    assert doc["environment"] == "base" and not doc["unchanged"] and doc["new_objects"] > 0
    assert "warning: base: the kernel /vmlinuz" in built.stderr  # the tests' kernel is a stand-in
    assert doc["warnings"] and "does not look like a Linux kernel image" in doc["warnings"][0]
    assert {d["path"]: d["policy"] for d in doc["directories"]} == {"/": "ram", "/srv": "sync", "/usr": "nfs"}
    again = _slim("ee", "build", "--all", env=env)
    assert again.returncode == 0 and "unchanged, nothing published; 0 new objects" in again.stdout
    ok = _slim("ee", "verify", env=env)
    assert ok.returncode == 0 and "base sha256:" in ok.stdout and ": ok:" in ok.stdout
    kernel = Path(tmp_path / "store" / "objects" / "sha256" / doc["kernel"]["digest"][7:])
    os.chmod(kernel, 0o644)
    kernel.write_bytes(b"corrupted")
    bad = _slim("ee", "verify", "base", env=env)
    assert bad.returncode == 1 and "kernel" in bad.stdout and "corrupt" in bad.stdout
    unknown = _slim("ee", "build", "nosuch", env=env)
    assert unknown.returncode == 1 and "unknown environment 'nosuch' (known: base)" in unknown.stderr


def test_a_build_signs_its_release_and_a_rebuild_with_another_key_signs_it_again(
    tmp_path: Path, image: Path
) -> None:
    from slim.signing import SigningKey, verify

    store, reg = Store(tmp_path / "store"), registry_for(image)
    unsigned = build_environment(reg, store, "base")
    assert store.release_signature("base") == ""  # built without the core's key: relays will not pin it
    key = SigningKey.generate()
    signed = build_environment(reg, store, "base", signer=key)
    assert signed.unchanged and signed.digest == unsigned.digest  # the same release, now signed
    document = store.read_object(signed.digest)
    assert verify(document, store.release_signature("base"), [key.public], "release") == key.public
    assert store.release_digest("base") == signed.digest  # the ref's first line is still the digest
    other = SigningKey.generate()
    build_environment(reg, store, "base", signer=other)
    assert verify(document, store.release_signature("base"), [other.public], "release") == other.public
    assert store.release_history("base") == [unsigned.digest]  # signing is not a new release
