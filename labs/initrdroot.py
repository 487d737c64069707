"""The agent's initrd runtime unpacked into a directory and run chrooted there, as the
initrd's /init runs it (the benchmarks and tests that time or check the agent as a node runs
it)."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

from slim.core.build.agentrt import AGENT_ROOT
from slim.core.build.initrd import CpioArchive

# the environment /init gives the agent (core/build/agentrt.py's INIT)
ENV = {"PYTHONPATH": AGENT_ROOT, "PATH": "/bin:/usr/bin", "SLIM_INITRD": "1"}


def unpack(archive: CpioArchive, into: Path) -> Path:
    """``archive``'s files under ``into`` (made here), as the kernel unpacks an initrd."""
    buf = io.BytesIO()
    archive.write_cpio(buf)
    into.mkdir(parents=True)
    subprocess.run(["cpio", "-idm", "--quiet"], input=buf.getvalue(), cwd=into, check=True, timeout=120)
    return into


def python(root: Path, *args: str) -> list[str]:
    """The command line of the runtime's Python at ``root``, chrooted, started as /init
    starts it (``-S -B``), with ``args``."""
    return [shutil.which("chroot") or "/usr/sbin/chroot", str(root), "/usr/bin/python3", "-S", "-B", *args]
