"""Slurm's RebootProgram: reboot this node into the EE the helper staged.

slurmd runs it with no arguments after the helper has asked the core for the
node's next boot.  The action is a command template: ``systemctl reboot`` on
the node itself (the default), or a power-cycle through the node's BMC
(``ipmitool -I lanplus -H {node}-bmc -U admin -E chassis power cycle``, a
Redfish ``curl``...), where ``{node}`` is the node's name.  Network boot does
the rest: the node comes back through PXE into its next EE.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from slim.plugin.helper import slurmd_ancestor


def expand(command: str, node: str) -> str:
    """The command with ``{node}`` replaced (quoted for the shell)."""
    if not command.strip():
        raise ValueError("the reboot command is empty")
    return command.replace("{node}", shlex.quote(node))


def run(command: str, node: str, timeout: float = 300.0) -> int:
    """Run the reboot action; its exit status (what slurmd logs on failure)."""
    return subprocess.run(["/bin/sh", "-c", expand(command, node)], timeout=timeout, check=False).returncode


def simulate(node: str, root_dir: Path, relay: str, slurm_conf: str, slurmd: str = "slurmd") -> None:
    """A reboot for tests, where nodes are slurmd processes (``slurmd -N NAME``) on one host
    and a node's "disk" is ``root_dir/NAME``.  slurmd waits for its RebootProgram, so this
    returns at once and the rest runs detached: stop the slurmd that called us (power off),
    clear the node's root (RAM is gone), run the agent in no-reboot mode into it (the boot:
    it fetches the plan of the node's next EE from ``relay`` and reports every stage to the
    core), and if the agent succeeds start ``slurmd -b`` again (boot time taken as now, as
    Slurm wants after a reboot).  A failed boot leaves slurmd down, as on real hardware.
    The boot's output goes to ``root_dir/NAME.boot.log``."""
    found = slurmd_ancestor()
    if found is None:
        raise ValueError("a simulated reboot must be started by slurmd (its RebootProgram)")
    slurmd_pid = found[0]
    if os.fork() > 0:
        return
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    code = 1
    try:
        log = (root_dir / f"{node}.boot.log").open("a")
        with log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            print(
                f"{time.strftime('%T')} simulated reboot of {node}: stopping slurmd (pid {slurmd_pid})",
                flush=True,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(slurmd_pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while Path(f"/proc/{slurmd_pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            target = root_dir / node
            shutil.rmtree(target, ignore_errors=True)
            agent = [sys.executable, "-m", "slim.agent", "--no-reboot", "--target", str(target),
                     "--node", node, "--relay", relay]  # fmt: skip
            rc = subprocess.run(agent, timeout=600, check=False).returncode
            print(f"{time.strftime('%T')} agent exited with {rc}", flush=True)
            if rc == 0:
                code = subprocess.run(
                    [slurmd, "-b", "-N", node, "-f", slurm_conf], timeout=60, check=False
                ).returncode
                print(f"{time.strftime('%T')} slurmd -b started ({code})", flush=True)
    finally:
        os._exit(code)
