"""Slurm's RebootProgram: reboot this node into the EE the helper staged.

slurmd runs it with no arguments after the helper has asked the core for the
node's next boot.  The action is a command template: ``systemctl reboot`` on
the node itself (the default), or a power-cycle through the node's BMC
(``ipmitool -I lanplus -H {node}-bmc -U admin -E chassis power cycle``, a
Redfish ``curl``...), where ``{node}`` is the node's name.  Network boot does
the rest: the node comes back through PXE into its next EE.
"""

from __future__ import annotations

import shlex
import subprocess


def expand(command: str, node: str) -> str:
    """The command with ``{node}`` replaced (quoted for the shell)."""
    if not command.strip():
        raise ValueError("the reboot command is empty")
    return command.replace("{node}", shlex.quote(node))


def run(command: str, node: str, timeout: float = 300.0) -> int:
    """Run the reboot action; its exit status (what slurmd logs on failure)."""
    return subprocess.run(["/bin/sh", "-c", expand(command, node)], timeout=timeout, check=False).returncode
