"""A simulated RebootProgram for the Slurm lab (labs/slurmlab.py), where nodes are
``slurmd -N NAME`` processes on one host and a node's "disk" is ``ROOTS/NAME``.

``slim slurm config --reboot`` is given::

    env PYTHONPATH=CHECKOUT PYTHON -m labs.slurmreboot --roots DIR --relay URL --node {node}

so Slurm's RebootProgram (``slim slurm reboot``) runs it for the node: it stops the
node's slurmd (power off), clears its root (RAM is gone), runs the agent in no-reboot
mode into it (the boot: the plan of the node's next EE from the relay, every stage
reported to the core) and, if the agent succeeds, starts ``slurmd -b`` again (boot
time taken as now, as Slurm wants after a reboot).  A failed boot leaves slurmd down,
as on real hardware.  The boot's output goes to ``ROOTS/NAME.boot.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from labs import onbehalf
from labs.host import ROOT
from slim.plugin.helper import slurmd_ancestor


def command(roots: Path, relay: str, trust: Path) -> str:
    """The ``--reboot`` template for ``slim slurm config`` ({node}: the node's name);
    ``trust``: the core's public key, which the agent checks plans against."""
    argv = ["env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "labs.slurmreboot",
            "--roots", str(roots), "--relay", relay, "--trust", str(trust)]  # fmt: skip
    return shlex.join(argv) + " --node {node}"


def simulate(
    node: str, root_dir: Path, relay: str, trust: Path, slurm_conf: str, slurmd: str = "slurmd"
) -> None:
    """The reboot: slurmd waits for its RebootProgram, so this returns at once and the rest
    runs detached (see the module's docstring)."""
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
                     "--node", node, "--relay", relay, "--trust", str(trust)]  # fmt: skip
            rc = subprocess.run(agent, timeout=600, check=False).returncode
            print(f"{time.strftime('%T')} agent exited with {rc}", flush=True)
            if rc == 0:
                code = subprocess.run(
                    [slurmd, "-b", "-N", node, "-f", slurm_conf], timeout=60, check=False
                ).returncode
                print(f"{time.strftime('%T')} slurmd -b started ({code})", flush=True)
                if code == 0:  # slurmd stands for the environment: it is up
                    said = onbehalf.report(relay, target, "labs.slurmreboot")
                    print(f"{time.strftime('%T')} reported {said} on the environment's behalf", flush=True)
    finally:
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labs.slurmreboot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--roots", type=Path, required=True, help="the nodes' roots: ROOTS/NAME")
    ap.add_argument("--relay", required=True, help="the relay the simulated nodes boot from")
    ap.add_argument("--node", required=True, help="this node's name")
    ap.add_argument("--trust", type=Path, required=True, help="the core's public key (plans are checked)")
    args = ap.parse_args(argv)
    try:
        simulate(
            args.node,
            args.roots,
            args.relay,
            args.trust,
            os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"),
        )
    except ValueError as exc:
        ap.error(str(exc))  # exits 2, naming what is wrong
    return 0


if __name__ == "__main__":
    sys.exit(main())
