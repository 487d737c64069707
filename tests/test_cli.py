"""The `slim` command against a real `slim core serve` process on 127.0.0.1, port 0."""

from __future__ import annotations

import importlib.util
import json
import queue
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from labs.host import lab_env
from slim.cli import main
from slim.core.control.config import CoreConfig
from slim.core.store import Store
from tests.support import ROOT, TEST_REGISTRY, Served, https_get, pki, read_address, start_core, stop

STARTUP = 30.0


def slim(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_registry_check(tmp_path: Path, registry_file: Path) -> None:
    code, out = slim("registry", "check", str(registry_file))
    assert code == 0 and "ok (2 sites, 4 relays, 1 profiles, 3 environments, 3 nodes)" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(TEST_REGISTRY.replace("environment: unbuilt", "environment: nosuch"))
    code, out = slim("registry", "check", str(bad))
    line = TEST_REGISTRY.splitlines().index("    environment: unbuilt") + 1
    assert code == 1
    assert f"{bad}:{line}: nodes.n3.environment: unknown environment 'nosuch'" in out
    code, out = slim("registry", "check", str(tmp_path / "missing.yaml"))
    assert code == 1 and "no such file" in out


def test_registry_check_example() -> None:
    code, out = slim("registry", "check", str(ROOT / "docs" / "registry.example.yaml"))
    assert code == 0, out


def test_admin_commands(served: Served) -> None:
    core = ("--core", served.address)
    code, out = slim("node", "list", *core)
    assert code == 0 and "n1" in out and "n3" in out
    code, out = slim("node", "set-ee", "n1", "ee:jdk14", *core)
    assert (code, out.strip()) == (0, "n1: next boot jdk14")
    code, out = slim("node", "show", "52:54:00:00:00:01", *core)
    assert code == 0 and "jdk14 (set by admin:tester" in out  # the credential's principal
    code, out = slim("node", "show", "n1", "--json", *core)
    assert json.loads(out)["next_boot"]["environment"] == "jdk14"
    code, out = slim("node", "set-ee", "n1", "default", *core)
    assert (code, out.strip()) == (0, "n1: next boot base")
    code, out = slim("ee", "list", *core)
    assert code == 0 and "ee:jdk14" in out and "(not built)" in out
    code, out = slim("ee", "show", "base", *core)
    assert code == 0 and "/usr" in out and "ro,nolock,noatime,actimeo=600,proto=tcp" in out
    code, out = slim("relay", "list", *core)
    assert code == 0 and "unknown" in out and "room-1" in out
    code, out = slim("node", "locate", "n1", "--from", "10.1.2.3", "--json", *core)
    answer = json.loads(out)
    assert answer["site"] == "room" and answer["relays"][0]["site"] == "room"
    code, out = slim("node", "plan", "n1", "--from", "10.1.2.3", *core)
    assert code == 0 and re.search(r"10\.1\.0\.1:/slim/[0-9a-f]{64}", out)
    code, out = slim("node", "boot-script", "52:54:00:00:00:01", "--from", "10.1.2.3", *core)
    assert code == 0 and out.startswith("#!ipxe")
    code, out = slim(
        "node", "boot-script", "52:54:00:00:00:01", "--from", "10.1.2.3", "--format", "pxelinux", *core
    )
    assert code == 0 and "LOCALBOOT 0" in out
    code, out = slim("node", "events", *core)
    assert code == 0


def test_errors_are_one_line_and_exit_1(served: Served) -> None:
    core = ("--core", served.address)
    code, out = slim("node", "show", "ghost", *core)
    assert code == 1 and "error: unknown node 'ghost' (NOT_FOUND)" in out
    code, out = slim("node", "set-ee", "n1", "nosuch", *core)
    assert code == 1 and "known: base, jdk14, unbuilt" in out
    code, out = slim("node", "plan", "n3", "--from", "10.1.2.3", *core)
    assert code == 1 and "FAILED_PRECONDITION" in out and "slim ee build unbuilt" in out
    code, out = slim("node", "locate", "n1", "--from", "not-an-ip", *core)
    assert code == 1 and "INVALID_ARGUMENT" in out


def test_unreachable_core(unused_tcp_port: int) -> None:
    code, out = slim("node", "list", "--core", f"127.0.0.1:{unused_tcp_port}")
    assert code == 1 and "cannot reach the core" in out


def test_sigterm_stops_gracefully(served: Served) -> None:
    code, err = stop(served.proc)
    assert code == 0, err
    assert "core stopped" in err


def test_sighup_reloads_registry_and_keeps_old_one_on_error(served: Served) -> None:
    core = ("--core", served.address)
    assert served.proc.stderr is not None
    log: queue.Queue[str] = queue.Queue()  # the core's log lines, read on a thread
    stderr = served.proc.stderr

    def pump() -> None:
        for line in stderr:
            log.put(line)

    threading.Thread(target=pump, daemon=True).start()
    added = TEST_REGISTRY + '  n4:\n    macs: ["52:54:00:00:00:04"]\n    profile: vm\n    environment: base\n'
    served.registry_file.write_text(added)
    served.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: slim("node", "show", "n4", *core)[0] == 0), "n4 never appeared"
    served.registry_file.write_text(added.replace("profile: vm\n    environment: base\n", "profile: nope\n"))
    served.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while True:
        line = log.get(timeout=max(0.1, deadline - time.monotonic()))  # raises Empty at the deadline
        if "registry not reloaded" in line:
            break
    assert slim("node", "show", "n4", *core)[0] == 0  # the previous registry still answers


def test_serve_refuses_bad_registry(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("nodes: [1, 2]\n")
    code, err = stop(start_core(bad, tmp_path), signal_it=False)
    assert code == 1 and "nodes" in err


def test_serve_refuses_busy_port(served: Served, tmp_path: Path, registry_file: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "slim.cli", "core", "serve", "--registry", str(registry_file), "--state",
         str(other / "s.db"), "--store", str(other / "st"), "--listen", served.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    code, err = stop(proc, signal_it=False)
    assert code == 1 and f"cannot listen on {served.address}" in err


def test_every_option_has_help() -> None:
    def walk(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
        yield path, cmd
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, f"{path} {name}")

    for path, cmd in walk(main, "slim"):
        assert cmd.help, f"{path} has no help text"
        for param in cmd.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                assert param.help, f"{path} {param.opts} has no help text"
        code, out = slim(*path.split()[1:], "--help")
        assert code == 0 and "Usage:" in out


def wait_for(condition: object, timeout: float = 20.0) -> bool:
    """Poll ``condition`` (a callable) until true or ``timeout`` seconds pass."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_runs() -> None:
    """The control-plane demo (`./run demo --control-plane`): a core and its answers."""
    env = {**lab_env(), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "labs.controlplane"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "listening on 127.0.0.1:" in out
    assert "site room" not in out  # the example registry, not the test one
    assert "node n001 from 10.1.7.20: site machine-room" in out
    assert "n001: next boot jdk14" in out
    assert "#!ipxe" in out
    assert "The core stopped cleanly (exit 0)" in out


def test_cli_reference_is_current() -> None:
    """docs/cli.md is generated from the help texts; regenerate with tools/clidoc.py."""
    spec = importlib.util.spec_from_file_location("clidoc", ROOT / "tools" / "clidoc.py")
    assert spec is not None and spec.loader is not None
    clidoc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clidoc)
    assert (ROOT / "docs" / "cli.md").read_text() == clidoc.render(), "run: python tools/clidoc.py"


def test_core_serve_objects_listen(registry_file: Path, tmp_path: Path) -> None:
    """--objects-listen serves the store over HTTPS with the core's certificate (the CA's,
    name slim-core): the relays' upstream.  --objects-http: plain HTTP."""
    store = Store(tmp_path / "store")
    ref = store.put_bytes(b"an object in the store\n")
    path = f"/objects/sha256/{ref.digest[7:]}"
    proc = start_core(registry_file, tmp_path, "--objects-listen", "127.0.0.1:0")
    try:
        read_address(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("objects on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        status, headers, body = https_get(port, path)
        assert (status, body, headers["ETag"]) == (200, b"an object in the store\n", f'"{ref.digest}"')
        assert https_get(port, f"/objects/sha256/{'0' * 64}")[0] == 404
        with pytest.raises(ssl.SSLCertVerificationError, match=r"not valid for 'edge-1\.relay\.slim'"):
            https_get(port, path, name="edge-1.relay.slim")  # the core's certificate is not a relay's
    finally:
        code, err = stop(proc)
    assert code == 0, err
    proc = start_core(registry_file, tmp_path, "--objects-listen", "127.0.0.1:0", "--objects-http")
    try:
        read_address(proc)
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            assert r.read() == b"an object in the store\n"
    finally:
        code, err = stop(proc)
    assert code == 0, err


def test_serving_commands_read_their_settings_from_a_file(registry_file: Path, tmp_path: Path) -> None:
    """--config FILE (what slim serve writes) instead of the options: the file is what runs;
    options beside it, unknown or bad settings are refused with the file and field named."""
    config = CoreConfig.build(
        registry=registry_file, state=tmp_path / "state.db", store=tmp_path / "store", listen="127.0.0.1:0",
        ca=pki().ca_dir, local_socket=False,
    ).dump(tmp_path / "core.json")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "slim.cli", "core", "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        address = read_address(proc)
        assert slim("node", "show", "n1", "--core", address)[0] == 0
    finally:
        code, err = stop(proc)
    assert code == 0, err
    code, out = slim("core", "serve", "--config", str(config), "--listen", "127.0.0.1:1")
    assert code == 1 and f"--config {config} holds every setting: drop --listen" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"registry": str(registry_file), "listn": "127.0.0.1:0", "grace": -1}))
    code, out = slim("core", "serve", "--config", str(bad))
    assert code == 1 and f"{bad}: listn: unknown setting" in out and f"{bad}: grace: " in out
    code, out = slim("relay", "serve", "--upstream", "ftp://x", "--max-bytes", "lots", "--core", "h:x")
    assert code == 1
    assert "--upstream: upstream 'ftp://x' is not an http://HOST:PORT base URL" in out
    assert "--max-bytes: size 'lots' is not a size" in out
    assert "--core: 'h:x' is not HOST:PORT" in out
    code, out = slim("relay", "serve", "--upstream", "http://core:8081", "--core", "core.example:50051")
    assert code == 1 and "needs --identity" in out and "slim relay enroll" in out
    code, out = slim("relay", "serve", "--upstream", "http://core:8081", "--core", "unix:/run/x.sock")
    assert code == 1 and "needs --name" in out
