"""Acceptance: a debootstrap minbase bookworm image (cached outside the repository)
imports and builds through the CLI; every object verifies; a second build adds no
objects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slim.core.build.image import default_cache_dir
from slim.core.store import Store
from tests.support import need, need_tool


def _slim(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slim.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_debootstrap_bookworm_imports_builds_and_verifies(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "debootstrap needs root")
    need_tool("debootstrap")
    need_tool("apt-get", "apt")
    image = tmp_path / "images" / "base"
    store_dir = tmp_path / "store"
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        f"""
settings: {{nfs_server: 10.0.2.2}}
profiles:
  vm: {{modules: [virtio_pci, virtio_net, virtio_blk], kernel_args: console=ttyS0}}
environments:
  base:
    image: {image}
    default_policy: ram
    directories: {{/usr: nfs, /var: sync}}
nodes:
  n1: {{macs: ["52:54:00:00:00:01"], profile: vm, environment: base, disk: /dev/vda1}}
"""
    )
    env = {
        **os.environ,
        "SLIM_REGISTRY": str(registry),
        "SLIM_STORE": str(store_dir),
        "SLIM_CACHE_DIR": str(default_cache_dir()),
    }
    imported = _slim(
        "ee", "import", "base", "--from", "debootstrap:bookworm", "--add-kernel", "--json", env=env
    )
    assert imported.returncode == 0, imported.stderr
    info = json.loads(imported.stdout)
    assert info["files"] > 4000 and info["kernel_release"]
    assert (image / "etc" / "debian_version").read_text().startswith("12.")
    assert (image / "usr" / "bin" / "dpkg").is_file()

    built = _slim("ee", "build", "base", "--json", env=env)
    assert built.returncode == 0, built.stderr
    doc = json.loads(built.stdout)[0]
    dirs = {d["path"]: d for d in doc["directories"]}
    assert dirs["/usr"]["tree"] and dirs["/usr"]["files"] > 3000
    assert dirs["/var"]["file_objects"] > 100 and dirs["/"]["archive"]["size"] > 0
    assert "virtio_net" in doc["initrd"]["modules"] and "nfsv4" in doc["initrd"]["modules"]
    print(
        f"\ninitrd {doc['initrd']['size'] / 1e6:.2f} MB, "
        f"'/' archive {dirs['/']['archive']['size'] / 1e6:.1f} MB, build {doc['seconds']:.1f} s"
    )

    store = Store(store_dir)
    for name in os.listdir(store.objects):  # every object verifies against its digest
        store.verify_object(f"sha256:{name}")
    verified = _slim("ee", "verify", "base", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    before = store.count_objects()
    again = _slim("ee", "build", "base", "--json", env=env)
    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)[0]
    assert second["new_objects"] == 0 and second["unchanged"] and second["release"] == doc["release"]
    assert store.count_objects() == before
