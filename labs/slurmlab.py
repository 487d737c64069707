"""A Slurm cluster on one machine, booting its nodes through SLIM (tests and benchmarks).

Real parts: munged, slurmctld and one ``slurmd -N nX`` per node (Debian's
Slurm 22.05, see docs/slurm.md "Slurm 22.05 as measured here"), `slim serve` (core on a unix
socket, relay on loopback), and the files `slim slurm config` renders.  A
node's "machine" is its slurmd; its root is ``roots/nX``, built by the agent
(no-reboot mode).  Reboots are simulated (:mod:`labs.slurmreboot`, the RebootProgram's command):
slurmd stops, the agent rebuilds the root for the next EE, ``slurmd -b``
starts again.

Three small environments: ``base``; ``jdk14`` (base plus /opt/jdk14/release,
the file that proves a job ran on jdk14); ``jdk15``, whose release lacks one
object, so a boot into it fails; ``jdk16``, whose simulated environment dies right after
switch_root (labs.onbehalf.CRASH_MARKER): it never reports up, so the core fails the boot
after its 5 s ``up_timeout``.  Every node starts on base.

Everything is started here and stopped by :meth:`SlurmLab.close` (by PID, from
the pid files the daemons write).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from labs import onbehalf, slurmreboot, standin
from labs.host import free_port
from slim.allinone import await_ready
from slim.core.build.release import build_environment
from slim.core.registry import load_registry
from slim.core.store import Store
from slim.signing import SigningKey

SLIM = [sys.executable, "-m", "slim.cli"]
REGISTRY = """\
settings: {{heartbeat_interval: 0.5, boot_menu_timeout: 0}}
sites:
  lo: {{prefixes: [127.0.0.0/8]}}
relays:
  r1: {{urls: ["http://127.0.0.1:{relay}/"], site: lo{relay_extra}}}
profiles:
  p: {{}}
environments:
  base: {{image: {tmp}/images/base}}
  jdk14: {{image: {tmp}/images/jdk14, description: base + OpenJDK 14}}
  jdk15: {{image: {tmp}/images/jdk15, description: a release with an object missing}}
  jdk16: {{image: {tmp}/images/jdk16, description: its init dies after switch_root, up_timeout: 5}}
nodes:
{nodes}
{pools}
server:
  state_dir: {tmp}/state
  core_listen: unix:{tmp}/core.sock
  relay_listen: 127.0.0.1:{relay}
  tftp_listen: null
  nfs_listen: null
  dhcp: false
{server}"""
SLURM_CONF = """\
ClusterName=slimlab
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={munge}/munge.sock
CryptoType=crypto/munge
StateSaveLocation={tmp}/slurm/state
SlurmdSpoolDir={tmp}/slurm/spool/%n
SlurmctldPidFile={tmp}/slurm/slurmctld.pid
SlurmdPidFile={tmp}/slurm/slurmd-%n.pid
SlurmctldLogFile={tmp}/slurm/slurmctld.log
SlurmdLogFile={tmp}/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
MailProg=/bin/true
ReturnToService=2
{slim_lines}
{node_lines}
PartitionName=all Nodes={node_names} Default=YES MaxTime=INFINITE State=UP
{extra}"""


ENVIRONMENTS = ("base", "jdk14", "jdk15", "jdk16")


def make_images(root: Path) -> None:
    for name in ENVIRONMENTS:
        image = root / name
        for d in ("etc", "usr/bin", "var/lib", "opt"):
            (image / d).mkdir(parents=True, exist_ok=True)
        (image / "etc" / "os-release").write_text(f"NAME=slim-{name}\n")
        (image / "usr" / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool\n" + bytes(range(256)) * 64)
        standin.add_kernel(image, name)
    (root / "jdk14" / "opt" / "jdk14").mkdir()
    (root / "jdk14" / "opt" / "jdk14" / "release").write_text('JAVA_VERSION="14.0.2"\n')
    (root / "jdk15" / "opt" / "jdk15").mkdir()
    (root / "jdk15" / "opt" / "jdk15" / "release").write_text('JAVA_VERSION="15.0.1"\n' * 1000)
    crash = root / "jdk16" / onbehalf.CRASH_MARKER
    crash.parent.mkdir(parents=True)
    crash.write_text("the simulated environment never reports up\n")


def stop_pid_file(pid_file: Path) -> None:
    """SIGTERM the daemon whose PID ``pid_file`` holds (one we started) and wait, bounded, for
    it to go; nothing if the file is missing or holds no PID."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class SlurmLab:
    def __init__(self, tmp: Path, nodes: int = 3) -> None:
        self.tmp = tmp
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.roots = tmp / "roots"
        self.registry = tmp / "registry.yaml"
        self.conf = tmp / "slurm" / "slurm.conf"
        self.prolog_log = tmp / "slurm" / "prolog.log"
        self.relay_port = free_port()
        self.relay = f"http://127.0.0.1:{self.relay_port}"
        self.core = f"unix:{tmp}/core.sock"
        self.trust = tmp / "state" / "keys" / "signing.pub"  # `slim serve` makes the core's key there
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._serve: subprocess.Popen[str] | None = None
        self.munge: Path | None = None

    # -- start ------------------------------------------------------------------------
    def start(self) -> SlurmLab:
        tmp = self.tmp
        make_images(tmp / "images")
        node = "  {}: {{macs: ['52:54:00:55:00:{:02x}'], profile: p, environment: base, site: lo}}"
        nodes = "\n".join(node.format(n, i) for i, n in enumerate(self.names, 1))
        self.registry.write_text(
            REGISTRY.format(tmp=tmp, relay=self.relay_port, nodes=nodes + self.registry_nodes(),
                            pools=self.registry_pools(), server=self.registry_server(),
                            relay_extra=self.registry_relay())
        )  # fmt: skip
        reg, store = load_registry(self.registry), Store(tmp / "state" / "store")
        signer = SigningKey.load_or_create(tmp / "state" / "keys")  # what `slim serve` will sign with
        for env in ENVIRONMENTS:
            build_environment(reg, store, env, signer=signer)
        self._break_jdk15(store)
        self._start_serve()
        self.roots.mkdir()
        for n in self.names:  # every node starts on base, booted by the agent
            self.boot(n)
        self._start_slurm()
        return self

    # -- what a lab built on this one adds (labs/harvestlab.py) ----------------------------
    def registry_nodes(self) -> str:
        """More lines of the registry's ``nodes`` (each beginning with a newline)."""
        return ""

    def registry_pools(self) -> str:
        """The registry's ``pools`` section, if any."""
        return ""

    def registry_relay(self) -> str:
        """More of relay r1's settings (", key: value" each); none here."""
        return ""

    def registry_server(self) -> str:
        """More lines of the registry's ``server`` section."""
        return ""

    def slurm_nodes(self) -> dict[str, int]:
        """More Slurm nodes (name -> slurmd port), not started here."""
        return {}

    def slurm_extra(self) -> str:
        """More lines for slurm.conf (after the partition of the lab's nodes)."""
        return ""

    def config_args(self) -> list[str]:
        """More arguments for ``slim slurm config``."""
        return []

    def _break_jdk15(self, store: Store) -> None:
        """Remove the archive of jdk15's / from the store: a boot into jdk15 fails there."""
        found = store.release("jdk15")
        assert found is not None
        archive = found[1].directories["/"].archive
        assert archive is not None
        store.object_path(archive.digest).unlink()

    def _start_serve(self) -> None:
        with open(self.tmp / "serve.log", "w") as err:
            self._serve = subprocess.Popen(
                [*SLIM, "serve", "--registry", str(self.registry)],
                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
            )  # fmt: skip
        assert self._serve.stdout is not None
        try:
            await_ready(self._serve.stdout, self.tmp / "serve.log")
        finally:
            self._serve.stdout.close()

    def boot(self, node: str) -> None:
        """Build ``node``'s root for its next EE with the agent (what a reboot does)."""
        argv = [sys.executable, "-m", "slim.agent", "--no-reboot", "--target", str(self.roots / node),
                "--node", node, "--relay", self.relay, "--trust", str(self.trust)]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"the agent could not boot {node}:\n{proc.stderr[-2000:]}")
        onbehalf.report(self.relay, self.roots / node, "labs.slurmlab")

    def _start_slurm(self) -> None:
        tmp = self.tmp
        slurm = tmp / "slurm"
        (slurm / "state").mkdir(parents=True)
        for n in [*self.names, *self.slurm_nodes()]:
            (slurm / "spool" / n).mkdir(parents=True)
        # munged wants every directory above its socket open to all: not pytest's private tmp
        self.munge = Path(tempfile.mkdtemp(prefix="slim-munge-"))
        self.munge.chmod(0o755)
        key = self.munge / "munge.key"
        subprocess.run(
            ["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True, timeout=30
        )
        key.chmod(0o400)
        subprocess.run(
            ["munged", f"--socket={self.munge}/munge.sock", f"--key-file={key}",
             f"--pid-file={self.munge}/munged.pid", f"--log-file={tmp}/munged.log",
             f"--seed-file={self.munge}/munge.seed"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        subprocess.run(
            [*SLIM, "slurm", "config", "--registry", str(self.registry), "--core", self.core,
             "--slurm-conf", str(self.conf),
             "--reboot", slurmreboot.command(self.roots, self.relay, self.trust),
             "--prolog-log", str(self.prolog_log), "--resume-timeout", "120", *self.config_args()],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        ports = {**{n: free_port() for n in self.names}, **self.slurm_nodes()}
        self.conf.write_text(
            SLURM_CONF.format(
                host=socket.gethostname().split(".")[0], ctld_port=free_port(), tmp=tmp, munge=self.munge,
                slim_lines=(slurm / "slurm.conf.slim").read_text(),
                node_lines="\n".join(f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs=1"
                                      for n, p in ports.items()),
                node_names=",".join(self.names), extra=self.slurm_extra(),
            )
        )  # fmt: skip
        self._run("slurmctld", "-f", str(self.conf))
        for n in self.names:
            self._run("slurmd", "-N", n, "-f", str(self.conf))
        self.wait_nodes(lambda nodes: all(s == "idle" and f == "ee=base" for s, f in nodes.values()), 120)

    def _run(self, *argv: str) -> None:
        """Start a Slurm daemon; it forks into the background and writes its pid file."""
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} did not start: {proc.stderr}")

    # -- Slurm, as a user -------------------------------------------------------------
    def slurm(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=30, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        return proc

    def nodes(self) -> dict[str, tuple[str, str]]:
        """Node -> (state, active features)."""
        out = self.slurm("sinfo", "-N", "-h", "-o", "%N|%T|%b").stdout
        rows = (line.split("|") for line in out.splitlines() if line.count("|") == 2)
        return {r[0]: (r[1], r[2]) for r in rows}

    def wait_nodes(self, cond: object, timeout: float) -> dict[str, tuple[str, str]]:
        assert callable(cond)
        deadline = time.monotonic() + timeout
        nodes: dict[str, tuple[str, str]] = {}
        while time.monotonic() < deadline:
            nodes = {n: v for n, v in self.nodes().items() if n in self.names}
            if len(nodes) == len(self.names) and cond(nodes):
                return nodes
            time.sleep(0.5)
        raise TimeoutError(f"nodes never got there: {nodes}")

    def sbatch(self, *argv: str) -> str:
        out = self.slurm("sbatch", "--parsable", "-o", f"{self.tmp}/job-%j.out", *argv).stdout
        return out.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, NodeList, ...)."""
        out = self.slurm("scontrol", "-o", "show", "job", job).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job} never reached {states}: {info}")

    # -- stop ---------------------------------------------------------------------------
    def close(self) -> None:
        slurm = self.tmp / "slurm"
        pid_files = [*sorted(slurm.glob("slurmd-*.pid")), slurm / "slurmctld.pid"]
        if self.munge is not None:
            pid_files.append(self.munge / "munged.pid")
        for pid_file in pid_files:
            stop_pid_file(pid_file)
        if self._serve is not None and self._serve.poll() is None:
            self._serve.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._serve.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._serve.pid, signal.SIGKILL)
            self._serve.wait()
        if self.munge is not None:
            shutil.rmtree(self.munge, ignore_errors=True)

    def __enter__(self) -> SlurmLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
