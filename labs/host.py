"""What every lab needs of this machine: where the checkout is (processes a lab starts
that import ``labs`` get it on PYTHONPATH: ``labs/`` is not installed with the package),
free ports for servers that must be told theirs before they start, and files read into
the page cache before a measurement."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: labs/ is beside slim/


def lab_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the checkout first on
    PYTHONPATH, for a process that runs ``python -m labs.…``."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the kernel just handed out on ``host``, for servers that must be told a
    port before they start (another process could take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def warm_page_cache(paths: Iterable[Path]) -> float:
    """Read every file of ``paths`` through, so that a measurement after finds its bytes in
    memory; the seconds it took."""
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(1 << 20):
                pass
    return time.perf_counter() - t0


def enroll(ca_dir: Path, name: str, role: str, out: Path) -> Path:
    """An identity directory for ``name`` in ``role`` from the CA in ``ca_dir`` (made if
    missing), as `slim relay enroll` / `slim admin enroll` write it."""
    from slim.pki import CertificateAuthority

    CertificateAuthority.load_or_create(ca_dir).enroll(name, role, out)  # type: ignore[arg-type]
    return out
