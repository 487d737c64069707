"""`slim serve`: every server of one machine from one registry file (slim/allinone.py).

On loopback, port 0: the core, the relay with TFTP and HTTPS; the relay reaches
the core and the core's object server (over HTTPS).  Failures are clear: a registry that does not say
which relay this machine is, a part that cannot start, a part that dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from slim.core.build.release import build_environment
from slim.core.registry import load_registry
from slim.core.store import Store
from slim.rpc import CoreClient
from slim.v1 import core_pb2 as pb
from tests.support import https_get, make_image

REGISTRY = """\
settings: {{heartbeat_interval: 0.2}}
sites:
  lo: {{prefixes: [127.0.0.0/8]}}
relays:
  local: {{urls: ["http://127.0.0.1:9/"], site: lo}}
{more}profiles:
  p: {{}}
environments:
  base: {{image: {image}, directories: {{/var: ram}}}}
nodes:
  n1: {{macs: ["52:54:00:00:00:01"], profile: p, environment: base}}
server:
  core_listen: 127.0.0.1:0
  relay_listen: 127.0.0.1:{relay_port}
  tftp_listen: 127.0.0.1:0
  nfs_listen: null
{server}"""


def write(tmp: Path, more: str = "", server: str = "", relay_port: int = 0) -> Path:
    image = tmp / "image"
    if not image.exists():
        image.mkdir()
        make_image(image)
    path = tmp / "registry.yaml"
    path.write_text(REGISTRY.format(image=image, more=more, server=server, relay_port=relay_port))
    return path


def start(registry: Path, tmp: Path) -> subprocess.Popen[str]:
    argv = ["serve", "--registry", str(registry), "--state-dir", str(tmp / "state")]
    # its own process group: if a test fails, stop() takes its children down with it; its
    # temporary directories in the test's (a part killed on purpose leaves its own behind)
    return subprocess.Popen(
        [sys.executable, "-m", "slim.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (``slim serve`` stops its parts), then SIGKILL to the whole group."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def said_until_ready(proc: subprocess.Popen[str]) -> dict[str, str]:
    assert proc.stdout is not None
    out: dict[str, str] = {}
    for _ in range(10):
        line = proc.stdout.readline()
        if not line:
            break
        words = line.split()
        out[" ".join(words[:-1]) if not line.startswith("ready") else "ready"] = words[-1]
        if line.startswith("ready"):
            break
    return out


@pytest.mark.slow
def test_serve_runs_core_and_relay_and_stops_cleanly(tmp_path: Path) -> None:
    registry = write(tmp_path, server="  relay_https_listen: 127.0.0.1:0\n")
    store = Store(tmp_path / "state" / "store")
    build_environment(load_registry(registry), store, "base")
    found = store.release("base")
    assert found is not None
    kernel = found[1].kernel
    proc = start(registry, tmp_path)
    try:
        said = said_until_ready(proc)
        assert "ready" in said, (said, proc.stderr.read() if proc.stderr else "")
        core = [k for k in said if k.startswith("core listening on")]
        assert core, said
        relay = said["relay local listening on"]
        assert said["relay local tftp on"].startswith("127.0.0.1:")
        assert not any(k.startswith(("nfs", "dhcp")) for k in said)  # nothing shared over NFS; no dhcp site
        # the relay serves the release's objects, fetched from the core's object server
        # root on this host asks over the core's local socket; the relay came in with the
        # certificate slim serve enrolled for it (mutual TLS)
        assert (tmp_path / "state" / "relays" / "local" / "cert.pem").exists()
        with CoreClient(f"unix:{tmp_path}/state/core.sock") as client:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                relays = client.call(client.admin.ListRelays, pb.ListRelaysRequest()).relays
                if relays and relays[0].status == "live":
                    break
                time.sleep(0.1)
            assert relays[0].status == "live"
        path = f"/objects/sha256/{kernel.digest.removeprefix('sha256:')}"
        with urllib.request.urlopen(f"http://{relay}{path}", timeout=10) as r:
            assert r.read() == (tmp_path / "image" / "vmlinuz").read_bytes()
        # and over HTTPS, with the certificate of relay "local" from slim serve's CA
        https = int(said["relay local https on"].rsplit(":", 1)[1])
        got = https_get(https, path, name="local.relay.slim", ca=tmp_path / "state" / "ca" / "ca.crt")
        assert got[0] == 200 and got[2] == (tmp_path / "image" / "vmlinuz").read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)
    logs = {p.name for p in (tmp_path / "state" / "logs").iterdir()}
    assert logs == {"core.log", "relay.log"}


def test_serve_needs_to_know_which_relay_it_is(tmp_path: Path) -> None:
    registry = write(tmp_path, more='  other: {urls: ["http://127.0.0.2:9/"], site: lo}\n')
    proc = start(registry, tmp_path)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "server.relay" in err and "local, other" in err


@pytest.mark.slow
def test_a_part_that_cannot_start_stops_the_rest(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        registry = write(tmp_path, relay_port=busy.getsockname()[1])
        proc = start(registry, tmp_path)
        out, err = proc.communicate(timeout=90)
    assert proc.returncode != 0
    assert "relay did not start" in err and "relay.log" in err, err
    assert out.startswith("core listening on") and "ready" not in out


@pytest.mark.slow
def test_a_part_that_dies_stops_slim_serve(tmp_path: Path) -> None:
    registry = write(tmp_path)
    proc = start(registry, tmp_path)
    try:
        said = said_until_ready(proc)
        assert "ready" in said
        # the relay's PID: the child of `slim serve` running `slim relay serve`
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        relay = next(
            int(c) for c in children if b"relay" in Path(f"/proc/{c}/cmdline").read_bytes().split(b"\0")
        )
        os.kill(relay, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        assert proc.stderr is not None
        assert "relay exited" in proc.stderr.read()
    finally:
        stop(proc)


def test_each_part_gets_its_settings_as_a_file(tmp_path: Path) -> None:
    """slim serve builds each part's settings model from the registry and starts it with
    --config STATE_DIR/config/PART.json: the file is what the part runs with."""
    registry = write(tmp_path)
    proc = start(registry, tmp_path)
    try:
        said = said_until_ready(proc)
        assert "ready" in said, (said, proc.stderr.read() if proc.stderr else "")
        configs = tmp_path / "state" / "config"
        assert sorted(p.name for p in configs.iterdir()) == ["core.json", "relay.json"]
        core = json.loads((configs / "core.json").read_text())
        assert core["registry"] == str(registry) and core["listen"] == "127.0.0.1:0"
        assert core["state"] == str(tmp_path / "state" / "state.db")
        relay = json.loads((configs / "relay.json").read_text())
        assert relay["name"] == "local" and relay["max_bytes"] == 20 << 30  # the default "20G"
        assert relay["tftp_listen"] == "127.0.0.1:0"
        assert relay["cache_dir"] == str(tmp_path / "state" / "cache")
        (objects,) = [v.rstrip(")") for k, v in said.items() if k.startswith("core listening on")]
        # the core's object server once it listened, over HTTPS (the core's certificate)
        assert relay["upstreams"] == [f"https://{objects}"]
    finally:
        stop(proc)


def test_the_relays_parent_is_its_upstream_and_stopping_is_said(tmp_path: Path) -> None:
    """A relay whose registry entry names a parent fetches from the parent's URLs first (an
    https one checked by the parent's name), then the core's object server; on SIGTERM slim
    serve says what it stopped."""
    more = '  hub: {urls: ["https://127.0.0.2:8/", "http://127.0.0.2:9/"], site: lo}\n'
    registry = write(tmp_path, more=more, server="  relay: local\n")
    registry.write_text(registry.read_text().replace("site: lo}\n", "site: lo, parent: hub}\n", 1))
    proc = start(registry, tmp_path)
    try:
        said = said_until_ready(proc)
        assert "ready" in said, (said, proc.stderr.read() if proc.stderr else "")
        relay = json.loads((tmp_path / "state" / "config" / "relay.json").read_text())
        (objects,) = [v.rstrip(")") for k, v in said.items() if k.startswith("core listening on")]
        assert relay["upstreams"] == [
            "https://127.0.0.2:8/#hub.relay.slim",
            "http://127.0.0.2:9/",
            f"https://{objects}",
        ]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert "slim serve stopped on SIGTERM: relay (exit 0), core (exit 0)" in out
    finally:
        stop(proc)
