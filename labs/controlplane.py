"""The control-plane demo (``./run demo --control-plane``, ``python -m labs.controlplane``):
a running core with the example registry, and what it answers.

Starts ``slim core serve`` on a free loopback port (a real process, as an
administrator would run it), publishes placeholder releases (kernel and
archives are small stand-in objects, :mod:`labs.placeholders`), sends
heartbeats as three relays would, then runs the admin commands and shows the
redirection answers, a boot storm's spread, a boot plan and a boot menu.
Everything it creates lives in a temporary directory and is removed at the end.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import yaml

from labs.placeholders import publish_placeholder_releases
from slim.core.registry import load_registry
from slim.core.store import Store
from slim.errors import FailedPrecondition, NotFound
from slim.rpc import AsyncCoreClient
from slim.v1 import core_pb2 as pb

STARTUP_TIMEOUT = 30.0


def example_registry() -> Path:
    path = Path(__file__).resolve().parent.parent / "docs" / "registry.example.yaml"
    if not path.exists():
        raise NotFound(f"{path} not found: run the demo from a SLIM checkout, or pass --registry")
    return path


async def _beats(relay: str, load: float) -> AsyncIterator[pb.Heartbeat]:
    yield pb.Heartbeat(relay=relay, load=load, active_transfers=int(load), healthy=True)


def say(text: str) -> None:
    print(f"\n\033[1m{text}\033[0m", flush=True)


async def run(cmd: list[str]) -> None:
    shown = ["slim", *cmd[3:]] if cmd[:3] == [sys.executable, "-m", "slim.cli"] else cmd
    print(f"\n$ {shlex.join(shown)}", flush=True)
    proc = await asyncio.create_subprocess_exec(*cmd)
    if await proc.wait() != 0:
        raise FailedPrecondition(f"{shlex.join(shown)} failed")


STORM_NODES = 200


def with_storm_nodes(registry_path: Path, out: Path) -> Path:
    """The registry plus STORM_NODES machine-room nodes (storm-000...) for the storm."""
    doc = yaml.safe_load(registry_path.read_text(encoding="utf-8"))
    nodes = doc.setdefault("nodes", {})
    profile = next(iter(doc["profiles"]))
    environment = next(iter(doc["environments"]))
    for i in range(STORM_NODES):
        nodes[f"storm-{i:03d}"] = {
            "macs": [f"52:54:00:aa:{i >> 8:02x}:{i & 255:02x}"],
            "profile": profile,
            "environment": environment,
            "groups": ["storm"],
        }
    out.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return out


async def run_demo(registry_path: Path | None) -> None:
    example = registry_path or example_registry()
    load_registry(example)  # say what is wrong with it, with its own line numbers
    with tempfile.TemporaryDirectory(prefix="slim-demo-") as tmp:
        registry_path = with_storm_nodes(example, Path(tmp) / "registry.yaml")
        store = Store(Path(tmp) / "store")
        publish_placeholder_releases(load_registry(registry_path), store)
        slim = [sys.executable, "-m", "slim.cli"]
        serve = [
            *slim,
            "core",
            "serve",
            "--registry",
            str(registry_path),
            "--state",
            f"{tmp}/state.db",
            "--store",
            str(store.root),
            "--listen",
            "127.0.0.1:0",
            "--ca",
            f"{tmp}/ca",
            "--log-level",
            "warning",
        ]
        say(f"Starting the core with {example} (plus {STORM_NODES} generated nodes for a boot storm)")
        print(f"$ {shlex.join(['slim', *serve[3:]])}", flush=True)
        proc = await asyncio.create_subprocess_exec(*serve, stdout=asyncio.subprocess.PIPE)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), STARTUP_TIMEOUT)
            if not line.startswith(b"listening on "):
                raise FailedPrecondition(f"the core did not start (said {line!r})")
            print(line.decode().strip(), flush=True)
            # as root on the core's host: its local socket (relays and remote admins would use
            # certificates of its CA, docs/security.md); the simulated relays below too
            await _demo_calls(slim, f"unix:{tmp}/core.sock")
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), STARTUP_TIMEOUT)
        say(f"The core stopped cleanly (exit {proc.returncode}); demo files removed.")


async def _demo_calls(slim: list[str], address: str) -> None:
    env = {**os.environ, "SLIM_CORE": address}
    os.environ.update(env)
    async with AsyncCoreClient(address) as client:
        core = client.core
        say("Relays report their load (simulated heartbeats: relays arrive with `slim relay serve`)")
        for relay, load in (("central", 8.0), ("mr-1", 3.0), ("mr-2", 1.0), ("lab-1", 0.0)):
            async for reply in core.RelayHeartbeat(_beats(relay, load)):
                print(f"  {relay}: load {load:g}, next beat in {reply.interval_ms} ms")
        await run([*slim, "relay", "list"])
        await run([*slim, "ee", "list"])
        await run([*slim, "node", "list", "--group", "gideon"])

        say("Redirection: the origin address picks the site, load picks the relay")
        await run([*slim, "node", "locate", "n001", "--from", "10.1.7.20"])
        await run([*slim, "node", "locate", "lab-pc-07", "--from", "10.2.0.50"])
        await run([*slim, "node", "locate", "vm1", "--from", "198.51.100.77"])

        say(f"A boot storm: {STORM_NODES} nodes of the machine room ask at once")
        first: collections.Counter[str] = collections.Counter()
        answers = await asyncio.gather(
            *(
                core.Locate(
                    pb.LocateRequest(node=pb.NodeRef(name=f"storm-{i:03d}"), origin=f"10.1.9.{i}"), timeout=10
                )
                for i in range(STORM_NODES)
            )
        )
        for a in answers:
            first[a.relays[0].name] += 1
        for name, count in sorted(first.items()):
            print(f"  {name:8} {count:4} nodes  {'#' * (count // 4)}")
        print("  (each answer counts toward the chosen relay's load until its next heartbeat)")

        say("A Slurm job asks for ee:jdk14 on n001: its next boot changes")
        await run([*slim, "node", "set-ee", "n001", "ee:jdk14"])
        await run([*slim, "node", "plan", "n001", "--from", "10.1.7.20"])
        say("The iPXE menu n001 gets from its relay")
        await run([*slim, "node", "boot-script", "52:54:00:00:01:01", "--from", "10.1.7.20"])


def main(argv: list[str] | None = None) -> int:
    import argparse

    from slim.cli.common import errors_to_exit

    ap = argparse.ArgumentParser(prog="python -m labs.controlplane", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="the registry to show (default: docs/registry.example.yaml)",
    )
    args = ap.parse_args(argv)
    with errors_to_exit():  # a bad registry: one line, exit 1
        asyncio.run(run_demo(args.registry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
