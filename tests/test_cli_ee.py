"""The image and NFS commands end to end, as an administrator runs them:
table2 → profile; build → nfs config → nfs serve (real ganesha) → SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from labs.host import free_port, lab_env
from labs.table2 import TABLE2
from slim.core.store import Store
from slim.daemons.ganesha import pseudo_path
from tests.support import make_image, need_tool, rpc_null, wait_for


def _slim(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "slim.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _table2(*args: str) -> subprocess.CompletedProcess[str]:
    """The Table-2 generator's command (a lab: ``python -m labs.table2``)."""
    return subprocess.run(
        [sys.executable, "-m", "labs.table2", *args],
        capture_output=True,
        text=True,
        env=lab_env(),
        timeout=120,
        check=False,
    )


def test_table2_then_profile(tmp_path: Path) -> None:
    image = tmp_path / "t2"
    made = _table2(str(image), "--scale", "0.002", "--seed", "3")
    assert made.returncode == 0, made.stderr
    assert "/usr" in made.stdout
    prof = _slim("profile", str(image), "--json")
    assert prof.returncode == 0, prof.stderr
    rows = {r["path"]: r for r in json.loads(prof.stdout)["directories"]}
    for row in TABLE2:
        assert rows[row.path]["files"] == row.scaled_files(0.002)
        assert rows[row.path]["bytes"] == row.scaled_bytes(0.002)
        assert rows[row.path]["policy"] == ("nfs" if row.access == "read-only" else "ram")
    again = _table2(str(image), "--scale", "0.002")
    assert again.returncode == 1 and "not empty" in again.stderr
    snippet = _slim("profile", str(image), "--snippet")
    assert snippet.returncode == 0 and "/usr: nfs" in snippet.stdout


def test_build_then_serve_the_nfs_trees(tmp_path: Path) -> None:
    need_tool("ganesha.nfsd", "nfs-ganesha nfs-ganesha-vfs")
    image = tmp_path / "image"
    image.mkdir()
    make_image(image)
    reg = tmp_path / "registry.yaml"
    reg.write_text(
        f"""
settings: {{nfs_server: 127.0.0.1}}
profiles: {{vm: {{modules: [virtio_net]}}}}
environments:
  base: {{image: {image}, directories: {{/usr: nfs}}}}
"""
    )
    env = {**os.environ, "SLIM_REGISTRY": str(reg), "SLIM_STORE": str(tmp_path / "store")}
    assert _slim("ee", "build", "base", env=env).returncode == 0
    release = Store(tmp_path / "store").release("base")
    assert release is not None
    tree = release[1].directories["/usr"].manifest
    assert tree is not None
    config = _slim("nfs", "config", "--listen", "127.0.0.1:2049", env=env)
    assert config.returncode == 0, config.stderr
    assert f"Pseudo = {pseudo_path('/slim', tree.digest)}" in config.stdout.replace('"', "")
    exports = _slim("nfs", "config", "--format", "exports", env=env)
    assert str(Store(tmp_path / "store").tree_path(tree.digest)) in exports.stdout

    port = free_port()
    workdir = tmp_path / "nfs"
    argv = ["nfs", "serve", "--listen", f"127.0.0.1:{port}", "--workdir", str(workdir)]
    with subprocess.Popen(
        [sys.executable, "-m", "slim.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()  # bounded: the server prints it or exits
            assert line.strip() == f"listening on 127.0.0.1:{port}", proc.stderr.read()
            assert rpc_null(port)  # ganesha answers an NFS NULL call on the rendered port
            pid = int((workdir / "ganesha.pid").read_text().split()[0])
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "ganesha to exit")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
